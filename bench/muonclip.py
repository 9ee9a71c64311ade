"""MuonClip vs AdamW: optimizer step time, its share of the iteration, and the loss after N steps.

    python bench/muonclip.py [--steps N] [--warmup W] [--nproc GPUS] [--parts step,loss]
                             [--loss-steps L] [hydra overrides ...]

Two parts, each optimizer's run in its own process (under torchrun with --nproc N > 1):
1. step: the same model (default: the proxy preset, bf16 on GPU) for N steps with each optimizer on
   the same data, timing every optimizer.step() and every whole iteration (CUDA-synchronised);
   "iteration_ms", "muonclip_step_ms", "adamw_step_ms", "adamw_iteration_ms" are means over the
   steps after the first W, with the losses of those steps. Then --steady-steps more, timed
   together with no synchronisation between them, as Trainer.fit runs: "steady_iteration_ms" and
   "adamw_steady_iteration_ms" are their mean wall times (the optimizer step's device work can
   overlap the next step's host-bound forward there, which the synchronised timing prevents).
   --profile prints a profiler table of one more step of each.
2. loss: the `tiny` preset on the bundled corpus, L steps with each optimizer (same seed, same
   tokens, each optimizer's default lr and schedule); "muonclip_losses"/"adamw_losses" and the
   validation losses of both. Hydra overrides apply to the step part only.
Writes bench/results/muonclip_<device>.json after each part.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, ResultsFile, compose, device_tag, environment, fit_losses, sync, timed_steps  # noqa: E402


def run(optimizer: str, overrides: list[str], steps: int, warmup: int, steady_steps: int, profile: bool) -> dict:
    """Train `steps` steps with `optimizer`; per-step timings and losses. Then `steady_steps`
    more without any synchronisation of ours between them (as Trainer.fit runs): their mean wall
    time is the steady-state iteration, where an optimizer step's device work may overlap the next
    forward's host work. With `profile`, a torch.profiler table of one more step."""
    from deltatron.train.trainer import Trainer

    cfg, resolved = compose([f"optim={optimizer}", f"train.steps={steps}", *overrides])
    trainer = Trainer(cfg, resolved)
    step_ms: list[float] = []
    inner = trainer.optimizer.step

    def timed_step():
        sync()
        start = time.perf_counter()
        out = inner()
        sync()
        step_ms.append(1e3 * (time.perf_counter() - start))
        return out

    trainer.optimizer.step = timed_step
    outs, seconds = timed_steps(trainer, steps)
    iteration_ms = [1e3 * t for t in seconds]
    trainer.optimizer.step = inner
    it = trainer.data.train_batches()
    sync()
    start = time.perf_counter()
    for _ in range(steady_steps):
        trainer.train_step([next(it) for _ in range(trainer.num_microbatches)])
    sync()
    steady_ms = 1e3 * (time.perf_counter() - start) / max(steady_steps, 1)
    table = None
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        batches = [next(it) for _ in range(trainer.num_microbatches)]
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            trainer.train_step(batches)
            sync()
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70)
    losses = [o["loss"] for o in outs]
    # QK-clip's statistics of the last step (read on log steps only; timed_steps does not log)
    metrics = trainer.optimizer.log_step_metrics() if hasattr(trainer.optimizer, "log_step_metrics") else {}
    timed = slice(warmup, None)
    return {
        "step_ms": statistics.mean(step_ms[timed]),
        "iteration_ms": statistics.mean(iteration_ms[timed]),
        "steady_iteration_ms": steady_ms,
        "profile": table,
        "losses": losses,
        "last_qk_clip": metrics,
    }


LOSS_MODEL = ["model=tiny", "logging.wandb=false", "train.save_interval=0"]
REFERENCE = (
    "measured in the same run: MuonClip against megatron-core's AdamW (same model, data, steps and "
    "parallel layout)"
)


def _child(args, overrides: list[str]) -> None:
    """One optimizer's run in this process (under torchrun for several GPUs)."""
    if args.part_kind == "loss":
        result = fit_losses([f"optim={args.only}", *LOSS_MODEL, *overrides], args.loss_steps)
    else:
        result = run(args.only, overrides, args.steps, args.warmup, args.steady_steps, args.profile)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        result["world_size"] = dist.get_world_size()
        with open(args.part, "w") as f:
            json.dump(result, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--nproc", type=int, default=1, help="GPUs (processes, via torchrun)")
    parser.add_argument("--parts", default="step,loss", help="which of step, loss to run")
    parser.add_argument("--loss-steps", type=int, default=400)
    parser.add_argument("--steady-steps", type=int, default=10,
                        help="steps after the timed ones, timed together without syncs between them")
    parser.add_argument("--profile", action="store_true", help="print a profiler table of one step of each optimizer")
    parser.add_argument("--out", default=None, help="default: bench/results/muonclip_<device>.json")
    parser.add_argument("--update", action="store_true", help="keep the parts already in --out that this run does not measure")
    parser.add_argument("--only", choices=("adamw", "muonclip"), help=argparse.SUPPRESS)
    parser.add_argument("--part-kind", choices=("step", "loss"), default="step", help=argparse.SUPPRESS)
    parser.add_argument("--part", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    if args.only:
        return _child(args, overrides)
    defaults = ["logging.wandb=false", "train.eval_interval=0"]
    if not any(o.startswith("model=") for o in overrides):
        defaults.insert(0, "model=proxy")
    step_overrides = [*defaults, *overrides]
    parts = args.parts.split(",")
    env = environment()
    out = args.out or os.path.join(REPO, "bench", "results", f"muonclip_{device_tag(env['device'])}.json")
    results = ResultsFile(out, {"benchmark": "muonclip", **env, "reference": REFERENCE}, args.update)
    record = results.record

    # One process (group) per optimizer: a Trainer's GPU memory is not returned within a process.
    def both(kind: str, extra: list[str]) -> tuple[dict, dict]:
        results = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("adamw", "muonclip"):
                part = os.path.join(tmp, f"{name}.json")
                launcher = [sys.executable]
                if args.nproc > 1:
                    launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc)]
                cmd = [*launcher, os.path.abspath(__file__), "--only", name, "--part", part,
                       "--part-kind", kind, "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--loss-steps", str(args.loss_steps), "--steady-steps", str(args.steady_steps),
                       *(["--profile"] if args.profile else []), *extra, f"train.run_dir={tmp}/run-{name}"]
                subprocess.run(cmd, check=True, cwd=REPO)
                with open(part) as f:
                    results[name] = json.load(f)
        return results["muonclip"], results["adamw"]

    if "step" in parts:
        m, a = both("step", step_overrides)
        for name, r in (("adamw", a), ("muonclip", m)):
            if r.get("profile"):
                print(f"=== {name}: one training step ===\n{r['profile']}")
        record.update({
            "world_size": m["world_size"],
            "overrides": step_overrides,
            "steps": args.steps,
            "timed_steps": args.steps - args.warmup,
            "iteration_ms": m["iteration_ms"],
            "muonclip_step_ms": m["step_ms"],
            "muonclip_step_share": m["step_ms"] / m["iteration_ms"],
            "adamw_iteration_ms": a["iteration_ms"],
            "adamw_step_ms": a["step_ms"],
            "adamw_step_share": a["step_ms"] / a["iteration_ms"],
            "muonclip_overhead_vs_adamw": (m["iteration_ms"] - a["iteration_ms"]) / a["iteration_ms"],
            "steady_steps": args.steady_steps,
            "steady_iteration_ms": m["steady_iteration_ms"],
            "adamw_steady_iteration_ms": a["steady_iteration_ms"],
            "muonclip_steady_overhead_vs_adamw": (
                (m["steady_iteration_ms"] - a["steady_iteration_ms"]) / a["steady_iteration_ms"]
            ),
            "muonclip_step_losses": m["losses"],
            "adamw_step_losses": a["losses"],
            "muonclip_last_qk_clip": m["last_qk_clip"],
        })
        results.save("step")
    if "loss" in parts:
        m, a = both("loss", [])
        record.update({
            "loss_overrides": LOSS_MODEL,
            "loss_steps": args.loss_steps,
            "muonclip_loss": m["losses"][-1],
            "adamw_loss": a["losses"][-1],
            "muonclip_losses": m["losses"],
            "adamw_losses": a["losses"],
            "muonclip_val_losses": m["val_losses"],
            "adamw_val_losses": a["val_losses"],
        })
        results.save("loss")
    print(json.dumps({k: v for k, v in record.items() if "losses" not in k}, indent=2))
    print(f"wrote {out}")

if __name__ == "__main__":
    main()
