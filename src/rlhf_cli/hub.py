"""Hugging Face hub access: one clear sentence when the hub cannot be reached."""

from __future__ import annotations

import os
import socket
from functools import lru_cache

from .errors import UserError


def offline_mode() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in {"0", "", "false", "False"}


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect instead of the libraries' long retry loops (~30 s when offline)."""
    if offline_mode():
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def no_hub_kernels_offline() -> None:
    """transformers with the `kernels` package installed fetches some layers' CUDA kernels (Llama's rotary
    embedding, ...) from the hub at load: without a hub that is an error, after the data is read. Offline, the
    models' own PyTorch layers run instead (USE_HUB_KERNELS=NO); a USE_HUB_KERNELS the user set is kept."""
    import importlib.util

    if "USE_HUB_KERNELS" not in os.environ and importlib.util.find_spec("kernels") and not hub_reachable():
        os.environ["USE_HUB_KERNELS"] = "NO"


def hub_error(what: str, name: str, exc: BaseException | None = None) -> UserError:
    """The one sentence for a hub name that could not be loaded."""
    if not hub_reachable():
        hint = "" if offline_mode() else ", or set HF_HUB_OFFLINE=1 to use a cached copy"
        return UserError(
            f"cannot fetch {what} '{name}': it is not a local path and the Hugging Face hub is unreachable "
            f"(offline); pass a local path{hint}"
        )
    detail = str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else ""
    return UserError(f"cannot load {what} '{name}' from the Hugging Face hub: {detail or type(exc).__name__}")
