"""Where a training step waits on the host: synchronising CUDA calls and the GPU's busy share.

    python bench/host_sync.py [--warmup 4] [--out FILE] [--cpu] [hydra overrides ...]

Builds a Trainer (default: `model=proxy`, bf16, sequence 4096, global batch 2, micro-batch 1),
trains --warmup steps, then
1. one step under `torch.cuda.set_sync_debug_mode("warn")`: every synchronising call (device-to-host
   reads, copies from pageable memory, explicit synchronisations) with its call site, as the
   innermost frames of deltatron, megatron-core and torch (`sync_sites`: [count, site] pairs, most
   frequent first; `syncs_per_step`: their total);
2. one step under torch.profiler: its wall time, the time the GPU was busy (the union of all kernel
   and copy intervals) and their ratio. A step whose GPU is busy a small share of the time is bound
   by the host (Python, kernel launches, synchronisations).
Writes bench/results/host_sync_<device>.json (with the timed steps' wall times). This is a
diagnostic, not a comparison: it has no reference.

--cpu runs the `tiny` preset on CPU (fp32) to check the script: without CUDA there are no
synchronisations to count and no GPU time, so it reports the step times only.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, compose, device_tag, environment, sync, timed_steps  # noqa: E402

GPU_MODEL = ["model=proxy", "data.seq_length=4096", "train.micro_batch_size=1", "train.global_batch_size=2"]
CPU_MODEL = ["model=tiny", "data.seq_length=128", "train.micro_batch_size=1", "train.global_batch_size=2"]
COMMON = ["train.eval_interval=0", "train.save_interval=0", "logging.wandb=false"]
SYNC_WARNING = "called a synchronizing CUDA operation"
# frames that name a call site (the rest: pytest, runpy, this script's own loop)
SITE_PACKAGES = ("deltatron", "megatron", "torch")


def call_site(depth: int = 6) -> str:
    """The innermost `depth` frames of the current stack inside deltatron, megatron-core or torch,
    innermost first, as file:line:function."""
    frames = [
        f for f in traceback.extract_stack()[:-2]
        if any(f"{os.sep}{pkg}{os.sep}" in f.filename for pkg in SITE_PACKAGES) and "warnings" not in f.filename
    ]
    return " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}:{f.name}" for f in reversed(frames[-depth:]))


def count_syncs(trainer, batches) -> collections.Counter:
    """Synchronising calls of one train_step on `batches`, by call site."""
    sites: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if SYNC_WARNING in str(message):
            sites[call_site()] += 1

    sync()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.train_step(batches)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sites


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (any unit)."""
    total, end = 0.0, None
    start = None
    for s, e in sorted(intervals):
        if end is None or s > end:
            if end is not None:
                total += end - start
            start, end = s, e
        else:
            end = max(end, e)
    return total + (end - start if end is not None else 0.0)


def profiled_step(trainer, batches) -> dict:
    """Wall time and GPU-busy time of one train_step."""
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        trainer.train_step(batches)
        sync()
        wall = time.perf_counter() - start
    gpu = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type.name == "CUDA"]
    busy = busy_seconds(gpu) / 1e6  # the profiler's times are microseconds
    return {"profiled_step_s": wall, "gpu_busy_s": busy, "gpu_busy_fraction": busy / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=int, default=4, help="steps before the measured ones")
    parser.add_argument("--cpu", action="store_true", help="tiny preset on CPU (checks the script)")
    parser.add_argument("--out", default=None, help="default: bench/results/host_sync_<device>.json")
    args, overrides = parser.parse_known_args()
    from deltatron.train.trainer import Trainer

    env = environment()
    out = args.out or os.path.join(REPO, "bench", "results", f"host_sync_{device_tag(env['device'])}.json")
    model = CPU_MODEL if args.cpu else GPU_MODEL
    run_overrides = [*model, *COMMON, f"train.steps={args.warmup + 2}", *overrides]
    cfg, resolved = compose(run_overrides)
    trainer = Trainer(cfg, resolved)
    outs, seconds = timed_steps(trainer, args.warmup)
    record = {"benchmark": "host_sync", **env, "overrides": run_overrides, "warmup_step_s": seconds}
    it = trainer.data.train_batches()
    if torch.cuda.is_available() and not args.cpu:
        sites = count_syncs(trainer, [next(it) for _ in range(trainer.num_microbatches)])
        record["syncs_per_step"] = sum(sites.values())
        record["sync_sites"] = [[n, site] for site, n in sites.most_common()]
        record.update(profiled_step(trainer, [next(it) for _ in range(trainer.num_microbatches)]))
    else:
        record["note"] = "no CUDA: synchronisations and GPU time not measured (script check only)"
    with open(out, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    print(json.dumps({k: v for k, v in record.items() if k != "sync_sites"}, indent=2))
    for n, site in record.get("sync_sites", [])[:15]:
        print(f"{n:6d}  {site}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
