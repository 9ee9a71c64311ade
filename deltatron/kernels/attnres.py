"""Fused Triton kernels for Block AttnRes's depth attention (the math is in deltatron.model.attnres).

Two operations per token, each a forward and a backward:

attend (phase 1): k queries over m sources,
    r_j = 1 / rms(x_j),  logit_jq = (x_j . Q_q) r_j,  w_.q = softmax_j(logit_.q),  out_q = sum_j w_jq x_j
merge (phase 2): one query's phase-1 result o (log-sum-exp lse) with one more source p,
    r = 1 / rms(p),  lp = (p . q) r,  s = sigmoid(lse - lp),  h = s o + (1 - s) p

Layout: tokens are rows, n = s * B + b of megatron-core's [S, B, D] hidden states (N = S * B rows).
    sources X  [m, N, D]   any float dtype (stacked by the caller)
    queries Q  [k, D]      fp32 effective queries (pseudo-query times key-norm weight)
    out        [k, N, D]   in X's dtype (query-major: each query's output is contiguous)
    lse [N, k] fp32;   weights [m, N, k] fp32;   rinv [m, N] fp32
Every program computes in fp32. Per token the work is a few dot products of length D over m + k
vectors, so the kernels are bound by memory traffic: each reads every source twice (once for the
logits, once for the weighted sum), where the eager version made fp32 copies of every source and a
[S, B, k, D] fp32 intermediate and launched some 20 kernels per source.

Query gradients sum over all tokens: g_Q = sum_{rows, j} g_z x_j is a [k, rows] x [rows, D]
product, computed by `query_grad` split over rows (each program's fp32 partial [k, D tile] written
once and the partials summed in PyTorch) rather than with atomics (contention on k * D addresses and
a nondeterministic order).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor


# ------------------------------------------------------------------------------------- kernels
@triton.jit
def _attend_fwd_kernel(
    X, Q, OUT, LSE, W, RINV, N, D, M, K, eps,
    KP: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per row: logits and their online log-sum-exp over the m sources (pass 1),
    then the weighted sum of the sources (pass 2) and the weights."""
    n = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, KP)
    k_mask = offs_k < K
    offs_d = tl.arange(0, BLOCK_D)
    run_max = tl.full([KP], float("-inf"), tl.float32)
    run_sum = tl.zeros([KP], tl.float32)
    for j in range(M):
        row = X + (j * N + n) * D
        sq = tl.zeros([BLOCK_D], tl.float32)
        dots = tl.zeros([KP], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d_mask = d0 + offs_d < D
            x = tl.load(row + d0 + offs_d, mask=d_mask, other=0.0).to(tl.float32)
            q = tl.load(Q + offs_k[:, None] * D + d0 + offs_d[None, :],
                        mask=k_mask[:, None] & d_mask[None, :], other=0.0)
            sq += x * x
            dots += tl.sum(q * x[None, :], 1)
        r = 1.0 / tl.sqrt(tl.sum(sq, 0) / D + eps)
        logit = dots * r
        tl.store(RINV + j * N + n, r)
        tl.store(W + (j * N + n) * K + offs_k, logit, mask=k_mask)  # logits; weights after pass 2
        new_max = tl.maximum(run_max, logit)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(logit - new_max)
        run_max = new_max
    lse = run_max + tl.log(run_sum)
    tl.store(LSE + n * K + offs_k, lse, mask=k_mask)
    for d0 in range(0, D, BLOCK_D):
        d_mask = d0 + offs_d < D
        acc = tl.zeros([KP, BLOCK_D], tl.float32)
        for j in range(M):
            w = tl.exp(tl.load(W + (j * N + n) * K + offs_k, mask=k_mask, other=0.0) - lse)
            x = tl.load(X + (j * N + n) * D + d0 + offs_d, mask=d_mask, other=0.0).to(tl.float32)
            acc += w[:, None] * x[None, :]
        tl.store(OUT + (offs_k[:, None] * N + n) * D + d0 + offs_d[None, :],
                 acc.to(OUT.dtype.element_ty), mask=k_mask[:, None] & d_mask[None, :])
    for j in range(M):
        ptr = W + (j * N + n) * K + offs_k
        tl.store(ptr, tl.exp(tl.load(ptr, mask=k_mask, other=0.0) - lse), mask=k_mask)


@triton.jit
def _attend_bwd_coef_kernel(
    X, Q, W, RINV, GOUT, GLSE, GZ, GR, N, D, M, K,
    KP: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per row: the per-(source, query) coefficients of the backward.

    g_w[j, q] = g_out_q . x_j and z[j, q] = x_j . Q_q (accumulated over D in GZ and GR's scratch
    rows), then g_logit = w (g_w - sum_j w g_w + g_lse), g_z = g_logit r_j (-> GZ) and
    g_r r_j^3 / D = sum_q g_logit z r_j^3 / D (-> GR), the factor of x_j in d rinv / d x_j."""
    n = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, KP)
    k_mask = offs_k < K
    offs_d = tl.arange(0, BLOCK_D)
    weighted = tl.zeros([KP], tl.float32)  # sum_j w_j g_w_j
    for j in range(M):
        row = X + (j * N + n) * D
        g_w = tl.zeros([KP], tl.float32)
        z = tl.zeros([KP], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d_mask = d0 + offs_d < D
            kd_mask = k_mask[:, None] & d_mask[None, :]
            x = tl.load(row + d0 + offs_d, mask=d_mask, other=0.0).to(tl.float32)
            g_out = tl.load(GOUT + (offs_k[:, None] * N + n) * D + d0 + offs_d[None, :],
                            mask=kd_mask, other=0.0).to(tl.float32)
            q = tl.load(Q + offs_k[:, None] * D + d0 + offs_d[None, :], mask=kd_mask, other=0.0)
            g_w += tl.sum(g_out * x[None, :], 1)
            z += tl.sum(q * x[None, :], 1)
        w = tl.load(W + (j * N + n) * K + offs_k, mask=k_mask, other=0.0)
        weighted += w * g_w
        tl.store(GZ + (j * N + n) * K + offs_k, g_w, mask=k_mask)  # scratch: g_w, then g_z
        tl.store(GR + (j * N + n) * KP + offs_k, z)  # scratch row of KP: z
    g_lse = tl.load(GLSE + n * K + offs_k, mask=k_mask, other=0.0)
    for j in range(M):
        w = tl.load(W + (j * N + n) * K + offs_k, mask=k_mask, other=0.0)
        g_w = tl.load(GZ + (j * N + n) * K + offs_k, mask=k_mask, other=0.0)
        z = tl.load(GR + (j * N + n) * KP + offs_k)
        r = tl.load(RINV + j * N + n)
        g_logit = w * (g_w - weighted + g_lse)
        tl.store(GZ + (j * N + n) * K + offs_k, g_logit * r, mask=k_mask)
        g_r = tl.sum(tl.where(k_mask, g_logit * z, 0.0), 0)
        tl.store(GR + (j * N + n) * KP, g_r * r * r * r / D)


@triton.jit
def _attend_bwd_grad_kernel(
    X, Q, W, GOUT, GZ, GR, GX, N, D, M, K,
    KP: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per row: g_x_j = sum_q w_jq g_out_q + sum_q g_z_jq Q_q - (g_r r^3 / D)_j x_j."""
    n = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, KP)
    k_mask = offs_k < K
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        d_mask = d0 + offs_d < D
        kd_mask = k_mask[:, None] & d_mask[None, :]
        q = tl.load(Q + offs_k[:, None] * D + d0 + offs_d[None, :], mask=kd_mask, other=0.0)
        g_out = tl.load(GOUT + (offs_k[:, None] * N + n) * D + d0 + offs_d[None, :],
                        mask=kd_mask, other=0.0).to(tl.float32)
        for j in range(M):
            x = tl.load(X + (j * N + n) * D + d0 + offs_d, mask=d_mask, other=0.0).to(tl.float32)
            w = tl.load(W + (j * N + n) * K + offs_k, mask=k_mask, other=0.0)
            g_z = tl.load(GZ + (j * N + n) * K + offs_k, mask=k_mask, other=0.0)
            c = tl.load(GR + (j * N + n) * KP)
            g_x = tl.sum(w[:, None] * g_out + g_z[:, None] * q, 0) - c * x
            tl.store(GX + (j * N + n) * D + d0 + offs_d, g_x.to(GX.dtype.element_ty), mask=d_mask)


@triton.jit
def _query_grad_kernel(
    X, C, C_ROW_STRIDE, PARTIAL, R, D, K, ROWS_PER_PROGRAM,
    KD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (d, s): its share of g_Q[:, d tile] = sum over rows r of C[r, :]^T X[r, d tile] for
    the rows [s * ROWS_PER_PROGRAM, ...) of X [R, D], C [R, K] (row stride C_ROW_STRIDE), as a
    [K, BLOCK_D] fp32 tile of PARTIAL[s]. fp32 products (the tile product is small next to the
    loads), K padded to KD >= 16 for tl.dot."""
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    offs_k = tl.arange(0, KD)
    k_mask = offs_k < K
    first = pid_s * ROWS_PER_PROGRAM
    last = tl.minimum(first + ROWS_PER_PROGRAM, R)
    acc = tl.zeros([KD, BLOCK_D], tl.float32)
    for r0 in range(first, last, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        r_mask = rows < last
        x = tl.load(X + rows[:, None] * D + offs_d[None, :], mask=r_mask[:, None] & d_mask[None, :],
                    other=0.0).to(tl.float32)
        c = tl.load(C + rows[:, None] * C_ROW_STRIDE + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :],
                    other=0.0)
        acc += tl.dot(tl.trans(c), x, input_precision="ieee")
    tl.store(PARTIAL + (pid_s * K + offs_k[:, None]) * D + offs_d[None, :], acc,
             mask=k_mask[:, None] & d_mask[None, :])


@triton.jit
def _merge_fwd_kernel(
    O, O_ROW_STRIDE, LSE, LSE_ROW_STRIDE, P, Q, H, SHARE, RINV, N, D, eps,
    BLOCK_D: tl.constexpr,
):
    """One program per row: r and lp = (p . q) r over D (pass 1), then h (pass 2)."""
    n = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    sq = tl.zeros([BLOCK_D], tl.float32)
    dot = tl.zeros([BLOCK_D], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_mask = d0 + offs_d < D
        p = tl.load(P + n * D + d0 + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        q = tl.load(Q + d0 + offs_d, mask=d_mask, other=0.0)
        sq += p * p
        dot += p * q
    r = 1.0 / tl.sqrt(tl.sum(sq, 0) / D + eps)
    lp = tl.sum(dot, 0) * r
    share = tl.sigmoid(tl.load(LSE + n * LSE_ROW_STRIDE) - lp)
    tl.store(SHARE + n, share)
    tl.store(RINV + n, r)
    for d0 in range(0, D, BLOCK_D):
        d_mask = d0 + offs_d < D
        p = tl.load(P + n * D + d0 + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        o = tl.load(O + n * O_ROW_STRIDE + d0 + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        h = share * o + (1.0 - share) * p
        tl.store(H + n * D + d0 + offs_d, h.to(H.dtype.element_ty), mask=d_mask)


@triton.jit
def _merge_bwd_coef_kernel(
    O, O_ROW_STRIDE, P, Q, GH, SHARE, RINV, G_LSE, COEF, N, D,
    BLOCK_D: tl.constexpr,
):
    """One program per row: g_s = g_h . (o - p), g_lse = g_s s (1 - s) and the two factors of
    g_p's rms term, COEF[n] = (g_lp r, g_lp (p . q) r^3 / D) with g_lp = -g_lse."""
    n = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    g_s = tl.zeros([BLOCK_D], tl.float32)
    dot = tl.zeros([BLOCK_D], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_mask = d0 + offs_d < D
        p = tl.load(P + n * D + d0 + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        o = tl.load(O + n * O_ROW_STRIDE + d0 + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        g_h = tl.load(GH + n * D + d0 + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        q = tl.load(Q + d0 + offs_d, mask=d_mask, other=0.0)
        g_s += g_h * (o - p)
        dot += p * q
    share = tl.load(SHARE + n)
    r = tl.load(RINV + n)
    g_lse = tl.sum(g_s, 0) * share * (1.0 - share)
    tl.store(G_LSE + n, g_lse)
    tl.store(COEF + 2 * n, -g_lse * r)
    tl.store(COEF + 2 * n + 1, -g_lse * tl.sum(dot, 0) * r * r * r / D)


@triton.jit
def _merge_bwd_grad_kernel(
    P, Q, GH, SHARE, COEF, GO, GP, N, D,
    BLOCK_D: tl.constexpr,
):
    """One program per row: g_o = s g_h and g_p = (1 - s) g_h + a q - b p with (a, b) = COEF[n]."""
    n = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    share = tl.load(SHARE + n)
    a = tl.load(COEF + 2 * n)
    b = tl.load(COEF + 2 * n + 1)
    for d0 in range(0, D, BLOCK_D):
        d_mask = d0 + offs_d < D
        q = tl.load(Q + d0 + offs_d, mask=d_mask, other=0.0)
        p = tl.load(P + n * D + d0 + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        g_h = tl.load(GH + n * D + d0 + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        tl.store(GO + n * D + d0 + offs_d, (share * g_h).to(GO.dtype.element_ty), mask=d_mask)
        g_p = (1.0 - share) * g_h + a * q - b * p
        tl.store(GP + n * D + d0 + offs_d, g_p.to(GP.dtype.element_ty), mask=d_mask)


# ------------------------------------------------------------------------------------ launching
def _block_d(D: int, KP: int = 1) -> int:
    """D chunk of the per-row kernels: the whole row up to 1024 elements, and at most 8192 elements
    in their [KP, chunk] query tiles (blocks of more than 8 sub-layers get shorter chunks rather
    than tiles too large for registers)."""
    return min(1024, triton.next_power_of_2(D), max(64, 8192 // KP))


# tiles of the query-gradient kernel, and its programs per SM (D tiles times row splits)
_QG_BLOCK_R, _QG_BLOCK_D = 32, 128
_QG_PROGRAMS_PER_SM = 4


def query_grad(X: Tensor, C: Tensor, K: int) -> Tensor:
    """g_Q [K, D] fp32 = C[:, :K]^T X for X [R, D] (any float dtype) and C [R, >= K] fp32 with unit
    column stride: a split over rows, each program's partial written once and summed here."""
    R, D = X.shape
    d_tiles = triton.cdiv(D, _QG_BLOCK_D)
    sms = torch.cuda.get_device_properties(X.device).multi_processor_count if X.is_cuda else 1
    splits = max(1, min(triton.cdiv(R, _QG_BLOCK_R), triton.cdiv(_QG_PROGRAMS_PER_SM * sms, d_tiles)))
    rows = triton.cdiv(triton.cdiv(R, splits), _QG_BLOCK_R) * _QG_BLOCK_R
    splits = triton.cdiv(R, rows)
    partial = torch.empty(splits, K, D, device=X.device, dtype=torch.float32)
    _query_grad_kernel[(d_tiles, splits)](X, C, C.stride(0), partial, R, D, K, rows,
                                         KD=max(16, triton.next_power_of_2(K)), BLOCK_R=_QG_BLOCK_R,
                                         BLOCK_D=_QG_BLOCK_D)
    return partial.sum(0)


def _rows(x: Tensor) -> Tensor:
    """[S, B, D] -> [N, D] rows, contiguous."""
    return x.reshape(-1, x.shape[-1]).contiguous()


class _Attend(torch.autograd.Function):
    """Phase 1 with the Triton kernels; saves the sources (alive anyway), the queries and the
    per-token statistics, and stacks the sources again in backward."""

    @staticmethod
    def forward(ctx, eps: float, queries: Tensor, *sources: Tensor):
        ctx.set_materialize_grads(False)
        S, B, D = sources[0].shape
        m, k, N = len(sources), queries.shape[0], S * B
        X = torch.stack(sources).view(m, N, D)
        q = queries.detach().float().contiguous()
        out = torch.empty(k, N, D, device=X.device, dtype=X.dtype)
        lse = torch.empty(N, k, device=X.device, dtype=torch.float32)
        weights = torch.empty(m, N, k, device=X.device, dtype=torch.float32)
        rinv = torch.empty(m, N, device=X.device, dtype=torch.float32)
        KP = triton.next_power_of_2(k)
        _attend_fwd_kernel[(N,)](X, q, out, lse, weights, rinv, N, D, m, k, eps, KP=KP, BLOCK_D=_block_d(D, KP))
        ctx.save_for_backward(q, weights, rinv, *sources)
        ctx.mark_non_differentiable(weights)
        return (*out.view(k, S, B, D).unbind(0), *lse.view(S, B, k).unbind(-1), weights.view(m, S, B, k))

    @staticmethod
    def backward(ctx, *grads):
        from deltatron.model.attnres import stack_grads

        q, weights, rinv, *sources = ctx.saved_tensors
        S, B, D = sources[0].shape
        m, k, N = len(sources), q.shape[0], S * B
        X = torch.stack(sources).view(m, N, D)
        g_out = stack_grads(grads[:k], sources[0], 0, sources[0].dtype)  # [k, S, B, D] = [k, N, D]
        g_lse = stack_grads(grads[k : 2 * k], rinv[0].view(S, B), -1, torch.float32)  # [N, k]
        KP = triton.next_power_of_2(k)
        g_z = torch.empty(m, N, k, device=X.device, dtype=torch.float32)
        g_r = torch.empty(m, N, KP, device=X.device, dtype=torch.float32)
        _attend_bwd_coef_kernel[(N,)](X, q, weights, rinv, g_out, g_lse, g_z, g_r, N, D, m, k, KP=KP,
                                      BLOCK_D=_block_d(D, KP))
        g_x = torch.empty_like(X)
        _attend_bwd_grad_kernel[(N,)](X, q, weights, g_out, g_z, g_r, g_x, N, D, m, k, KP=KP,
                                      BLOCK_D=_block_d(D, KP))
        g_q = query_grad(X.view(m * N, D), g_z.view(m * N, k), k)
        return (None, g_q, *(g.view(S, B, D) for g in g_x.unbind(0)))


def attend(sources: Sequence[Tensor], queries: Tensor, eps: float) -> tuple[Tensor, ...]:
    """Phase 1 (deltatron.model.attnres.attend_completed) with the Triton kernels.

    sources: m tensors [S, B, D], same dtype; queries [k, D] fp32.
    Returns k outputs [S, B, D] (sources' dtype), k log-sum-exps [S, B] fp32, then the weights
    [m, S, B, k] fp32 (no gradient)."""
    return _Attend.apply(eps, queries, *(s.contiguous() for s in sources))


class _Merge(torch.autograd.Function):
    """Phase 2 with the Triton kernels; saves the inputs as they are and the per-token share and
    inverse RMS."""

    @staticmethod
    def forward(ctx, out: Tensor, lse: Tensor, partial: Tensor, query: Tensor, eps: float):
        ctx.set_materialize_grads(False)
        S, B, D = partial.shape
        N = S * B
        o, o_stride = _row_view(out)
        l, l_stride = _row_view(lse.unsqueeze(-1))
        p = _rows(partial)
        q = query.detach().float().contiguous()
        h = torch.empty(N, D, device=p.device, dtype=out.dtype)
        share = torch.empty(N, device=p.device, dtype=torch.float32)
        rinv = torch.empty(N, device=p.device, dtype=torch.float32)
        _merge_fwd_kernel[(N,)](o, o_stride, l, l_stride, p, q, h, share, rinv, N, D, eps, BLOCK_D=_block_d(D))
        ctx.save_for_backward(out, partial, q, share, rinv)
        ctx.mark_non_differentiable(share)
        return h.view(S, B, D), share.view(S, B)

    @staticmethod
    def backward(ctx, g_h: Tensor, _g_share):
        if g_h is None:  # h unused: no gradient anywhere
            return None, None, None, None, None
        out, partial, q, share, rinv = ctx.saved_tensors
        S, B, D = partial.shape
        N = S * B
        o, o_stride = _row_view(out)
        p = _rows(partial)
        g_h = _rows(g_h)
        g_lse = torch.empty(N, device=p.device, dtype=torch.float32)
        coef = torch.empty(N, 2, device=p.device, dtype=torch.float32)
        _merge_bwd_coef_kernel[(N,)](o, o_stride, p, q, g_h, share, rinv, g_lse, coef, N, D, BLOCK_D=_block_d(D))
        g_o = torch.empty(N, D, device=p.device, dtype=out.dtype)
        g_p = torch.empty_like(p)
        _merge_bwd_grad_kernel[(N,)](p, q, g_h, share, coef, g_o, g_p, N, D, BLOCK_D=_block_d(D))
        g_q = query_grad(p, coef, 1)[0]
        return g_o.view(S, B, D), g_lse.view(S, B), g_p.view(S, B, D), g_q, None


def _row_view(x: Tensor) -> tuple[Tensor, int]:
    """x [S, B, D] (possibly a strided slice such as out[..., k, :]) as rows of a common stride:
    (tensor to pass, row stride in elements). Copies only when the rows are not evenly spaced."""
    S, B, D = x.shape
    if x.stride(-1) == 1 and (B == 1 or x.stride(0) == B * x.stride(1)):
        return x, (x.stride(1) if B > 1 else x.stride(0))
    return _rows(x), D


def merge(out: Tensor, lse: Tensor, partial: Tensor, query: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Phase 2 (deltatron.model.attnres.merge_partial) with the Triton kernels.

    out: [S, B, D] (a slice of phase 1's output is fine); lse: [S, B] fp32; partial [S, B, D];
    query [D] fp32. Returns h [S, B, D] in out's dtype and the share [S, B] (no gradient)."""
    return _Merge.apply(out, lse, partial, query, eps)


__all__ = ["attend", "merge"]
