"""SwiGLU, fused in Triton: the activation between an MLP's two linears when the first writes the
gate and the up projection side by side (megatron-core's GLU layout, gate first).

    y = silu(x[..., :F]) * x[..., F:] (* scale per row)        x: [..., 2F] -> y: [..., F]

The optional per-row scale is the MoE routing weight that megatron-core applies right after the
activation. Eagerly (megatron-core's MLP without Transformer Engine or its torch.compile'd
fusion) this is a chunk into two strided views, silu, the add of glu_linear_offset (0), a product
and, for experts, the scaling and a cast: four to six full-size passes forward and more backward,
the strided ones at a fraction of the memory bandwidth. The kernel reads x once and writes y once,
in fp32 inside; the backward reads x and dy and writes dx (x is what is saved, as megatron-core's
fused bias_swiglu saves it) and the scale's gradient as per-program partials (summed in PyTorch,
deterministic). CUDA tensors run the kernels, others the eager reference (the CPU path and the
kernels' test reference).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from deltatron.kernels import cdiv, on_device, runs_fused, triton_available

BLOCK_F = 1024  # columns of y per program (one row per program)
NUM_WARPS = 4


def swiglu_reference(x: Tensor, scale: Optional[Tensor] = None) -> Tensor:
    """x: [..., 2F]; scale: [...] (one per row) or None. Returns [..., F] in x's dtype, computed
    as megatron-core's MLP does: silu(gate) * up in x's dtype, then times the scale in the
    scale's dtype."""
    gate, up = torch.chunk(x, 2, dim=-1)
    y = F.silu(gate) * up
    if scale is not None:
        y = (y * scale.unsqueeze(-1)).to(x.dtype)
    return y


def swiglu(x: Tensor, scale: Optional[Tensor] = None) -> Tensor:
    """`swiglu_reference`'s result, fused on CUDA (fp32 inside, one rounding); differentiable in x
    and scale."""
    if runs_fused(x) and x.shape[-1] % 2 == 0 and x.numel() > 0:
        return _SwiGLU.apply(x, scale)
    return swiglu_reference(x, scale)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: Optional[Tensor]):
        shape = x.shape
        F2 = shape[-1]
        x2 = x.reshape(-1, F2).contiguous()
        rows = x2.shape[0]
        p = scale.reshape(rows).contiguous() if scale is not None else x2  # x2: an unused pointer
        y = torch.empty((rows, F2 // 2), dtype=x.dtype, device=x.device)
        with on_device(x):
            _swiglu_fwd_kernel[(rows, cdiv(F2 // 2, BLOCK_F))](
                x2, p, y, F2 // 2, HAS_SCALE=scale is not None, BF=BLOCK_F, num_warps=NUM_WARPS,
            )
        ctx.save_for_backward(x2, scale)
        ctx.shape = shape
        return y.view(*shape[:-1], F2 // 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x2, scale = ctx.saved_tensors
        rows, F2 = x2.shape
        tiles = cdiv(F2 // 2, BLOCK_F)
        dy = dy.reshape(rows, F2 // 2).contiguous()
        dx = torch.empty_like(x2)
        has_scale = scale is not None
        p = scale.reshape(rows).contiguous() if has_scale else x2
        dp = torch.empty((rows, tiles), dtype=torch.float32, device=x2.device) if has_scale else dx
        with on_device(x2):
            _swiglu_bwd_kernel[(rows, tiles)](
                x2, p, dy, dx, dp, F2 // 2, tiles, HAS_SCALE=has_scale, BF=BLOCK_F,
                num_warps=NUM_WARPS,
            )
        dscale = dp.sum(1).to(scale.dtype).view(scale.shape) if has_scale else None
        return dx.view(ctx.shape), dscale


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _swiglu_tile(X, i_r, i_f, NF, BF: tl.constexpr):
        """(gate, up, column mask) of one row's BF columns, fp32."""
        cols = i_f * BF + tl.arange(0, BF)
        mask = cols < NF
        row = X + i_r * 2 * NF
        a = tl.load(row + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(row + NF + cols, mask=mask, other=0.0).to(tl.float32)
        return a, b, cols, mask

    @triton.jit
    def _swiglu_fwd_kernel(X, P, Y, NF, HAS_SCALE: tl.constexpr, BF: tl.constexpr):
        """Y [rows, NF] = silu(X[:, :NF]) * X[:, NF:] (* P per row); grid (rows, column tiles)."""
        i_r, i_f = tl.program_id(0).to(tl.int64), tl.program_id(1)
        a, b, cols, mask = _swiglu_tile(X, i_r, i_f, NF, BF)
        y = a * tl.sigmoid(a) * b
        if HAS_SCALE:
            y *= tl.load(P + i_r).to(tl.float32)
        tl.store(Y + i_r * NF + cols, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(X, P, DY, DX, DP, NF, TILES, HAS_SCALE: tl.constexpr,
                           BF: tl.constexpr):
        """DX [rows, 2 NF] and, with a scale, its per-tile partial gradients DP [rows, TILES]."""
        i_r, i_f = tl.program_id(0).to(tl.int64), tl.program_id(1)
        a, b, cols, mask = _swiglu_tile(X, i_r, i_f, NF, BF)
        dy = tl.load(DY + i_r * NF + cols, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(a)
        silu = a * s
        if HAS_SCALE:
            tl.store(DP + i_r * TILES + i_f, tl.sum(dy * silu * b, 0))
            dy *= tl.load(P + i_r).to(tl.float32)
        row = DX + i_r * 2 * NF
        tl.store(row + cols, (dy * b * s * (1.0 + a * (1.0 - s))).to(DX.dtype.element_ty), mask=mask)
        tl.store(row + NF + cols, (dy * silu).to(DX.dtype.element_ty), mask=mask)
