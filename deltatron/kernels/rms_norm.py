"""RMSNorm, fused in Triton: the local path's norm (deltatron/model/norm.py) before every mixer and
FFN, the final norm and MLA's KV-latent norm.

    y = weight * round(x / sqrt(mean(x^2) + eps))        x: [..., D], weight: [D]

with the statistics in fp32 and the normalised values rounded to x's dtype before the weight
multiplies them (Kimi Linear's reference, and `rms_norm_reference`). Eagerly that is an fp32 copy
of x, a square, a mean, an rsqrt, two products and two casts, and the backward as many again;
autograd keeps the fp32 copy and the normalised values (4 + 2 bytes per element in bf16). The
kernel reads x once and writes y once; it keeps x itself and one fp32 rstd per row, and the
backward recomputes the rest, writing dx and the weight's gradient as per-program partial sums
(summed in PyTorch: deterministic). CUDA tensors with rows of up to MAX_FUSED_DIM elements run the
kernels, others the eager reference (the CPU path and the kernels' test reference).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from deltatron.kernels import cdiv, on_device, runs_fused, triton_available

MAX_FUSED_DIM = 16384  # a row is one tile: up to 16384 fp32 values over the program's threads
ROWS_PER_PROGRAM = 16  # backward: rows one program walks, summing its weight-gradient partial


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x: [..., D]; weight: [D]. Statistics in fp32, the normalised values cast back to x's dtype,
    then multiplied by the weight (in the promoted dtype of the two)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`rms_norm_reference`'s result, fused on CUDA; differentiable in x and weight."""
    if runs_fused(x) and runs_fused(weight) and 0 < x.shape[-1] <= MAX_FUSED_DIM and x.numel() > 0:
        return _RMSNorm.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def _block(D: int) -> dict:
    import triton

    block = triton.next_power_of_2(D)
    return dict(BD=block, num_warps=min(16, max(1, block // 512)))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float):
        shape = x.shape
        D = shape[-1]
        x2 = x.reshape(-1, D).contiguous()
        rows = x2.shape[0]
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty((rows, D), dtype=out_dtype, device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        with on_device(x):
            _rms_norm_fwd_kernel[(rows,)](x2, weight, y, rstd, D, eps, **_block(D))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x2, weight, rstd = ctx.saved_tensors
        rows, D = x2.shape
        dy = dy.reshape(rows, D).contiguous()
        dx = torch.empty_like(x2)
        programs = cdiv(rows, ROWS_PER_PROGRAM)
        dw_parts = torch.empty((programs, D), dtype=torch.float32, device=x2.device)
        with on_device(x2):
            _rms_norm_bwd_kernel[(programs,)](
                x2, weight, dy, rstd, dx, dw_parts, rows, D, ROWS=ROWS_PER_PROGRAM, **_block(D),
            )
        return dx.view(ctx.shape), dw_parts.sum(0).to(weight.dtype), None


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_fwd_kernel(X, W, Y, RSTD, D, eps, BD: tl.constexpr):
        """Y [rows, D] = W * round_X(X * rstd), RSTD [rows] fp32; grid (rows,)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BD)
        mask = cols < D
        x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / D + eps)
        n = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * D + cols, (n * w).to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _rms_norm_bwd_kernel(X, W, DY, RSTD, DX, DW, rows, D, ROWS: tl.constexpr,
                             BD: tl.constexpr):
        """DX [rows, D] and the weight-gradient partial of this program's ROWS rows, DW [programs,
        D]: dn = dy * w, dx = rstd (dn - n mean(dn n)), dw = sum_rows dy round_X(n)."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BD)
        mask = cols < D
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BD], dtype=tl.float32)
        for i in range(ROWS):
            row = pid.to(tl.int64) * ROWS + i
            if row < rows:
                x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + row * D + cols, mask=mask, other=0.0).to(tl.float32)
                rstd = tl.load(RSTD + row)
                n = x * rstd
                dw += dy * n.to(X.dtype.element_ty).to(tl.float32)
                dn = dy * w
                dx = rstd * (dn - n * (tl.sum(dn * n, 0) / D))
                tl.store(DX + row * D + cols, dx.to(DX.dtype.element_ty), mask=mask)
        tl.store(DW + pid.to(tl.int64) * D + cols, dw, mask=mask)
