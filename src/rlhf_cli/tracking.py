"""Metric logging: JSONL always; TensorBoard and Weights & Biases when asked for."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from .errors import UserError


class MetricsLogger:
    def __init__(self, path: Path, logging_cfg, run_name: str, config: dict, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if logging_cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("logging.tensorboard is on but tensorboard is not installed "
                                "(pip install tensorboard)") from None
            self.tb = SummaryWriter(str(self.path.parent / "tb"))
        if logging_cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise UserError("logging.wandb is on but wandb is not installed (pip install wandb)") from None
            # its run folder beside our log (it travels into the checkpoint), not in the current directory
            self.wandb = wandb.init(project=logging_cfg.wandb_project, name=run_name, config=config,
                                    dir=str(self.path.parent))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                 for k, v in metrics.items()}
        record = {"step": step, "time": round(time.time(), 3), **clean}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
        if self.tb is not None:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(clean, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after `step` (a resumed run logs them again)."""
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
