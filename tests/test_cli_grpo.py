"""`rlhf grpo` end to end on micro configs (no value head; beta 0 loads no reference), and bad input."""

import json
import re
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


BAD_REWARDS = ("def short(samples, prompts, outputs, **kw):\n    return [1.0] * (len(outputs) - 1)\n"
               "def nan(samples, prompts, outputs, **kw):\n    return [float('nan')] * len(outputs)\n"
               "def words(samples, prompts, outputs, **kw):\n    return ['good'] * len(outputs)\n")


@pytest.mark.parametrize("fn,pattern", [
    ("short", r"at step 0 \(iteration 1\): reward function bad_rewards:short returned 7 scores for 8 samples"),
    ("nan", r"at step 0 \(iteration 1\): reward function bad_rewards:nan returned a non-finite score \(nan\)"),
    ("words", r"reward function bad_rewards:words returned str 'good' for sample 0; a score must be a number"),
])
def test_a_bad_reward_function_stops_grpo_in_one_sentence(fn, pattern, sft_ckpt, tmp_path, monkeypatch):
    (tmp_path / "bad_rewards.py").write_text(BAD_REWARDS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    r = run_cli("grpo", "--config", GRPO_CONFIG, "--policy", str(sft_ckpt), "--reward-fn", f"bad_rewards:{fn}",
                *GRPO_MICRO, "--set", "eval.at_start=false", "--output-dir", str(tmp_path / "grpo"))
    assert r.exit_code == 2 and "Traceback" not in r.output
    error = r.stderr[r.stderr.index("error:"):]  # the progress shown before it, then the one sentence
    assert re.search(pattern, " ".join(error.split())), error
    assert not (tmp_path / "grpo").exists()  # no checkpoint was complete: nothing presented as one


@pytest.mark.parametrize("sets,pattern", [
    (["reward.sources=[{fn: rlhf_cli.rewards.rules:exact_match}, {fn: rlhf_cli.rewards.rules:answer_format}]",
      "reward.weights=[1.0]"], r"reward.weights has 1 weight\(s\) for 2 reward source\(s\)"),
    (["reward.weights=[1.0, 2.0]"], "reward.weights weighs the entries of reward.sources, and there are none"),
    (["reward.sources=[{fn: rlhf_cli.rewards.rules:exact_match, url: 'http://localhost:1'}]"],
     r"reward.sources\[0\] must give exactly one of ckpt, fn, url, classifier"),
])
def test_bad_reward_sources_are_one_sentence(sets, pattern, sft_ckpt, tmp_path):
    r = run_cli("grpo", "--config", GRPO_CONFIG, "--policy", str(sft_ckpt), *GRPO_MICRO,
                *[x for s in sets for x in ("--set", s)], "--output-dir", str(tmp_path / "grpo"))
    assert_one_sentence(r, pattern)
    assert not (tmp_path / "grpo").exists()


def test_arith_with_weighted_rule_rewards_logs_each_source(sft_ckpt, tmp_path):
    """synthetic:arith, scored by exact_match (against the data's `answer` column) + answer_format: each
    source is logged on its own, and the gold score is the exact-match accuracy."""
    out = tmp_path / "grpo"
    sources = ("reward.sources=[{fn: rlhf_cli.rewards.rules:exact_match, weight: 1.0}, "
               "{fn: rlhf_cli.rewards.rules:answer_format, weight: 0.1}]")
    r = run_cli("grpo", "--config", GRPO_CONFIG, "--policy", str(sft_ckpt), *GRPO_MICRO, "--set", sources,
                "--set", "data.source=synthetic:arith", "--set", "train.max_steps=2", "--output-dir", str(out))
    assert r.exit_code == 0, r.output
    assert "1 x exact_match + 0.1 x answer_format" in " ".join(r.output.split())
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*logged)
    for key in ("rollout/reward/exact_match", "rollout/reward/answer_format", "eval/reward/exact_match",
                "eval/reward/answer_format", "eval/gold"):
        assert key in keys, key
    for row in logged:
        if "eval/gold" in row:  # on arith, the gold score is the exact-match accuracy
            assert row["eval/gold"] == row["eval/reward/exact_match"]
        if "rollout/reward" in row:
            assert row["rollout/reward"] == pytest.approx(row["rollout/reward/exact_match"]
                                                          + 0.1 * row["rollout/reward/answer_format"])


ARITH_CONFIG = str(ROOT / "stage_configs" / "arith_grpo.yaml")


def test_the_gsm8k_preset_plans_on_this_machine():
    from conftest import assert_planned_then_refused_here

    r = run_cli("grpo", "--config", ARITH_CONFIG, "--preset", "qwen2.5-1.5b", "--dry-run")
    assert_planned_then_refused_here(r)  # the plan, then: the hub is unreachable here
    text = " ".join(r.output.split())
    assert "Qwen/Qwen2.5-1.5B-Instruct" in text and "1 x exact_match + 0.1 x answer_format" in text


def test_gsm8k_shaped_data_with_a_system_prompt_trains_on_the_reference_answers(sft_ckpt, tmp_path):
    """The GSM8K preset's path, offline: {question, answer} rows renamed to prompt-completion, opened by a
    system prompt and rendered by the chat template; exact_match reads the truth from each reference's
    '#### N' (the rendered reply ends in the template's end-of-turn token)."""
    rows = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
             "answer": f"He has {a} + {b} = {a + b} apples.\n#### {a + b}"} for a in range(1, 9) for b in range(1, 9)]
    data = tmp_path / "gsm8k_like.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "grpo"
    r = run_cli("grpo", "--config", ARITH_CONFIG, "--policy", str(sft_ckpt), *GRPO_MICRO, "--output-dir", str(out),
                "--set", f"data.source={data}", "--set", "data.columns.prompt=question", "--set", "data.columns.completion=answer",
                "--set", "data.system_prompt=Give the final number in <answer></answer> tags.",
                "--set", f"data.chat_template={ROOT / 'stage_configs' / 'chatml.jinja'}", "--set", "train.max_steps=2")
    assert r.exit_code == 0, r.output
    samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert samples[0]["prompt"].startswith("<|im_start|>system\nGive the final number in <answer></answer> tags.")
    assert "<|im_start|>user\nTom has" in samples[0]["prompt"]
    from rlhf_cli.rewards.rules import exact_match
    truth = [s["reference"].split("#### ")[1].split("<")[0] for s in samples]
    assert exact_match(outputs=[f"<answer>{t}</answer>" for t in truth],
                       references=[s["reference"] for s in samples]) == [1.0] * len(samples)


@pytest.mark.slow  # ~6 min: the README's arith table
def test_arith_pipeline_raises_held_out_accuracy_by_15_points(tmp_path):
    """make arith-pipeline's three commands: sft, grpo with rule-based rewards, eval of both on held-out problems."""
    cfg = ROOT / "stage_configs"
    for args in (["sft", "--config", str(cfg / "arith_sft.yaml"), "--output-dir", str(tmp_path / "sft")],
                 ["grpo", "--config", str(cfg / "arith_grpo.yaml"), "--policy", str(tmp_path / "sft"),
                  "--output-dir", str(tmp_path / "grpo")],
                 ["eval", "--ckpt", str(tmp_path / "sft"), "--ckpt", str(tmp_path / "grpo"), "--no-rouge", "--reward",
                  "--reward-fn", "rlhf_cli.rewards.rules:exact_match", "--num-samples", "1024",
                  "--output-dir", str(tmp_path / "eval")]):
        r = run_cli(*args)
        assert r.exit_code == 0, r.output
    sft, grpo = json.loads((tmp_path / "eval" / "report.json").read_text())["results"]
    assert grpo["gold"] - sft["gold"] >= 0.15, (sft["gold"], grpo["gold"])
    assert grpo["reward"] == grpo["gold"]  # exact_match against the answer column is the accuracy
