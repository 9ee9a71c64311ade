"""Long sequences on one GPU: tokens/s, peak memory and time per KDA and MLA layer against length.

    python bench/long_context.py [--lengths 65536,131072,262144] [--steps 3] [--warmup 1]
                                 [--timeout 900] [--cpu] [--out FILE] [hydra overrides ...]

Each length T trains the model (default the `proxy` preset, bf16; `--cpu`: `tiny`, fp32, short
lengths, to check the script) on one sequence of T mock tokens per step: one document, so MLA
attends over the whole sequence (micro-batch 1, no document boundaries). Every length runs in its
own subprocess with its own timeout, so an out-of-memory length is recorded as not fitting and
the longer ones are still tried.

On a GPU the lengths train with full activation recomputation (train.recompute_granularity=full,
uniform, one sub-layer per unit: every sub-layer keeps only its input and runs its forward again
in the backward); without it the proxy's activations alone exceed one H200 from 64k on
(deltatron-plan: 151 GiB at 64k, 3.3 GiB with it). They also compute the output layer's loss by
blocks of 4096 tokens (train.cross_entropy_chunk_size=4096, deltatron/model/chunked_loss.py):
megatron-core's whole-sequence logits and fp32 softmax would take 100 GiB at 64k, 200 at 128k and
400 at 256k. With both, deltatron-plan expects on one H200 peaks of 38.3 / 50.6 / 75.3 GiB at
64k / 128k / 256k (46.3 / 59.6 / 86.3 of 140.4 GiB with its allowances; the largest transient is
then the recomputed sub-layer, the loss's block term about 5 GiB). Overrides turn either off or
change them, e.g. `train.recompute_granularity=none`, `train.cross_entropy_chunk_size=0` or
`train.recompute_method=block train.recompute_num_layers=8`. The per-layer times then include the
recomputed forward. `--cpu` runs without recomputation or chunked loss.

Per length: median step seconds over --steps timed steps after --warmup, tokens/s, peak memory
(torch.cuda.max_memory_allocated; on CPU the process's peak RSS), and the time of one KDA layer
and one MLA layer per step, forward + backward (deltatron/train/time_split.ModuleTimes: CUDA
events around every KimiDeltaAttention and MLASelfAttention, divided by the layer count).
"scaling" compares each length with the shortest: time ratio / length ratio per layer kind, which
stays near 1 for a linear-time layer (KDA's chunkwise recurrence) and grows like T for causal
softmax attention (MLA). Results: bench/results/long_context_<device>.json (environment, shapes,
date), rewritten after every length.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, ResultsFile, compose, device_name, device_tag, environment, sync, timed_steps  # noqa: E402

GPU_LENGTHS = (65536, 131072, 262144)
CPU_LENGTHS = (256, 512, 1024)
# GPU defaults, placed before the command line's overrides (Hydra: the last value wins): full
# recompute and the output layer's loss by blocks of tokens
GPU_RECOMPUTE = ("train.recompute_granularity=full",)
GPU_CHUNKED_LOSS = ("train.cross_entropy_chunk_size=4096",)
REFERENCE = (
    "measured in the same run: each length against the shortest (scaling: time ratio / length ratio "
    "per layer kind), and KDA layers against MLA (softmax attention) layers at every length; issue 15 "
    "names no external reference for this benchmark"
)


def measure(length: int, steps: int, warmup: int, cpu: bool, run_dir: str, overrides: list[str]) -> dict:
    """Train `warmup + steps` steps on one sequence of `length` tokens; this length's record."""
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    from deltatron.model.kda import KimiDeltaAttention
    from deltatron.train.time_split import ModuleTimes
    from deltatron.train.trainer import Trainer

    cfg, resolved = compose([
        "model=tiny" if cpu else "model=proxy", f"data.seq_length={length}",
        f"model.max_sequence_length={length}", "train.micro_batch_size=1", "train.global_batch_size=1",
        "data.mock=true", "data.document_boundaries=false", "train.eval_interval=0",
        "train.save_interval=0", "logging.wandb=false", f"train.steps={warmup + steps}",
        f"train.run_dir={run_dir}", *(["train.precision=fp32"] if cpu else GPU_RECOMPUTE + GPU_CHUNKED_LOSS), *overrides,
    ])
    trainer = Trainer(cfg, resolved)
    timed_steps(trainer, warmup)
    times = ModuleTimes(trainer.model, {"kda": (KimiDeltaAttention,), "mla": (MLASelfAttention,)})
    times.read()  # start the window here
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    _, seconds = timed_steps(trainer, steps)
    kinds = times.read()
    sync()
    step = statistics.median(seconds)
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    return {
        "status": "ok", "seq_length": length, "step_s": step, "tokens_per_sec": length / step,
        "peak_memory_gib": peak, "layers": dict(times.counts), "precision": trainer.precision,
        "recompute": cfg.train.describe_recompute(),
        "cross_entropy_chunk_size": cfg.train.cross_entropy_chunk_size,
        # seconds per layer and step, forward + backward
        "kda_layer_s": kinds["kda"] / steps / max(times.counts["kda"], 1),
        "mla_layer_s": kinds["mla"] / steps / max(times.counts["mla"], 1),
    }


def scaling(rows: list[dict]) -> dict:
    """Per kind: (time at T / time at T0) / (T / T0) for every measured T, T0 the shortest."""
    ok = [r for r in rows if r["status"] == "ok"]
    if len(ok) < 2:
        return {}
    base = ok[0]
    out = {}
    for kind in ("kda", "mla"):
        if base[f"{kind}_layer_s"] <= 0:
            continue
        out[f"{kind}_time_ratio_over_length_ratio"] = {
            str(r["seq_length"]): (r[f"{kind}_layer_s"] / base[f"{kind}_layer_s"])
            / (r["seq_length"] / base["seq_length"])
            for r in ok
        }
    return out


def run_length(length: int, args, tmp: str) -> dict:
    """One length in a subprocess (an out-of-memory length loses only its own row)."""
    result = os.path.join(tmp, f"len{length}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--lengths", str(length),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--result", result,
           *(["--cpu"] if args.cpu else []), *args.overrides]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    try:
        proc = subprocess.run(cmd, cwd=tmp, env=env, timeout=args.timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {args.timeout}s", "seq_length": length}
    if proc.returncode == 0 and os.path.exists(result):
        with open(result) as f:
            return json.load(f)
    tail = (proc.stderr or proc.stdout)[-2000:]
    status = "out of memory" if "OutOfMemoryError" in tail or "out of memory" in tail else f"failed (exit {proc.returncode})"
    return {"status": status, "seq_length": length, "error_tail": tail}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default=None, help="comma-separated sequence lengths")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per length")
    parser.add_argument("--warmup", type=int, default=1, help="steps before the timed ones")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per length")
    parser.add_argument("--cpu", action="store_true", help="tiny model, short lengths, fp32 on CPU")
    parser.add_argument("--out", default=None, help="default: bench/results/long_context_<device>.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    args.overrides = overrides
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else list(CPU_LENGTHS if args.cpu else GPU_LENGTHS)
    if args.worker:
        with tempfile.TemporaryDirectory() as run_dir:
            record = measure(lengths[0], args.steps, args.warmup, args.cpu, run_dir, overrides)
        record["environment"] = environment()
        with open(args.result, "w") as f:
            json.dump(record, f)
        return
    tag = "cpu" if args.cpu else device_tag(device_name())
    out = args.out or os.path.join(REPO, "bench", "results", f"long_context_{tag}.json")
    env_record = environment()
    results = ResultsFile(out, {
        "benchmark": "long_context", "gpu": env_record["device"], **env_record, "reference": REFERENCE,
        "model": "tiny" if args.cpu else "proxy", "micro_batch_size": 1, "documents_per_sequence": 1,
        "steps": args.steps, "warmup": args.warmup, "overrides": overrides, "lengths": [],
    })
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for length in lengths:
            print(f"[long_context] T={length}: up to {args.timeout:.0f}s", flush=True)
            row = run_length(length, args, tmp)
            row.pop("environment", None)
            rows.append(row)
            print(f"[long_context] T={length}: {row['status']}" + (
                f", {row['tokens_per_sec']:,.0f} tokens/s, peak {row['peak_memory_gib']:.2f} GiB, "
                f"KDA layer {1e3 * row['kda_layer_s']:.1f} ms, MLA layer {1e3 * row['mla_layer_s']:.1f} ms"
                if row["status"] == "ok" else ""), flush=True)
            results.record["lengths"] = rows
            results.record["scaling"] = scaling(rows)
            results.save(f"T{length}")
    print(f"[long_context] scaling (time ratio / length ratio; 1 = linear): {json.dumps(results.record['scaling'])}")
    print(f"[long_context] wrote {out}")


if __name__ == "__main__":
    main()
