"""Checks that take seconds and run before any model is loaded or worker spawned, on `--dry-run` too:
every checkpoint a run is given exists and is of the right kind (`check_paths`), and this machine can run
the plan (`check_machine`: the GPUs a launch config asks for are there, a hub name is cached or the hub
reachable, a Ray cluster to join answers). Each problem is one sentence (a UserError)."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from . import checkpoint as ck
from . import ray_launch
from .errors import UserError
from .hub import hub_error, hub_reachable
from .models import expect_kind

if TYPE_CHECKING:
    from .config import StageConfig


def model_sources(cfg) -> list[tuple[str, str, str | None]]:
    """(flag, name or path, the kind of checkpoint it must be) of every model a stage starts from."""
    stage = cfg.stage
    found: list[tuple[str, str, str | None]] = []
    if stage == "sft":
        found.append(("model.name_or_path", cfg.model.name_or_path, "policy"))
    elif stage == "train-rm":
        found.append(("--init-from", cfg.init_source, None))  # a policy or an earlier reward model
    else:
        found.append(("--policy", cfg.policy_source, "policy"))
    reward = getattr(cfg, "reward", None)
    if reward is not None and reward.ckpt:
        found.append(("--reward-ckpt", reward.ckpt, "reward"))
    return [(flag, name, kind) for flag, name, kind in found if name and name != "tiny"]


def _looks_local(name: str) -> bool:
    """A path rather than a hub name (`org/name`, or an old bare one like `gpt2`): absolute, relative with
    ./ or ~, deeper than one slash, or under a folder that exists here (`runs/sfft` when runs/ exists)."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1
            or ("/" in name and Path(name.split("/")[0]).expanduser().is_dir()))


def _suggest(path: Path) -> str:
    parent = path.parent if str(path.parent) else Path(".")
    names = [p.name for p in parent.iterdir()] if parent.is_dir() else []
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    return f"; did you mean {parent / close[0]}?" if close else ""


def _cached(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:
        return False


def check_paths(cfg) -> None:
    """Local checkpoints exist and are of the right kind: a property of the command, not the machine; and
    GPU-only model options have a GPU (checked here because a dry run's plan loads the model)."""
    check_gpu_only(cfg.model)
    for flag, name, kind in model_sources(cfg):
        path = Path(name).expanduser()
        if path.exists():
            if kind is not None:
                expect_kind(path, kind, flag)
            elif not (path / "config.json").exists():
                raise UserError(f"{flag} {name} is not a model checkpoint (no config.json)")
        elif _looks_local(name):
            raise UserError(f"{flag} {name} does not exist{_suggest(path)}")


def _on_hub(name: str) -> bool:
    """False only when the hub says there is no such model (a private one looks the same without a token);
    any other failure is left to the load, which names it."""
    try:
        from huggingface_hub import repo_exists

        return repo_exists(name)
    except Exception:
        return True


def check_hub(cfg) -> None:
    """A hub name not in the local cache needs a reachable hub, and a model of that name on it."""
    for flag, name, _ in model_sources(cfg):
        if Path(name).expanduser().exists() or _looks_local(name) or _cached(name):
            continue
        if not hub_reachable():
            raise hub_error("model", name)
        if not _on_hub(name):
            raise UserError(f"{flag} {name} is neither a local path nor a model on the Hugging Face hub "
                            f"(a private or gated one needs `hf auth login`)")


def check_gpu_only(model_cfg) -> None:
    """bitsandbytes quantization and FlashAttention-2 run on CUDA GPUs only: one sentence here, not a library's
    error after the model has half loaded."""
    import importlib.util

    wanted = [k for k in ("load_in_4bit", "load_in_8bit") if getattr(model_cfg, k)]
    if model_cfg.attn_implementation == "flash_attention_2":
        wanted.append("attn_implementation: flash_attention_2")
    if not wanted:
        return
    import torch  # only when asked: a refused command stays fast

    what = "model." + wanted[0]
    if not torch.cuda.is_available():
        raise UserError(f"{what} needs a CUDA GPU and this machine has none; " + (
            "use sdpa or eager here" if "flash" in what else "drop it here (LoRA alone runs on CPU)"))
    package = "flash_attn" if "flash" in what else "bitsandbytes"
    if importlib.util.find_spec(package) is None:
        raise UserError(f"{what} needs the {package} package: pip install {package.replace('_', '-')}")


def check_devices(cfg) -> None:
    """A launch config that asks for GPU processes on a machine with fewer GPUs stops here, not after
    every worker has started and failed."""
    import torch

    acc_cfg = cfg.distributed.accelerate_config
    if not acc_cfg or not Path(acc_cfg).is_file():
        return
    try:
        launch = yaml.safe_load(Path(acc_cfg).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return  # the launcher names the problem with the file itself
    wanted = int(launch.get("num_processes") or 1) if isinstance(launch, dict) else 1
    have = torch.cuda.device_count()
    if isinstance(launch, dict) and not launch.get("use_cpu", False) and have < wanted:
        raise UserError(f"preset '{cfg.preset}' launches {wanted} GPU processes ({acc_cfg}), but this machine "
                        f"has {have} GPU{'s' if have != 1 else ''}; choose the tiny preset or another machine")


def check_machine(cfg) -> None:
    """What this machine must have for the plan: the GPUs first (the bigger surprise), then the hub, then
    Ray (installed, and the cluster to join answering) for `distributed.launcher: ray`."""
    check_devices(cfg)
    check_hub(cfg)
    if cfg.distributed.launcher == "ray":
        ray_launch.check(cfg.distributed)


def fill_defaults(cfg: StageConfig) -> list[str]:
    """Defaults taken from the checkpoints a run is given, each said in a note: PPO or GRPO without a policy
    starts from the reward model's own parent (the SFT checkpoint it was trained from)."""
    notes = []
    ckpt = getattr(getattr(cfg, "reward", None), "ckpt", None)
    if cfg.stage in ("ppo", "grpo") and cfg.policy is None and cfg.model.name_or_path == "tiny" and ckpt:
        parent = ((ck.read_manifest(Path(ckpt).expanduser()) or {}).get("parent") or {}).get("path")
        if parent and Path(parent).is_dir():
            cfg.policy = parent
            notes.append(f"no --policy: {parent}, the parent of the reward model {ckpt}")
    return notes
