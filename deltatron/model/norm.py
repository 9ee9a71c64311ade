"""RMSNorm for the local (non-Transformer-Engine) path.

torch's RMSNorm (megatron-core's `WrappedTorchNorm`) refuses sequence parallelism; this one marks
its weight `sequence_parallel` so megatron-core all-reduces its gradient over TP ranks, and it
normalises in fp32 before casting back, as Kimi Linear's reference implementation does. On CUDA it
runs the fused kernel (deltatron/kernels/rms_norm.py), elsewhere the same math eagerly.
"""

from __future__ import annotations

import torch
from torch import nn

from deltatron.kernels.rms_norm import rms_norm


class RMSNorm(nn.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)), statistics in fp32. Signature of megatron's norms."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
