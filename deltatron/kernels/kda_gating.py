"""KDA's per-channel gates, fused in Triton: the decay gate before the recurrence and the gated
output norm after it.

    decay gate    g = -exp(A_log[h]) * softplus(f + dt_bias)               per channel, fp32
    output norm   y = o / rms_head(o) * w * sigmoid(z)                     per head, then
                  laid out [S, B, H * V] for the output projection

Eagerly each is a chain of full-size fp32 operations (an upcast, an add, softplus, exp, products;
pow, mean, rsqrt, sigmoid, products, a downcast and the transposing copy), about 8 forward and
15 backward passes over memory per layer and micro-batch. Each kernel reads its inputs once and
writes its output once; the backward kernels recompute the forward from the inputs and write the
parameters' gradients as per-program partials (summed in PyTorch, deterministic).

Layouts: per-token inputs [B, T, H * D] with unit channel stride and any batch and time strides
(the transposed output of a [S, B, ...] projection is read in place); D (the head dim) a power of
two from 16 to 256, tiled whole. CUDA tensors run the kernels, others the eager references (the
CPU path and the kernels' test reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from deltatron.kernels import cdiv, on_device, runs_fused, triton_available

_BLOCK_T = 32  # tokens per program
# 8 warps: at 4 the gated norm's backward spills 584 bytes per thread on sm_90, at 8 none of
# these kernels does (python -m deltatron.kernels.kda.triton_compile_check).
NUM_WARPS = 8


def kda_decay_gate_reference(f: Tensor, A_log: Tensor, dt_bias: Tensor) -> Tensor:
    """f: [B, T, H * K] (any float dtype); A_log: [H]; dt_bias: [H * K].
    Returns g [B, T, H, K] fp32, the per-channel log decay (<= 0)."""
    B, T, HK = f.shape
    H = A_log.shape[0]
    gate_in = f.float() + dt_bias
    return -A_log.float().exp()[:, None] * F.softplus(gate_in.view(B, T, H, HK // H))


def gated_rms_norm_reference(o: Tensor, gate: Tensor, weight: Tensor, eps: float) -> Tensor:
    """o: [B, T, H, V]; gate: [B, T, H * V] (or [B, T, H, V]); weight: [V] fp32.
    Returns [T, B, H * V] contiguous in o's dtype: RMSNorm over each head times sigmoid(gate)."""
    B, T, H, V = o.shape
    of = o.float()
    y = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + eps) * weight
    y = (y * torch.sigmoid(gate.reshape(B, T, H, V).float())).to(o.dtype)
    return y.reshape(B, T, H * V).transpose(0, 1).contiguous()


def kda_decay_gate(f: Tensor, A_log: Tensor, dt_bias: Tensor) -> Tensor:
    """`kda_decay_gate_reference`'s result, fused on CUDA; differentiable in all three."""
    if runs_fused(f, f.shape[-1] // A_log.shape[0]):
        return _DecayGate.apply(f, A_log, dt_bias)
    return kda_decay_gate_reference(f, A_log, dt_bias)


def gated_rms_norm(o: Tensor, gate: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`gated_rms_norm_reference`'s result, fused on CUDA; differentiable in all three."""
    if runs_fused(o, o.shape[-1]):
        return _GatedRMSNorm.apply(o, gate, weight, eps)
    return gated_rms_norm_reference(o, gate, weight, eps)


def _rows(x: Tensor) -> Tensor:
    """x [B, T, C] with unit channel stride (copied only if it has none)."""
    return x if x.stride(-1) == 1 else x.contiguous()


class _DecayGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f: Tensor, A_log: Tensor, dt_bias: Tensor):
        f = _rows(f)
        B, T, HK = f.shape
        H = A_log.shape[0]
        K = HK // H
        A_log, dt_bias = A_log.contiguous(), dt_bias.contiguous()
        g = torch.empty((B, T, H, K), dtype=torch.float32, device=f.device)
        with on_device(f):
            _gate_fwd_kernel[(cdiv(T, _BLOCK_T), H, B)](
                f, A_log, dt_bias, g, T, H, f.stride(0), f.stride(1),
                K=K, BT=_BLOCK_T, num_warps=NUM_WARPS,
            )
        ctx.save_for_backward(f, A_log, dt_bias)
        return g

    @staticmethod
    @once_differentiable
    def backward(ctx, dg: Tensor):
        f, A_log, dt_bias = ctx.saved_tensors
        B, T, HK = f.shape
        H = A_log.shape[0]
        K = HK // H
        NT = cdiv(T, _BLOCK_T)
        dg = dg.contiguous()
        df = torch.empty((B, T, HK), dtype=f.dtype, device=f.device)
        d_bias = torch.empty((B * NT, HK), dtype=torch.float32, device=f.device)
        d_alog = torch.empty((B * NT, H), dtype=torch.float32, device=f.device)
        with on_device(f):
            _gate_bwd_kernel[(NT, H, B)](
                f, A_log, dt_bias, dg, df, d_bias, d_alog, T, H, f.stride(0), f.stride(1),
                K=K, BT=_BLOCK_T, num_warps=NUM_WARPS,
            )
        return df, d_alog.sum(0).to(A_log.dtype), d_bias.sum(0).to(dt_bias.dtype)


class _GatedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o: Tensor, gate: Tensor, weight: Tensor, eps: float):
        B, T, H, V = o.shape
        o = o.contiguous()
        gate_shape = gate.shape
        gate = _rows(gate.reshape(B, T, H * V))
        weight = weight.contiguous()
        out = torch.empty((T, B, H * V), dtype=o.dtype, device=o.device)
        with on_device(o):
            _norm_fwd_kernel[(cdiv(T, _BLOCK_T), H, B)](
                o, gate, weight, out, T, H, B, gate.stride(0), gate.stride(1), eps,
                V=V, BT=_BLOCK_T, num_warps=NUM_WARPS,
            )
        ctx.save_for_backward(o, gate, weight)
        ctx.eps, ctx.gate_shape = eps, gate_shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor):
        o, gate, weight = ctx.saved_tensors
        B, T, H, V = o.shape
        NT = cdiv(T, _BLOCK_T)
        dout = dout.contiguous()
        do = torch.empty_like(o)
        dgate = torch.empty((B, T, H * V), dtype=gate.dtype, device=o.device)
        dw = torch.empty((B * NT * H, V), dtype=torch.float32, device=o.device)
        with on_device(o):
            _norm_bwd_kernel[(NT, H, B)](
                o, gate, weight, dout, do, dgate, dw, T, H, B, gate.stride(0), gate.stride(1), ctx.eps,
                V=V, BT=_BLOCK_T, num_warps=NUM_WARPS,
            )
        return do, dgate.view(ctx.gate_shape), dw.sum(0).to(weight.dtype), None


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _gate_tile(F_, A, DTB, i_b, i_h, rows, T, H, sfb, sft, K: tl.constexpr):
        """(f + dt_bias, -exp(A_log[h]), the row mask) of a [BT, K] tile, fp32."""
        cols = i_h * K + tl.arange(0, K)
        rmask = rows < T
        f = tl.load(F_ + i_b * sfb + rows[:, None].to(tl.int64) * sft + cols[None, :],
                    mask=rmask[:, None], other=0.0).to(tl.float32)
        x = f + tl.load(DTB + cols)[None, :]
        neg_a = -tl.exp(tl.load(A + i_h).to(tl.float32))
        return x, neg_a, rmask

    @triton.jit
    def _softplus(x):
        # log(1 + exp(x)) without overflow; below about -17 it rounds to 0 where torch's
        # log1p keeps ~exp(x): an absolute difference under 1e-7 in the decay
        return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))

    @triton.jit
    def _gate_fwd_kernel(F_, A, DTB, G, T, H, sfb, sft, K: tl.constexpr, BT: tl.constexpr):
        """G [B, T, H, K] fp32 = -exp(A_log[h]) softplus(F + dt_bias); grid (row tiles, H, B)."""
        i_t, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        rows = i_t * BT + tl.arange(0, BT)
        x, neg_a, rmask = _gate_tile(F_, A, DTB, i_b, i_h, rows, T, H, sfb, sft, K)
        offs = ((i_b * T + rows[:, None]) * H + i_h) * K + tl.arange(0, K)[None, :]
        tl.store(G + offs, neg_a * _softplus(x), mask=rmask[:, None])

    @triton.jit
    def _gate_bwd_kernel(F_, A, DTB, DG, DF, DBIAS, DALOG, T, H, sfb, sft,
                         K: tl.constexpr, BT: tl.constexpr):
        """DF [B, T, H*K] = DG (-exp(A_log)) sigmoid(F + dt_bias); per program the partial sums
        DBIAS [B*NT, H*K] (of DF over its rows) and DALOG [B*NT, H] (of DG * G)."""
        i_t, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        rows = i_t * BT + tl.arange(0, BT)
        x, neg_a, rmask = _gate_tile(F_, A, DTB, i_b, i_h, rows, T, H, sfb, sft, K)
        kk = tl.arange(0, K)
        dg = tl.load(DG + ((i_b * T + rows[:, None]) * H + i_h) * K + kk[None, :],
                     mask=rmask[:, None], other=0.0)
        df = dg * neg_a * tl.sigmoid(x)
        cols = i_h * K + kk
        tl.store(DF + (i_b * T + rows[:, None]) * (H * K) + cols[None, :],
                 df.to(DF.dtype.element_ty), mask=rmask[:, None])
        tile = i_b * tl.num_programs(0) + i_t
        tl.store(DBIAS + tile * (H * K) + cols, tl.sum(df, 0))
        tl.store(DALOG + tile * H + i_h, tl.sum(tl.sum(dg * neg_a * _softplus(x), 1), 0))

    @triton.jit
    def _norm_tile(O, GT, W, i_b, i_h, rows, T, H, sgb, sgt, eps, V: tl.constexpr):
        """(normalised o, w, sigmoid(gate), 1/rms, o offsets, row mask) of a [BT, V] tile."""
        vv = tl.arange(0, V)
        rmask = rows < T
        o_offs = ((i_b * T + rows[:, None]) * H + i_h) * V + vv[None, :]
        o = tl.load(O + o_offs, mask=rmask[:, None], other=0.0).to(tl.float32)
        z = tl.load(GT + i_b * sgb + rows[:, None].to(tl.int64) * sgt + i_h * V + vv[None, :],
                    mask=rmask[:, None], other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(o * o, 1) / V + eps)
        w = tl.load(W + vv).to(tl.float32)
        return o * r[:, None], w, tl.sigmoid(z), r, rmask

    @triton.jit
    def _norm_fwd_kernel(O, GT, W, OUT, T, H, B, sgb, sgt, eps, V: tl.constexpr, BT: tl.constexpr):
        """OUT [T, B, H*V] = o / rms(o) * w * sigmoid(gate); grid (row tiles, H, B)."""
        i_t, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        rows = i_t * BT + tl.arange(0, BT)
        n, w, s, r, rmask = _norm_tile(O, GT, W, i_b, i_h, rows, T, H, sgb, sgt, eps, V)
        out_offs = (rows[:, None].to(tl.int64) * B + i_b) * (H * V) + i_h * V + tl.arange(0, V)[None, :]
        tl.store(OUT + out_offs, (n * w[None, :] * s).to(OUT.dtype.element_ty), mask=rmask[:, None])

    @triton.jit
    def _norm_bwd_kernel(O, GT, W, DOUT, DO, DGT, DW, T, H, B, sgb, sgt, eps,
                         V: tl.constexpr, BT: tl.constexpr):
        """DO [B, T, H, V], DGT [B, T, H*V] and per-program partials DW [B*NT*H, V]."""
        i_t, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        rows = i_t * BT + tl.arange(0, BT)
        vv = tl.arange(0, V)
        n, w, s, r, rmask = _norm_tile(O, GT, W, i_b, i_h, rows, T, H, sgb, sgt, eps, V)
        out_offs = (rows[:, None].to(tl.int64) * B + i_b) * (H * V) + i_h * V + vv[None, :]
        dy = tl.load(DOUT + out_offs, mask=rmask[:, None], other=0.0).to(tl.float32)
        nw = n * w[None, :]
        dz = dy * nw * s * (1.0 - s)
        u = dy * s
        dn = u * w[None, :]
        do = r[:, None] * (dn - n * (tl.sum(dn * n, 1) / V)[:, None])
        o_offs = ((i_b * T + rows[:, None]) * H + i_h) * V + vv[None, :]
        tl.store(DO + o_offs, do.to(DO.dtype.element_ty), mask=rmask[:, None])
        tl.store(DGT + (i_b * T + rows[:, None]) * (H * V) + i_h * V + vv[None, :],
                 dz.to(DGT.dtype.element_ty), mask=rmask[:, None])
        tile = (i_b * tl.num_programs(0) + i_t) * H + i_h
        tl.store(DW + tile * V + vv, tl.sum(u * n, 0))
