"""Kernels: the KDA recurrence (`deltatron.kernels.kda`), the KDA layer's short convolutions and
gates (`deltatron.kernels.short_conv`, `deltatron.kernels.kda_gating`) and Block AttnRes's depth
attention (`deltatron.kernels.attnres`). Importing this package does not import triton."""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch

# Input dtypes the kernels load (each converts to fp32 and accumulates there).
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether the triton package imports in this installation (the Triton kernels' precondition)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def runs_fused(x: torch.Tensor, whole_tile: Optional[int] = None) -> bool:
    """Whether a fused kernel takes x: a CUDA tensor in a dtype the kernels load, where Triton
    imports, and `whole_tile` (a dimension a program holds whole, such as a head) a power of two
    from 16 to 256 when given. Elsewhere callers run their eager references."""
    if whole_tile is not None and not (whole_tile & (whole_tile - 1) == 0 and 16 <= whole_tile <= 256):
        return False
    return x.is_cuda and x.dtype in FUSED_DTYPES and triton_available()


def on_device(t: torch.Tensor):
    """Context that launches kernels on t's GPU, whatever the current device is (none on CPU)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def cdiv(a: int, b: int) -> int:
    """Ceiling of a / b for launch grids (triton.cdiv, without importing triton)."""
    return -(-a // b)
