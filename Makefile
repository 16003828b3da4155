# rlhf-cli — two commands do all set-up on a fresh machine:
#   make summarize-pipeline     the "Learning to summarize" recipe (tiny preset: CPU, minutes)
#   make hh-pipeline            SFT, PPO, ILQL and DPO on HH dialogues, compared in one table
#   make arith-pipeline         SFT then GRPO with rule-based rewards on arithmetic problems (accuracy up)
#   make test                   the fast test suite (what CI runs)
#   make bench                  rlhf_cli against TRL on identical work -> benchmarks/RESULTS.md (~35 min)
VENV   ?= .venv
PY     := $(VENV)/bin/python
RLHF   := $(VENV)/bin/rlhf
PRESET ?= tiny
RUNS   ?= runs/$(PRESET)

.PHONY: install test test-slow lint bench summarize-pipeline hh-pipeline arith-pipeline clean

# torch first and pinned: 2.13.0 has a CPU wheel on the build machines; a bare `torch`
# requirement would pull several GB of CUDA packages.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# F: errors (undefined names, unused imports); C901: no function of src/ above McCabe complexity 10
lint: install
	$(VENV)/bin/ruff check --select F src tests benchmarks
	$(VENV)/bin/ruff check --select C901 src

test: install lint
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q

test-slow: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -m slow

# Not part of `make test`: TRL 1.16 (the `bench` extra) joins .venv; bench.py makes .bench/trl112 (TRL
# 1.12, the last with PPO) and the workloads, runs every cell A/B and rewrites benchmarks/RESULTS.md.
bench: install
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) benchmarks/bench.py

# sft -> train-rm -> ppo -> eval (SFT and PPO side by side). --resume makes a rerun skip a complete
# stage whose config is unchanged and continue an interrupted one; eval reuses an up-to-date report.
# tiny: the reward model learns from the SFT policy's own samples (4 per prompt, every two compared by the
# gold scorer, 10% of labels flipped), as Stiennon et al.'s labellers compared policy samples; the reference
# pairs alone never show it a hallucinated object, so PPO learned to hallucinate (gold 0.24; 0.47 with these, and 0.82,
# above the references' 0.52, once the SFT policy copies the object: tldr_sft.yaml).
POLICY_COMPARISONS := --set policy_comparisons.samples_per_prompt=4 --set data.synthetic.num_train=3000
summarize-pipeline: install
	$(RLHF) sft --config stage_configs/tldr_sft.yaml --preset $(PRESET) --output-dir $(RUNS)/sft --resume
	$(RLHF) train-rm --config stage_configs/tldr_rm.yaml --preset $(PRESET) --init-from $(RUNS)/sft \
		--output-dir $(RUNS)/rm --resume $(if $(filter tiny,$(PRESET)),$(POLICY_COMPARISONS))
	$(RLHF) ppo --config stage_configs/tldr_ppo.yaml --preset $(PRESET) --policy $(RUNS)/sft \
		--reward-ckpt $(RUNS)/rm --output-dir $(RUNS)/ppo --resume
	$(RLHF) eval --ckpt $(RUNS)/sft --ckpt $(RUNS)/ppo --rouge --reward --reward-ckpt $(RUNS)/rm --win-rate \
		--max-new-tokens $(if $(filter tiny,$(PRESET)),32,50) --output-dir $(RUNS)/eval

# Critic-free RL on a verifiable task: sft on a mediocre student's worked answers, then grpo scored by
# rules (exact_match against the data's answers, answer_format), then one eval of both on held-out problems
# (gold = accuracy, and the exact-match reward beside it).
ARITH := $(RUNS)/arith
arith-pipeline: install
	$(RLHF) sft --config stage_configs/arith_sft.yaml --preset $(PRESET) --output-dir $(ARITH)/sft --resume
	$(RLHF) grpo --config stage_configs/arith_grpo.yaml --preset $(PRESET) --policy $(ARITH)/sft \
		--output-dir $(ARITH)/grpo --resume
	$(RLHF) eval --ckpt $(ARITH)/sft --ckpt $(ARITH)/grpo --no-rouge --reward \
		--reward-fn rlhf_cli.rewards.rules:exact_match --num-samples 1024 --output-dir $(ARITH)/eval

# The HH workflow, one data set, every method: sft -> rm, then ppo, ilql and dpo from the sft
# checkpoint, then one eval of all of them side by side (ILQL steered with beta 4).
HH := $(RUNS)/hh
hh-pipeline: install
	$(RLHF) sft --config stage_configs/hh_sft.yaml --preset $(PRESET) --output-dir $(HH)/sft --resume
	$(RLHF) train-rm --config stage_configs/hh_rm.yaml --preset $(PRESET) --init-from $(HH)/sft \
		--output-dir $(HH)/rm --resume
	$(RLHF) ppo --config stage_configs/hh_ppo.yaml --preset $(PRESET) --policy $(HH)/sft \
		--reward-ckpt $(HH)/rm --output-dir $(HH)/ppo --resume
	$(RLHF) ilql --config stage_configs/hh_ilql.yaml --preset $(PRESET) --policy $(HH)/sft \
		--output-dir $(HH)/ilql --resume
	$(RLHF) dpo --config stage_configs/hh_dpo.yaml --preset $(PRESET) --policy $(HH)/sft \
		--output-dir $(HH)/dpo --resume
	$(RLHF) eval --ckpt $(HH)/sft --ckpt $(HH)/ppo --ckpt $(HH)/ilql --ckpt $(HH)/dpo --beta 4 --rouge \
		--reward --reward-ckpt $(HH)/rm --win-rate --max-new-tokens $(if $(filter tiny,$(PRESET)),40,128) \
		--output-dir $(HH)/eval

clean:
	rm -rf runs .bench
