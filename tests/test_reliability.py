"""Crash safety and graceful stops across stages."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MICRO, SFT_CONFIG, rlhf_cmd


def _wait_for(path: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not path.exists():
        time.sleep(0.05)


def test_sigterm_saves_a_checkpoint_then_resume_finishes(tmp_path):
    out = tmp_path / "sft"
    args = [*rlhf_cmd(), "sft", "--config", SFT_CONFIG, "--output-dir", str(out), *MICRO,
            "--set", "train.max_steps=400", "--set", "checkpoint.interval=0", "--set", "eval.at_start=false",
            "--set", "train.log_interval=1"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(Path(str(out) + ".partial") / "metrics.jsonl")
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "stopped at step" in " ".join(stderr.split())
    saved = list((Path(str(out) + ".partial") / "checkpoints").glob("step-*/trainer_state/state.json"))
    assert len(saved) == 1  # checkpoint.interval is 0: this one exists only because of the signal
    # a resume that would train something else (here another learning rate) is refused, nothing touched
    changed = subprocess.run(args + ["--resume", "--set", "train.learning_rate=5e-4"], capture_output=True, text=True)
    assert changed.returncode == 2 and "train.learning_rate" in changed.stderr, changed.stderr
    assert len(changed.stderr.strip().splitlines()) == 1 and "Traceback" not in changed.stderr
    assert list((Path(str(out) + ".partial") / "checkpoints").glob("step-*/trainer_state/state.json")) == saved
    resumed = subprocess.run(args + ["--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    m = json.loads((out / "rlhf_stage.json").read_text())
    assert m["status"] == "complete" and m["step"] == 400
    # the stopped-and-resumed run matches one that was never interrupted
    straight = [a if a != str(out) else str(tmp_path / "straight") for a in args]
    assert subprocess.run(straight, capture_output=True).returncode == 0
    s = json.loads((tmp_path / "straight" / "rlhf_stage.json").read_text())
    assert m["metrics"] == pytest.approx(s["metrics"], rel=1e-4, abs=1e-5)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    from conftest import run_cli

    from rlhf_cli import checkpoint as ck

    out = tmp_path / "sft"
    args = ["sft", "--config", SFT_CONFIG, "--output-dir", str(out), *MICRO, "--set", "checkpoint.interval=0"]
    assert run_cli(*args).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "save_trainer_state", full)
    r = run_cli(*args, "--overwrite", "--set", "train.learning_rate=0.01")
    # training ran first (its progress is on stderr); the failure itself is the one error line at the end
    assert r.exit_code == 2 and "Traceback" not in r.output
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the disk is full: writing") and "nothing was replaced" in last
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_the_reward_token_is_sent_but_never_written(sft_ckpt, tmp_path, monkeypatch):
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from conftest import ROOT, run_cli

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append(self.headers.get("Authorization"))
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            data = json.dumps({"rewards": [float(len(c)) / 10 for c in body["completions"]]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    secret = "tok-3f9a-very-secret"
    monkeypatch.setenv("RLHF_REWARD_TOKEN", secret)
    out = tmp_path / "ppo"
    try:
        r = run_cli("ppo", "--config", str(ROOT / "stage_configs" / "tldr_ppo.yaml"), "--policy", str(sft_ckpt),
                    "--reward-url", f"http://127.0.0.1:{server.server_port}/score", "--output-dir", str(out),
                    "--set", "data.synthetic.num_train=32", "--set", "data.synthetic.num_eval=4",
                    "--set", "train.batch_size=4", "--set", "train.max_steps=2", "--set", "ppo.num_rollouts=4",
                    "--set", "ppo.chunk_size=4", "--set", "ppo.ppo_epochs=2", "--set", "ppo.num_layers_unfrozen=1",
                    "--set", "ppo.generation.max_new_tokens=4", "--set", "eval.num_samples=4",
                    "--set", "eval.generation.max_new_tokens=4", "--set", "checkpoint.interval=1",
                    "--set", "logging.tensorboard=true")
    finally:
        server.shutdown()
    assert r.exit_code == 0, r.output
    assert seen and all(h == f"Bearer {secret}" for h in seen)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 10
    for p in files:
        assert secret.encode() not in p.read_bytes(), p
    assert secret not in r.output


def test_ctrl_c_during_generation_exits_130_in_one_line(sft_ckpt, tmp_path):
    proc = subprocess.Popen([*rlhf_cmd(), "eval", "--ckpt", str(sft_ckpt), "--num-samples", "4000",
                             "--max-new-tokens", "64", "--batch-size", "4", "--output-dir", str(tmp_path / "e")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    while proc.poll() is None and "sampling from" not in " ".join(seen):  # inside generation (a loaded CPU
        seen.append(proc.stderr.readline())  # can take long to get there: wait for the sign, not a clock)
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in stderr
    last = [line for line in stderr.strip().splitlines() if line.strip()][-1]
    assert last == "interrupted; nothing was written"  # eval has no --resume to advise


def test_tokenizer_and_model_vocab_mismatch_is_one_sentence(shared_data, sft_ckpt, tmp_path):
    from conftest import ROOT, assert_one_sentence, run_cli

    r = run_cli("dpo", "--config", str(ROOT / "stage_configs" / "tldr_dpo.yaml"), "--policy", str(sft_ckpt),
                "--set", f"tokenizer.name_or_path={shared_data / 'gpt2_tokenizer'}", "--output-dir", str(tmp_path / "d"))
    assert_one_sentence(r, "has 50257 tokens but the model's embedding has only .* rows; they do not belong together")


def test_a_slow_reward_url_times_out_in_one_sentence():
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer


    from rlhf_cli.errors import UserError
    from rlhf_cli.rewards import HttpReward

    class Slow(BaseHTTPRequestHandler):
        def do_POST(self):
            time.sleep(2)

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(UserError, match=r"failed after 1 attempts: timed out"):
            HttpReward(f"http://127.0.0.1:{server.server_port}/", timeout=0.3, retries=0).score(["p"], ["c"])
    finally:
        server.shutdown()


def test_a_non_finite_loss_stops_with_the_step_named():
    import torch

    from rlhf_cli.errors import UserError
    from rlhf_cli.trainers.common import optimizer_step

    with pytest.raises(UserError, match=r"the loss became nan at step 7; no checkpoint had been saved yet"):
        optimizer_step(None, torch.nn.Linear(1, 1), None, None, 1.0, float("nan"), 7)
    with pytest.raises(UserError, match=r"the loss became inf at step 9; the checkpoint of step 8 is kept"):
        optimizer_step(None, torch.nn.Linear(1, 1), None, None, 1.0, float("inf"), 9, saved_step=8)


STAGE_ARGS = {
    "sft": ["sft", "--config", "tldr_sft.yaml"],
    "train-rm": ["train-rm", "--config", "tldr_rm.yaml", "--init-from", "SFT"],
    "dpo": ["dpo", "--config", "tldr_dpo.yaml", "--policy", "SFT"],
    "ppo": ["ppo", "--config", "tldr_ppo.yaml", "--policy", "SFT", "--reward-fn", "rlhf_cli.data.synthetic:gold_reward_fn",
            "--set", "ppo.num_rollouts=8", "--set", "ppo.chunk_size=8", "--set", "ppo.ppo_epochs=1",
            "--set", "ppo.num_layers_unfrozen=1", "--set", "ppo.generation.max_new_tokens=6"],
    "ilql": ["ilql", "--config", "tldr_ilql.yaml", "--policy", "SFT"],
}
KILLS = 20


def _whole(ckpt: Path) -> bool:
    """A checkpoint directory is either absent or whole: manifest, trainer state and weights all readable."""
    from safetensors.torch import load_file

    try:
        json.loads((ckpt / "rlhf_stage.json").read_text())
        json.loads((ckpt / "trainer_state" / "state.json").read_text())
        return all(load_file(str(w)) is not None for w in ckpt.glob("*.safetensors")) and any(ckpt.glob("*.safetensors"))
    except (OSError, ValueError):
        return False


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGE_ARGS))
def test_sigkill_at_random_points_then_resume(stage, sft_ckpt, tmp_path):
    """kill -9 at KILLS seeded random moments (start-up, mid-step, mid-save alike), resuming after each: every
    checkpoint on disk after every kill is whole, and the last resume finishes the run."""
    import random

    from conftest import ROOT

    rng = random.Random(f"kill-{stage}")
    out, steps = tmp_path / stage, 60
    cmd = [a.replace("SFT", str(sft_ckpt)) if a == "SFT" else a for a in STAGE_ARGS[stage]]
    cmd[2] = str(ROOT / "stage_configs" / cmd[2])
    args = [*rlhf_cmd(), *cmd, "--output-dir", str(out), "--set", "data.synthetic.num_train=64",
            "--set", "data.synthetic.num_eval=4", "--set", "train.batch_size=8", "--set", f"train.max_steps={steps}",
            "--set", "checkpoint.interval=2", "--set", "eval.at_start=false", "--set", "eval.num_samples=2",
            "--set", "eval.generation.max_new_tokens=2", "--set", "model.tiny.n_layer=1", "--set", "model.tiny.n_embd=32",
            "--set", "model.tiny.n_head=2", "--set", "tokenizer.vocab_size=300"]
    if stage in ("sft", "train-rm"):
        args += ["--set", "checkpoint.keep_last=3"]
    for i in range(KILLS):
        proc = subprocess.Popen(args + (["--resume"] if i else []), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 8.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        saved = sorted((Path(str(out) + ".partial") / "checkpoints").glob("step-*"))
        assert all(_whole(c) for c in saved), (i, [c.name for c in saved if not _whole(c)])
        assert not out.exists() or _whole(out), i
    final = subprocess.run(args + ["--resume"], capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    m = json.loads((out / "rlhf_stage.json").read_text())
    assert m["status"] == "complete" and m["step"] == steps
    assert not Path(str(out) + ".partial").exists()
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name or ".old-" in p.name or ".trash-" in p.name]
    loader = "AutoModelForSequenceClassification" if stage == "train-rm" else "AutoModelForCausalLM"
    code = f"import sys, transformers as t; t.{loader}.from_pretrained(sys.argv[1])"
    assert subprocess.run([sys.executable, "-c", code, str(out)]).returncode == 0


def test_trust_remote_code_is_off_unless_asked(tmp_path):
    from conftest import run_cli

    plain = run_cli("sft", "--config", SFT_CONFIG, *MICRO, "--dry-run", "--output-dir", str(tmp_path / "a"))
    asked = run_cli("sft", "--config", SFT_CONFIG, *MICRO, "--dry-run", "--trust-remote-code",
                    "--output-dir", str(tmp_path / "b"))
    assert plain.exit_code == asked.exit_code == 0
    assert "trust_remote_code: false" in plain.output and "trust_remote_code: true" in asked.output


def test_a_nan_reward_stops_ppo_naming_the_step(sft_ckpt, tmp_path, monkeypatch):
    from conftest import ROOT, run_cli

    (tmp_path / "nan_reward.py").write_text(
        "def score(samples, prompts, outputs, **kw):\n    return [float('nan')] * len(outputs)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    r = run_cli("ppo", "--config", str(ROOT / "stage_configs" / "tldr_ppo.yaml"), "--policy", str(sft_ckpt),
                "--reward-fn", "nan_reward:score", "--no-delta", "--output-dir", str(tmp_path / "ppo"),
                "--set", "data.synthetic.num_train=16", "--set", "data.synthetic.num_eval=2", "--set", "train.batch_size=4",
                "--set", "train.max_steps=2", "--set", "ppo.num_rollouts=4", "--set", "ppo.chunk_size=4",
                "--set", "ppo.num_layers_unfrozen=1", "--set", "ppo.generation.max_new_tokens=4",
                "--set", "eval.at_start=false")
    assert r.exit_code == 2 and "Traceback" not in r.output
    last = " ".join(r.stderr.split())
    assert "error: at step 0 (iteration 1): reward function nan_reward:score returned a non-finite score (nan)" in last


@pytest.mark.parametrize("stage", ["sft", "train-rm", "dpo", "ppo", "ilql"])
def test_every_stage_treats_a_changed_config_at_resume_the_same_way(stage, tmp_path):
    """What the interrupted run trained with decides: a change to what is trained is refused, a change to
    where or how it is recorded (logging, checkpoint cadence, output directory) is not."""
    from rlhf_cli import checkpoint as ck
    from rlhf_cli.config import load_config, to_dict
    from rlhf_cli.errors import UserError
    from rlhf_cli.trainers.rundir import refuse_changed_config

    saved = load_config(None, stage)
    ck.write_manifest(tmp_path, status="partial", stage=stage, config=to_dict(saved))
    for harmless in (["logging.run_name=again"], ["checkpoint.interval=7"], ["output_dir=elsewhere"]):
        refuse_changed_config(load_config(None, stage, harmless), tmp_path)
    for material in (["train.learning_rate=0.5"], ["data.source=synthetic:hh"], ["seed=3"]):
        with pytest.raises(UserError, match=material[0].split("=")[0].replace(".", r"\.")):
            refuse_changed_config(load_config(None, stage, material), tmp_path)


def test_config_that_is_not_a_regular_file_is_named_so(tmp_path):
    from conftest import assert_one_sentence, run_cli

    assert_one_sentence(run_cli("sft", "--config", "/dev/null"), r"config file /dev/null is not a regular file")
    assert_one_sentence(run_cli("sft", "--config", str(tmp_path)), r"is not a regular file")
    assert_one_sentence(run_cli("sft", "--config", str(tmp_path / "nope.yaml")), r"nope.yaml does not exist")


def _tiny_reward_checkpoint(sft_ckpt, path, positions: int):
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    tok = AutoTokenizer.from_pretrained(str(sft_ckpt))
    cfg = GPT2Config(vocab_size=len(tok), n_positions=positions, n_embd=32, n_layer=1, n_head=2, num_labels=1,
                     pad_token_id=tok.pad_token_id)
    GPT2ForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_reward_inputs_are_capped_at_the_models_positions(sft_ckpt, tmp_path):
    """A reward model with 32 positions scores long texts (it was given 512 tokens: IndexError)."""
    import math

    from conftest import run_cli

    from rlhf_cli.rewards import CheckpointReward

    rm = _tiny_reward_checkpoint(sft_ckpt, tmp_path / "rm", positions=32)
    reward = CheckpointReward(str(rm))
    assert reward.max_length == 32 and reward.max_prompt_length <= 32
    long_prompt, long_completion = "a long post " * 300 + "TL;DR:", " and so on" * 200
    [score] = reward.score([long_prompt], [long_completion])
    assert math.isfinite(score)
    (tmp_path / "rows.jsonl").write_text(json.dumps({"prompt": long_prompt, "completion": long_completion}) + "\n")
    r = run_cli("score", "--data", str(tmp_path / "rows.jsonl"), "--reward-ckpt", str(rm))
    assert r.exit_code == 0, r.output


def test_eval_fits_prompts_beside_the_new_tokens_in_the_models_positions(sft_ckpt):
    from transformers import AutoModelForCausalLM

    from rlhf_cli.errors import UserError
    from rlhf_cli.report import prompt_room

    model = AutoModelForCausalLM.from_pretrained(str(sft_ckpt))
    limit = model.config.n_positions
    assert prompt_room(model, "m", 192, 32) == min(192, limit - 32)
    assert prompt_room(model, "m", 192, limit - 10) == 10
    with pytest.raises(UserError, match=f"--max-new-tokens {limit} leaves no room for a prompt"):
        prompt_room(model, "m", 192, limit)


def test_a_truncated_safetensors_file_is_one_sentence(sft_ckpt, tmp_path):
    import shutil

    from conftest import ROOT, assert_one_sentence, run_cli

    from rlhf_cli import checkpoint as ck
    from rlhf_cli.errors import UserError

    broken = tmp_path / "broken"
    shutil.copytree(sft_ckpt, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    r = run_cli("dpo", "--config", str(ROOT / "stage_configs" / "tldr_dpo.yaml"), "--policy", str(broken),
                "--output-dir", str(tmp_path / "dpo"))
    assert_one_sentence(r, r"cannot load model from .*broken: a weights file is truncated or corrupt")
    assert not (tmp_path / "dpo").exists()
    with pytest.raises(UserError, match=r"model.safetensors is truncated or corrupt"):
        ck.load_tensors(weights)


def test_a_file_size_limit_while_saving_is_one_sentence(tmp_path):
    """safetensors reports EFBIG / ENOSPC inside its own error type: still named, exit 2, nothing replaced."""
    import resource

    out = tmp_path / "sft"
    args = [*rlhf_cmd(), "sft", "--config", SFT_CONFIG, "--output-dir", str(out), *MICRO,
            "--set", "checkpoint.interval=0", "--set", "eval.at_start=false"]

    def limit():  # logs and the tokenizer fit, the weights (~120 KB) do not
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    r = subprocess.run(args, capture_output=True, text=True, preexec_fn=limit)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: a file grew past the file-size limit (ulimit -f): writing"), last
    assert "nothing was replaced" in last and "Traceback" not in r.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
