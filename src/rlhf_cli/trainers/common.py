"""What the loop and the stages share besides processes and run directories: optimizer and schedule,
deterministic batching, step counts, the progress bar, and the dry-run's no-download plan. No loss math.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import get_scheduler

from ..data.sources import is_hub_name
from ..errors import UserError
from ..models import checkpointing
from ..memory import estimate


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
    """AdamW, fused (one kernel for every parameter: a third of the unfused step's time on CPU, less on
    GPUs); biases and norm weights (1-D parameters) get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": train_cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=train_cfg.learning_rate, betas=tuple(train_cfg.adam_betas))
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except RuntimeError:  # a device or dtype the fused kernel does not cover
        return torch.optim.AdamW(groups, **kw)


def make_scheduler(optimizer, train_cfg, total_steps: int):
    """transformers' schedule: linear warmup from 0 over `warmup_steps` (or `warmup_ratio` of the steps),
    then cosine or linear decay to 0, or constant."""
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


def plan_without_download(cfg, info: dict, model_name: str) -> dict | None:
    """--dry-run for hub names: say what would be fetched instead of fetching it; None when all is local."""
    if is_hub_name(cfg.data.source):
        info["data"] = f"would fetch dataset '{cfg.data.source}' from the hub (not downloaded in --dry-run)"
    if model_name != "tiny" and not Path(model_name).expanduser().exists():
        info["model"] = f"would fetch model '{model_name}' from the hub (not downloaded in --dry-run)"
        info["memory"] = estimate(cfg, model_name) or "unknown size: no estimate without downloading its config"
    if "data" in info or "model" in info:
        info["optimizer_steps"] = cfg.train.max_steps or "depends on the dataset size"
        return info
    return None


def chat_renderer(cfg, source: str):
    """What renders the stage's conversational data: a function giving the `chat.Renderer` of the tokenizer
    the stage trains with (`tokenizer.name_or_path`, else `source`: its model), `data.chat_template` first.
    The tiny model's tokenizer is trained later, on the rendered text: its special tokens are known, and its
    template is ChatML unless data.chat_template names another. After a call, `.template` is the one used."""
    def make():
        from ..data import chat
        from ..models import EOS, PAD, TINY_CHAT_TEMPLATE, load_tokenizer

        name = cfg.tokenizer.name_or_path or source
        if name == "tiny":
            r = chat.renderer(None, {"bos_token": EOS, "eos_token": EOS, "unk_token": EOS, "pad_token": PAD},
                              "the tiny model", cfg.data.chat_template or str(TINY_CHAT_TEMPLATE))
        else:
            tok = load_tokenizer(name, cfg.model.trust_remote_code, cfg.model.revision)
            r = chat.from_tokenizer(tok, name, cfg.data.chat_template)
        make.template = r.template
        return r
    make.template = None
    return make


def progress_bar(console, enabled: bool):
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    TextColumn("{task.fields[info]}"), console=console, disable=not enabled)


def checkpoint_activations(model) -> int:
    """train.gradient_checkpointing: every transformers model inside what a stage trains (the policy under
    a value head, a reward model's trunk) recomputes its blocks' activations in the backward pass instead
    of keeping them. Non-reentrant: it also gives gradients when the bottom blocks are frozen. Returns how
    many models were switched."""
    from transformers import PreTrainedModel

    switched = 0
    for m in model.modules():
        if isinstance(m, PreTrainedModel) and m.supports_gradient_checkpointing and not checkpointing(m):
            kwargs = {"use_reentrant": False}
            if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5.24; the older name warns there
                m.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            switched += 1
    if not checkpointing(model):
        raise UserError(f"train.gradient_checkpointing is on, but {type(model).__name__} does not support it")
    return switched


class PlainLines:
    """Progress for a log file: with no terminal (nohup, Slurm, CI) rich draws its bar only at the end,
    so a plain line is printed every `every` steps or `seconds`, whichever comes first, and at the end."""

    def __init__(self, console, name: str, total: int, state: dict, every: int, seconds: float, enabled: bool):
        self.console, self.name, self.total, self.every, self.seconds = console, name, total, every, seconds
        self.enabled = enabled and not console.is_terminal
        start = state["step"]
        self.start, self.tokens0, self.t0 = start, state["tokens"], time.perf_counter()
        self.last_step, self.last_t = start, self.t0

    def __call__(self, state: dict, loss: float, lr: float, grad_norm: float) -> None:
        step, now = state["step"], time.perf_counter()
        if not self.enabled or not (step - self.last_step >= self.every or now - self.last_t >= self.seconds
                                    or step == self.total):
            return
        self.last_step, self.last_t = step, now
        eta = (self.total - step) * (now - self.t0) / max(step - self.start, 1)
        tokens_per_s = (state["tokens"] - self.tokens0) / max(now - self.t0, 1e-9)  # this process's, since start
        self.console.print(f"{self.name} step {step}/{self.total} ({step / self.total:.0%}) loss {loss:.4f} "
                           f"lr {lr:.2e} grad-norm {grad_norm:.3f} {tokens_per_s:.0f} tokens/s "
                           f"ETA {int(eta) // 3600}:{int(eta) % 3600 // 60:02d}:{int(eta) % 60:02d}",
                           highlight=False, soft_wrap=True)


def optimizer_step(acc, model, optimizer, scheduler, max_grad_norm: float | None, loss: float, step: int,
                   saved_step: int | None = None):
    """Stop on a non-finite loss before it reaches the weights; clip, step, zero. Returns the grad norm.

    `saved_step`: the step of the run's last checkpoint, if any (the message says what is left).
    """
    if not math.isfinite(loss):
        kept = f"the checkpoint of step {saved_step} is kept" if saved_step else "no checkpoint had been saved yet"
        raise UserError(f"the loss became {loss} at step {step}; {kept} (lower train.learning_rate, then rerun "
                        "with --overwrite)")
    grad_norm = acc.clip_grad_norm_(model.parameters(), max_grad_norm) if max_grad_norm else None
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm) if grad_norm is not None else float("nan")


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
