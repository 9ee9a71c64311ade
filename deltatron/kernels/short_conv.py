"""KDA's short convolutions: causal depthwise conv + SiLU (+ per-head L2 norm), fused in Triton.

Per channel c with taps w[c, 0..W-1] (tap W-1 multiplies the current token) and the token's
position p_t inside its document (packed sequences reset the history at every document start):

    a_t = sum_{s < W, s <= p_t} w[c, W-1-s] x_{t-s},    y_t = SiLU(a_t)
    out_t = y_t / sqrt(sum_{c in head} y_t^2 + eps)     (with norm_group: q and k, per head)

The eager form (`short_conv_silu_reference`, the CPU path and the kernels' test reference) runs
about 16 full-size operations forward and 30 backward per convolution (a pad, a mask, two products
and an add per tap, then SiLU and the fp32 normalisation), each one a pass over memory and a host
launch. The kernels read x once and write the output once; the backward recomputes a from x, writes
the activation gradient (fp32) with per-tile partials of the weight gradient, then forms the input
gradient from it: about 6 passes in all.

Layouts: x [B, T, C] with unit channel stride (any batch and time strides: the transposed output of
a [S, B, C] projection is read in place); weight [C, W]; doc_pos [T] int (or None: one document per
row). Output [B, T, C] contiguous in x's dtype; all arithmetic in fp32.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from deltatron.kernels import cdiv, on_device, runs_fused, triton_available

L2_EPS = 1e-6


def causal_short_conv(x: Tensor, weight: Tensor, doc_pos: Optional[Tensor] = None) -> Tensor:
    """Depthwise causal convolution with document resets, eager.

    x: [B, T, C]; weight: [C, W] (tap W-1 multiplies the current token, like torch's conv1d with
    left padding W-1); doc_pos: [T] position inside the document (packed sequences) or None.
    A tap reaching before the start of a document contributes zero, so documents never mix.
    """
    width = weight.shape[-1]
    out = x * weight[:, width - 1]
    for shift in range(1, width):
        shifted = F.pad(x[:, :-shift], (0, 0, shift, 0)) if shift < x.shape[1] else torch.zeros_like(x)
        if doc_pos is not None:
            shifted = shifted * (doc_pos >= shift).to(x.dtype)[None, :, None]
        out = out + shifted * weight[:, width - 1 - shift]
    return out


def l2_normalize(x: Tensor, eps: float = L2_EPS) -> Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, in fp32 (the form Kimi's kernels use)."""
    x = x.float()
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def short_conv_silu_reference(
    x: Tensor, weight: Tensor, doc_pos: Optional[Tensor] = None, norm_group: int = 0, eps: float = L2_EPS
) -> Tensor:
    """The eager composition the kernels fuse; arguments and result as `short_conv_silu`."""
    y = F.silu(causal_short_conv(x, weight, doc_pos))
    if not norm_group:
        return y
    B, T, C = y.shape
    return l2_normalize(y.view(B, T, C // norm_group, norm_group), eps).to(x.dtype).view(B, T, C)


def short_conv_silu(
    x: Tensor, weight: Tensor, doc_pos: Optional[Tensor] = None, norm_group: int = 0, eps: float = L2_EPS
) -> Tensor:
    """SiLU(causal depthwise conv(x)), L2-normalised over each group of `norm_group` channels
    when norm_group > 0 (a head), differentiable in x and weight.

    x: [B, T, C]; weight: [C, W]; doc_pos: [T] position of each token in its document, or None.
    Returns [B, T, C] in x's dtype. CUDA tensors run the Triton kernels; others the eager
    reference (also where a head is not a power of two up to 256, which the kernels tile whole).
    """
    if norm_group and x.shape[-1] % norm_group:
        raise ValueError(f"norm_group={norm_group} does not divide the {x.shape[-1]} channels")
    if runs_fused(x, norm_group or None):
        return ShortConvSiLU.apply(x, weight, doc_pos, norm_group, eps)
    return short_conv_silu_reference(x, weight, doc_pos, norm_group, eps)


# Rows per program; channels per program without normalisation (with it: one head). 8 warps: at
# 4 the backward kernels spill 68-364 bytes per thread on sm_90, at 8 only the normalised one
# does, 120 (python -m deltatron.kernels.kda.triton_compile_check).
_BLOCK_T = 32
_BLOCK_C = 128
NUM_WARPS = 8


class ShortConvSiLU(torch.autograd.Function):
    """Autograd boundary of the kernels (`short_conv_silu`'s arguments). Saves x, weight and
    doc_pos only: the backward recomputes the convolution."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, doc_pos: Optional[Tensor], norm_group: int, eps: float):
        if x.stride(-1) != 1:
            x = x.contiguous()
        weight = weight.contiguous()
        B, T, C = x.shape
        out = torch.empty((B, T, C), dtype=x.dtype, device=x.device)
        _launch(_conv_fwd_kernel, x, weight, doc_pos, norm_group, eps, out)
        ctx.save_for_backward(x, weight, doc_pos)
        ctx.norm_group, ctx.eps = norm_group, eps
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, weight, doc_pos = ctx.saved_tensors
        B, T, C = x.shape
        W = weight.shape[-1]
        grad_out = grad_out.contiguous()
        grad_act = torch.empty((B, T, C), dtype=torch.float32, device=x.device)
        # per program (row tile, batch row), the weight gradient of its channels: summed below
        partial_dw = torch.empty((B * cdiv(T, _BLOCK_T), C, W), dtype=torch.float32, device=x.device)
        _launch(
            _conv_bwd_act_kernel, x, weight, doc_pos, ctx.norm_group, ctx.eps, grad_out, grad_act, partial_dw,
        )
        grad_x = torch.empty((B, T, C), dtype=x.dtype, device=x.device)
        _launch(_conv_bwd_input_kernel, grad_act, weight, doc_pos, 0, 0.0, grad_x)
        return grad_x, partial_dw.sum(0).to(weight.dtype), None, None, None


def _launch(kernel, x: Tensor, weight: Tensor, doc_pos: Optional[Tensor], norm_group: int, eps: float, *outs):
    """One launch over (row tiles, channel tiles, batch rows) of x [B, T, C]."""
    B, T, C = x.shape
    block_c = norm_group or min(_BLOCK_C, max(16, 1 << (C - 1).bit_length()))
    grid = (cdiv(T, _BLOCK_T), cdiv(C, block_c), B)
    pos = doc_pos if doc_pos is not None else x  # never read without HAS_POS
    with on_device(x):
        kernel[grid](
            x, weight, pos, *outs, T, C, x.stride(0), x.stride(1), eps,
            W=weight.shape[-1], HAS_POS=doc_pos is not None, NORM=norm_group > 0,
            BT=_BLOCK_T, BC=block_c, num_warps=NUM_WARPS,
        )


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _positions(POS, rows, T, HAS_POS: tl.constexpr):
        """Each row's position in its document (the row itself without documents)."""
        if HAS_POS:
            pos = tl.load(POS + rows, mask=rows < T, other=0)
        else:
            pos = rows
        return pos

    @triton.jit
    def _tap(X, pos, i_b, rows, cols, T, C, sxb, sxt, s: tl.constexpr):
        """x_{t-s} at rows t x cols of batch row i_b, fp32 [BT, BC]; zero where tap s reaches
        before the document's start (or the sequence's)."""
        ok = (rows < T) & (pos >= s) & (rows >= s)
        return tl.load(X + i_b * sxb + (rows - s)[:, None].to(tl.int64) * sxt + cols[None, :],
                       mask=ok[:, None] & (cols < C)[None, :], other=0.0).to(tl.float32)

    @triton.jit
    def _conv_tile(X, Wt, pos, i_b, rows, cols, T, C, sxb, sxt,
                   W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
        """a = the convolution at rows x cols of batch row i_b, fp32 [BT, BC]."""
        cmask = cols < C
        acc = tl.zeros([BT, BC], dtype=tl.float32)
        for s in tl.static_range(W):
            ws = tl.load(Wt + cols * W + (W - 1 - s), mask=cmask, other=0.0).to(tl.float32)
            acc += _tap(X, pos, i_b, rows, cols, T, C, sxb, sxt, s) * ws[None, :]
        return acc

    @triton.jit
    def _conv_fwd_kernel(X, Wt, POS, OUT, T, C, sxb, sxt, eps,
                         W: tl.constexpr, HAS_POS: tl.constexpr, NORM: tl.constexpr,
                         BT: tl.constexpr, BC: tl.constexpr):
        """OUT [B, T, C] = SiLU(conv(X)) (normalised over the BC channels of a head if NORM)."""
        i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        rows = i_t * BT + tl.arange(0, BT)
        cols = i_c * BC + tl.arange(0, BC)
        pos = _positions(POS, rows, T, HAS_POS)
        a = _conv_tile(X, Wt, pos, i_b, rows, cols, T, C, sxb, sxt, W, BT, BC)
        y = a * tl.sigmoid(a)
        if NORM:
            y = y * tl.rsqrt(tl.sum(y * y, 1) + eps)[:, None]
        mask = (rows < T)[:, None] & (cols < C)[None, :]
        offs = (i_b * T + rows[:, None]) * C + cols[None, :]
        tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _conv_bwd_act_kernel(X, Wt, POS, DOUT, DA, DWP, T, C, sxb, sxt, eps,
                             W: tl.constexpr, HAS_POS: tl.constexpr, NORM: tl.constexpr,
                             BT: tl.constexpr, BC: tl.constexpr):
        """DA [B, T, C] fp32 = gradient of the convolution's output a; DWP [B * NT, C, W] fp32 =
        this tile's sum over its rows of DA_t x_{t-s} for every tap."""
        i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        rows = i_t * BT + tl.arange(0, BT)
        cols = i_c * BC + tl.arange(0, BC)
        rmask = rows < T
        cmask = cols < C
        mask = rmask[:, None] & cmask[None, :]
        pos = _positions(POS, rows, T, HAS_POS)
        a = _conv_tile(X, Wt, pos, i_b, rows, cols, T, C, sxb, sxt, W, BT, BC)
        sig = tl.sigmoid(a)
        y = a * sig
        offs = (i_b * T + rows[:, None]) * C + cols[None, :]
        dy = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
        if NORM:
            r = tl.rsqrt(tl.sum(y * y, 1) + eps)
            out = y * r[:, None]
            dy = r[:, None] * (dy - out * tl.sum(dy * out, 1)[:, None])
        da = tl.where(mask, dy * sig * (1.0 + a * (1.0 - sig)), 0.0)
        tl.store(DA + offs, da, mask=mask)
        tile = i_b * tl.num_programs(0) + i_t
        for s in tl.static_range(W):
            xs = _tap(X, pos, i_b, rows, cols, T, C, sxb, sxt, s)
            tl.store(DWP + (tile * C + cols) * W + (W - 1 - s), tl.sum(da * xs, 0), mask=cmask)

    @triton.jit
    def _conv_bwd_input_kernel(DA, Wt, POS, DX, T, C, sdb, sdt, eps,
                               W: tl.constexpr, HAS_POS: tl.constexpr, NORM: tl.constexpr,
                               BT: tl.constexpr, BC: tl.constexpr):
        """DX_t = sum_s DA_{t+s} w[W-1-s] over the taps s whose output t+s is in t's document."""
        i_t, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        rows = i_t * BT + tl.arange(0, BT)
        cols = i_c * BC + tl.arange(0, BC)
        cmask = cols < C
        acc = tl.zeros([BT, BC], dtype=tl.float32)
        for s in tl.static_range(W):
            dst = rows + s
            dmask = dst < T
            pos = _positions(POS, dst, T, HAS_POS)
            da = tl.load(DA + i_b * sdb + dst[:, None].to(tl.int64) * sdt + cols[None, :],
                         mask=(dmask & (pos >= s))[:, None] & cmask[None, :], other=0.0)
            ws = tl.load(Wt + cols * W + (W - 1 - s), mask=cmask, other=0.0).to(tl.float32)
            acc += da * ws[None, :]
        mask = (rows < T)[:, None] & cmask[None, :]
        offs = (i_b * T + rows[:, None]) * C + cols[None, :]
        tl.store(DX + offs, acc.to(DX.dtype.element_ty), mask=mask)
