# rlhf-cli — two commands do all set-up on a fresh machine:
#   make summarize-pipeline     the "Learning to summarize" recipe (tiny preset: CPU, minutes)
#   make test                   the fast test suite (what CI runs)
VENV   ?= .venv
PY     := $(VENV)/bin/python
RLHF   := $(VENV)/bin/rlhf
PRESET ?= tiny
RUNS   ?= runs/$(PRESET)

.PHONY: install test test-slow lint summarize-pipeline clean

# torch first and pinned: 2.13.0 has a CPU wheel on the build machines; a bare `torch`
# requirement would pull several GB of CUDA packages.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check --select F src tests

test: install lint
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q

test-slow: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -m slow

# sft -> train-rm -> ppo (-> eval lands with its stage). --resume makes a rerun skip a
# complete stage and continue an interrupted one.
summarize-pipeline: install
	$(RLHF) sft --config stage_configs/tldr_sft.yaml --preset $(PRESET) --output-dir $(RUNS)/sft --resume
	$(RLHF) train-rm --config stage_configs/tldr_rm.yaml --preset $(PRESET) --init-from $(RUNS)/sft \
		--output-dir $(RUNS)/rm --resume
	$(RLHF) ppo --config stage_configs/tldr_ppo.yaml --preset $(PRESET) --policy $(RUNS)/sft \
		--reward-ckpt $(RUNS)/rm --output-dir $(RUNS)/ppo --resume

clean:
	rm -rf runs
