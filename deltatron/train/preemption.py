"""Preemption: SIGTERM or SIGUSR1 asks the run to save at the next step boundary and exit.

slurm sends SIGTERM (or, with `--signal=USR1@<seconds>`, SIGUSR1) some time before it kills a job;
torchrun forwards SIGTERM to its workers. The handler only records the request; the training loop
asks `requested()` at every step boundary, which all-reduces the flag so that every rank saves the
same step even when the signal reached only some of them, then saves a checkpoint and exits with
PREEMPTED_EXIT_CODE, which launch scripts take as "requeue me" (EX_TEMPFAIL: temporary failure).
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

PREEMPTED_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionSignal:
    """Context manager that records SIGTERM / SIGUSR1 while training runs."""

    def __init__(self, device: torch.device):
        self.device = device
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "PreemptionSignal":
        if threading.current_thread() is threading.main_thread():  # signal() works only there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def requested(self) -> bool:
        """Whether any rank received a signal (collective: every rank calls it each step)."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
