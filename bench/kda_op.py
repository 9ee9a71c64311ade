"""KDA operator speed: our Triton kernels against flash-linear-attention's chunk_kda, in one run.

    python bench/kda_op.py                      # the issue's shapes, H=32, D=128, bf16
    python bench/kda_op.py --shapes 8x4096 --iters 5

For each shape it times, with CUDA events (median of --iters after --warmup calls):
  ours      deltatron.kernels.kda.kda(backend="triton"), chunk 64
  fla       fla.ops.kda.chunk_kda (fla-core 0.6.0): the reference, imported here only
  sdpa      torch scaled_dot_product_attention, causal (flash), same B, T, H, D: the full
            attention a KDA layer replaces, for the crossover length
forward alone (no autograd) and forward + backward (all of q, k, v, g, beta get gradients), peak
memory of one forward + backward above the inputs, and each implementation's relative error
(largest absolute difference over the largest absolute value) in o and every input gradient
against our kernels run on the same inputs widened to fp32 (3xTF32 products, held to the
token-by-token oracle by tests/test_kda_triton.py): fla's errors are the yardstick for ours,
which the accuracy tests in tests/test_kda_triton.py bound. The varlen row packs documents of
mixed lengths into one row through cu_seqlens. The first call of each implementation (Triton compilation, fla's autotuning) is timed
separately as the cold start; with --autotune-cache DIR, fla's autotuning results from an
earlier run are reused (and the new ones added to DIR), which the results file says: its first
call is then no cold start.

Each row carries its date. A run over some of the shapes keeps the results file's rows for the
other shapes (same GPU), so a long shape can be measured in a call of its own (fla autotunes
for minutes at each new shape).

Inputs are shaped as the model feeds the kernel: q, k L2-normalised per head (bf16), v bf16,
g = -exp(A_log) * softplus(x + dt_bias) per channel (fp32, log space), beta = sigmoid(.) (fp32).

TFLOP/s use the chunkwise forward's matmul FLOPs per token and head at chunk C = 64 (the Kimi
Linear paper's eq. 13 count, which the reference measurements use):
    intra-chunk  K K^T, Q K^T, A K, A V          4 x 2 C D
    inter-chunk  W S, Q S, K^T U                3 x 2 D^2
so 8 C D + 6 D^2 per token and head (163,840 at D = 128), and 3x that for forward + backward.
The results go to bench/results/kda_<gpu>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deltatron.kernels.kda import kda  # noqa: E402
from common import copy_autotune_results  # noqa: E402

CHUNK = 64
DEFAULT_SHAPES = ("8x4096", "2x16384", "1x65536", "varlen16384")


def flops_per_token_head(head_dim: int, chunk: int = CHUNK) -> int:
    return 8 * chunk * head_dim + 6 * head_dim * head_dim


def make_inputs(batch: int, seq_len: int, heads: int, head_dim: int, seed: int = 0):
    """q, k, v [B, T, H, D] bf16 (q, k unit-norm), g [B, T, H, D] fp32 <= 0, beta [B, T, H] fp32."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = (batch, seq_len, heads, head_dim)
    q = F.normalize(torch.randn(shape, device="cuda", generator=gen), dim=-1).bfloat16()
    k = F.normalize(torch.randn(shape, device="cuda", generator=gen), dim=-1).bfloat16()
    v = torch.randn(shape, device="cuda", generator=gen).bfloat16()
    a_log = torch.log(torch.empty(heads, device="cuda").uniform_(1, 16, generator=gen))
    gate_in = torch.randn(shape, device="cuda", generator=gen) - 2.0
    g = -a_log.exp()[:, None] * F.softplus(gate_in)
    beta = torch.sigmoid(torch.randn(shape[:3], device="cuda", generator=gen))
    return [t.requires_grad_() for t in (q, k, v, g, beta)]


def varlen_cu_seqlens(total: int, seed: int = 0) -> torch.Tensor:
    """Document boundaries of mixed lengths (64 to 4096 tokens) filling `total` tokens."""
    gen = torch.Generator().manual_seed(seed)
    bounds, pos = [0], 0
    while pos < total:
        pos = min(total, pos + int(torch.randint(64, 4097, (1,), generator=gen)))
        bounds.append(pos)
    return torch.tensor(bounds, dtype=torch.int32, device="cuda")


def cuda_time_ms(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_mem_gb(fn) -> float:
    """Peak memory of one call above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def cold_ms(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


class Impl:
    """Forward and forward+backward closures of one KDA implementation over fixed inputs."""

    def __init__(self, run, inputs):
        self.run, self.inputs = run, inputs
        self.grad_out = None

    def forward(self):
        with torch.no_grad():
            return self.run(*self.inputs)

    def forward_backward(self):
        out = self.run(*self.inputs)
        if self.grad_out is None:
            self.grad_out = torch.randn_like(out)
        out.backward(self.grad_out)
        for t in self.inputs:
            t.grad = None


def ours(cu_seqlens):
    def run(q, k, v, g, beta):
        return kda(q, k, v, g, beta, cu_seqlens=cu_seqlens, output_final_state=False,
                   backend="triton", chunk_size=CHUNK)[0]
    return run


def fla_reference(cu_seqlens):
    from fla.ops.kda import chunk_kda

    cu = None if cu_seqlens is None else cu_seqlens.long()

    def run(q, k, v, g, beta):
        return chunk_kda(q, k, v, g, beta, output_final_state=False, cu_seqlens=cu)[0]
    return run


ERROR_NAMES = ("o", "dq", "dk", "dv", "dg", "dbeta")


def outputs_and_grads(run, inputs, grad_out) -> list[torch.Tensor]:
    """o and the gradients of q, k, v, g, beta for o.backward(grad_out), as fp32."""
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    out = run(*xs)
    out.backward(grad_out.to(out.dtype))
    return [out.detach().float()] + [x.grad.float() for x in xs]


def relative_errors(run, inputs, grad_out, reference: list[torch.Tensor]) -> dict:
    """max |x - ref| / max |ref| of o and each input gradient (ERROR_NAMES)."""
    got = outputs_and_grads(run, inputs, grad_out)
    return {
        name: ((a - b).abs().max() / b.abs().max()).item()
        for name, a, b in zip(ERROR_NAMES, got, reference)
    }


def sdpa_fwd_bwd_ms(batch, seq_len, heads, head_dim, warmup, iters) -> float:
    q, k, v = (torch.randn(batch, heads, seq_len, head_dim, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)

    def step():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)
    return cuda_time_ms(step, warmup, iters)


def profile_table(fn, iters: int = 3) -> str:
    """CUDA time per kernel over `iters` calls of fn (after one untimed call), largest first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)


def bench_shape(spec: str, heads: int, head_dim: int, warmup: int, iters: int,
                impl_names=("ours", "fla"), profile: bool = False) -> dict:
    varlen = spec.startswith("varlen")
    if varlen:
        batch, seq_len = 1, int(spec[len("varlen"):])
        cu_seqlens = varlen_cu_seqlens(seq_len)
    else:
        batch, seq_len = (int(x) for x in spec.split("x"))
        cu_seqlens = None
    inputs = make_inputs(batch, seq_len, heads, head_dim)
    row = {"B": batch, "T": seq_len, "H": heads, "D": head_dim, "varlen": varlen}
    if varlen:
        row["documents"] = int(cu_seqlens.numel() - 1)
    makers = {"ours": ours, "fla": fla_reference}
    impls = {name: Impl(makers[name](cu_seqlens), inputs) for name in impl_names}
    for name, impl in impls.items():
        row[f"{name}_first_call_ms"] = cold_ms(impl.forward_backward)
        row[f"{name}_fwd_ms"] = cuda_time_ms(impl.forward, warmup, iters)
        row[f"{name}_fwdbwd_ms"] = cuda_time_ms(impl.forward_backward, warmup, iters)
        row[f"{name}_peak_mem_gb"] = peak_mem_gb(impl.forward_backward)
        if profile:
            print(f"--- {name} {spec} forward+backward, CUDA time per kernel over 3 calls", flush=True)
            print(profile_table(impl.forward_backward), flush=True)
    grad_out = torch.randn(inputs[2].shape, device="cuda", generator=torch.Generator(
        device="cuda").manual_seed(1)).bfloat16()
    reference = outputs_and_grads(ours(cu_seqlens), [x.float() for x in inputs], grad_out.float())
    for name, impl in impls.items():
        row[f"{name}_rel_err_vs_fp32"] = relative_errors(impl.run, inputs, grad_out, reference)
    del reference, impls, inputs
    # full attention over each document would be cheaper for varlen; causal over the row is
    # what the shapes without documents compare, so keep SDPA to those
    row["sdpa_fwdbwd_ms"] = None if varlen else sdpa_fwd_bwd_ms(batch, seq_len, heads, head_dim, warmup, iters)
    flops = flops_per_token_head(head_dim) * batch * seq_len * heads
    for name in impl_names:
        row[f"{name}_fwd_tflops"] = flops / row[f"{name}_fwd_ms"] / 1e9
        row[f"{name}_fwdbwd_tflops"] = 3 * flops / row[f"{name}_fwdbwd_ms"] / 1e9
    if set(impl_names) == {"ours", "fla"}:
        row["speedup_fwd_vs_fla"] = row["fla_fwd_ms"] / row["ours_fwd_ms"]
        row["speedup_fwdbwd_vs_fla"] = row["fla_fwdbwd_ms"] / row["ours_fwdbwd_ms"]
    torch.cuda.empty_cache()
    return row


def row_key(row: dict) -> tuple:
    return row["B"], row["T"], row["H"], row["D"], row["varlen"]


def merge_rows(rows: list[dict], row: dict) -> list[dict]:
    """rows with `row` in place of the one of its shape (appended if there is none)."""
    kept = [r for r in rows if row_key(r) != row_key(row)]
    at = next((i for i, r in enumerate(rows) if row_key(r) == row_key(row)), len(kept))
    return kept[:at] + [row] + kept[at:]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES),
                        help="BxT (e.g. 8x4096) or varlenT (one packed row of T tokens)")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--impls", default="ours,fla",
                        help="comma list of ours, fla (the results file needs both; one alone is for profiling)")
    parser.add_argument("--profile", action="store_true", help="print CUDA time per kernel of each implementation")
    parser.add_argument("--out", default=None, help="default: bench/results/kda_<gpu>.json")
    parser.add_argument("--autotune-cache", default=None,
                        help="folder of Triton autotuning results carried between runs (read and "
                             "added to; see common.copy_autotune_results)")
    args = parser.parse_args(argv)
    impl_names = tuple(args.impls.split(","))
    if not set(impl_names) <= {"ours", "fla"}:
        parser.error(f"--impls takes ours and/or fla, got {args.impls!r}")
    if not torch.cuda.is_available():
        sys.exit("bench/kda_op.py needs a CUDA GPU (the Triton kernels and fla's run there)")

    carried = 0
    if args.autotune_cache:  # before triton and fla are imported: fla's autotuners read it then
        import tempfile

        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="kda-op-triton-")
        os.environ["TRITON_CACHE_AUTOTUNING"] = "1"
        carried = copy_autotune_results(args.autotune_cache, os.environ["TRITON_CACHE_DIR"])
    import triton

    try:
        import fla
    except ImportError:
        if "fla" in impl_names:
            raise
        fla = None

    gpu = torch.cuda.get_device_name()
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results",
        "kda_" + gpu.lower().replace("nvidia ", "").split()[0] + ".json",
    )
    os.makedirs(os.path.dirname(out), exist_ok=True)
    result = {
        "benchmark": "kda_op", "gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
        "fla": getattr(fla, "__version__", "unknown"), "dtype": "bf16", "chunk_size": CHUNK,
        "reference": "fla.ops.kda.chunk_kda, timed in the same run (fla_* columns)",
        "autotune_cache": (f"{carried} Triton autotuning results carried from an earlier run: "
                           "fla's first calls are not cold starts") if carried else "none (cold)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/kda_op.py " + " ".join(
            f"--shapes {' '.join(args.shapes)} --heads {args.heads} --head-dim {args.head_dim} "
            f"--warmup {args.warmup} --iters {args.iters}".split()
        ),
        "rows": [],
    }
    earlier = []
    if os.path.exists(out):
        with open(out) as f:
            previous = json.load(f)
        if previous.get("gpu") == gpu:
            earlier = previous.get("rows", [])
    for spec in args.shapes:
        row = bench_shape(spec, args.heads, args.head_dim, args.warmup, args.iters, impl_names, args.profile)
        row["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        print(json.dumps(row), flush=True)
        if args.autotune_cache:  # after every shape, so a run cut short keeps what it tuned
            copy_autotune_results(os.environ["TRITON_CACHE_DIR"], args.autotune_cache)
        if set(impl_names) != {"ours", "fla"}:
            continue  # a partial comparison is printed, not written over the results file
        result["rows"] = merge_rows(result["rows"] or earlier, row)
        # rewritten after every shape, so a run cut short keeps the shapes it finished
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
