"""Random token batches for throughput runs and smoke tests (Megatron-LM's --mock-data).

Deterministic for a seed; documents of random length (mean `mean_document_length`) give the
model realistic packing boundaries. Nothing is read from disk. The state (for resuming) is the
training generator's; unlike the corpus loader's it is per DP rank.
"""

from __future__ import annotations

from typing import Iterator

import torch

from deltatron.data.config import DataConfig


class MockData:
    def __init__(self, cfg: DataConfig, micro_batch_size: int, dp_rank: int, dp_size: int,
                 vocab_size: int, mean_document_length: int = 512):
        self.cfg = cfg
        self.micro_batch_size = micro_batch_size
        self.vocab_size = vocab_size
        self.mean_document_length = mean_document_length
        self.seed = cfg.seed * 1000003 + dp_rank
        self._train_rng = torch.Generator().manual_seed(self.seed)

    def _batch(self, g: torch.Generator) -> dict:
        b, t = self.micro_batch_size, self.cfg.seq_length
        tokens = torch.randint(0, self.vocab_size, (b, t + 1), generator=g)
        starts = []
        for i in range(b):
            pos = 0
            while pos < t:
                starts.append(i * t + pos)
                pos += int(torch.randint(1, 2 * self.mean_document_length, (1,), generator=g))
        cu = torch.tensor(starts + [b * t], dtype=torch.int32)
        if not self.cfg.document_boundaries:
            cu = torch.arange(0, b * t + 1, t, dtype=torch.int32)
        return {
            "tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(b, t),
            "cu_seqlens": cu, "max_seqlen": int((cu[1:] - cu[:-1]).max()),
        }

    def train_batches(self) -> Iterator[dict]:
        while True:
            yield self._batch(self._train_rng)

    def state_dict(self) -> dict:
        """The training stream's position: its random generator's state (per DP rank)."""
        return {"generator": self._train_rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self._train_rng.set_state(state["generator"])

    def val_batches(self, n: int) -> list[dict]:
        g = torch.Generator().manual_seed(self.seed + 7)
        return [self._batch(g) for _ in range(n)]

    def describe(self) -> str:
        return f"mock random tokens (vocab {self.vocab_size}, mean document {self.mean_document_length})"
