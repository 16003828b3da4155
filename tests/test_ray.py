"""distributed.launcher: ray: the same command line on Ray Train workers gives what one process gives, and
Ray's start-up problems are one sentence, not a traceback."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, assert_one_sentence, rlhf_cmd, run_cli, sigterm_once_training
from test_distributed import SMALL, TINY_MODEL, _losses

SFT = ["sft", "--config", str(ROOT / "stage_configs" / "tldr_sft.yaml")]
RAY = ["--set", "distributed.launcher=ray", "--set", "distributed.num_processes=2"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- fast: no Ray cluster is started -----------------------------------------------------------------
def test_the_launcher_keys_are_validated_in_one_sentence(tmp_path):
    out = ["--output-dir", str(tmp_path / "s"), "--dry-run"]
    assert_one_sentence(run_cli(*SFT, *out, "--set", "distributed.launcher=bogus"),
                        r"'distributed.launcher' in --set: input should be 'torchrun', 'accelerate' or 'ray'")
    assert_one_sentence(run_cli(*SFT, *out, *RAY, "--set", "distributed.accelerate_config=x.yaml"),
                        r"launcher: ray does not read distributed.accelerate_config")
    assert_one_sentence(run_cli(*SFT, *out, "--set", "distributed.ray_address=10.0.0.1:6379"),
                        r"ray_address is only read by distributed.launcher: ray")
    assert_one_sentence(run_cli(*SFT, *out, "--set", "distributed.launcher=accelerate"),
                        r"launcher: accelerate needs distributed.accelerate_config")
    assert not (tmp_path / "s").exists()


def test_an_unreachable_ray_address_is_one_sentence_in_seconds(tmp_path):
    pytest.importorskip("ray")
    start = time.time()
    r = run_cli(*SFT, "--output-dir", str(tmp_path / "s"), *RAY,
                "--set", f"distributed.ray_address=127.0.0.1:{_closed_port()}")
    assert_one_sentence(r, r"no Ray cluster answers at .*:\d+ \(distributed.ray_address\): connection refused")
    assert time.time() - start < 30 and not (tmp_path / "s").exists()


def test_without_ray_installed_the_launcher_says_how_to_install_it(monkeypatch):
    from rlhf_cli.config import DistributedConfig
    from rlhf_cli.errors import UserError
    from rlhf_cli.ray_launch import check

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(UserError, match=r"^distributed.launcher: ray needs Ray Train: pip install 'rlhf-cli\[ray\]'$"):
        check(DistributedConfig(launcher="ray", num_processes=2))
    check(DistributedConfig(launcher="ray", num_processes=1))  # one process trains here: Ray is not needed


def test_one_process_under_the_ray_launcher_trains_here(monkeypatch):
    from rlhf_cli.cli import _relaunch
    from rlhf_cli.config import DistributedConfig

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert _relaunch(DistributedConfig(launcher="ray", num_processes=1)) is False


def test_a_dry_run_under_the_ray_launcher_plans_the_processes(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # no cluster to reach: the check finds a local one to start
    args = [*SFT, *TINY_MODEL, "--dry-run", "--set", "data.synthetic.num_train=96", "--set", "train.batch_size=8",
            "--set", "train.epochs=1"]

    def plan(*extra):
        r = run_cli(*args, "--output-dir", str(tmp_path / "s"), *extra)
        assert r.exit_code == 0, r.output
        return {row.split("│")[1].strip(): row.split("│")[2].strip() for row in r.output.splitlines()
                if row.count("│") == 3}
    torchrun, ray = plan("--set", "distributed.num_processes=2"), plan(*RAY)
    assert ray["optimizer_steps"] == torchrun["optimizer_steps"] == "6"  # 96 examples / (2 processes x 8)
    assert ray["examples_per_step"] == "16"
    assert not (tmp_path / "s").exists()


# --- slow: Ray clusters on this machine ------------------------------------------------------------------
def _run(args, env=None):
    r = subprocess.run([*rlhf_cmd(), *args], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _two_ways(stage_args, tmp_path, extra=(), env=None):
    """One process with batch 8 (no Ray), and two Ray workers with batch 4 each: the same global batch."""
    one, two = tmp_path / "one", tmp_path / "two"
    _run([*stage_args, "--output-dir", str(one), *SMALL, "--set", "train.batch_size=8"])
    r = _run([*stage_args, "--output-dir", str(two), *SMALL, "--set", "train.batch_size=4", *RAY, *extra], env)
    assert "launching 2 processes: Ray Train workers" in r.stderr and "Traceback" not in r.stderr
    m = json.loads((two / "rlhf_stage.json").read_text())
    assert m["status"] == "complete" and m["step"] == 6
    return _losses(one), _losses(two)


HOLD = """import logging, sys, ray
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # the cluster lives until the test closes this pipe
"""


@pytest.fixture(scope="module")
def ray_cluster():
    """A Ray cluster started apart from `rlhf` (as `ray start` would): (its address, the environment that
    joins it). Token authentication is on, as for any cluster a Ray 2.5x+ ray.init() starts."""
    pytest.importorskip("ray")
    holder = subprocess.Popen([sys.executable, "-c", HOLD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    address = holder.stdout.readline().strip()
    assert address, "the Ray cluster did not start"
    yield address, {**os.environ, "RAY_AUTH_MODE": "token"}
    holder.stdin.close()  # it shuts its cluster down as it exits
    try:
        holder.wait(timeout=60)
    except subprocess.TimeoutExpired:
        holder.kill()


@pytest.mark.slow  # ~50 s: Ray starts a local cluster for the run
def test_sft_on_two_ray_workers_matches_one_process(tmp_path):
    pytest.importorskip("ray")
    a, b = _two_ways([*SFT, *TINY_MODEL], tmp_path)
    assert len(a) == len(b) == 6
    assert b == pytest.approx(a, rel=1e-4)  # the sums run in another order


@pytest.mark.slow  # ~60 s
def test_dpo_on_two_workers_of_a_running_ray_cluster_matches_one_process(sft_ckpt, tmp_path, ray_cluster):
    """Joining a cluster that `rlhf` did not start: its workers have none of this shell's environment but
    what the launcher passes on (the output lock, the offline hub)."""
    address, env = ray_cluster
    a, b = _two_ways(["dpo", "--config", str(ROOT / "stage_configs" / "tldr_dpo.yaml"), "--policy", str(sft_ckpt)],
                     tmp_path, ["--set", f"distributed.ray_address={address}"], env)
    assert len(a) == len(b) == 6
    assert b == pytest.approx(a, rel=1e-4)


@pytest.mark.slow  # ~30 s
def test_a_bad_input_found_by_the_workers_is_one_sentence_and_exit_2(tmp_path, ray_cluster):
    address, env = ray_cluster
    r = subprocess.run([*rlhf_cmd(), *SFT, *TINY_MODEL, *SMALL, "--output-dir", str(tmp_path / "s"), *RAY,
                        "--set", f"distributed.ray_address={address}", "--set", "train.mixed_precision=fp16"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "RayTaskError" not in r.stderr and "WorkerGroupError" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines[-1] == "error: train.mixed_precision fp16 needs a GPU; use bf16 or no on CPU.", lines
    assert len(lines) == 2  # the launch notice, the error
    assert not (tmp_path / "s").exists()


@pytest.mark.slow  # ~45 s
def test_a_signal_to_the_launcher_stops_every_ray_worker_with_a_checkpoint(tmp_path, ray_cluster):
    """SIGTERM to `rlhf` (a scheduler's kill): every training process finishes its step, one checkpoint
    is written, exit 130, and no training process is left running."""
    address, env = ray_cluster
    out = tmp_path / "sft"
    stderr = sigterm_once_training([*rlhf_cmd(), *SFT, *TINY_MODEL, *SMALL[:4], "--set", "train.max_steps=100000",
                                    "--set", "checkpoint.interval=0", "--set", "eval.at_start=false",
                                    "--set", "train.batch_size=4", *RAY, "--set", f"distributed.ray_address={address}",
                                    "--output-dir", str(out)], out, env)
    assert "continue with --resume" in stderr
    time.sleep(1)  # Ray tears the workers down as the launcher leaves
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert left == [], left
