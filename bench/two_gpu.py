"""Two GPUs over NCCL: every 2-way layout against one GPU on the same model and batches, MuonClip
distributed over DP2 and TP2 against single-GPU MuonClip, and tokens/s with scaling efficiency.

    python bench/two_gpu.py [--steps 10] [--warmup 3] [--cpu] [--attnres] [hydra overrides ...]

Each job is its own `torchrun --standalone --nproc-per-node {1,2}` launch (GPU memory of a
finished Trainer is not all returned within a process: DDP's gradient hooks hold the model, so
peak memory per job needs a process per job). The first job saves the initial weights; every job
starts from them (`load_model`, as train.init_from does) and reads the same global batches (the
corpus loader's global sample order does not depend on the DP size). Writes
bench/results/two_gpu_<device>.json.

Model: the proxy preset cut to 4 layers (3 KDA + 1 MLA, first dense, 32 experts top-8 + shared),
bf16, sequence 2048, global batch 4 (micro-batch 1), on the bundled corpus. --cpu checks the
script on CPU processes with gloo instead (tiny model, fp32).

Parity: the loss of every step within LOSS_RTOL (relative) of the single-GPU run's, the same
threshold for every layout, fixed before measuring. bf16 reductions in another order (TP partial
sums, DP gradient all-reduce, EP token order) change the rounding, and Adam's normalised update
carries that into later steps. Scaling efficiency is strong scaling: the same global batch,
tokens/s on 2 GPUs divided by 2x tokens/s on one.
--attnres adds Block AttnRes (model.residual=block_attnres, 4 blocks) on one GPU and under PP2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, compose, device_tag, environment, timed_steps  # noqa: E402

LOSS_RTOL = {"bf16": 1e-2, "fp32": 1e-4}  # precision of the run (train.precision=fp32 on GPUs too)

GPU_MODEL = [
    "model=proxy", "model.num_layers=4", "data.seq_length=2048", "train.micro_batch_size=1",
    "train.global_batch_size=4",  # train.precision=auto: bf16 on GPUs
]
CPU_MODEL = [
    "model=tiny", "data.seq_length=128", "train.micro_batch_size=2", "train.global_batch_size=8",
    "train.precision=fp32", "optim.muon_ns_dtype=float32",
]
# lr 1e-3: at the default 3e-3 AdamW's loss spikes at step 3 on this model (12.2 -> 10.7 -> 14.2
# in a first run), and a spike turns rounding differences into loss differences of several percent
COMMON = [
    "train.eval_interval=0", "train.save_interval=0", "logging.wandb=false", "optim.lr=1e-3",
    "optim.warmup_steps=2",
]
ATTNRES = ["model.residual=block_attnres", "model.attnres_blocks=4"]

# name -> (world size, overrides, reference job of the same model and optimizer on one GPU)
JOBS = {
    "single": (1, [], None),
    "single_muonclip": (1, ["optim=muonclip"], None),
    "tp2": (2, ["parallel=tp2"], "single"),
    "pp2": (2, ["parallel=pp2"], "single"),
    "ep2": (2, ["parallel=ep2"], "single"),
    "dp2": (2, [], "single"),
    "dp2_muonclip": (2, ["optim=muonclip"], "single_muonclip"),
    "tp2_muonclip": (2, ["optim=muonclip", "parallel=tp2"], "single_muonclip"),
}
ATTNRES_JOBS = {
    "single_block_attnres": (1, ATTNRES, None),
    "pp2_block_attnres": (2, ["parallel=pp2", *ATTNRES], "single_block_attnres"),
}


def run_job(name: str, overrides: list[str], init_ckpt: str, steps: int, warmup: int) -> dict:
    """Train `steps` steps from `init_ckpt` (saving it first if absent); losses and timings."""
    from deltatron.train.checkpoint import load_model, save_model
    from deltatron.train.trainer import Trainer

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    cfg, resolved = compose([*overrides, f"train.steps={steps}"])
    trainer = Trainer(cfg, resolved)
    if not os.path.exists(os.path.join(init_ckpt, "metadata.json")):
        save_model(trainer.model, init_ckpt)
    load_model(trainer.model, init_ckpt)
    if hasattr(trainer.optimizer, "reload_model_params"):  # fp32 master copies of bf16 weights
        trainer.optimizer.reload_model_params()
    outs, step_seconds = timed_steps(trainer, steps)
    losses = [o["loss"] for o in outs]
    grad_norms = [o["grad_norm"] for o in outs]
    timed = statistics.median(step_seconds[warmup:])
    peak = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None
    peaks = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(peaks, peak)
    # AttnRes under PP: bytes the stages handed on per micro-batch in the last step (collective)
    handoff = trainer._handoff_bytes() if trainer.attnres_pipeline else None
    return {
        "pipeline_bytes_per_microbatch": handoff,
        "layout": cfg.parallel.describe(trainer.world_size),
        "optimizer": cfg.optim.name,
        "world_size": trainer.world_size,
        "tokens_per_step": trainer.tokens_per_step,
        "losses": losses,
        "grad_norms": grad_norms,
        "step_seconds": step_seconds,
        "median_step_seconds": timed,
        "tokens_per_sec": trainer.tokens_per_step / timed,
        "peak_memory_gb_per_rank": peaks,
    }


def worker(args, overrides: list[str]) -> None:
    """One job in these processes; rank 0 writes its result."""
    import torch.distributed as dist

    name = args.job
    result = run_job(name, [*overrides, *JOBS_ALL[name][1], f"train.run_dir={args.tmp}/run-{name}"],
                     # each reference job saves the initial weights its layouts start from
                     os.path.join(args.tmp, f"init-{JOBS_ALL[name][2] or name}"), args.steps, args.warmup)
    if dist.get_rank() == 0:
        print(f"[two_gpu] {name}: losses {[round(x, 4) for x in result['losses']]} "
              f"{result['tokens_per_sec']:,.0f} tokens/s", flush=True)
        with open(os.path.join(args.tmp, f"{name}.json"), "w") as f:
            json.dump({"result": result, "environment": environment()}, f)


def compare(results: dict, precision: str) -> dict:
    """Per layout: loss deviation from its single-GPU reference, parity verdict, scaling."""
    rtol = LOSS_RTOL[precision]
    table = {}
    for name, r in results.items():
        ref_name = JOBS_ALL[name][2]
        row = {k: r[k] for k in ("layout", "optimizer", "world_size", "tokens_per_sec", "peak_memory_gb_per_rank",
                                 "pipeline_bytes_per_microbatch")}
        if ref_name:
            ref = results[ref_name]
            rel = [abs(a - b) / abs(b) for a, b in zip(r["losses"], ref["losses"])]
            row.update(
                reference=ref_name,
                max_loss_rel_diff=max(rel),
                final_loss_rel_diff=rel[-1],
                final_loss=r["losses"][-1],
                reference_final_loss=ref["losses"][-1],
                loss_parity=max(rel) <= rtol,
                scaling_efficiency=r["tokens_per_sec"] / (r["world_size"] * ref["tokens_per_sec"]),
            )
        table[name] = row
    return table


JOBS_ALL = {**JOBS, **ATTNRES_JOBS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4, help="steps left out of the timing")
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU processes, tiny model, fp32")
    parser.add_argument("--attnres", action="store_true", help="add the Block AttnRes jobs")
    parser.add_argument("--only", default=None, help="comma-separated job names (their references are added)")
    parser.add_argument("--out", default=None, help="default: bench/results/two_gpu_<device>.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.worker:
        return worker(args, overrides)
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    if not args.cpu and torch.cuda.device_count() < 2:
        raise SystemExit(f"two GPUs needed, {torch.cuda.device_count()} visible; --cpu runs on CPU processes")
    base = [*(CPU_MODEL if args.cpu else GPU_MODEL), *COMMON, *overrides]
    jobs = {**(ATTNRES_JOBS if args.attnres else {}), **JOBS}
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - set(jobs)
        if unknown:
            raise SystemExit(f"--only: unknown jobs {sorted(unknown)}; choose from {sorted(jobs)} (--attnres adds AttnRes jobs)")
        wanted |= {jobs[name][2] for name in wanted if jobs[name][2]}
        jobs = {name: job for name, job in jobs.items() if name in wanted}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    if args.cpu:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    precision = "fp32" if args.cpu or "train.precision=fp32" in overrides else "bf16"
    results, record = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (world, _, _) in jobs.items():  # references first: they precede their layouts
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
                   os.path.abspath(__file__), "--worker", "--job", name, "--tmp", tmp,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), *base]
            subprocess.run(cmd, check=True, env=env, cwd=REPO)
            with open(os.path.join(tmp, f"{name}.json")) as f:
                part = json.load(f)
            results[name] = part["result"]
            record = {
                "benchmark": "two_gpu", **part["environment"],
                "backend": "gloo" if args.cpu else "nccl",
                "overrides": base,
                "steps": args.steps, "timed_steps": args.steps - args.warmup,
                "loss_rtol": LOSS_RTOL[precision],
                "table": compare(results, precision),
                "runs": results,
            }
            out = args.out or os.path.join(REPO, "bench", "results", f"two_gpu_{device_tag(record['device'])}.json")
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with open(out, "w") as f:  # after every job, so a cut-short run keeps what it measured
                json.dump(record, f, indent=2)
    table = record["table"]
    print(f"{'job':<22}{'tokens/s':>10}{'scaling':>9}{'max loss rel diff':>19}{'parity':>8}")
    for name, row in table.items():
        print(f"{name:<22}{row['tokens_per_sec']:>10,.0f}{row.get('scaling_efficiency', 1.0):>9.2f}"
              f"{row.get('max_loss_rel_diff', 0.0):>19.2e}{str(row.get('loss_parity', '-')):>8}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
