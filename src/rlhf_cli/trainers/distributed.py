"""Processes and devices: the Accelerator (one process, DDP, or DeepSpeed ZeRO), who is the main
process, and the few collectives the trainers need (on CPU as on GPUs)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from ..errors import UserError


def setup_accelerator(cfg):
    """Accelerate for one process, DDP (launched by torchrun / accelerate launch) or DeepSpeed ZeRO
    (`distributed.deepspeed_config`, a DeepSpeed JSON; "auto" values are filled from the train section)."""
    mp = cfg.train.mixed_precision
    if mp == "fp16" and not torch.cuda.is_available():
        raise UserError("train.mixed_precision fp16 needs a GPU; use bf16 or no on CPU")
    ds_path = cfg.distributed.deepspeed_config
    if ds_path:
        try:
            ds = json.loads(Path(ds_path).expanduser().read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read distributed.deepspeed_config {ds_path}: {e}") from None
        fill = {"train_micro_batch_size_per_gpu": cfg.train.batch_size,
                "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
                "gradient_clipping": cfg.train.max_grad_norm or 0.0}
        ds.update({k: v for k, v in fill.items() if ds.get(k, "auto") == "auto"})
        if ds.get("bf16", {}).get("enabled", "auto") == "auto":
            ds["bf16"] = {"enabled": mp == "bf16"}
        ds.setdefault("zero_allow_untested_optimizer", True)
        # zero3_init_flag off: models load whole and are sharded when prepared, so the PPO reference copy
        # and the vocabulary checks see real weights (each process holds one full copy in CPU RAM at load)
        # DeepSpeed counts the accumulated micro-batches itself (its step is a no-op between boundaries)
        acc = Accelerator(mixed_precision=mp, gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
                          deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds, zero3_init_flag=False))
        unset_hf_deepspeed_config()  # Accelerate registers it anyway; without this from_pretrained shards at load
        return acc
    return Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())


def backward(acc, loss, accumulation: int, last: bool = True) -> None:
    """acc.backward of a loss already divided over the accumulated micro-batches. DeepSpeed divides by its
    gradient_accumulation_steps itself, so ours is undone there, and it must be told which micro-batch
    closes the step (it steps at that boundary only)."""
    if uses_deepspeed(acc):
        acc.gradient_state._set_sync_gradients(last)
        acc.backward(loss * accumulation)
    else:
        acc.backward(loss)


def world(acc) -> tuple[int, int]:
    """(rank, number of processes). Under DeepSpeed on CPU, Accelerate reports 1 process: ask torch."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return acc.process_index, acc.num_processes


def is_main(acc) -> bool:
    return world(acc)[0] == 0


def barrier() -> None:
    """Wait for every process (Accelerate's own wait is a no-op when it miscounts the processes)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce(value: float, op: str = "mean") -> float:
    """A float reduced over every process (itself when there is one)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / (dist.get_world_size() if op == "mean" else 1)


def all_gather(values: list[float]) -> list[float]:
    """Every process's list, concatenated in rank order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, list(values))
    return [v for part in out for v in part]


def uses_deepspeed(acc) -> bool:
    return getattr(acc.state, "deepspeed_plugin", None) is not None


def zero_stage(acc) -> int:
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage) if plugin is not None else 0


def broadcast(value):
    """The main process's `value`, on every process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --- ZeRO: each process saves and restores its own shard of the optimizer state -------------------
def _zero_optimizer(optimizer):
    """The DeepSpeed ZeRO optimizer inside Accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def save_zero_shard(acc, optimizer, folder: Path) -> None:
    """Every process writes `folder/rank-<r>.{safetensors,json}`: its partition of the fp32 master
    weights and of Adam's moments (DeepSpeed's own checkpoints are pickles; these are not)."""
    from .. import checkpoint as ck

    rank, size = world(acc)
    folder.mkdir(parents=True, exist_ok=True)
    ck.save_nested(_zero_optimizer(optimizer).state_dict(), folder / f"rank-{rank:05d}",
                   {"world_size": size, "zero_stage": zero_stage(acc)})


def load_zero_shard(acc, optimizer, folder: Path) -> str | None:
    """Restore this process's shard saved by `save_zero_shard`; returns a note when it cannot be used."""
    from .. import checkpoint as ck

    rank, size = world(acc)
    if not folder.is_dir():
        return f"{folder.parent.parent} holds no ZeRO optimizer state: Adam's moments restart from zero"
    meta = ck.read_nested_meta(folder / f"rank-{0:05d}")
    if (meta["world_size"], meta["zero_stage"]) != (size, zero_stage(acc)):
        return (f"the optimizer state was saved by {meta['world_size']} processes under ZeRO-{meta['zero_stage']}; "
                f"this run has {size} under ZeRO-{zero_stage(acc)}: Adam's moments restart from zero")
    inner = _zero_optimizer(optimizer)
    live = inner.state_dict()
    shards: list = [None] * size
    # an elastic ZeRO-1/2 layout rebuilds each partition from every process's file; otherwise one's own
    for r in range(size) if getattr(inner, "elastic_checkpoint", False) else [rank]:
        shards[r] = ck.load_nested(folder / f"rank-{r:05d}", live)
    inner.load_state_dict(shards, load_optimizer_states=True, load_from_fp32_weights=True)
    return None
