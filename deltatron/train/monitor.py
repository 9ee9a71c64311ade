"""Where training metrics go: the console, a JSONL file in the run directory, and wandb.

Only rank 0 writes. wandb runs offline unless the config says otherwise, so a run never needs a
login; `wandb sync RUN_DIR/wandb/offline-run-*` uploads it later.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

import torch.distributed as dist


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Monitor:
    def __init__(self, run_dir: str, logging_cfg, resolved_config: dict, wandb_id: Optional[str] = None):
        self.run_dir = run_dir
        self.cfg = logging_cfg
        self.enabled = is_rank0()
        self._wandb = None
        self._jsonl = None
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        if logging_cfg.wandb and logging_cfg.wandb_mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=logging_cfg.wandb_project,
                entity=logging_cfg.wandb_entity,
                name=logging_cfg.run_name,
                id=wandb_id,
                resume="allow" if wandb_id else None,
                mode=logging_cfg.wandb_mode,
                dir=run_dir,
                config=resolved_config,
            )

    @property
    def wandb_dir(self) -> Optional[str]:
        return self._wandb.dir if self._wandb is not None else None

    def print(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
