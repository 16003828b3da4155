"""The Python API over the stage registry, what the `rlhf` command itself runs.

    from rlhf_cli import train
    result = train("ppo", config="stage_configs/tldr_ppo.yaml", policy="runs/sft",
                   reward_fn=my_reward, prompts=["SUBREDDIT: r/cats ... TL;DR:", ...],
                   overrides={"ppo.init_kl_coef": 0.05}, output_dir="runs/ppo")
    result.output_dir, result.metrics

trlx's `trlx.train(reward_fn=..., prompts=..., config=...)` in the same spirit: a callable reward and
data held in memory (a notebook's) need no module or file; the run writes the same checkpoint as the CLI.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console

if not torch.cuda.is_available():  # else DeepSpeed, when installed, warns on import that it fell back to CPU
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from . import checkpoint as ck
from . import rewards
from .config import StageConfig, load_config, resolve  # noqa: F401  (resolve: part of the API)
from .data.sources import in_memory
from .errors import UserError
from .preflight import fill_defaults  # noqa: F401  (part of the API)
from .stages import get
from .trainers.loop import fit
from .trainers.rundir import material_changes


@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict  # held-out metrics of the trained model
    initial_metrics: dict = field(default_factory=dict)  # the same, of the model it started from
    steps: int = 0


def plan(cfg: StageConfig, out: Path) -> dict:
    """What the run would do (data, model, steps, memory), without training: `--dry-run`."""
    return get(cfg.stage).plan(cfg, out)


def run(cfg: StageConfig, out: Path, resume: bool = False, overwrite: bool = False,
        console: Console | None = None) -> dict:
    """Train the stage of `cfg` into `out`. With `resume`, a complete checkpoint whose config differs in
    what it trains is trained again (and replaced once the new one is complete), so a rerun pipeline
    retrains exactly the stages whose config changed."""
    console = console or Console(stderr=True)
    with ck.output_lock(out):  # held for the whole run: a second run into `out` is refused
        ck.finish_cleanup(out)
        changed = material_changes(cfg, out) if resume and ck.is_complete(out) and not ck.in_progress(out) else []
        if changed:
            console.print(f"{out} was trained with a different config ({', '.join(changed[:4])}"
                          f"{', ...' if len(changed) > 4 else ''}); training it again")
        return fit(get(cfg.stage).trainer, cfg, out, resume=resume and not changed,
                   overwrite=overwrite or bool(changed), console=console)


def train(stage: str, config: str | Path | None = None, *, output_dir: str | Path | None = None,
          overrides: dict | None = None, preset: str | None = None, seed: int | None = None,
          policy: str | None = None, reward_fn: Callable | None = None, prompts: list[str] | None = None,
          dataset: list[dict] | None = None, resume: bool = False, overwrite: bool = False,
          console: Console | None = None) -> TrainResult:
    """Train one stage and return its checkpoint directory and held-out metrics.

    `reward_fn`: trlx's `fn(samples, prompts, outputs, **metadata) -> list[float]` (ppo). `prompts`: the
    prompts of online RL; `dataset`: rows of any schema the stage reads (e.g. {prompt, chosen, rejected}).
    `overrides`: {"dotted.key": value}. Bad input raises `rlhf_cli.errors.UserError` with one sentence.
    """
    values = dict(overrides or {})
    if policy is not None:
        values["policy"] = policy
    if reward_fn is not None:
        values.update({"reward.fn": rewards.in_memory(reward_fn), "reward.ckpt": None, "reward.url": None,
                       "reward.classifier": None})
    if prompts is not None and dataset is not None:
        raise UserError("pass prompts or dataset, not both")
    rows = [{"prompt": p} for p in prompts] if prompts is not None else dataset
    if rows is not None:
        values["data.source"] = in_memory(rows, _digest(rows))
    cfg, out = resolve(stage, config, values, preset, seed, output_dir)
    if cfg.distributed.num_processes > 1 or cfg.distributed.accelerate_config:
        raise UserError("several processes need a launcher: run `rlhf` (it relaunches itself) or `accelerate launch`")
    from . import preflight

    preflight.check_paths(cfg)
    preflight.check_hub(cfg)
    result = run(cfg, out, resume, overwrite, console)
    return TrainResult(Path(result["output_dir"]), result.get("final") or result.get("metrics") or {},
                       result.get("initial") or result.get("initial_metrics") or {}, result.get("steps", 0))


def _digest(rows: list) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()[:12]

