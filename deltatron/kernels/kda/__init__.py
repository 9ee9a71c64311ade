"""Kimi Delta Attention (KDA): the gated delta rule with per-channel decay, behind one boundary.

    S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T,    o_t = S_t^T (scale q_t)

`kda(...)` picks a backend; every backend takes and returns the same shapes:

    q, k          [B, T, H, K]  already L2-normalised over K by the caller
    v             [B, T, H, V]
    g             [B, T, H, K]  per-channel log decay (<= 0), any float dtype, fp32 preferred
    beta          [B, T, H]     already sigmoid-ed, in (0, 1)
    initial_state [N, H, K, V]  fp32, or None for zeros; N = B, or N documents with cu_seqlens
    cu_seqlens    [N + 1]       int32/int64 document offsets into T, only with B == 1
    ->  o [B, T, H, V] in v's dtype,  final_state [N, H, K, V] fp32 (None if not asked for)

Backends: "torch" (chunkwise parallel in pure PyTorch, differentiable; the CPU path and the GPU
fallback), "naive" (token by token, the test oracle) and, where triton imports, "triton" (chunkwise
forward and backward kernels for CUDA tensors, chunk_size 16, 32, 64 or 128; see triton_chunk.py)
and "recurrent" (token by token in one Triton kernel, forward only: generation against a carried
state; see triton_recurrent.py).
"""

from __future__ import annotations

from typing import Optional

import torch

from deltatron.kernels import triton_available
from deltatron.kernels.kda.chunk import chunk_kda_torch
from deltatron.kernels.kda.naive import naive_recurrent_kda

__all__ = ["available_backends", "chunk_kda_torch", "kda", "naive_recurrent_kda"]

_BACKENDS = ("torch", "naive")


def available_backends() -> tuple[str, ...]:
    """Names `kda(..., backend=...)` accepts in this installation ("triton" only if it imports)."""
    return _BACKENDS + (("triton", "recurrent") if triton_available() else ())


def kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = True,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "torch",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run KDA with the chosen backend (shapes in the module docstring).

    scale defaults to K ** -0.5 and multiplies q inside. chunk_size is the chunk length of the
    chunkwise backends; the token-by-token ones ignore it. Raises ValueError for an unknown
    backend or for inputs that do not fit.
    """
    if backend == "torch":
        return chunk_kda_torch(
            q, k, v, g, beta, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
        )
    if backend == "naive":
        return naive_recurrent_kda(
            q, k, v, g, beta, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        )
    if backend == "triton" and backend in available_backends():
        # Imported on first use, so importing this package never imports triton. TRITON_INTERPRET
        # is read when the kernels are defined, i.e. at this first import.
        from deltatron.kernels.kda.triton_chunk import chunk_kda_triton

        return chunk_kda_triton(
            q, k, v, g, beta, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
        )
    if backend == "recurrent" and backend in available_backends():
        from deltatron.kernels.kda.triton_recurrent import fused_recurrent_kda

        return fused_recurrent_kda(
            q, k, v, g, beta, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        )
    raise ValueError(
        f"KDA backend {backend!r} is not available; choose one of: "
        f"{', '.join(available_backends())}"
    )
