"""Nothing lost when the final save is killed at any of its steps, or when two runs share an output dir."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MICRO, SFT_CONFIG, rlhf_cmd

# Runs the CLI with os.replace wrapped: SIGKILL right after the rename whose destination matches, or
# in the middle of writing the complete manifest. A real kill -9: no finally, no atexit.
KILLER = r"""
import os, signal, sys
from pathlib import Path
point, out = sys.argv[1], Path(sys.argv[2]).resolve()
real = os.replace

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def replace(src, dst, *a, **k):
    real(src, dst, *a, **k)
    d = Path(dst).resolve()
    if (point == "rename" and d == out or point == "old" and d.name.startswith(f".{out.name}.old-")
            or point == "cleanup" and d.name.startswith(f".{out.name}.partial.trash-")):
        die()
os.replace = replace

import rlhf_cli.checkpoint as ck
write = ck.write_manifest
def write_manifest(path, **fields):
    if point == "manifest" and fields.get("status") == "complete":
        (Path(path) / ck.MANIFEST).write_text('{"format": 1, "sta')  # half-written, then the kill
        die()
    return write(path, **fields)
ck.write_manifest = write_manifest

from rlhf_cli.cli import main
sys.argv = ["rlhf", *sys.argv[3:]]
main()
"""


def _args(out: Path, *extra) -> list[str]:
    return ["sft", "--config", SFT_CONFIG, "--output-dir", str(out), *MICRO, "--set", "eval.at_start=false", *extra]


def _rlhf(*args):
    return subprocess.run([*rlhf_cmd(), *args], capture_output=True, text=True)


def _clean(tmp: Path) -> list[str]:
    """What must not be left: temp, old or trash siblings, a .partial, a lock file."""
    return [p.name for p in tmp.iterdir() if p.name.startswith(".") or p.name.endswith(".partial")]


def _loads(out: Path) -> bool:
    code = "import sys, transformers as t; t.AutoModelForCausalLM.from_pretrained(sys.argv[1])"
    return subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True).returncode == 0


# "old" (an --overwrite run killed after moving the previous checkpoint aside) and "cleanup" (killed while the
# .partial was being deleted, after the same rename the "rename" case kills at) run in `make test-slow`,
# keeping the fast suite within its 10 minutes
@pytest.mark.parametrize("point", ["manifest", pytest.param("old", marks=pytest.mark.slow), "rename",
                                   pytest.param("cleanup", marks=pytest.mark.slow)])
def test_a_kill_at_each_step_of_the_final_save_loses_nothing(point, tmp_path):
    """manifest: the new checkpoint is half-written in its temp dir; old: an existing checkpoint was moved
    aside, the new one not yet in; rename: the new one is in place, the .partial not yet gone; cleanup:
    the .partial was being deleted. After each, --resume either finishes the run or says it is complete."""
    out = tmp_path / "sft"
    if point == "old":  # an earlier complete run in `out`, replaced by an --overwrite run
        assert _rlhf(*_args(out, "--set", "train.max_steps=3")).returncode == 0
        first = json.loads((out / "rlhf_stage.json").read_text())
    args = _args(out, *(["--overwrite"] if point == "old" else []))
    killed = subprocess.run([sys.executable, "-c", KILLER, point, str(out), *args], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    if point == "old":  # the killed process left `out` moved aside: the next command puts it back
        assert not out.exists()
        again = _rlhf(*_args(out, "--set", "train.max_steps=3"))
        assert again.returncode == 2 and "an unfinished run exists" in again.stderr, again.stderr
        assert json.loads((out / "rlhf_stage.json").read_text()) == first
    resumed = _rlhf(*_args(out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    said = " ".join(resumed.stderr.split())
    if point in ("rename", "cleanup"):
        assert "already complete at step 6; nothing to do" in said
    else:
        assert "resuming from" in said
    m = json.loads((out / "rlhf_stage.json").read_text())
    assert m["status"] == "complete" and m["step"] == 6 and m["run_id"]
    assert _clean(tmp_path) == [] and _loads(out)
    plain = _rlhf(*_args(out))  # a plain rerun: the finished run is the one to keep
    assert plain.returncode == 2 and "already exists and is not empty" in plain.stderr, plain.stderr


def test_a_second_run_into_the_same_directory_is_refused(tmp_path):
    """The first run holds the directory until it ends; a second (even with --overwrite or --resume) gets one
    sentence, and the first run's checkpoint and log stay its own."""
    import signal

    out, partial = tmp_path / "sft", tmp_path / "sft.partial"
    first = subprocess.Popen([*rlhf_cmd(), *_args(out, "--set", "train.max_steps=100000", "--set", "train.log_interval=1",
                                                  "--set", "checkpoint.interval=0")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (partial / "metrics.jsonl").exists():
        time.sleep(0.05)
    for extra in ([], ["--overwrite"], ["--resume"]):
        second = _rlhf(*_args(out, "--set", "train.learning_rate=0.01", *extra))
        assert second.returncode == 2, second.stderr[-2000:]
        line = second.stderr.strip()
        assert len(line.splitlines()) == 1 and "Traceback" not in line, line
        assert line.startswith(f"error: {out} is being written by another run (pid {first.pid} on "), line
    assert first.poll() is None  # still training, its directory untouched by the refused runs
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 130, stderr[-2000:]
    rows = [json.loads(line) for line in (partial / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == list(range(1, len(steps) + 1))  # one run's log, nothing mixed in
    [saved] = (partial / "checkpoints").iterdir()
    assert json.loads((saved / "rlhf_stage.json").read_text())["config"]["train"]["learning_rate"] != 0.01
    assert not (tmp_path / ".sft.lock").exists()


def test_a_lock_left_by_a_dead_process_is_not_held(tmp_path):
    """A SIGKILLed run leaves its lock file behind; the kernel released its flock, so the next run goes."""
    out = tmp_path / "sft"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".sft.lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "started": "x"}))
    r = _rlhf(*_args(out, "--set", "train.max_steps=2"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert _clean(tmp_path) == []
