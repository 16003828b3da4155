"""What a stage gives the one loop (`loop.fit`): a `Stage` subclass that makes micro-batches, computes
its loss as a sum over its units, evaluates, and names its extra files. See docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from rich.console import Console

from . import common


@dataclass
class Micro:
    """One micro-batch: the stage's own `data`, and how much it holds."""

    data: Any
    units: int  # what the loss sum runs over (label tokens, pairs, response tokens, ...)
    examples: int = 0  # sequences / pairs / samples, for throughput
    tokens: int = 0  # tokens passed through the model, for throughput


class StepLoss(NamedTuple):
    loss_sum: torch.Tensor  # scalar, summed over the micro-batch's units (keeps the graph)
    metrics: dict[str, float]  # also sums over those units; logged divided by the units


class Stage:
    """What a stage gives `fit`. Subclasses set the class attributes and implement the methods."""

    name: str = ""  # the CLI's name of the stage
    unit: str = "tokens"  # what a loss sum runs over
    throughput: str = "examples"  # what `examples` counts, in rlhf_stage.json's train_loop
    best_metric: str | None = None  # eval metric that picks best/ (None: no best/)
    best_mode: str = "max"  # "max" or "min"

    def __init__(self, cfg, out: Path, resume_from: Path | None, console: Console):
        self.cfg, self.out, self.resume_from, self.console = cfg, out, resume_from, console
        self.total_steps = 0
        self.manifest: dict = {}
        self.tokenizer = None

    @classmethod
    def precheck(cls, cfg) -> None:
        """Refuse bad input before anything is created (e.g. a --policy of the wrong kind)."""

    def prepare_data(self) -> None:
        """Load the data and set `total_steps` (no model yet: an already complete run stops here)."""
        raise NotImplementedError

    def initial_state(self) -> dict:
        """The stage's own counters in the resumable state (data position, PPO's KL coefficient, ...)."""
        return {"micro_step": 0}

    def build(self, acc) -> torch.nn.Module:
        """Load the models (on `acc.device` where the stage needs them there); return what trains."""
        raise NotImplementedError

    def start(self, model, acc, state: dict) -> None:
        """Called once the model is prepared and the state (fresh or resumed) is known."""
        self.model, self.acc, self.state = model, acc, state

    def next_step(self, state: dict) -> list[Micro]:
        """The micro-batches of the next optimizer step: by default the batcher's next index lists."""
        return [self.micro(idx) for idx in self.draw(state)]

    def micro(self, idx: list[int]) -> Micro:
        """The micro-batch of examples `idx` (what the stage's loss reads, and its units)."""
        raise NotImplementedError

    def loss(self, model, micro: Micro) -> StepLoss:
        raise NotImplementedError

    def after_step(self, state: dict) -> dict:
        """After each optimizer step; metrics returned are logged at once (e.g. a PPO iteration's)."""
        return {}

    def at_boundary(self, state: dict) -> bool:
        """Whether eval and checkpoints may happen after this step (PPO: only between iterations)."""
        return True

    def log_extras(self, state: dict) -> dict:
        batcher = getattr(self, "batcher", None)
        return {"train/epoch": state["micro_step"] / batcher.batches_per_epoch} if batcher is not None else {}

    def make_batcher(self, lengths: list[int]) -> common.Batcher:
        """Deterministic micro-batches over the stage's examples (grouped by `lengths` if configured)."""
        rank, world_size = self.world
        self.batcher = common.Batcher(len(lengths), self.cfg.train.batch_size, self.cfg.seed, rank, world_size,
                                      lengths if self.cfg.train.group_by_length else None)
        return self.batcher

    def draw(self, state: dict) -> list[list[int]]:
        """Example indices of the next step's micro-batches; the position is state["micro_step"]."""
        out = []
        for _ in range(self.cfg.train.gradient_accumulation_steps):
            out.append(self.batcher.indices(state["micro_step"]))
            state["micro_step"] += 1
        return out

    def evaluate(self, core, progress) -> tuple[dict, list[dict]]:
        return {}, []

    def extra_files(self, samples: list[dict]) -> dict[str, str]:
        return {"eval_samples.jsonl": common.jsonl(samples)} if samples else {}

    def describe(self) -> str:
        """One line printed when training starts."""
        return f"{self.name}: {self.total_steps} optimizer steps -> {self.out}"
