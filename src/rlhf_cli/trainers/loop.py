"""One training loop for every stage: `fit(stage_class, cfg, out)`.

A stage supplies what differs — how the micro-batches of an optimizer step are made (for PPO an
experience phase first), its loss as a *sum* over its units, its eval and its extra files — and
`fit` owns the rest: Accelerate / DeepSpeed, resume, signals, the progress bar, the LR schedule,
gradient accumulation, clipping, logging, eval cadence, the best checkpoint and atomic saves.

    for each optimizer step:
        micro_batches = stage.next_step(state)
        units = sum of micro.units over the step and every process     # tokens, pairs or sequences
        for micro in micro_batches:
            backward(stage.loss(model, micro).loss_sum / units)          # one big batch's mean
        clip, step, schedule; stage.after_step(state)
        at a stage boundary: log, evaluate, keep the best, checkpoint (each when due)

Dividing every micro-batch's sum by the units of the whole step makes the update the same however
the step is split into micro-batches or processes (a per-micro-batch mean would weight a short
micro-batch's tokens more than a long one's).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from .. import checkpoint as ck
from .. import lora
from ..errors import UserError
from . import common, distributed, rundir
from .stage import Micro, Stage


def fit(stage_cls: type[Stage], cfg, out: Path, resume: bool = False, overwrite: bool = False,
        console: Console | None = None) -> dict:
    """Train `stage_cls` on `cfg` into the checkpoint directory `out`; returns initial and final metrics."""
    console = console or Console(stderr=True)
    out = Path(out)
    stage_cls.precheck(cfg)
    resume_from = ck.prepare_output(out, resume, overwrite)
    if resume_from is not None:
        rundir.refuse_changed_config(cfg, resume_from)
    acc = distributed.setup_accelerator(cfg)
    torch.manual_seed(cfg.seed)
    stage = stage_cls(cfg, out, resume_from, console)
    stage.world = distributed.world(acc)
    stage.prepare_data()
    if (done := rundir.already_complete(out, resume_from, stage.total_steps, console)) is not None:
        return done
    model = stage.build(acc)
    if cfg.train.gradient_checkpointing:
        common.checkpoint_activations(model)
    optimizer = common.make_optimizer(model, cfg.train)
    scheduler = common.make_scheduler(optimizer, cfg.train, stage.total_steps)
    model, optimizer = acc.prepare(model, optimizer)
    run = rundir.Run(cfg, out, acc, resume_from)
    state = {"step": 0, "examples": 0, "tokens": 0, **stage.initial_state()}
    if resume_from is not None:
        state = rundir.load_resumed(resume_from, acc, optimizer, scheduler, console)
        console.print(f"resuming from {resume_from} at step {state['step']}")
    stage.start(model, acc, state)
    console.print(stage.describe())
    loop = _Loop(stage, model, optimizer, scheduler, acc, run, state)
    with common.progress_bar(console, distributed.is_main(acc)) as progress:
        stage.progress = progress  # for the stage's own tasks (rollouts, generation)
        loop.train(progress)
    return loop.finish()


class _Best:
    """The best eval so far by the stage's metric, kept as `best/` in the run directory."""

    def __init__(self, stage: Stage, state: dict):
        self.metric, self.mode = stage.best_metric, stage.best_mode
        self.enabled = bool(self.metric) and stage.cfg.checkpoint.save_best
        state.setdefault("best", None)

    def update(self, loop: "_Loop", metrics: dict, step: int) -> None:
        value = metrics.get(self.metric) if self.enabled else None
        best = loop.state["best"]
        if value is None or value != value or step == 0:
            return
        if best is not None and (value <= best["value"] if self.mode == "max" else value >= best["value"]):
            return
        loop.state["best"] = {"step": step, "metric": self.metric, "value": value}  # the same on every process
        state_dict = loop.acc.get_state_dict(loop.model)  # every process takes part (ZeRO-3 gathers)
        if distributed.is_main(loop.acc):
            with ck.atomic_dir(loop.run.partial / "best") as tmp:
                lora.save_model(loop.acc.unwrap_model(loop.model), tmp, state_dict)
                loop.stage.tokenizer.save_pretrained(tmp)
                ck.write_manifest(tmp, status="complete", stage=loop.stage.name, step=step, metrics=metrics,
                                  note=f"the best checkpoint by {self.metric}; the parent directory holds the last")


@dataclass
class _Window:
    """Train metrics since the last log: sums over units, and the clock and counters at its start."""

    sums: dict = field(default_factory=dict)
    steps: int = 0
    grad_norm: float = 0.0
    t0: float = field(default_factory=time.perf_counter)
    examples0: int = 0
    tokens0: int = 0


class _Loop:
    def __init__(self, stage: Stage, model, optimizer, scheduler, acc, run, state: dict):
        self.stage, self.model, self.optimizer, self.scheduler = stage, model, optimizer, scheduler
        self.acc, self.run, self.state, self.cfg = acc, run, state, stage.cfg
        self.best = _Best(stage, state)
        self.first_eval: dict = {}
        self.last_eval: dict = {}
        self.samples: list[dict] = []
        self.window = _Window(examples0=state["examples"], tokens0=state["tokens"])
        self.last_eval_step = self.last_ckpt_step = state["step"]
        self.grad_norm = float("nan")

    @property
    def core(self):
        return self.acc.unwrap_model(self.model)

    def evaluate(self, progress, step: int) -> dict:
        metrics, self.samples = self.stage.evaluate(self.core, progress)
        self.run.log(step, metrics)
        self.best.update(self, metrics, step)
        return metrics

    def train(self, progress) -> None:
        total = self.stage.total_steps
        if self.cfg.eval.at_start and self.state["step"] == 0:
            self.first_eval = self.evaluate(progress, 0)
        self.bar = progress.add_task(self.stage.name, total=total, completed=self.state["step"], info="")
        lg = self.cfg.logging
        lines = common.PlainLines(self.stage.console, self.stage.name, total, self.state, lg.print_every,
                                  lg.print_every_seconds, distributed.is_main(self.acc))
        self.model.train()
        clock = common.LoopClock(self.state)
        while self.state["step"] < total:
            loss = self.step()
            w = self.window
            speed = (self.state["tokens"] - w.tokens0) / max(time.perf_counter() - w.t0, 1e-9)
            progress.update(self.bar, advance=1, info=f"loss {loss:.3f}" + (f", {speed:.0f} tokens/s" if speed else ""))
            lines(self.state, loss, self.scheduler.get_last_lr()[0], self.grad_norm)
            forced = self.stage.after_step(self.state)
            if not self.stage.at_boundary(self.state) and not forced:
                continue
            self.log(forced)
            if self.stage.at_boundary(self.state):
                self.boundary(progress)
        clock.record(self.state, self.stage.manifest, self.stage.throughput)
        self.last_eval = self.evaluate(progress, total)

    def step(self) -> float:
        """One optimizer step over the stage's micro-batches."""
        try:
            micro_batches = self.stage.next_step(self.state)
        except UserError as e:  # e.g. the reward server gone in an experience phase: say what is kept
            last = ck.latest_checkpoint(self.run.out)
            raise UserError(f"{e}; " + (f"the checkpoint {last} is kept, continue with --resume" if last else
                                        "no checkpoint was saved yet")) from None
        loss_total = accumulate(self.stage, self.model, micro_batches, self.acc, self.window.sums)
        for micro in micro_batches:
            self.state["examples"] += micro.examples
            self.state["tokens"] += micro.tokens
        last = ck.latest_checkpoint(self.run.out) if not math.isfinite(loss_total) else None  # for the message
        grad_norm = common.optimizer_step(self.acc, self.model, self.optimizer, self.scheduler,
                                          self.cfg.train.max_grad_norm, loss_total, self.state["step"] + 1,
                                          saved_step=int(last.name.removeprefix(ck.CKPT_PREFIX)) if last else None)
        self.state["step"] += 1
        self.window.steps += 1
        self.window.grad_norm += grad_norm
        self.grad_norm = grad_norm
        return loss_total

    def log(self, forced: dict) -> None:
        step, total, w = self.state["step"], self.stage.total_steps, self.window
        due = step // self.cfg.train.log_interval != (step - w.steps) // self.cfg.train.log_interval or step == total
        if not (due or forced) or not w.steps:
            return
        sums = {k: distributed.all_reduce(v, "sum") for k, v in sorted(w.sums.items())}
        units = max(sums.pop("__units"), 1)
        dt = max(time.perf_counter() - w.t0, 1e-9)
        metrics = {f"train/{k}": v / units for k, v in sums.items()}
        metrics.update({"train/lr": self.scheduler.get_last_lr()[0], "train/grad_norm": w.grad_norm / w.steps,
                        "train/tokens_per_s": distributed.all_reduce(self.state["tokens"] - w.tokens0, "sum") / dt,
                        f"train/{self.stage.throughput}_per_s":
                            distributed.all_reduce(self.state["examples"] - w.examples0, "sum") / dt,
                        **self.stage.log_extras(self.state), **forced})
        self.run.log(step, metrics)
        self.window = _Window(examples0=self.state["examples"], tokens0=self.state["tokens"])

    def boundary(self, progress) -> None:
        """Eval and checkpoints, each when its interval was crossed since the last one (not at the end)."""
        step, total = self.state["step"], self.stage.total_steps

        def crossed(interval: int, since: int) -> bool:
            return bool(interval) and step // interval != since // interval and step != total
        if crossed(self.cfg.eval.interval, self.last_eval_step):
            self.evaluate(progress, step)
            self.last_eval_step = step
        due = crossed(self.cfg.checkpoint.interval, self.last_ckpt_step)
        if due:
            self.last_ckpt_step = step
        if step != total:
            self.run.checkpoint(self.model, self.stage.tokenizer, self.optimizer, self.scheduler, self.state,
                                self.stage.manifest, due=due)

    def finish(self) -> dict:
        stage, run = self.stage, self.run
        if not self.first_eval:  # a resumed run: the initial eval is in the log
            self.first_eval = next((r for r in run.metrics() if r["step"] == 0
                                    and any(k.startswith("eval/") for k in r)), {})
        manifest = stage.manifest
        manifest["metrics"] = self.last_eval
        manifest["initial_metrics"] = {k: v for k, v in self.first_eval.items() if k.startswith("eval/")}
        best_dir = run.partial / "best"
        if self.state.get("best"):
            manifest["best"] = {"dir": "best", **self.state["best"]}
        run.save_final(self.model, stage.tokenizer, self.optimizer, self.scheduler, self.state, manifest,
                       stage.extra_files(self.samples), extra_dirs={"best": best_dir} if best_dir.exists() else {})
        return {"initial": manifest["initial_metrics"], "final": self.last_eval, "output_dir": str(stage.out),
                "steps": stage.total_steps}


def accumulate(stage: Stage, model, micro_batches: list[Micro], acc, sums: dict | None = None) -> float:
    """Backward every micro-batch's loss sum divided by the units of the whole step over every process;
    returns the step's loss (its mean per unit). `sums` collects the metric sums for logging."""
    units = distributed.all_reduce(sum(m.units for m in micro_batches), "sum")
    world_size = distributed.world(acc)[1]
    loss_total = 0.0
    for j, micro in enumerate(micro_batches):
        with acc.autocast():
            out = stage.loss(model, micro)
        # DDP averages gradients over the processes: the world_size factor turns that mean into the sum
        loss = out.loss_sum * world_size / max(units, 1)
        distributed.backward(acc, loss, stage.cfg.train.gradient_accumulation_steps, last=j == len(micro_batches) - 1)
        loss_total += out.loss_sum.item()
        if sums is not None:
            for k, v in {"loss": out.loss_sum.item(), **out.metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            sums["__units"] = sums.get("__units", 0.0) + micro.units
    return distributed.all_reduce(loss_total, "sum") / max(units, 1)
