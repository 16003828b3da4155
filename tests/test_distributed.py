"""Several processes on this CPU (torchrun, gloo): DDP and DeepSpeed ZeRO give what one process gives."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, rlhf_cmd

ACC = ROOT / "stage_configs" / "accelerate"
SMALL = ["--set", "data.synthetic.num_train=96", "--set", "data.synthetic.num_eval=8", "--set", "eval.num_samples=4",
         "--set", "eval.generation.max_new_tokens=4", "--set", "checkpoint.interval=3", "--set", "train.max_steps=6",
         "--set", "train.log_interval=1"]
TINY_MODEL = ["--set", "model.tiny.n_layer=1", "--set", "model.tiny.n_embd=32", "--set", "model.tiny.n_head=2",
              "--set", "tokenizer.vocab_size=300", "--set", "train.learning_rate=1e-2"]


def _run(args):
    r = subprocess.run([*rlhf_cmd(), *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def _two_ways(stage_args, tmp_path, extra=()):
    """One process with batch 8, and two processes with batch 4 each: the same global batch."""
    one, two = tmp_path / "one", tmp_path / "two"
    _run([*stage_args, "--output-dir", str(one), *SMALL, "--set", "train.batch_size=8"])
    _run([*stage_args, "--output-dir", str(two), *SMALL, "--set", "train.batch_size=4",
          "--set", "distributed.num_processes=2", *extra])
    m = json.loads((two / "rlhf_stage.json").read_text())
    assert m["status"] == "complete" and m["step"] == 6
    return _losses(one), _losses(two)


def test_sft_with_two_processes_matches_one(tmp_path):
    # tolerance: the sums run in another order; measured differences are below 1e-5
    a, b = _two_ways(["sft", "--config", str(ROOT / "stage_configs" / "tldr_sft.yaml"), *TINY_MODEL], tmp_path)
    assert len(a) == len(b) == 6
    assert b == pytest.approx(a, rel=1e-4)


def test_dpo_with_two_processes_matches_one(sft_ckpt, tmp_path):
    a, b = _two_ways(["dpo", "--config", str(ROOT / "stage_configs" / "tldr_dpo.yaml"), "--policy", str(sft_ckpt)],
                     tmp_path)
    assert len(a) == len(b) == 6
    assert b == pytest.approx(a, rel=1e-4)


@pytest.mark.slow  # the fast suite within 10 minutes; SFT and DPO keep the two-process loop in it
def test_reward_model_with_two_processes_matches_one(sft_ckpt, tmp_path):
    a, b = _two_ways(["train-rm", "--config", str(ROOT / "stage_configs" / "tldr_rm.yaml"), "--init-from",
                      str(sft_ckpt)], tmp_path)
    assert b == pytest.approx(a, rel=1e-4)


@pytest.mark.slow  # 70 s; ZeRO-3 stays in the fast suite through test_ppo_under_zero_with_two_processes[3]
def test_sft_under_zero3_matches_one_process_and_saves_a_plain_model(tmp_path):
    pytest.importorskip("deepspeed")
    a, b = _two_ways(["sft", "--config", str(ROOT / "stage_configs" / "tldr_sft.yaml"), *TINY_MODEL], tmp_path,
                     ["--set", f"distributed.deepspeed_config={ACC / 'ds_zero3.json'}"])
    assert b == pytest.approx(a, rel=1e-4)
    code = "import sys, transformers as t; t.AutoModelForCausalLM.from_pretrained(sys.argv[1])"
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path / "two")]).returncode == 0


# ZeRO-2 in `make test-slow` (the fast suite keeps ZeRO-2 through the resume and accumulation tests, and PPO
# under ZeRO through [3], the harder case), keeping the fast suite within its 10 minutes
@pytest.mark.parametrize("zero", [pytest.param(2, marks=pytest.mark.slow), 3])
def test_ppo_under_zero_with_two_processes(zero, sft_ckpt, tmp_path):
    """ZeRO-3 too: rollouts generate with synced processes, the reference is a whole frozen copy."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "ppo"
    _run(["ppo", "--config", str(ROOT / "stage_configs" / "tldr_ppo.yaml"), "--policy", str(sft_ckpt),
          "--reward-fn", "rlhf_cli.data.synthetic:gold_reward_fn", "--output-dir", str(out),
          "--set", "data.synthetic.num_train=64", "--set", "data.synthetic.num_eval=8", "--set", "train.batch_size=4",
          "--set", "train.max_steps=8", "--set", "ppo.num_rollouts=16", "--set", "ppo.chunk_size=8",
          "--set", "ppo.ppo_epochs=2", "--set", "ppo.num_layers_unfrozen=1", "--set", "ppo.generation.max_new_tokens=6",
          "--set", "eval.num_samples=8", "--set", "eval.generation.max_new_tokens=6", "--set", "checkpoint.interval=4",
          "--set", "distributed.num_processes=2", "--set", f"distributed.deepspeed_config={ACC / f'ds_zero{zero}.json'}"])
    m = json.loads((out / "rlhf_stage.json").read_text())
    assert m["status"] == "complete" and m["step"] == 8
    assert (out / "value_head.safetensors").is_file()
    code = "import sys, transformers as t; t.AutoModelForCausalLM.from_pretrained(sys.argv[1])"
    assert subprocess.run([sys.executable, "-c", code, str(out)]).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 2])  # 0: DDP
def test_grpo_with_two_processes_matches_one(zero, sft_ckpt, tmp_path, monkeypatch):
    """Each process samples whole groups of its own prompts; each completion's sampling noise follows its
    prompt (not its process), advantages take the whole iteration's statistics (batch-scaled here), and the
    update is over both processes' groups: the same steps as one process with the whole batch."""
    ds = ["--set", f"distributed.deepspeed_config={ACC / f'ds_zero{zero}.json'}"] if zero else []
    # the micro policy's completions score 0 gold: a reward that tells any two texts apart
    (tmp_path / "lengthy.py").write_text("def score(samples, prompts, outputs, **kw):\n"
                                         "    return [len(set(o)) / 10 for o in outputs]\n")
    monkeypatch.chdir(tmp_path)
    common = ["grpo", "--config", str(ROOT / "stage_configs" / "tldr_grpo.yaml"), "--policy", str(sft_ckpt),
              "--reward-fn", "lengthy:score",
              "--set", "data.synthetic.num_train=64", "--set", "data.synthetic.num_eval=8", "--set", "train.max_steps=3",
              "--set", "train.log_interval=1", "--set", "grpo.num_rollouts=16", "--set", "grpo.num_generations=4",
              "--set", "grpo.num_iterations=1", "--set", "grpo.scale_rewards=batch",
              "--set", "grpo.generation.max_new_tokens=6", "--set", "reward.delta=false", "--set", "eval.num_samples=8",
              "--set", "eval.generation.max_new_tokens=6", "--set", "checkpoint.interval=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    # one optimizer step per iteration: the whole iteration's 16 completions, on one process or split over two
    _run([*common, "--output-dir", str(one), "--set", "train.batch_size=16", "--set", "grpo.chunk_size=4"])
    _run([*common, "--output-dir", str(two), "--set", "train.batch_size=8", "--set", "grpo.chunk_size=2",
          "--set", "distributed.num_processes=2", *ds])
    m = json.loads((two / "rlhf_stage.json").read_text())
    assert m["status"] == "complete" and m["step"] == 3 and not (two / "value_head.safetensors").exists()

    def logged(out, key):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r[key] for r in rows if key in r]
    for key in ("rollout/reward", "rollout/response_length", "train/loss", "train/kl", "train/clip_high"):
        a, b = logged(one, key), logged(two, key)
        assert len(a) == len(b) == 3, key
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6), key
    assert len(set(logged(one, "rollout/reward"))) > 1  # the policy changed between iterations
    code = "import sys, transformers as t; t.AutoModelForCausalLM.from_pretrained(sys.argv[1])"
    assert subprocess.run([sys.executable, "-c", code, str(two)]).returncode == 0


def test_every_gpu_preset_dry_runs_with_a_memory_estimate(sft_ckpt, tmp_path, monkeypatch):
    import yaml
    from conftest import assert_planned_then_refused_here, hh_reward_model_in, run_cli

    hh_reward_model_in(tmp_path, sft_ckpt)
    monkeypatch.chdir(tmp_path)

    checked = 0
    for path in sorted((ROOT / "stage_configs").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        for preset in raw.get("presets") or {}:
            if preset == "tiny":
                continue
            r = run_cli(raw["stage"], "--config", str(path), "--preset", preset, "--dry-run",
                        "--output-dir", str(tmp_path / f"{path.stem}-{preset}"))
            assert_planned_then_refused_here(r)  # no 8 GPUs and no hub here
            flat = " ".join(r.output.replace("│", " ").split())  # the plan table wraps long values
            assert "GiB per device" in flat and "ZeRO-3 over 8" in flat, (path.name, preset)
            checked += 1
    assert checked >= 20


def test_memory_estimate_by_hand():
    from rlhf_cli.config import SFTConfig
    from rlhf_cli.memory import _estimate

    cfg = SFTConfig()
    # 1e9 trained parameters: 16 B each on one process; ZeRO-2 over 8: 4 + 12 / 8 = 5.5 B each
    assert "~14.9 GiB" in _estimate(cfg, (1e9, 10), 1, 0)
    assert "~5.1 GiB" in _estimate(cfg, (1e9, 10), 8, 2, short=True)
    assert "~1.9 GiB" in _estimate(cfg, (1e9, 10), 8, 3, short=True)


def test_zero2_with_gradient_accumulation_matches_one_process(tmp_path):
    """DeepSpeed counts accumulated micro-batches itself: 2 processes x 2 x batch 2 = 1 process x 2 x batch 4."""
    pytest.importorskip("deepspeed")
    sft = ["sft", "--config", str(ROOT / "stage_configs" / "tldr_sft.yaml"), *TINY_MODEL, *SMALL,
           "--set", "train.gradient_accumulation_steps=2"]
    _run([*sft, "--output-dir", str(tmp_path / "one"), "--set", "train.batch_size=4"])
    _run([*sft, "--output-dir", str(tmp_path / "two"), "--set", "train.batch_size=2",
          "--set", "distributed.num_processes=2", "--set", f"distributed.deepspeed_config={ACC / 'ds_zero2.json'}"])
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-4)


def test_bad_input_with_two_processes_is_still_one_sentence(tmp_path):
    r = subprocess.run([*rlhf_cmd(), "sft", "--config", str(ROOT / "stage_configs" / "tldr_sft.yaml"),
                        "--output-dir", str(tmp_path / "s"), "--set", f"data.source={tmp_path}/none.jsonl",
                        "--set", "distributed.num_processes=2"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: data source") and len(lines) <= 2  # the launch notice, the error
    assert not (tmp_path / "s").exists()


# Imported by every Python process of the run (launcher and workers) through PYTHONPATH: each notes its
# pid; once the checkpoint of step KILL_AFTER_STEP is written, the main process SIGKILLs them all (the
# launcher may start workers in sessions of their own, so a process group would not reach them).
KILL_AFTER = r"""
import os, signal
from pathlib import Path
if os.environ.get("KILL_AFTER_STEP"):
    pids = Path(os.environ["KILL_PIDS"])
    with open(pids, "a") as f:
        f.write(f"{os.getpid()}\n")
    from rlhf_cli.trainers import rundir
    save = rundir.Run.save_intermediate

    def save_then_die(self, model, tokenizer, optimizer, scheduler, progress, manifest):
        save(self, model, tokenizer, optimizer, scheduler, progress, manifest)
        if progress["step"] >= int(os.environ["KILL_AFTER_STEP"]) and os.environ.get("RANK", "0") == "0":
            for pid in {int(p) for p in pids.read_text().split()} - {os.getpid()}:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            os.kill(os.getpid(), signal.SIGKILL)
    rundir.Run.save_intermediate = save_then_die
"""


@pytest.mark.parametrize("zero", [2, pytest.param(3, marks=pytest.mark.slow)])  # ZeRO-3: `make test-slow`
def test_zero_resume_restores_the_optimizer_state(zero, tmp_path):
    """Killed after its first checkpoint and resumed, a ZeRO run trains on as the uninterrupted one did:
    each process's shard of Adam's moments and fp32 weights was saved (safetensors) and restored."""
    import os

    pytest.importorskip("deepspeed")
    steps = 9
    base = ["sft", "--config", str(ROOT / "stage_configs" / "tldr_sft.yaml"), *TINY_MODEL, *SMALL,
            "--set", f"train.max_steps={steps}", "--set", "train.batch_size=4", "--set", "eval.at_start=false",
            "--set", "distributed.num_processes=2", "--set", f"distributed.deepspeed_config={ACC / f'ds_zero{zero}.json'}"]
    _run([*base, "--output-dir", str(tmp_path / "straight")])
    out = tmp_path / "killed"
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(KILL_AFTER)
    env = {**os.environ, "KILL_AFTER_STEP": "3", "KILL_PIDS": str(tmp_path / "pids"),
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "hook"), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([*rlhf_cmd(), *base, "--output-dir", str(out)], capture_output=True, text=True, env=env)
    assert killed.returncode == -9, killed.stderr[-3000:]
    ckpts = sorted(p.name for p in (tmp_path / "killed.partial" / "checkpoints").iterdir())
    assert ckpts == ["step-00000003"]
    zero_dir = tmp_path / "killed.partial" / "checkpoints" / "step-00000003" / "trainer_state" / "zero"
    assert sorted(p.name for p in zero_dir.iterdir()) == [
        "rank-00000.json", "rank-00000.safetensors", "rank-00001.json", "rank-00001.safetensors"]
    r = _run([*base, "--output-dir", str(out), "--resume"])
    assert "at step 3" in r.stderr and "moments restart" not in r.stderr
    straight, resumed = _losses(tmp_path / "straight"), _losses(out)
    assert len(straight) == len(resumed) == steps
    assert resumed == pytest.approx(straight, rel=1e-5)  # with Adam restarted at step 3 they differ by ~1e-2
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))  # nothing pickled


def test_a_signal_to_the_launcher_stops_every_worker_with_a_checkpoint(tmp_path):
    """SIGTERM to `rlhf` alone (a scheduler's kill, not the terminal's Ctrl-C to the whole group): it reaches
    every worker through the launcher; each finishes its step, one checkpoint is written, exit 130, and no
    worker is left running (the launcher was killed outright before, leaving them orphaned)."""
    from conftest import sigterm_once_training

    out = tmp_path / "sft"
    sigterm_once_training([*rlhf_cmd(), "sft", "--config", str(ROOT / "stage_configs" / "tldr_sft.yaml"), *TINY_MODEL,
                           *SMALL[:4], "--set", "train.max_steps=100000", "--set", "checkpoint.interval=0",
                           "--set", "eval.at_start=false", "--set", "train.batch_size=4",
                           "--set", "distributed.num_processes=2", "--output-dir", str(out)], out)
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert left == [], left
