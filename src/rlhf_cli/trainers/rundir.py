"""A stage run's directory while it trains: the live metrics log, intermediate and final checkpoints
(written atomically, main process only), stop requests (SIGINT / SIGTERM), and resuming.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from .. import checkpoint as ck
from .. import lora
from ..config import to_dict
from ..errors import STOP, Interrupted, UserError
from ..tracking import MetricsLogger, read_metrics, truncate_metrics
from .distributed import barrier, broadcast, is_main, load_zero_shard, save_zero_shard, uses_deepspeed


def run_name(cfg) -> str:
    return cfg.logging.run_name or f"{cfg.stage}-{cfg.preset}-seed{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


ZERO_DIR = "zero"


class Run:
    """One stage run's directories, logger and checkpoint writing (main process only writes)."""

    def __init__(self, cfg, out: Path, accelerator, resume_from: Path | None):
        self.cfg, self.out, self.acc = cfg, Path(out), accelerator
        self.partial = ck.partial_dir(self.out)
        self.zero_staging: Path | None = None
        self.resume_from = resume_from
        self.started = ck.now()
        main = is_main(accelerator)
        self.run_id = None
        if main:
            self.partial.mkdir(parents=True, exist_ok=True)
            self.run_id = ck.start_run_file(self.partial)
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
        lora.save_model(self.acc.unwrap_model(model), dest, state_dict)
        tokenizer.save_pretrained(dest)
        # ZeRO shards the optimizer state across processes: each wrote its own (_stage_zero_shards)
        ck.save_trainer_state(dest / ck.STATE_DIR, None if uses_deepspeed(self.acc) else optimizer, scheduler,
                              progress)
        if self.zero_staging is not None and self.zero_staging.is_dir():
            os.replace(self.zero_staging, dest / ck.STATE_DIR / ZERO_DIR)
        if (self.partial / ck.METRICS).exists():
            shutil.copyfile(self.partial / ck.METRICS, dest / ck.METRICS)
        for name, text in (extra_files or {}).items():
            (dest / name).write_text(text)
        if status == "complete":
            manifest = {**manifest, "content_hash": ck.compute_content_hash(dest)}
        ck.write_manifest(dest, status=status, stage=self.cfg.stage, config=to_dict(self.cfg), run_id=self.run_id,
                          started=self.started, ended=ck.now(), step=progress["step"], **manifest)

    def _stage_zero_shards(self, optimizer) -> None:
        """Under ZeRO every process writes its optimizer shard beside the checkpoint being made (a temp
        folder named for the main process, so a killed run's is tidied at the next start); the main
        process moves it in."""
        if not uses_deepspeed(self.acc):
            return
        self.zero_staging = self.partial / f".{ZERO_DIR}.tmp-{broadcast(os.getpid())}"
        save_zero_shard(self.acc, optimizer, self.zero_staging)
        barrier()

    def save_intermediate(self, model, tokenizer, optimizer, scheduler, progress: dict, manifest: dict) -> None:
        barrier()
        state_dict = self.acc.get_state_dict(model)  # every process takes part: ZeRO-3 gathers the shards
        self._stage_zero_shards(optimizer)
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
        self._stage_zero_shards(optimizer)
        if is_main(self.acc):
            self.logger.close()
            with ck.atomic_dir(self.out) as tmp:
                # extra directories: PPO's best/, TensorBoard's tb/, W&B's wandb/
                logs = {"tb": self.partial / "tb", "wandb": self.partial / "wandb"}
                for name, src in {**(extra_dirs or {}), **logs}.items():
                    if src.exists():
                        shutil.copytree(src, tmp / name)
                self._write(tmp, model, tokenizer, optimizer, scheduler, progress, "complete", manifest,
                            extra_files, state_dict=state_dict)
            ck.retire(self.partial)  # a kill before or during this leaves it whole or gone (see finish_cleanup)
        STOP.armed = False
        barrier()


def already_complete(out: Path, resume_from: Path | None, steps: int, console) -> dict | None:
    """The manifest of `out` when --resume finds it complete at `steps` or beyond (nothing to train)."""
    if resume_from is None or resume_from != out or (ck.read_progress(out) or {}).get("step", 0) < steps:
        return None
    console.print(f"[green]{out} is already complete at step {steps}; nothing to do.[/]")
    return ck.read_manifest(out) or {}


def load_resumed(resume_from: Path, acc, optimizer, scheduler, console) -> dict:
    """The progress saved in `resume_from`; the optimizer and scheduler restored to it."""
    if not uses_deepspeed(acc):
        return ck.load_trainer_state(resume_from / ck.STATE_DIR, optimizer, scheduler)
    note = load_zero_shard(acc, optimizer, resume_from / ck.STATE_DIR / ZERO_DIR)
    if note and is_main(acc):
        console.print(f"[yellow]warning:[/] {note}")
    return ck.load_trainer_state(resume_from / ck.STATE_DIR, None, scheduler)


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


# which sections may differ when a run resumes: they change where and how a run is recorded, not what
# it trains (a changed learning rate or data source would make the manifest disagree with the weights)
RESUMABLE_CHANGES = ("output_dir", "logging.", "checkpoint.")


def material_changes(cfg, checkpoint_dir: Path) -> list[str]:
    """Config keys that differ from the checkpoint's and change what is trained."""
    return [k for k in config_changes(cfg, checkpoint_dir) if not k.startswith(RESUMABLE_CHANGES)]


def refuse_changed_config(cfg, resume_from: Path) -> None:
    changed = material_changes(cfg, resume_from)
    if changed:
        keys = ", ".join(changed[:4]) + (", ..." if len(changed) > 4 else "")
        raise UserError(f"--resume: the config differs from the interrupted run's in {keys}; resume with the "
                        "same config, or pass --overwrite to start over with the new one")
