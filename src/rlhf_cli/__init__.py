"""rlhf-cli: Reinforcement Learning from Human Feedback as one command, and as `rlhf_cli.train(...)`."""

from .version import __version__

__all__ = ["train", "TrainResult", "__version__"]


def __getattr__(name: str):
    # loaded on first use, so `import rlhf_cli` (and `rlhf --help`) stays fast: the API pulls in torch
    if name in ("train", "TrainResult"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'rlhf_cli' has no attribute {name!r}")
