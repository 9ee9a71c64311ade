"""Muon's orthogonalisation: the quintic Newton-Schulz iteration and the RMS-matching update scale.

Newton-Schulz maps a matrix G = U S V^T to approximately U V^T without an SVD: starting from
X0 = G / ||G||_F (so every singular value is at most 1), each step applies the odd polynomial
p(x) = a x + b x^3 + c x^5 to the singular values,

    X <- a X + (b A + c A^2) X,   A = X X^T.

The coefficients (3.4445, -4.7750, 2.0315) (Keller Jordan's, used by Moonlight and Kimi K2) make
p steep at 0 so small singular values grow fast; after 5 steps they sit in a band around 1
(roughly 0.7 to 1.2) rather than at exactly 1, which Muon does not need. Runs in bf16: the
iteration is self-correcting, so bf16 rounding does not accumulate.
"""

from __future__ import annotations

import math

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(
    g: torch.Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
    overwrite: bool = False,
) -> torch.Tensor:
    """Approximate orthogonalisation of each matrix in a batch.

    g: [m, n] or [B, m, n] (any float dtype). Returns `dtype` (bf16 by default) of the same shape.
    Works on the wide orientation (m <= n) so the Gram matrix X X^T is the smaller one.
    overwrite: g is scratch the caller built for this call (already in `dtype`): it is
    normalised in place instead of copied.
    """
    if g.dim() not in (2, 3):
        raise ValueError(f"newton_schulz takes [m, n] or [B, m, n] matrices, got shape {tuple(g.shape)}")
    a, b, c = coefficients
    x = g.to(dtype) if g.dim() == 3 else g.to(dtype)[None]
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    # Frobenius norm of each matrix, accumulated in fp32, bounds the spectral norm by 1. The input
    # is rounded to `dtype` before (as torch.optim.Muon does), so a matrix gathered from TP shards
    # sent in `dtype` gives exactly the result of the unsharded one.
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True, dtype=torch.float32).clamp_min(eps)
    if x.data_ptr() == g.data_ptr() and not overwrite:  # g was already in `dtype`: keep it intact
        x = x.clone()
    # x / norm in fp32, rounded to `dtype` (the in-place division computes in fp32 too)
    x = x.div_(norm)
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    if tall:
        x = x.mT
    x = x.contiguous()
    return x if g.dim() == 3 else x[0]


def muon_update_scale(shape: tuple[int, int], rms_scale: float = 0.2) -> float:
    """Factor on the orthogonalised update of an [A, B] matrix: rms_scale * sqrt(max(A, B)).

    An orthogonal [A, B] matrix has RMS 1/sqrt(max(A, B)), so the scaled update has RMS about
    rms_scale, which Moonlight chose (0.2) to match AdamW's typical update RMS: AdamW's learning
    rate and weight decay then carry over (Moonlight, arXiv 2502.16982, eq. 4).
    """
    rows, cols = shape
    return rms_scale * math.sqrt(max(rows, cols))
