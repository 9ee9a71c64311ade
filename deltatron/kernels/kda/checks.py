"""Input validation shared by every KDA backend.

The shapes at the boundary (see `deltatron.kernels.kda.kda`):
    q, k, g: [B, T, H, K]   v: [B, T, H, V]   beta: [B, T, H]
    initial_state: [N, H, K, V] or None, N = B, or N = len(cu_seqlens) - 1 with cu_seqlens
    cu_seqlens: 1-D integer tensor [N + 1] of document offsets into T (only with B == 1)
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class KDAShapes:
    """Sizes of one validated KDA call."""

    batch: int
    seq_len: int
    heads: int
    head_k_dim: int
    head_v_dim: int
    # Number of independent sequences: B, or the number of packed documents.
    num_seqs: int
    scale: float
    # Document offsets as Python ints (None without cu_seqlens).
    offsets: Optional[tuple[int, ...]]


# (the cu_seqlens tensor last read, its version counter, its offsets); see host_offsets
_last_read: tuple = (None, -1, ())


def host_offsets(cu_seqlens: torch.Tensor) -> tuple[int, ...]:
    """cu_seqlens as Python ints. Every KDA layer of a forward (and its backward) gets the same
    tensor, so it is read back from the device (a sync on GPUs) once per micro-batch rather than
    once per layer: the last tensor read is remembered by identity (a weak reference: a new
    tensor at the same address is another object) and its in-place version counter."""
    global _last_read
    ref, version, offsets = _last_read
    if ref is not None and ref() is cu_seqlens and version == cu_seqlens._version:
        return offsets
    offsets = tuple(int(x) for x in cu_seqlens.tolist())
    _last_read = (weakref.ref(cu_seqlens), cu_seqlens._version, offsets)
    return offsets


def _check_float(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_kda_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float],
    initial_state: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
) -> KDAShapes:
    """Validate a KDA call's arguments; raise ValueError with the reason when they do not fit."""
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        _check_float(name, x)
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, K], got shape {tuple(q.shape)}")
    batch, seq_len, heads, dk = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)} [B, T, H, K], got {tuple(k.shape)}")
    if g.shape != q.shape:
        raise ValueError(
            f"g (per-channel log decay) must have q's shape {tuple(q.shape)} [B, T, H, K], "
            f"got {tuple(g.shape)}"
        )
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must be [B, T, H, V] with B, T, H = {tuple(q.shape[:3])} from q, got {tuple(v.shape)}"
        )
    if beta.shape != q.shape[:3]:
        raise ValueError(f"beta must be [B, T, H] = {tuple(q.shape[:3])}, got {tuple(beta.shape)}")
    if dk == 0 or heads == 0:
        raise ValueError(f"q has an empty head or channel dimension: shape {tuple(q.shape)}")
    dv = v.shape[-1]
    devices = {x.device for x in (q, k, v, g, beta)}
    if len(devices) != 1:
        raise ValueError(f"q, k, v, g, beta must be on one device, got {sorted(map(str, devices))}")

    if scale is None:
        scale = dk ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a number or None, got {type(scale).__name__}")
    scale = float(scale)

    offsets = None
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor):
            raise ValueError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(
                f"cu_seqlens must be 1-D [N + 1] with N >= 1 documents, got shape "
                f"{tuple(cu_seqlens.shape)}"
            )
        if batch != 1:
            raise ValueError(
                f"cu_seqlens (packed documents) requires batch size 1, got B = {batch}; "
                "fold the batch into one row"
            )
        offsets = host_offsets(cu_seqlens)
        if offsets[0] != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {offsets[0]}")
        if offsets[-1] != seq_len:
            raise ValueError(f"cu_seqlens must end at T = {seq_len}, got {offsets[-1]}")
        if any(b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"cu_seqlens must be non-decreasing, got {list(offsets)}")
        num_seqs = len(offsets) - 1
    else:
        num_seqs = batch

    if initial_state is not None:
        _check_float("initial_state", initial_state)
        want = (num_seqs, heads, dk, dv)
        if tuple(initial_state.shape) != want:
            what = "number of documents" if cu_seqlens is not None else "B"
            raise ValueError(
                f"initial_state must be [N, H, K, V] = {want} (N = {what}), "
                f"got {tuple(initial_state.shape)}"
            )
        if initial_state.device != q.device:
            raise ValueError(f"initial_state is on {initial_state.device}, the inputs on {q.device}")

    return KDAShapes(batch, seq_len, heads, dk, dv, num_seqs, scale, offsets)
