"""`rlhf dpo` end to end on micro configs: the DPO signature, the cached reference, real HH data."""

import json

import pytest
from conftest import ROOT, assert_one_sentence, run_cli, assert_planned_then_refused_here

DPO_CONFIG = str(ROOT / "stage_configs" / "tldr_dpo.yaml")
DPO_MICRO = ["--set", "data.synthetic.num_train=48", "--set", "data.synthetic.num_eval=16", "--set", "train.batch_size=8",
             "--set", "train.max_steps=6", "--set", "eval.num_samples=8", "--set", "eval.generation.max_new_tokens=8",
             "--set", "checkpoint.interval=3", "--set", "train.log_interval=1", "--set", "train.learning_rate=1e-2"]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dpo_run(sft_ckpt):
    out = sft_ckpt.parent / "dpo"
    r = run_cli("dpo", "--config", DPO_CONFIG, "--policy", str(sft_ckpt), "--output-dir", str(out), *DPO_MICRO)
    assert r.exit_code == 0, r.output
    return out


def test_dpo_starts_at_log_2_with_even_accuracy_and_learns(dpo_run):
    rows = metrics(dpo_run)
    start = rows[0]
    assert start["step"] == 0 and abs(start["eval/loss"] - 0.6931472) < 1e-6  # policy == reference
    assert start["eval/rewards/accuracies"] == 0.5 and start["eval/rewards/margins"] == 0.0
    # learned: judged on the held-out pairs at the end, not on one noisy last training batch (lr 1e-2)
    end = [r for r in rows if "eval/loss" in r][-1]
    assert end["step"] == 6 and end["eval/rewards/margins"] > 0 and end["eval/loss"] < 0.6931
    assert len([r for r in rows if "train/loss" in r]) == 6
    m = json.loads((dpo_run / "rlhf_stage.json").read_text())
    assert m["stage"] == "dpo" and m["reference"] == "frozen copy"
    assert {"eval/rewards/chosen", "eval/rewards/rejected", "eval/logps/chosen", "eval/logps/rejected",
            "eval/gold"} <= set(m["metrics"])


def test_cached_reference_gives_the_same_losses(dpo_run, sft_ckpt, tmp_path):
    out = tmp_path / "dpo_cached"
    args = ["dpo", "--config", DPO_CONFIG, "--policy", str(sft_ckpt), "--output-dir", str(out), *DPO_MICRO,
            "--set", "precompute_ref_logps=true", "--set", f"ref_cache_dir={tmp_path / 'cache'}"]
    r = run_cli(*args)
    assert r.exit_code == 0, r.output
    assert "computed once and cached" in r.output
    cached = [x["train/loss"] for x in metrics(out) if "train/loss" in x]
    plain = [x["train/loss"] for x in metrics(dpo_run) if "train/loss" in x]
    assert len(cached) == len(plain) == 6
    assert max(abs(a - b) for a, b in zip(cached, plain)) < 1e-4
    # a second run reads the cache; other data means another key
    r = run_cli(*[a if a != str(out) else str(tmp_path / "again") for a in args])
    assert r.exit_code == 0 and "from the cache" in r.output
    r = run_cli(*[a if a != str(out) else str(tmp_path / "other") for a in args], "--set", "data.synthetic.seed=5")
    assert r.exit_code == 0 and "computed once and cached" in r.output
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


def test_dpo_refuses_a_reward_model_as_policy(tmp_path, sft_ckpt):
    rm = tmp_path / "rm"
    r = run_cli("train-rm", "--config", str(ROOT / "stage_configs" / "tldr_rm.yaml"), "--init-from", str(sft_ckpt),
                "--output-dir", str(rm), "--set", "train.max_steps=1", "--set", "data.synthetic.num_train=16",
                "--set", "data.synthetic.num_eval=4", "--set", "eval.at_start=false")
    assert r.exit_code == 0, r.output
    assert_one_sentence(run_cli("dpo", "--config", DPO_CONFIG, "--policy", str(rm), "--output-dir", str(tmp_path / "d")),
                        "is a reward checkpoint, but a policy")


def test_dpo_runs_unchanged_on_real_hh(shared_data, sft_ckpt, tmp_path):
    out = tmp_path / "hh"
    r = run_cli("dpo", "--config", str(ROOT / "stage_configs" / "hh_dpo.yaml"), "--policy", str(sft_ckpt),
                "--output-dir", str(out), *DPO_MICRO,
                "--set", f"data.source={shared_data / 'hh_rlhf' / 'harmless-base_test.jsonl.gz'}",
                "--set", "data.max_examples=32")
    assert r.exit_code == 0, r.output
    m = json.loads((out / "rlhf_stage.json").read_text())
    assert m["data"]["format"] == "hh" and "eval/rewards/accuracies" in m["metrics"]


@pytest.mark.parametrize("config,presets", [("tldr_dpo.yaml", ["gptj"]), ("hh_dpo.yaml", ["125M", "1B", "6B", "20B"])])
def test_dpo_gpu_presets_dry_run(config, presets, tmp_path):
    for preset in presets:
        r = run_cli("dpo", "--config", str(ROOT / "stage_configs" / config), "--preset", preset,
                    "--output-dir", str(tmp_path / preset), "--dry-run")
        assert "would fetch" in r.output
        assert_planned_then_refused_here(r)


@pytest.mark.parametrize("stage", ["train-rm", "dpo"])
def test_sigkill_then_resume_for_rm_and_dpo(stage, sft_ckpt, tmp_path):
    """Kill -9 after an intermediate checkpoint, resume, and finish complete at the planned step."""
    import signal
    import subprocess
    import time
    from pathlib import Path

    from conftest import rlhf_cmd

    out, steps = tmp_path / stage, 400
    config = {"train-rm": "tldr_rm.yaml", "dpo": "tldr_dpo.yaml"}[stage]
    parent = ["--init-from", str(sft_ckpt)] if stage == "train-rm" else ["--policy", str(sft_ckpt)]
    args = [*rlhf_cmd(), stage, "--config", str(ROOT / "stage_configs" / config), *parent, "--output-dir", str(out),
            "--set", "data.synthetic.num_train=64", "--set", "data.synthetic.num_eval=8", "--set", "train.batch_size=4",
            "--set", f"train.max_steps={steps}", "--set", "checkpoint.interval=10", "--set", "eval.at_start=false",
            "--set", "eval.num_samples=4", "--set", "eval.generation.max_new_tokens=4"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckdir = Path(str(out) + ".partial") / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not any(ckdir.glob("step-*/trainer_state/state.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "rlhf_stage.json").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(args + ["--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    m = json.loads((out / "rlhf_stage.json").read_text())
    assert m["status"] == "complete" and m["step"] == steps
    assert not Path(str(out) + ".partial").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
