"""A weighted blend of datasets as one endless, deterministic sequence of samples.

Global sample k is sample n of dataset j, with (j, n) from megatron-core's `build_blending_indices`
(its C++ helper): at every position it picks the dataset whose share so far lags its weight most,
so any prefix of the sequence matches the weights to within one sample per dataset. The helper
needs a finite length, so the sequence is built in blocks of BLOCK samples: each block has the same
pattern and the same count c_j per dataset, and dataset j's sample index is b * c_j + (index within
block b). Nothing depends on the number of data-parallel ranks or the batch size, which is what
lets a run resume on a different DP size at the same global sample.
"""

from __future__ import annotations

import numpy as np

from megatron.core.datasets import helpers_cpp

BLOCK = 1 << 16


class BlendSchedule:
    """Global sample index -> (dataset, sample index within that dataset)."""

    def __init__(self, weights: list[float]):
        if not weights or min(weights) <= 0:
            raise ValueError(f"blend weights {weights} must be > 0")
        self.weights = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.dataset = np.zeros(BLOCK, dtype=np.int16)
        self.index = np.zeros(BLOCK, dtype=np.int64)
        helpers_cpp.build_blending_indices(self.dataset, self.index, self.weights, len(weights), BLOCK, False)
        self.per_block = np.bincount(self.dataset, minlength=len(weights)).astype(np.int64)

    def locate(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """k int64 [N] global sample indices -> (dataset int64 [N], sample index int64 [N])."""
        block, pos = np.divmod(np.asarray(k, dtype=np.int64), BLOCK)
        j = self.dataset[pos].astype(np.int64)
        return j, block * self.per_block[j] + self.index[pos]
