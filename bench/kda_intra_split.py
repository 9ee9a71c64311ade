"""Where the time of the Triton KDA intra-chunk pass goes: the production kernel against copies of
it with one stage left out, timed in one run (a profiling aid for docs/kda_kernels.md, not a
result file).

    python bench/kda_intra_split.py [--batch 8] [--seq-len 4096] [--heads 32] [--head-dim 128]

Stages of deltatron.kernels.kda.triton_intra._intra_fwd_kernel (one program per chunk and head):
  cross    the decayed scores of pairs in different 16-token sub-blocks (sub_block_decays,
           boundary_decays and two [C, BK] x [BK, C] products per boundary and key block)
  inblock  the pairs inside a sub-block (in_block_log_decay and two products per key block)
  inverse  (I + A_kk)^-1 (unit_lower_inverse)
  outputs  W, U, Qg, Kg, gC and their stores
Each variant drops one stage (its result replaced by zeros), so "production - variant" is that
stage's cost. The outputs of a variant are wrong by design; only the production kernel's output is
used. Timing: triton.testing.do_bench, median.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deltatron.kernels.kda.triton_common import (  # noqa: E402
    IN_BLOCK_FACTOR_BOUND, SUB, boundary_decays, chunk_decays, chunk_layout,
    in_block_log_decay, sub_block_decays, load_decays, load_rows, load_vector, store_rows,
)
from deltatron.kernels.kda.triton_intra import intra_chunk_fwd, intra_config, unit_lower_inverse  # noqa: E402


@triton.jit
def _scores(q_ptr, k_ptr, g_ptr, t0, n, stride, scale, K: tl.constexpr, C: tl.constexpr,
            BC: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
            CROSS: tl.constexpr, INBLOCK: tl.constexpr):
    """intra_scores' fast path (bounded in-block decays), stages switchable."""
    NS: tl.constexpr = C // BC
    rows = tl.arange(0, C)
    same_block = (rows // BC)[:, None] == (rows // BC)[None, :]
    in_block_strict = same_block & (rows[None, :] < rows[:, None])
    in_block_incl = same_block & (rows[None, :] <= rows[:, None])
    kk = tl.zeros([C, C], dtype=tl.float32)
    qk = tl.zeros([C, C], dtype=tl.float32)
    for ik in range(tl.cdiv(K, BK)):
        cols = ik * BK + tl.arange(0, BK)
        qt = load_rows(q_ptr, t0, rows, n, stride, cols, K) * scale
        kt = load_rows(k_ptr, t0, rows, n, stride, cols, K)
        g, g_next = load_decays(g_ptr, t0, rows, n, stride, cols, K)
        if CROSS:
            e_in, e_out, totals = sub_block_decays(g, g_next, C, BC, BK)
            for b in tl.static_range(NS - 1):
                left, right = boundary_decays(e_in, e_out, totals, b, rows, C, BC, BK)
                k_right = tl.trans(kt * right)
                kk += tl.dot(kt * left, k_right, input_precision=PREC)
                qk += tl.dot(qt * left, k_right, input_precision=PREC)
        if INBLOCK:
            log_in = in_block_log_decay(g, g_next, C, BC, BK)
            if tl.max(tl.abs(log_in)) <= IN_BLOCK_FACTOR_BOUND:
                k_in = tl.trans(kt * tl.exp(-log_in))
                out_in = tl.exp(log_in)
                kk += tl.where(in_block_strict, tl.dot(kt * out_in, k_in, input_precision=PREC), 0.0)
                qk += tl.where(in_block_incl, tl.dot(qt * out_in, k_in, input_precision=PREC), 0.0)
    return kk, qk


@triton.jit
def _variant_kernel(q, k, v, g, beta, aqk, w, u, qg, kg, gc, chunks, scale, H,
                    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BC: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, CROSS: tl.constexpr,
                    INBLOCK: tl.constexpr, INVERSE: tl.constexpr, OUTPUTS: tl.constexpr):
    i_c = tl.program_id(0)
    i_h = tl.program_id(1)
    t0 = tl.load(chunks + 2 * i_c)
    n = tl.load(chunks + 2 * i_c + 1)
    rows = tl.arange(0, C)
    cc = tl.arange(0, C)
    kk, qk = _scores(q + i_h * K, k + i_h * K, g + i_h * K, t0, n, H * K, scale, K, C, BC, BK,
                     PREC, CROSS, INBLOCK)
    store_rows(aqk + i_h * C, qk, t0, rows, n, H * C, cc, C)
    bt = load_vector(beta + i_h, t0, rows, n, H)
    if INVERSE:
        a_inv = unit_lower_inverse(kk * bt[:, None], C, BC, PREC)
    else:
        a_inv = kk * bt[:, None]
    if OUTPUTS:
        for ik in range(tl.cdiv(K, BK)):
            cols = ik * BK + tl.arange(0, BK)
            kt = load_rows(k + i_h * K, t0, rows, n, H * K, cols, K)
            g_t, g_next = load_decays(g + i_h * K, t0, rows, n, H * K, cols, K)
            e_in, e_out, totals = sub_block_decays(g_t, g_next, C, BC, BK)
            decay_in, decay_out = chunk_decays(e_in, e_out, totals, C, BC, BK)
            x = kt * decay_in * bt[:, None]
            store_rows(w + i_h * K, tl.dot(a_inv, x, input_precision=PREC), t0, rows, n, H * K, cols, K)
            qt = load_rows(q + i_h * K, t0, rows, n, H * K, cols, K)
            store_rows(qg + i_h * K, qt * decay_in * scale, t0, rows, n, H * K, cols, K)
            store_rows(kg + i_h * K, kt * decay_out, t0, rows, n, H * K, cols, K)
            gc_offs = (i_c * H + i_h).to(tl.int64) * K + cols
            tl.store(gc + gc_offs, tl.exp(tl.sum(g_t, 0)), mask=cols < K)
        for iv in range(tl.cdiv(V, BV)):
            cols = iv * BV + tl.arange(0, BV)
            x = load_rows(v + i_h * V, t0, rows, n, H * V, cols, V) * bt[:, None]
            store_rows(u + i_h * V, tl.dot(a_inv, x, input_precision=PREC), t0, rows, n, H * V, cols, V)
    else:  # keep a_inv alive
        store_rows(w + i_h * K, a_inv, t0, rows, n, H * K, cc, C)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/kda_intra_split.py needs a CUDA GPU")
    B, T, H, D = args.batch, args.seq_len, args.heads, args.head_dim
    torch.manual_seed(0)
    TT = B * T
    q = F.normalize(torch.randn(TT, H, D, device="cuda"), dim=-1).bfloat16()
    k = F.normalize(torch.randn(TT, H, D, device="cuda"), dim=-1).bfloat16()
    v = torch.randn(TT, H, D, device="cuda").bfloat16()
    a_log = torch.log(torch.empty(H, device="cuda").uniform_(1, 16))
    g = (-a_log.exp()[:, None] * F.softplus(torch.randn(TT, H, D, device="cuda") - 2.0)).contiguous()
    beta = torch.sigmoid(torch.randn(TT, H, device="cuda"))
    layout = chunk_layout([b * T for b in range(B + 1)], 64, q.device)
    scale = D ** -0.5
    C = 64
    times = {"production": triton.testing.do_bench(
        lambda: intra_chunk_fwd(q, k, v, g, beta, layout, scale, C, "tf32"), return_mode="median")}
    f32 = dict(dtype=torch.float32, device="cuda")
    bufs = [torch.empty((TT, H, C), **f32), torch.empty((TT, H, D), **f32), torch.empty((TT, H, D), **f32),
            torch.empty((TT, H, D), **f32), torch.empty((TT, H, D), **f32),
            torch.empty((layout.num_chunks, H, D), **f32)]
    cfg = intra_config(D, D, C)
    stages = ("CROSS", "INBLOCK", "INVERSE", "OUTPUTS")
    for name, flags in [("copy (all stages)", {}), ("no cross", {"CROSS": False}),
                        ("no inblock", {"INBLOCK": False}), ("no inverse", {"INVERSE": False}),
                        ("no outputs", {"OUTPUTS": False}), ("loads and stores only", dict.fromkeys(stages, False))]:
        switches = {s: flags.get(s, True) for s in stages}

        def launch(switches=switches):
            _variant_kernel[(layout.num_chunks, H)](
                q, k, v, g, beta, *bufs, layout.chunks, scale, H,
                K=D, V=D, C=C, BC=SUB, PREC="tf32", **switches, **cfg)
        times[name] = triton.testing.do_bench(launch, return_mode="median")
    print(f"intra pass, B={B} T={T} H={H} D={D} bf16, {torch.cuda.get_device_name()}")
    for name, ms in times.items():
        print(f"  {name:24s} {ms:8.3f} ms")


if __name__ == "__main__":
    main()
