"""Run a function on N CPU processes (gloo) and collect each rank's return value.

The processes of each world size are spawned once per test session and reused: spawning them
and importing torch and megatron-core costs more than most of the jobs they run (on the 2-core CI
machine, 15-40 s per launch). Every job gets a fresh rendezvous port and ends with the process
groups destroyed, as a freshly spawned set would; jobs already train several layouts one after
another in the same processes (tests/parity.py), so nothing else carries over that matters. A job
that fails or times out takes its processes down (a rank may be stuck in a collective); the next
job spawns new ones.
"""

from __future__ import annotations

import atexit
import os
import queue as queue_module
import socket
import traceback

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(rank: int, world_size: int, inbox, outbox) -> None:
    """A pool process: run (port, fn, args) jobs from inbox until it gets None."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)  # torch was imported before OMP_NUM_THREADS was set: 2+ ranks share 2 cores
    parent = os.getppid()
    while True:
        try:
            job = inbox.get(timeout=5)
        except queue_module.Empty:
            if os.getppid() != parent:  # the test session is gone without closing the pool
                return
            continue
        if job is None:
            return
        port, fn, args = job
        os.environ["MASTER_PORT"] = str(port)
        try:
            outbox.put((rank, "ok", fn(rank, world_size, *args)))
        except BaseException:
            outbox.put((rank, "error", traceback.format_exc()))
        finally:
            from deltatron.parallel.setup import destroy_process_groups

            destroy_process_groups()


class _Pool:
    def __init__(self, world_size: int):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.inboxes = [ctx.Queue() for _ in range(world_size)]
        self.outbox = ctx.Queue()
        self.procs = [
            # not daemonic: a job may start processes of its own (checkpoint writers)
            ctx.Process(target=_serve, args=(r, world_size, self.inboxes[r], self.outbox))
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn, args, timeout: float) -> tuple[dict, list]:
        port = _free_port()
        for inbox in self.inboxes:
            inbox.put((port, fn, args))
        results, errors = {}, []
        for _ in range(self.world_size):
            try:
                rank, status, value = self.outbox.get(timeout=timeout)
            except queue_module.Empty:
                errors.append(f"no answer within {timeout:.0f} s")
                break
            if status == "ok":
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
                break
        return results, errors

    def close(self, graceful: bool) -> None:
        if graceful:
            for inbox in self.inboxes:
                inbox.put(None)
        for p in self.procs:
            p.join(timeout=10 if graceful else 0.1)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)


_POOLS: dict[int, _Pool] = {}


@atexit.register
def _close_pools() -> None:
    while _POOLS:
        _POOLS.popitem()[1].close(graceful=True)


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0) -> list:
    """fn(rank, world_size, *args) on `world_size` processes; returns results by rank.

    fn must be importable (a module-level function of a test module) and must leave nothing
    behind but process groups (which are destroyed after it).
    """
    pool = _POOLS.get(world_size)
    if pool is None or not all(p.is_alive() for p in pool.procs):
        if pool is not None:
            pool.close(graceful=False)
        pool = _POOLS[world_size] = _Pool(world_size)
    results, errors = pool.run(fn, args, timeout)
    if errors:
        del _POOLS[world_size]
        pool.close(graceful=False)
        raise AssertionError("distributed run failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
