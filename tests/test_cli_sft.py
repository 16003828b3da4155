"""`rlhf sft` end to end on micro configs, and every bad input as one sentence with exit code 2."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MICRO, SFT_CONFIG, assert_one_sentence, rlhf_cmd, run_cli, assert_planned_then_refused_here

CONFIG = SFT_CONFIG


@pytest.fixture(scope="module")
def sft_run(sft_ckpt):
    return sft_ckpt


def test_sft_writes_the_checkpoint_contract(sft_run):
    files = {p.name for p in sft_run.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "rlhf_stage.json", "metrics.jsonl",
            "trainer_state", "eval_samples.jsonl"} <= files
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in files)
    m = json.loads((sft_run / "rlhf_stage.json").read_text())
    assert m["stage"] == "sft" and m["status"] == "complete" and m["step"] == 6
    assert m["config"]["train"]["max_steps"] == 6 and m["data"]["fingerprint"]
    assert {"eval/rouge1", "eval/gold", "eval/loss"} <= set(m["metrics"]) and m["content_hash"]
    assert not sft_run.with_name("sft.partial").exists()
    rows = [json.loads(line) for line in (sft_run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and "eval/gold" in rows[0] and rows[-1]["step"] == 6


def test_checkpoint_loads_with_plain_transformers(sft_run):
    # no rlhf_cli import in the child: only transformers
    code = ("from transformers import AutoModelForCausalLM, AutoTokenizer; import sys; d=sys.argv[1];"
            "m=AutoModelForCausalLM.from_pretrained(d); t=AutoTokenizer.from_pretrained(d);"
            "ids=t('SUBREDDIT: r/tifu', return_tensors='pt').input_ids;"
            "print(m.generate(ids, max_new_tokens=3, pad_token_id=t.pad_token_id).shape[1] - ids.shape[1])")
    out = subprocess.run([sys.executable, "-c", code, str(sft_run)], capture_output=True,
                         text=True, cwd="/", env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3"


def test_existing_output_is_refused_and_untouched(sft_run):
    before = (sft_run / "model.safetensors").stat().st_mtime_ns
    r = run_cli("sft", "--config", CONFIG, "--output-dir", str(sft_run), *MICRO)
    assert_one_sentence(r, "already exists and is not empty; pass --resume or --overwrite")
    assert (sft_run / "model.safetensors").stat().st_mtime_ns == before


def test_resume_of_a_complete_run_does_nothing(sft_run):
    before = (sft_run / "model.safetensors").stat().st_mtime_ns
    r = run_cli("sft", "--config", CONFIG, "--output-dir", str(sft_run), "--resume", *MICRO)
    assert r.exit_code == 0, r.output
    assert (sft_run / "model.safetensors").stat().st_mtime_ns == before


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    r = run_cli("sft", "--config", CONFIG, "--output-dir", str(tmp_path / "x"), "--dry-run", *MICRO)
    assert r.exit_code == 0, r.output
    assert "optimizer_steps" in r.output and "estimated_tokens" in r.output and "learning_rate" in r.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("preset", ["gptj"])
def test_gpu_preset_dry_run_reports_what_it_would_fetch(preset, tmp_path):
    r = run_cli("sft", "--config", CONFIG, "--preset", preset, "--output-dir", str(tmp_path / "g"), "--dry-run")
    assert_planned_then_refused_here(r)
    assert "would fetch model 'EleutherAI/gpt-j-6b'" in " ".join(r.output.split())


def _data_file(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


@pytest.mark.parametrize("case", ["wrong_key", "wrong_type", "missing_config", "missing_data", "empty",
                                  "missing_column", "bad_utf8", "hub_offline", "bad_yaml", "brackets"])
def test_bad_input_is_one_sentence_and_exit_2(case, tmp_path):
    args = ["sft", "--config", CONFIG, "--output-dir", str(tmp_path / "o"), *MICRO]
    expect = {
        "wrong_key": (["--set", "train.lerning_rate=1"], "unknown key 'train.lerning_rate'.*did you mean 'train.learning_rate'"),
        "wrong_type": (["--set", "train.batch_size=lots"], "'train.batch_size'.*integer"),
        "missing_config": ([], "config file .*nope.yaml does not exist"),
        "missing_data": (["--set", f"data.source={tmp_path}/none.jsonl"], "is not a file, a directory"),
        "empty": (["--set", f"data.source={_data_file(tmp_path, [], 'empty.jsonl')}"], "empty.jsonl is empty: it has no rows"),
        "missing_column": (["--set", f"data.source={_data_file(tmp_path, [{'prompt': 'a', 'label': 'b'}] * 4, 'cols.jsonl')}",
                            "--set", "data.format=comparisons"], "has no column 'chosen' needed by format 'comparisons'"),
        "bad_utf8": ([], "line 2 of .*bad.jsonl is not UTF-8 text"),
        "hub_offline": (["--set", "model.name_or_path=someone/missing-model"], "hub is unreachable|cannot load model"),
        "bad_yaml": ([], "not valid YAML"),
        # brackets in a message are text, not markup (rich failed on "[/x]" and the error was lost)
        "brackets": (["--set", f"data.source={tmp_path}/[/x]/none.jsonl"], r"\[/x\]/none.jsonl' is not a file"),
    }[case]
    extra, pattern = expect
    if case == "missing_config":
        args[2] = str(tmp_path / "nope.yaml")
    if case == "bad_utf8":
        p = tmp_path / "bad.jsonl"
        p.write_bytes(b'{"prompt": "a\\nTL;DR:", "label": " b"}\n{"prompt": "\xff\xfe", "label": "x"}\n')
        extra = ["--set", f"data.source={p}"]
    if case == "bad_yaml":
        p = tmp_path / "bad.yaml"
        p.write_text("stage: sft\ntrain: [1, 2\n")
        args[2] = str(p)
    assert_one_sentence(run_cli(*args, *extra), pattern)


def test_trains_on_the_real_tldr_sample_without_code_changes(shared_data, tmp_path):
    src = shared_data / "tldr" / "tldr_sft_carper_format.jsonl"
    r = run_cli("sft", "--config", CONFIG, "--output-dir", str(tmp_path / "real"), *MICRO,
                "--set", f"data.source={src}", "--set", "data.max_examples=64", "--set", "tokenizer.vocab_size=400")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "real" / "rlhf_stage.json").read_text())
    assert m["data"]["format"] == "tldr" and m["data"]["train_examples"] == 64
    assert "eval/rouge1" in m["metrics"] and "eval/gold" not in m["metrics"]  # no gold for real posts


def test_sigkill_then_resume_ends_at_the_planned_step(tmp_path):
    """Kill -9 mid-run after a checkpoint, resume, and finish with a complete checkpoint."""
    out = tmp_path / "sft"
    steps = 300
    args = [*rlhf_cmd(), "sft", "--config", CONFIG, "--output-dir", str(out), *MICRO,
            "--set", f"train.max_steps={steps}", "--set", "checkpoint.interval=10", "--set", "eval.at_start=false"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckdir = Path(str(out) + ".partial") / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckdir.exists() and any(ckdir.glob("step-*/trainer_state/state.json"))):
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "rlhf_stage.json").exists(), "the run finished before it could be killed"
    killed_at = max(int(p.name.split("-")[1]) for p in ckdir.glob("step-*"))
    assert 0 < killed_at < steps
    # without --resume the unfinished run is protected
    refused = subprocess.run(args, capture_output=True, text=True)
    assert refused.returncode == 2 and "pass --resume" in refused.stderr
    resumed = subprocess.run(args + ["--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    m = json.loads((out / "rlhf_stage.json").read_text())
    assert m["status"] == "complete" and m["step"] == steps
    state = json.loads((out / "trainer_state" / "state.json").read_text())["progress"]
    assert state["step"] == steps
    assert not Path(str(out) + ".partial").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    steps_logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == sorted(steps_logged)  # no duplicate records after the resume point


def test_tensorboard_events_land_in_the_checkpoint(tmp_path):
    r = run_cli("sft", "--config", CONFIG, "--output-dir", str(tmp_path / "tb"), *MICRO, "--set", "logging.tensorboard=true")
    assert r.exit_code == 0, r.output
    assert list((tmp_path / "tb" / "tb").glob("events.out.tfevents.*"))
