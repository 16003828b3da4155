import os
import sys
from pathlib import Path

import pytest

# The hub is unreachable in CI: fail fast instead of ~30 s of retries per lookup.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data():
    if not SHARED.is_dir():
        pytest.skip("../shared/data is absent (a user's clone has no shared folder)")
    return SHARED


def rlhf_cmd():
    """The installed console script, or the module as a fallback."""
    exe = Path(sys.executable).with_name("rlhf")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "rlhf_cli.cli"]


MICRO = [
    "--set", "data.synthetic.num_train=96", "--set", "data.synthetic.num_eval=8",
    "--set", "model.tiny.n_layer=1", "--set", "model.tiny.n_embd=32", "--set", "model.tiny.n_head=2",
    "--set", "tokenizer.vocab_size=300", "--set", "train.batch_size=8", "--set", "train.max_steps=6",
    "--set", "eval.num_samples=4", "--set", "eval.generation.max_new_tokens=8", "--set", "checkpoint.interval=3",
]
SFT_CONFIG = str(ROOT / "stage_configs" / "tldr_sft.yaml")


def run_cli(*args):
    from typer.testing import CliRunner

    from rlhf_cli.cli import app

    return CliRunner().invoke(app, list(args))


def assert_one_sentence(result, pattern):
    """Exit code 2, no traceback, exactly one line on stderr that starts with 'error:' and matches."""
    import re

    assert result.exit_code == 2, result.output
    text = (result.stderr if hasattr(result, "stderr") else result.output).strip()
    assert "Traceback" not in result.output
    assert len(text.splitlines()) == 1 and text.startswith("error:"), text
    assert re.search(pattern, text), text


def assert_planned_then_refused_here(result):
    """A GPU preset's --dry-run on this machine: the plan is printed, then one sentence says why this
    machine cannot run it (no GPUs for the launch config, or a hub model while offline), exit 2."""
    import re

    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert "optimizer_steps" in result.output and "Traceback" not in result.output, result.output
    if result.exit_code == 0:  # a machine with the GPUs and the hub (not CI)
        return
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert re.search(r"launches \d+ GPU processes|hub is unreachable", errors[0]), errors[0]


@pytest.fixture(scope="session")
def sft_ckpt(tmp_path_factory):
    """A micro SFT checkpoint that the later stages start from."""
    out = tmp_path_factory.mktemp("micro") / "sft"
    r = run_cli("sft", "--config", SFT_CONFIG, "--output-dir", str(out), *MICRO)
    assert r.exit_code == 0, r.output
    return out


def sigterm_once_training(cmd, out, env=None) -> str:
    """Start `cmd` (a training run into `out`), SIGTERM the launcher once it logs, and check what it leaves:
    exit 130, no traceback, one 'stopping:' line and one whole checkpoint. Returns its stderr."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not (Path(f"{out}.partial") / "metrics.jsonl").exists():
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and stderr.count("stopping:") == 1, stderr[-2000:]
    [saved] = (Path(f"{out}.partial") / "checkpoints").iterdir()
    assert (saved / "trainer_state" / "state.json").is_file()
    return stderr


def tiny_reward_ckpt(out, sft_ckpt, seed: int = 0):
    """A random-init tiny reward checkpoint at `out` with the micro SFT model's tokenizer."""
    from rlhf_cli.config import TinyModelConfig
    from rlhf_cli.models import build_tiny_reward, load_tokenizer

    tok = load_tokenizer(str(sft_ckpt))
    rm = build_tiny_reward(TinyModelConfig(n_layer=1, n_embd=32, n_head=2), tok, seed=seed)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def hh_reward_model_in(folder, sft_ckpt):
    """Tiny reward checkpoints at folder/runs/hh/rm and runs/chat/rm, where the hh_ppo and chat_ppo GPU presets
    expect the reward model of the earlier stage: preflight (on --dry-run too) refuses a missing one."""
    from rlhf_cli.config import TinyModelConfig
    from rlhf_cli.models import build_tiny_reward, load_tokenizer

    tok = load_tokenizer(str(sft_ckpt))
    for recipe in ("hh", "chat"):
        rm = build_tiny_reward(TinyModelConfig(n_layer=1, n_embd=32, n_head=2), tok, 0)
        rm.save_pretrained(folder / "runs" / recipe / "rm")
        tok.save_pretrained(folder / "runs" / recipe / "rm")

