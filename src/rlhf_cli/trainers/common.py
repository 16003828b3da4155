"""What every trainer shares: Accelerate set-up, optimizer and schedule, deterministic batching,
run directories, checkpoint writing and resuming. No loss math here.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import checkpoint as ck
from ..config import to_dict
from ..errors import UserError
from ..tracking import MetricsLogger, read_metrics, truncate_metrics


def setup_accelerator(cfg):
    """Accelerate for one process, DDP (launched by torchrun / accelerate launch) or DeepSpeed ZeRO
    (`distributed.deepspeed_config`, a DeepSpeed JSON; "auto" values are filled from the train section)."""
    from accelerate import Accelerator

    mp = cfg.train.mixed_precision
    if mp == "fp16" and not torch.cuda.is_available():
        raise UserError("train.mixed_precision fp16 needs a GPU; use bf16 or no on CPU")
    ds_path = cfg.distributed.deepspeed_config
    if ds_path:
        from accelerate.utils import DeepSpeedPlugin

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
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

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
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return acc.process_index, acc.num_processes


def is_main(acc) -> bool:
    return world(acc)[0] == 0


def barrier() -> None:
    """Wait for every process (Accelerate's own wait is a no-op when it miscounts the processes)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce(value: float, op: str = "mean") -> float:
    """A float reduced over every process (itself when there is one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / (dist.get_world_size() if op == "mean" else 1)


def all_gather(values: list[float]) -> list[float]:
    """Every process's list, concatenated in rank order."""
    import torch.distributed as dist

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


class LoopClock:
    """Wall seconds and work of this process's training loop, recorded as rlhf_stage.json's
    `train_loop` (eval inside the loop included; model loading, first and final eval excluded):
    the throughput a run reports and `benchmarks/` compares."""

    def __init__(self, state: dict, count: str = "examples"):
        self.t0, self.start, self.count = time.perf_counter(), dict(state), count

    def record(self, state: dict, manifest: dict, unit: str) -> dict:
        seconds = time.perf_counter() - self.t0
        work = {k: state.get(k, 0) - self.start.get(k, 0) for k in ("step", self.count, "tokens")}
        manifest["train_loop"] = {"seconds": round(seconds, 4), "optimizer_steps": work["step"],
                                  unit: work[self.count], "tokens": work["tokens"],
                                  f"{unit}_per_s": round(work[self.count] / max(seconds, 1e-9), 3)}
        return manifest["train_loop"]


def make_optimizer(model, train_cfg) -> torch.optim.Optimizer:
    """AdamW; biases and norm weights (1-D parameters) get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": train_cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train_cfg.learning_rate, betas=tuple(train_cfg.adam_betas),
                             fused=False, foreach=None)


def make_scheduler(optimizer, train_cfg, total_steps: int):
    """transformers' schedule: linear warmup from 0 over `warmup_steps` (or `warmup_ratio` of the steps),
    then cosine or linear decay to 0, or constant."""
    from transformers import get_scheduler

    warmup = train_cfg.warmup_steps or int(train_cfg.warmup_ratio * total_steps)
    name = {"constant": "constant_with_warmup"}.get(train_cfg.scheduler, train_cfg.scheduler)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


@dataclass
class Batcher:
    """Deterministic micro-batches: epoch e is a permutation seeded by (seed, e), sharded by rank.

    With `lengths`, examples are grouped by length inside windows of 50 batches (HF Trainer's
    group_by_length) so a batch pads little; the batches of an epoch are then shuffled. Position is
    one integer (micro-batches consumed), so resuming is exact and needs no replay.
    """

    num_examples: int
    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    lengths: list[int] | None = None
    _epoch: int = field(default=-1, repr=False)
    _batches: list[list[int]] = field(default_factory=list, repr=False)

    @property
    def batches_per_epoch(self) -> int:
        return max(1, self.num_examples // (self.batch_size * self.world_size))

    def _plan_epoch(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(self.num_examples, generator=g).tolist()
        step = self.batch_size * self.world_size  # one global batch: every rank's share
        perm = perm[: self.batches_per_epoch * step]
        if self.lengths is not None:
            window = step * 50
            perm = [i for w in range(0, len(perm), window)
                    for i in sorted(perm[w: w + window], key=lambda i: -self.lengths[i])]
        batches = [perm[i: i + step] for i in range(0, len(perm), step)]
        order = torch.randperm(len(batches), generator=g).tolist()
        return [batches[o] for o in order]

    def indices(self, position: int) -> list[int]:
        epoch, i = divmod(position, self.batches_per_epoch)
        if epoch != self._epoch:
            self._batches, self._epoch = self._plan_epoch(epoch), epoch
        start = self.rank * self.batch_size
        return self._batches[i][start: start + self.batch_size]


def total_steps(train_cfg, num_examples: int, world_size: int) -> tuple[int, int]:
    """(optimizer steps, micro-batches per epoch) for the config and data size."""
    per_epoch = max(1, num_examples // (train_cfg.batch_size * world_size))
    if train_cfg.max_steps:
        return train_cfg.max_steps, per_epoch
    steps = math.ceil(per_epoch * train_cfg.epochs / train_cfg.gradient_accumulation_steps)
    return max(1, steps), per_epoch


def run_name(cfg) -> str:
    return cfg.logging.run_name or f"{cfg.stage}-{cfg.preset}-seed{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


class StopFlag:
    """SIGINT / SIGTERM during training: finish the current step, save a checkpoint, then exit.

    Armed while a training loop runs (`Run` arms it); unarmed, a signal interrupts at once.
    A second signal always interrupts at once.
    """

    def __init__(self):
        self.armed = False
        self.requested = False

    def signal(self, signum, frame) -> None:
        if not self.armed or self.requested:
            raise KeyboardInterrupt
        self.requested = True
        import sys

        print("stopping: a checkpoint is written after the current step (interrupt again to abort at once)",
              file=sys.stderr, flush=True)


STOP = StopFlag()


class Interrupted(KeyboardInterrupt):
    """Raised after the checkpoint of a requested stop is written."""

    def __init__(self, step: int, path: Path):
        super().__init__(f"stopped at step {step}")
        self.step, self.path = step, path


class Run:
    """One stage run's directories, logger and checkpoint writing (main process only writes)."""

    def __init__(self, cfg, out: Path, accelerator, resume_from: Path | None):
        self.cfg, self.out, self.acc = cfg, Path(out), accelerator
        self.partial = ck.partial_dir(self.out)
        self.resume_from = resume_from
        self.started = ck.now()
        main = is_main(accelerator)
        if main:
            self.partial.mkdir(parents=True, exist_ok=True)
            log = self.partial / ck.METRICS
            if resume_from is not None and (resume_from / ck.METRICS).exists():
                shutil.copyfile(resume_from / ck.METRICS, log)  # the live log restarts from the checkpoint's
            elif log.exists():
                log.unlink()
        self.logger = MetricsLogger(self.partial / ck.METRICS, cfg.logging, run_name(cfg), to_dict(cfg), enabled=main)
        STOP.armed, STOP.requested = True, False
        if main and resume_from is not None:
            truncate_metrics(self.partial / ck.METRICS, (ck.read_progress(resume_from) or {}).get("step", 0))

    def log(self, step: int, metrics: dict) -> None:
        self.logger.log(step, metrics)

    def metrics(self) -> list[dict]:
        return read_metrics(self.partial / ck.METRICS)

    def _write(self, dest: Path, model, tokenizer, optimizer, scheduler, progress: dict, status: str,
               manifest: dict, extra_files: dict[str, str] | None = None, state_dict=None) -> None:
        unwrapped = self.acc.unwrap_model(model)
        unwrapped.save_pretrained(dest, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(dest)
        # ZeRO shards the optimizer state across processes; it is not gathered (a resume restarts the moments)
        ck.save_trainer_state(dest / ck.STATE_DIR, None if uses_deepspeed(self.acc) else optimizer, scheduler,
                              progress)
        if (self.partial / ck.METRICS).exists():
            shutil.copyfile(self.partial / ck.METRICS, dest / ck.METRICS)
        for name, text in (extra_files or {}).items():
            (dest / name).write_text(text)
        if status == "complete":
            manifest = {**manifest, "content_hash": ck.compute_content_hash(dest)}
        ck.write_manifest(dest, status=status, stage=self.cfg.stage, config=to_dict(self.cfg),
                          started=self.started, ended=ck.now(), step=progress["step"], **manifest)

    def save_intermediate(self, model, tokenizer, optimizer, scheduler, progress: dict, manifest: dict) -> None:
        barrier()
        state_dict = self.acc.get_state_dict(model)  # every process takes part: ZeRO-3 gathers the shards
        if is_main(self.acc):
            dest = self.partial / "checkpoints" / f"{ck.CKPT_PREFIX}{progress['step']:08d}"
            with ck.atomic_dir(dest) as tmp:
                self._write(tmp, model, tokenizer, optimizer, scheduler, progress, "partial", manifest,
                            state_dict=state_dict)
            ck.prune_checkpoints(self.out, self.cfg.checkpoint.keep_last)
        barrier()

    def checkpoint(self, model, tokenizer, optimizer, scheduler, progress: dict, manifest: dict, due: bool) -> None:
        """Save an intermediate checkpoint when one is due or a stop was requested; then honour the stop."""
        if due or STOP.requested:
            self.save_intermediate(model, tokenizer, optimizer, scheduler, progress, manifest)
        if STOP.requested:
            STOP.armed = False
            raise Interrupted(progress["step"], self.partial / "checkpoints" / f"{ck.CKPT_PREFIX}{progress['step']:08d}")

    def save_final(self, model, tokenizer, optimizer, scheduler, progress: dict, manifest: dict,
                   extra_files: dict[str, str] | None = None, extra_dirs: dict[str, Path] | None = None) -> None:
        barrier()
        state_dict = self.acc.get_state_dict(model)
        if is_main(self.acc):
            self.logger.close()
            with ck.atomic_dir(self.out) as tmp:
                # extra directories: PPO's best/, TensorBoard's tb/
                for name, src in {**(extra_dirs or {}), "tb": self.partial / "tb"}.items():
                    if src.exists():
                        shutil.copytree(src, tmp / name)
                self._write(tmp, model, tokenizer, optimizer, scheduler, progress, "complete", manifest,
                            extra_files, state_dict=state_dict)
            shutil.rmtree(self.partial, ignore_errors=True)
        STOP.armed = False
        barrier()


def plan_without_download(cfg, info: dict, model_name: str) -> dict | None:
    """--dry-run for hub names: say what would be fetched instead of fetching it; None when all is local."""
    from ..data.sources import is_hub_name

    if is_hub_name(cfg.data.source):
        info["data"] = f"would fetch dataset '{cfg.data.source}' from the hub (not downloaded in --dry-run)"
    if model_name != "tiny" and not Path(model_name).expanduser().exists():
        from ..memory import estimate

        info["model"] = f"would fetch model '{model_name}' from the hub (not downloaded in --dry-run)"
        info["memory"] = estimate(cfg, model_name) or "unknown size: no estimate without downloading its config"
    if "data" in info or "model" in info:
        info["optimizer_steps"] = cfg.train.max_steps or "depends on the dataset size"
        return info
    return None


def already_complete(out: Path, resume_from: Path | None, steps: int, console) -> dict | None:
    """The manifest of `out` when --resume finds it complete at `steps` or beyond (nothing to train)."""
    if resume_from is None or resume_from != out or (ck.read_progress(out) or {}).get("step", 0) < steps:
        return None
    console.print(f"[green]{out} is already complete at step {steps}; nothing to do.[/]")
    return ck.read_manifest(out) or {}


def progress_bar(console, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    TextColumn("{task.fields[info]}"), console=console, disable=not enabled)


def optimizer_step(acc, model, optimizer, scheduler, max_grad_norm: float | None, loss: float, step: int):
    """Stop on a non-finite loss (the last good checkpoint stays); clip, step, zero. Returns the grad norm."""
    if not math.isfinite(loss):
        raise UserError(f"the loss became {loss} at step {step}; the last good checkpoint is kept "
                        "(lower train.learning_rate?)")
    grad_norm = acc.clip_grad_norm_(model.parameters(), max_grad_norm) if max_grad_norm else None
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm) if grad_norm is not None else float("nan")


def load_resumed(resume_from: Path, optimizer, scheduler) -> dict:
    return ck.load_trainer_state(resume_from / ck.STATE_DIR, optimizer, scheduler)


def config_changes(cfg, resume_from: Path) -> list[str]:
    """Dotted keys whose value differs from the config the checkpoint was trained with."""
    saved = (ck.read_manifest(resume_from) or {}).get("config") or {}

    def diff(a, b, prefix=""):
        for k in sorted(set(a) | set(b)):
            x, y = a.get(k), b.get(k)
            if isinstance(x, dict) and isinstance(y, dict):
                yield from diff(x, y, f"{prefix}{k}.")
            elif x != y and k != "output_dir":
                yield f"{prefix}{k}"
    return list(diff(to_dict(cfg), saved)) if saved else []


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
