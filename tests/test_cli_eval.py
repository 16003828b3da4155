"""`rlhf eval`: the report's numbers on fixed tiny inputs, ILQL checkpoints with --beta, bad input."""

import json

import pytest
from conftest import ROOT, assert_one_sentence, run_cli

GOLD_FN = "rlhf_cli.data.synthetic:gold_reward_fn"


def _flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines at the terminal width


def test_rouge_against_a_hand_checked_pair():
    from rlhf_cli.metrics import rouge

    r = rouge(["the cat sat"], ["the cat sat on the mat"])
    # unigrams: precision 3/3, recall 3/6 -> F 2/3; bigrams: 2/2 and 2/5 -> F 4/7; LCS 3 -> F 2/3
    assert r["rouge1"] == pytest.approx(2 / 3)
    assert r["rouge2"] == pytest.approx(4 / 7)
    assert r["rougeL"] == pytest.approx(2 / 3)


def test_eval_report_numbers_and_files(sft_ckpt, tmp_path):
    out = tmp_path / "eval"
    r = run_cli("eval", "--ckpt", str(sft_ckpt), "--ckpt", str(sft_ckpt), "--reward", "--reward-fn", GOLD_FN,
                "--num-samples", "6", "--max-new-tokens", "6", "--output-dir", str(out))
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    a, b = rep["results"]
    assert a == {**b, "checkpoint": a["checkpoint"]}  # same model, same seed: same numbers
    assert a["kl"] == pytest.approx(0.0, abs=1e-6)  # its own reference
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6
    name = a["checkpoint"]
    rewards = [s[name]["reward"] for s in samples]
    assert a["reward"] == pytest.approx(sum(rewards) / 6)
    assert a["gold"] == pytest.approx(a["reward"])  # the reward function is the gold scorer
    deltas = [s[name]["reward"] - s["reference_reward"] for s in samples]
    assert a["reward_delta"] == pytest.approx(sum(deltas) / 6)
    for f in ("report.md", "reward_vs_kl.png", "reward_distribution.png"):
        assert (out / f).stat().st_size > 0
    assert "reward Δ" in (out / "report.md").read_text()


def test_eval_steers_an_ilql_checkpoint_with_beta(sft_ckpt, tmp_path):
    ilql = tmp_path / "ilql"
    r = run_cli("ilql", "--config", str(ROOT / "stage_configs" / "tldr_ilql.yaml"), "--policy", str(sft_ckpt),
                "--output-dir", str(ilql), "--set", "data.synthetic.num_train=32", "--set", "data.synthetic.num_eval=4",
                "--set", "train.batch_size=8", "--set", "train.max_steps=2", "--set", "eval.num_samples=2",
                "--set", "eval.generation.max_new_tokens=4", "--set", "ilql.gen_betas=[0]")
    assert r.exit_code == 0, r.output
    r = run_cli("eval", "--ckpt", str(ilql), "--beta", "0", "--beta", "2", "--num-samples", "4", "--max-new-tokens",
                "4", "--output-dir", str(tmp_path / "eval"))
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert [r["checkpoint"].rsplit(" (", 1)[1] for r in rep["results"]] == ["beta 0)", "beta 2)"]  # a sweep
    assert all("gold" in r for r in rep["results"])


@pytest.mark.parametrize("args,pattern", [
    (["--ckpt", "no/such/dir"], "checkpoint no/such/dir does not exist"),
    (["--ckpt", "SFT", "--reward"], "--reward needs"),
])
def test_eval_bad_input(args, pattern, sft_ckpt, tmp_path):
    args = [str(sft_ckpt) if a == "SFT" else a for a in args]
    assert_one_sentence(run_cli("eval", *args, "--output-dir", str(tmp_path / "e")), pattern)


def test_resume_skips_an_unchanged_stage_and_retrains_a_changed_one(tmp_path):
    from conftest import MICRO, SFT_CONFIG

    out = tmp_path / "sft"
    args = ["sft", "--config", SFT_CONFIG, "--output-dir", str(out), *MICRO, "--set", "checkpoint.interval=0"]
    assert run_cli(*args).exit_code == 0
    before = (out / "model.safetensors").read_bytes()
    again = run_cli(*args, "--resume")
    assert again.exit_code == 0 and "already complete" in _flat(again.output)
    assert (out / "model.safetensors").read_bytes() == before
    changed = run_cli(*args, "--resume", "--set", "train.learning_rate=0.01")
    assert changed.exit_code == 0 and "different config (train.learning_rate)" in _flat(changed.output)
    m = json.loads((out / "rlhf_stage.json").read_text())
    assert m["status"] == "complete" and m["config"]["train"]["learning_rate"] == 0.01
    assert (out / "model.safetensors").read_bytes() != before


def test_eval_reuses_an_up_to_date_report(sft_ckpt, tmp_path):
    args = ["eval", "--ckpt", str(sft_ckpt), "--num-samples", "3", "--max-new-tokens", "4",
            "--output-dir", str(tmp_path / "e")]
    first = run_cli(*args)
    assert first.exit_code == 0, first.output
    second = run_cli(*args)
    assert second.exit_code == 0 and "up to date" in _flat(second.output)
    assert "up to date" not in _flat(run_cli(*args[:-2], "--seed", "7", "--output-dir", str(tmp_path / "e")).output)


def test_win_rates_against_the_references_and_head_to_head_and_a_self_contained_html(sft_ckpt, tmp_path):
    import re

    from rlhf_cli.data.synthetic import gold_score

    out = tmp_path / "eval"
    r = run_cli("eval", "--ckpt", str(sft_ckpt), "--win-rate", "--num-samples", "12", "--max-new-tokens", "8",
                "--temperature", "1.5", "--output-dir", str(out))
    assert r.exit_code == 0, r.output
    rows = json.loads((out / "report.json").read_text())["results"]
    mine, refs = rows
    assert refs["checkpoint"] == "reference completions"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    name = mine["checkpoint"]
    ref_gold = [gold_score(s["prompt"], s["reference"]) for s in samples]
    by_hand = sum(1.0 if s[name]["gold"] > g else 0.5 if s[name]["gold"] == g else 0.0
                  for s, g in zip(samples, ref_gold)) / 12
    assert mine["win_rate"] == pytest.approx(by_hand) and mine["win_rate_judge"] == "gold"
    assert mine["win_rate_lo"] <= mine["win_rate"] <= mine["win_rate_hi"]
    assert refs["gold"] == pytest.approx(sum(ref_gold) / 12)
    words = [len(s[name]["completion"].split()) - len(s["reference"].split()) for s in samples]
    assert mine["length_difference"] == pytest.approx(sum(words) / 12) and 0 <= mine["win_rate_lc"] <= 1
    page = (out / "report.html").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs and page.count('src="data:image/png;base64,') == len(pngs)
    assert not re.search(r'(src|href)="(?!data:)', page) and "<script" not in page and "<link" not in page
    assert "win rate" in page and samples[0]["reference"][:20].replace("&", "&amp;") in page

    assert_one_sentence(run_cli("eval", "--ckpt", str(sft_ckpt), "--against", str(sft_ckpt), "--output-dir",
                                str(tmp_path / "none")), r"--against .* needs another --ckpt to compare with it")
    import shutil

    twin = tmp_path / "twin"  # the same weights: every completion the same, so every pair a tie
    shutil.copytree(sft_ckpt, twin)
    r = run_cli("eval", "--ckpt", str(twin), "--against", str(sft_ckpt), "--num-samples", "6", "--max-new-tokens",
                "4", "--output-dir", str(tmp_path / "h2h"))
    assert r.exit_code == 0, r.output
    twin_row, base_row = json.loads((tmp_path / "h2h" / "report.json").read_text())["results"]
    assert (twin_row["win_rate"], twin_row["win_rate_lo"], twin_row["win_rate_hi"]) == (0.5, 0.5, 0.5)
    assert twin_row["win_rate_against"] == str(sft_ckpt) and "win_rate" not in base_row


EXACT_METRIC = '''
import datasets
import evaluate


class ExactShare(evaluate.Metric):
    """The share of completions equal to their reference, and their mean length in characters."""

    def _info(self):
        return evaluate.MetricInfo(description="exact share", citation="", inputs_description="",
                                   features=datasets.Features({"predictions": datasets.Value("string"),
                                                               "references": datasets.Value("string")}))

    def _compute(self, predictions, references):
        return {"exact": sum(p == r for p, r in zip(predictions, references)) / len(predictions),
                "chars": sum(map(len, predictions)) / len(predictions)}
'''


def test_an_evaluate_metric_from_a_local_script_and_one_that_cannot_load(sft_ckpt, tmp_path):
    script = tmp_path / "exact_share.py"
    script.write_text(EXACT_METRIC)
    out = tmp_path / "eval"
    r = run_cli("eval", "--ckpt", str(sft_ckpt), "--metric", str(script), "--num-samples", "5", "--max-new-tokens",
                "4", "--output-dir", str(out))
    assert r.exit_code == 0, r.output
    row = json.loads((out / "report.json").read_text())["results"][0]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    texts = [s[row["checkpoint"]]["completion"] for s in samples]
    assert row["metric/exact_share/chars"] == pytest.approx(sum(map(len, texts)) / 5)
    assert row["metric/exact_share/exact"] == 0.0
    assert "exact_share/chars" in (out / "report.md").read_text()
    assert_one_sentence(run_cli("eval", "--ckpt", str(sft_ckpt), "--metric", str(tmp_path / "missing.py"),
                                "--output-dir", str(tmp_path / "e2")), r"--metric .*missing.py cannot be loaded")


def test_curves_along_training_proxy_and_gold_against_sqrt_kl_and_the_dpo_signature(sft_ckpt, tmp_path):
    """PPO and DPO evaluate every 2 steps (KL to their reference included); `rlhf eval` reads those evals back
    and draws Gao et al.'s figure and DPO's training signature into report.html."""
    micro = ["--set", "data.synthetic.num_train=32", "--set", "data.synthetic.num_eval=4", "--set", "eval.num_samples=4",
             "--set", "eval.generation.max_new_tokens=4", "--set", "eval.interval=2", "--set", "checkpoint.interval=0",
             "--set", "train.log_interval=1"]
    r = run_cli("dpo", "--config", str(ROOT / "stage_configs" / "tldr_dpo.yaml"), "--policy", str(sft_ckpt),
                "--output-dir", str(tmp_path / "dpo"), *micro, "--set", "train.batch_size=4", "--set", "train.max_steps=6")
    assert r.exit_code == 0, r.output
    r = run_cli("ppo", "--config", str(ROOT / "stage_configs" / "tldr_ppo.yaml"), "--policy", str(sft_ckpt),
                "--reward-fn", GOLD_FN, "--no-delta", "--output-dir", str(tmp_path / "ppo"), *micro,
                "--set", "train.batch_size=4", "--set", "train.max_steps=6", "--set", "ppo.num_rollouts=4",
                "--set", "ppo.chunk_size=4", "--set", "ppo.ppo_epochs=1", "--set", "ppo.generation.max_new_tokens=4",
                "--set", "ppo.num_layers_unfrozen=1")
    assert r.exit_code == 0, r.output
    out = tmp_path / "eval"
    r = run_cli("eval", "--ckpt", str(tmp_path / "dpo"), "--ckpt", str(tmp_path / "ppo"), "--num-samples", "4",
                "--max-new-tokens", "4", "--output-dir", str(out))
    assert r.exit_code == 0, r.output
    curves = json.loads((out / "report.json").read_text())["curves"]
    for name in ("dpo", "ppo"):  # at the start, every 2 steps, at the end
        points = curves[str(tmp_path / name)]
        assert [p["step"] for p in points] == [0, 2, 4, 6], points
        assert points[0]["kl"] == pytest.approx(0.0, abs=1e-5) and all(p["gold"] is not None for p in points)
    assert all(p["reward"] is not None for p in curves[str(tmp_path / "ppo")])
    page = (out / "report.html").read_text()
    for figure in ("overoptimization", "dpo_training"):
        assert (out / f"{figure}.png").stat().st_size > 0 and f'alt="{figure}"' in page
