"""`rlhf grpo` end to end on micro configs (no value head; beta 0 loads no reference), and bad input."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, assert_one_sentence, run_cli

GRPO_CONFIG = str(ROOT / "stage_configs" / "tldr_grpo.yaml")
GOLD_FN = "rlhf_cli.data.synthetic:gold_reward_fn"
GRPO_MICRO = [
    "--set", "data.synthetic.num_train=64", "--set", "data.synthetic.num_eval=8", "--set", "train.batch_size=4",
    "--set", "train.max_steps=4", "--set", "grpo.num_rollouts=8", "--set", "grpo.num_generations=4",
    "--set", "grpo.chunk_size=2", "--set", "grpo.generation.max_new_tokens=8", "--set", "eval.num_samples=8",
    "--set", "eval.generation.max_new_tokens=8", "--set", "checkpoint.interval=0", "--set", "reward.delta=false",
]


@pytest.fixture(scope="module")
def grpo_run(sft_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo") / "grpo"
    r = run_cli("grpo", "--config", GRPO_CONFIG, "--policy", str(sft_ckpt), "--reward-fn", GOLD_FN,
                "--output-dir", str(out), *GRPO_MICRO)
    assert r.exit_code == 0, r.output
    return out


def test_grpo_writes_a_plain_hf_policy_and_logs_group_statistics(grpo_run):
    m = json.loads((grpo_run / "rlhf_stage.json").read_text())
    assert m["status"] == "complete" and m["stage"] == "grpo" and m["step"] == 4
    for key in ("eval/reward", "eval/gold", "eval/kl", "eval/response_length"):
        assert key in m["metrics"] and key in m["initial_metrics"]
    assert m["initial_metrics"]["eval/kl"] == 0.0  # the initial policy is the reference (beta 0.1)
    assert not (grpo_run / "value_head.safetensors").exists()
    code = ("import sys, transformers as t; d = sys.argv[1]; m = t.AutoModelForCausalLM.from_pretrained(d); "
            "t.AutoTokenizer.from_pretrained(d); assert 'rlhf_cli' not in sys.modules; print(type(m).__name__)")
    out = subprocess.run([sys.executable, "-c", code, str(grpo_run)], capture_output=True, text=True)
    assert out.returncode == 0 and "LMHeadModel" in out.stdout, out.stderr
    logged = set().union(*[json.loads(line) for line in (grpo_run / "metrics.jsonl").read_text().splitlines()])
    for key in ("rollout/reward", "rollout/gold", "rollout/reward_std_in_group", "rollout/frac_groups_zero_std",
                "train/clip_low", "train/clip_high", "train/kl", "train/entropy", "rollout/response_length",
                "time/generate"):
        assert key in logged, key


def test_beta_zero_loads_no_reference_and_rloo_trains(sft_ckpt, tmp_path):
    out = tmp_path / "grpo"
    r = run_cli("grpo", "--config", GRPO_CONFIG, "--policy", str(sft_ckpt), "--reward-fn", GOLD_FN, "--output-dir",
                str(out), *GRPO_MICRO, "--set", "grpo.beta=0", "--set", "grpo.advantage=rloo", "--set",
                "grpo.loss_type=dr_grpo", "--set", "grpo.mask_truncated_completions=true", "--set", "train.max_steps=2")
    assert r.exit_code == 0, r.output
    m = json.loads((out / "rlhf_stage.json").read_text())
    assert "eval/kl" not in m["metrics"] and "no reference (beta 0)" in r.output


@pytest.mark.parametrize("extra,pattern", [
    ([], "grpo needs a reward"),
    (["--reward-fn", GOLD_FN, "--set", "grpo.num_generations=1"], "grpo.num_generations is 1; a group needs at least 2"),
    (["--reward-fn", GOLD_FN, "--set", "grpo.num_generations=3"],
     r"grpo.num_rollouts \(8\) must be a multiple of grpo.num_generations \(3\)"),
    (["--reward-fn", GOLD_FN, "--set", "grpo.loss_type=ppo"], "grpo.loss_type"),
])
def test_bad_input_is_one_sentence(extra, pattern, sft_ckpt, tmp_path):
    r = run_cli("grpo", "--config", GRPO_CONFIG, "--policy", str(sft_ckpt), *GRPO_MICRO, *extra,
                "--output-dir", str(tmp_path / "grpo"))
    assert_one_sentence(r, pattern)
    assert not (tmp_path / "grpo").exists()
