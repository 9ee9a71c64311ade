"""Where training metrics go: the console, a JSONL file in the run directory, wandb and (optionally)
TensorBoard.

Only rank 0 writes. wandb runs offline unless the config says otherwise, so a run never needs a
login; `wandb sync RUN_DIR/wandb/offline-run-*` uploads it later. The wandb run id is derived from
the run directory, so a job that resumes in the same directory continues the same wandb run.
Each run directory also gets `run_info.json`: the git commit, the exact command line and the host,
saved with the wandb run too (next to the resolved config.yaml the trainer writes).
`Monitor.close()` returns once wandb's run file (`run-*.wandb`) is complete on disk, so it can be
read or synced right away.

Console: on a terminal a rich progress bar with ETA to train.steps; otherwise (log files, CI) the
per-log-step line "step N/M | loss ... | ETA ..." is the progress line.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
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


def wandb_run_id(run_dir: str) -> str:
    """A stable wandb id for a run directory: resuming in the same directory continues the run."""
    path = os.path.realpath(run_dir)
    stem = "".join(c if c.isalnum() else "-" for c in os.path.basename(path))[:40].strip("-")
    return f"{stem}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


def git_commit(repo_dir: str) -> Optional[str]:
    """The checkout's commit (with "-dirty" if tracked files have uncommitted changes), or None
    outside git. Generous timeouts: on a loaded machine `git status` can take seconds."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    commit = head.stdout.strip()
    try:
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_dir,
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return commit + "-unknown-state"  # the commit is still worth recording
    return commit + ("-dirty" if status.stdout.strip() else "")


def run_info() -> dict:
    """What reproduces this process: the code version, the exact command line, where it ran."""
    here = os.path.dirname(os.path.abspath(__file__))
    return {
        "git_commit": git_commit(here),
        "command": [sys.executable, *sys.argv],
        "cwd": os.getcwd(),
        "host": socket.gethostname(),
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


WANDB_BLOCK = 32 * 1024  # a wandb run file's block size (the LevelDB log format)


def wandb_file_records(path: str, first_block: int = 0):
    """The records (wandb_internal_pb2.Record) of a wandb run file, from block `first_block` on.

    The file (`run-*.wandb`, the log wandb-core writes for offline and online runs alike) is a
    7-byte header, then 32 KiB blocks of chunks, each framed by crc32 (4 bytes), length (2) and
    type (1: a whole record, 2: first, 3: middle, 4: last chunk of one); a block's tail too short
    for a frame is padding. Chunks that continue a record begun before `first_block`, and a
    record the file does not hold all of yet, are skipped."""
    import struct

    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        start = max(first_block * WANDB_BLOCK, 7)
        f.seek(start)
        raw = f.read()
    pos, parts = 0, None  # parts: the chunks of the record being assembled, None between records
    while pos + 7 <= len(raw):
        left = WANDB_BLOCK - (start + pos) % WANDB_BLOCK
        if left < 7:
            pos += left
            continue
        length, kind = struct.unpack("<HB", raw[pos + 4 : pos + 7])
        chunk = raw[pos + 7 : pos + 7 + length]
        if len(chunk) < length:  # written only partly so far
            return
        pos += 7 + length
        if kind in (1, 2):
            parts = [chunk]
        elif parts is not None:
            parts.append(chunk)
        if kind in (1, 4) and parts is not None:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = None
            yield record


def wandb_file_complete(path: str) -> bool:
    """Whether a wandb run file holds its exit record, and so all that was logged before it.
    wandb-core writes the file a 32 KiB block at a time, keeping the last block in memory until it
    closes the run's stream; the exit record is small enough to start in the second-to-last
    block at the earliest, so only the last two are read."""
    try:
        last_block = os.path.getsize(path) // WANDB_BLOCK
        return any(r.HasField("exit") for r in wandb_file_records(path, max(last_block - 1, 0)))
    except OSError:
        return False


def wait_for_wandb_file(path: str, timeout: float) -> bool:
    """Wait until the wandb run file at `path` is complete (wandb_file_complete); False if it is
    not within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while not wandb_file_complete(path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(2 * delay, 0.5)
    return True


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Progress:
    """rich progress bar with ETA to train.steps, on an interactive terminal only."""

    def __init__(self, total: int, first: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            TextColumn("{task.description}"), transient=False,
        )
        self.task = self.bar.add_task("", total=total, completed=first - 1)
        self.bar.start()

    def print(self, line: str) -> None:
        self.bar.console.print(line, markup=False, highlight=False)

    def advance(self, description: Optional[str]) -> None:
        if description is None:
            self.bar.advance(self.task)
        else:
            self.bar.update(self.task, advance=1, description=description)

    def close(self) -> None:
        self.bar.stop()


class Monitor:
    WANDB_FILE_TIMEOUT = 60.0  # seconds close() waits for wandb's run file to be complete

    def __init__(self, run_dir: str, logging_cfg, resolved_config: dict, wandb_id: Optional[str] = None):
        self.run_dir = run_dir
        self.cfg = logging_cfg
        self.enabled = is_rank0()
        self._wandb = None
        self._jsonl = None
        self._tb = None
        self._progress: Optional[_Progress] = None
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        info = run_info()
        with open(os.path.join(run_dir, "run_info.json"), "w") as f:
            json.dump(info, f, indent=1)
        if logging_cfg.wandb and logging_cfg.wandb_mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=logging_cfg.wandb_project,
                entity=logging_cfg.wandb_entity,
                name=logging_cfg.run_name,
                id=wandb_id or wandb_run_id(run_dir),
                resume="allow",
                mode=logging_cfg.wandb_mode,
                dir=run_dir,
                config={**resolved_config, "run_info": info},
            )
            # the files themselves too, as written; files in the run's directory are uploaded with
            # it ("config.yaml" there is wandb's own, hence the other name)
            for name, dest in (("config.yaml", "resolved_config.yaml"), ("run_info.json", "run_info.json")):
                path = os.path.join(run_dir, name)
                if os.path.exists(path):
                    shutil.copyfile(path, os.path.join(self._wandb.dir, dest))
        if getattr(logging_cfg, "tensorboard", False):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ImportError(
                    "logging.tensorboard=true needs the tensorboard package: pip install -e '.[obs]'"
                ) from exc
            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    @property
    def wandb_dir(self) -> Optional[str]:
        return self._wandb.dir if self._wandb is not None else None

    def start_progress(self, total_steps: int, first_step: int) -> None:
        """Show a progress bar (rank 0, interactive terminal, logging.progress_bar)."""
        if self.enabled and getattr(self.cfg, "progress_bar", True) and sys.stdout.isatty():
            self._progress = _Progress(total_steps, first_step)

    def step_done(self, description: Optional[str] = None) -> None:
        """Advance the progress bar by one step (cheap: no I/O unless it redraws)."""
        if self._progress is not None:
            self._progress.advance(description)

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.print(line)
        else:
            print(line, flush=True)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """One record: the JSONL gets everything (lists such as moe/layer{N}/load as lists), wandb
        gets scalars and a histogram per list, TensorBoard scalars only."""
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            import wandb

            self._wandb.log(
                {k: (wandb.Histogram(v) if isinstance(v, list) else v) for k, v in metrics.items()}, step=step
            )
        if self._tb is not None:
            for k, v in metrics.items():
                if _scalar(v) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            run_file = None if self._wandb.settings.x_skip_transaction_log else self._wandb.settings.sync_file
            self._wandb.finish()
            # finish() returns once wandb-core has handled the run's exit, but the run file's last
            # block (the last rows, the exit record) reaches the disk only when wandb-core closes
            # the run's stream, on a message finish() sends without waiting. Wait for it, so what
            # reads the file next (wandb sync, the tests) sees every row.
            if run_file and os.path.exists(run_file) and not wait_for_wandb_file(run_file, self.WANDB_FILE_TIMEOUT):
                print(f"warning: wandb's run file {run_file} was not complete {self.WANDB_FILE_TIMEOUT:.0f} s "
                      "after the run finished; wandb writes the rest in the background", file=sys.stderr, flush=True)
