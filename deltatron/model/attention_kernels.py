"""Causal softmax attention for MLA on the fastest kernel torch has for it.

MLA's query/key head dim (nope 128 + rope 64 = 192) differs from its value head dim (128). torch
SDPA's flash kernel requires one head dim for q, k and v, so MLA silently ran on the slower
memory-efficient kernel (or math, for packed documents: one SDPA call per document after a
`cu_seqlens.tolist()` host sync). Padding v with zeros to the q/k head dim makes flash eligible;
the padded output columns are zeros and are dropped (their gradient is zero, so dV is exact):

    out = softmax(q k^T * scale) [v | 0]  ->  out[..., :Dv]

The padding costs (Dqk - Dv) / (Dqk + Dv) more attention FLOPs (1/5 for 192/128) in exchange for
flash's forward and backward. Packed documents (THD) go to torch's variable-length flash kernel
(`torch.nn.attention.varlen.varlen_attn`) with the document offsets on the device: one kernel for
all documents, no host sync.

Both paths apply only where flash runs: CUDA tensors of a 16-bit dtype with head dims <= 256 and a
multiple of 8. Elsewhere (CPU, fp32) `causal_attention` is plain SDPA and `varlen_causal_attention`
returns None so the caller keeps its per-document loop.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_MAX_HEAD_DIM = 256


def flash_eligible(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether q, k, v (after padding v to q's head dim) can run on torch's flash kernels."""
    d = q.shape[-1]
    return (
        q.is_cuda
        and q.dtype in _FLASH_DTYPES
        and v.dtype == q.dtype
        and d <= _FLASH_MAX_HEAD_DIM
        and d % 8 == 0
        and v.shape[-1] <= d
    )


def pad_value_heads(v: torch.Tensor, head_dim: int) -> torch.Tensor:
    """v [..., Dv] -> [..., head_dim], zeros in the new columns."""
    return v if v.shape[-1] == head_dim else F.pad(v, (0, head_dim - v.shape[-1]))


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float], pad_value: Optional[bool] = None
) -> torch.Tensor:
    """Causal SDPA. q, k: [B, N, T, Dqk]; v: [B, N, T, Dv] -> [B, N, T, Dv].

    pad_value: pad v to Dqk (None: where that makes flash eligible; tests force it on CPU)."""
    dv = v.shape[-1]
    if pad_value is None:
        pad_value = dv != q.shape[-1] and flash_eligible(q, v)
    if pad_value:
        out = F.scaled_dot_product_attention(q, k, pad_value_heads(v, q.shape[-1]), is_causal=True, scale=scale)
        return out[..., :dv]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def _varlen_attn(*args, **kwargs):
    # Imported on first use: torch.nn.attention.varlen registers custom ops at import.
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(*args, **kwargs)


def varlen_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
    max_seqlen: Optional[int], scale: Optional[float], force: bool = False,
) -> Optional[torch.Tensor]:
    """Causal attention within each packed document, one varlen flash kernel.

    q, k: [T, N, Dqk]; v: [T, N, Dv]; cu_seqlens: [D + 1] document offsets (on q's device);
    max_seqlen: the longest document (a host int, so nothing is read back). Returns [T, N, Dv],
    or None where the flash path does not apply (the caller falls back); force: take it anyway
    (tests, with `_varlen_attn` replaced by a CPU reference).
    """
    if max_seqlen is None or not (force or flash_eligible(q, v)):
        return None
    dv, d = v.shape[-1], q.shape[-1]
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    out = _varlen_attn(
        q, k, pad_value_heads(v, d), cu, cu, int(max_seqlen), int(max_seqlen),
        scale=scale, window_size=(-1, 0),  # (-1, 0): causal
    )
    return out[..., :dv]
