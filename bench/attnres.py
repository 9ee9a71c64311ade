"""Block AttnRes against standard residuals: training step time and peak memory, the depth-attention
op against flash-linear-attention's fused AttnRes kernel, and the loss of a short training run.

    python bench/attnres.py [--steps 12] [--warmup 4] [--blocks 8] [--loss-steps 300]

Three parts, each model run in its own process (a finished Trainer's memory is not all returned):
1. step: `model=proxy` (12 layers, 24 sub-layers), bf16, sequence 4096, global batch 2, trained
   `--steps` steps with model.residual=standard and with block_attnres (`--blocks` blocks); the
   median step time after `--warmup` steps and the peak allocated memory. The proxy's step is
   bound by the host (Python and kernel launches: the GPU is busy about half of it), so its time
   follows the host's CPU speed, which differs between machines of one kind by 30% or more:
   compare the two within one run. `--repeats N` runs both N times, alternating, and reports the
   median of the runs' medians (each run's is kept in "<residual>_step_ms_runs").
2. op: one block's depth attention, forward and backward, at the proxy's width and the 48B
   model's (D=2304), 8192 tokens, k sub-layers per block over m completed sources plus the
   partial block sum: ours (deltatron.model.attnres: one pass over the completed sources for
   all k queries, then an online-softmax merge per sub-layer) against fla.ops.attnres
   `fused_attnres` called once per sub-layer over all m+1 sources (fla is a reference here,
   never imported by deltatron). Skipped when fla is not installed.
3. loss: the `tiny` preset on the bundled corpus, `--loss-steps` steps, same seed and tokens,
   standard vs block_attnres; train and validation losses of both.
Writes bench/results/attnres_<device>.json with "standard_step_ms", "block_attnres_step_ms",
"standard_peak_mem_gb", "block_attnres_peak_mem_gb", "blocks" and the losses of both runs.
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
from common import REPO, ResultsFile, compose, device_tag, environment, fit_losses, sync, timed_steps  # noqa: E402

STEP_MODEL = ["model=proxy", "data.seq_length=4096", "train.micro_batch_size=1", "train.global_batch_size=2"]
LOSS_MODEL = ["model=tiny"]
COMMON = ["train.eval_interval=0", "train.save_interval=0", "logging.wandb=false"]
REFERENCE = (
    "measured in the same run: Block AttnRes against standard residuals (same model, data and steps; "
    "runs alternate with --repeats), and our depth-attention op against flash-linear-attention's "
    "fused_attnres at the same shapes"
)


def residual_overrides(residual: str, blocks: int) -> list[str]:
    if residual == "standard":
        return ["model.residual=standard"]
    return [f"model.residual={residual}", f"model.attnres_blocks={blocks}"]


# ------------------------------------------------------------------------------ 1. step time
def step_run(overrides: list[str], steps: int, warmup: int) -> dict:
    from deltatron.train.trainer import Trainer

    cfg, resolved = compose([*overrides, f"train.steps={steps}"])
    trainer = Trainer(cfg, resolved)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    outs, step_seconds = timed_steps(trainer, steps)
    losses = [o["loss"] for o in outs]
    return {
        "step_ms": 1e3 * statistics.median(step_seconds[warmup:]),
        "step_seconds": step_seconds,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None,
        "losses": losses,
        "parameters": sum(p.numel() for m in trainer.model for p in m.parameters()),
    }


# ------------------------------------------------------------------------------- 2. the op
def cuda_ms(fn, warmup: int = 3, iters: int = 10) -> float:
    for _ in range(warmup):
        fn()
    sync()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    sync()
    return start.elapsed_time(end) / iters


def peak_gb(fn) -> float:
    """Peak memory above what was allocated before one call of fn."""
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


def op_case(tokens: int, hidden: int, completed_sources: int, sublayers: int, eps: float = 1e-5) -> dict:
    """One block: `sublayers` sub-layers over `completed_sources` completed sources and the
    partial sum (which grows by each sub-layer's output), forward + backward into every source,
    query and partial. Both paths use the same inputs; outputs are compared."""
    from fla.ops.attnres import fused_attnres

    from deltatron.model.attnres import attend_completed, merge_partial

    g = torch.Generator(device="cuda").manual_seed(0)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    completed = [torch.randn(tokens, 1, hidden, generator=g, **bf16).requires_grad_() for _ in range(completed_sources)]
    partial = torch.randn(tokens, 1, hidden, generator=g, **bf16).requires_grad_()
    # sub-layer outputs added to the partial sum between merges (stand-ins for f_k)
    updates = [0.1 * torch.randn(tokens, 1, hidden, generator=g, **bf16) for _ in range(sublayers)]
    queries = (0.02 * torch.randn(sublayers, hidden, generator=g, device="cuda")).requires_grad_()
    key_weight = torch.ones(hidden, device="cuda", dtype=torch.bfloat16)
    grad_out = [torch.randn(tokens, 1, hidden, generator=g, **bf16) for _ in range(sublayers)]

    def ours():
        out, lse, _ = attend_completed(completed, queries, eps)
        p, outs = partial, []
        for k in range(sublayers):
            h, _ = merge_partial(out[k], lse[k], p, queries[k], eps)
            outs.append(h)
            p = p + updates[k]
        return outs

    def fla():
        p, outs = partial, []
        for k in range(sublayers):
            outs.append(fused_attnres(queries[k].to(torch.bfloat16), [*completed, p], key_weight, rms_eps=eps))
            p = p + updates[k]
        return outs

    def fwd_bwd(run):
        def call():
            outs = run()
            torch.autograd.backward(outs, grad_out)
            for t in (*completed, partial, queries):
                t.grad = None
        return call

    with torch.no_grad():
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(ours(), fla()))
    result = {"tokens": tokens, "hidden": hidden, "completed_sources": completed_sources,
              "sublayers": sublayers, "max_abs_diff_outputs": diff}
    for name, run in (("ours", ours), ("fla", fla)):
        result[f"{name}_fwd_bwd_ms"] = cuda_ms(fwd_bwd(run))
        result[f"{name}_peak_gb"] = peak_gb(fwd_bwd(run))
    result["ours_vs_fla_speed"] = result["fla_fwd_bwd_ms"] / result["ours_fwd_bwd_ms"]
    return result


# --------------------------------------------------------------------------------- driver
def child(args, overrides: list[str]) -> None:
    part = {"step": lambda: step_run(overrides, args.steps, args.warmup),
            "loss": lambda: fit_losses(overrides, args.loss_steps)}[args.child]()
    with open(args.out_part, "w") as f:
        json.dump(part, f)


def in_subprocess(kind: str, overrides: list[str], args, tmp: str, name: str) -> dict:
    part = os.path.join(tmp, f"{name}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--out-part", part,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--loss-steps", str(args.loss_steps),
           *overrides, f"train.run_dir={tmp}/run-{name}"]
    subprocess.run(cmd, check=True, cwd=REPO)
    with open(part) as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1,
                        help="step part: run standard and block_attnres this many times, alternating")
    parser.add_argument("--loss-steps", type=int, default=300)
    parser.add_argument("--parts", default="step,op,loss", help="which of step, op, loss to run")
    parser.add_argument("--out", default=None, help="default: bench/results/attnres_<device>.json")
    parser.add_argument("--update", action="store_true", help="keep the parts already in --out that this run does not measure")
    parser.add_argument("--child", choices=("step", "loss"), help=argparse.SUPPRESS)
    parser.add_argument("--out-part", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.child:
        return child(args, overrides)
    parts = set(args.parts.split(","))
    env = environment()
    out = args.out or os.path.join(REPO, "bench", "results", f"attnres_{device_tag(env['device'])}.json")
    results = ResultsFile(out, {"benchmark": "attnres", **env, "reference": REFERENCE, "blocks": args.blocks}, args.update)
    record = results.record

    with tempfile.TemporaryDirectory() as tmp:
        if "step" in parts:
            medians = {"standard": [], "block_attnres": []}
            for repeat in range(args.repeats):  # alternating, so drift of the host hits both alike
                for residual in ("standard", "block_attnres"):
                    run = in_subprocess("step", [*STEP_MODEL, *COMMON, *residual_overrides(residual, args.blocks), *overrides],
                                        args, tmp, f"step-{residual}-{repeat}")
                    medians[residual].append(run["step_ms"])
                    record[f"{residual}_peak_mem_gb"] = run["peak_mem_gb"]
                    record[f"{residual}_step_losses"] = run["losses"]
                    record[f"{residual}_parameters"] = run["parameters"]
            for residual, runs in medians.items():
                record[f"{residual}_step_ms"] = statistics.median(runs)
                record[f"{residual}_step_ms_runs"] = runs
            record["step_overrides"] = [*STEP_MODEL, *COMMON, *overrides]
            record["step_time_overhead"] = record["block_attnres_step_ms"] / record["standard_step_ms"] - 1
            if record["standard_peak_mem_gb"]:
                record["peak_memory_overhead"] = record["block_attnres_peak_mem_gb"] / record["standard_peak_mem_gb"] - 1
            results.save("step")
        if "loss" in parts:
            for residual in ("standard", "block_attnres"):
                run = in_subprocess("loss", [*LOSS_MODEL, *COMMON, *residual_overrides(residual, 4), *overrides],
                                    args, tmp, f"loss-{residual}")
                record[f"{residual}_losses"] = run["losses"]
                record[f"{residual}_val_losses"] = run["val_losses"]
            record["loss_overrides"] = [*LOSS_MODEL, *COMMON, "model.attnres_blocks=4", *overrides]
            results.save("loss")
        if "op" in parts:  # last: fla autotunes its kernels on the first call
            try:
                import fla  # noqa: F401
            except ImportError:
                record["op"] = "skipped: flash-linear-attention (fla-core) is not installed"
            else:
                completed = args.blocks  # the embedding and the completed blocks before the last block
                record["op"] = [op_case(8192, hidden, completed, 3) for hidden in (1024, 2304)]
            results.save("op")
    print(json.dumps({k: v for k, v in record.items() if "losses" not in k}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
