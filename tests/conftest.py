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
