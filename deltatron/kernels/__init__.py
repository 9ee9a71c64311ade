"""Kernels: the KDA recurrence (`deltatron.kernels.kda`) and Block AttnRes's depth attention
(`deltatron.kernels.attnres`). Importing this package does not import triton."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether the triton package imports in this installation (the Triton kernels' precondition)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
