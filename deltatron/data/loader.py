"""The trainer's batch source: `build_data(cfg, ...)` returns an object with `train_batches()`
(an endless iterator of this data-parallel rank's collated micro-batches), `val_batches(n)` (a
fixed list) and `describe()`.

Micro-batches are dicts: tokens/labels int64 [B, T], loss_mask float [B, T], cu_seqlens int32
[N+1] (document starts in the flattened B*T stream; every sample boundary is one) and max_seqlen.
"""

from __future__ import annotations

import os
from typing import Iterator

import torch

from deltatron.data.config import DataConfig


def _prepare_once(cfg: DataConfig) -> str:
    """Tokenize the corpus into the cache (or find it there): rank 0 first, then the others, who
    find its files (or, with a cache directory local to each node, write their node's copy)."""
    from deltatron.data.packed import prepare_corpus

    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return prepare_corpus(cfg.corpus, cfg.tokenizer, cfg.cache_dir)
    if dist.get_rank() == 0:
        try:
            return prepare_corpus(cfg.corpus, cfg.tokenizer, cfg.cache_dir)
        finally:
            dist.barrier()  # also on an error: the other ranks then meet it themselves, not a hang
    dist.barrier()
    return prepare_corpus(cfg.corpus, cfg.tokenizer, cfg.cache_dir)


class CorpusData:
    """Packed sequences of the tokenized corpus; sample i of an epoch goes to rank i % dp_size."""

    def __init__(self, cfg: DataConfig, micro_batch_size: int, dp_rank: int, dp_size: int, vocab_size: int):
        from deltatron.data.packed import PackedSequenceDataset

        prefix = _prepare_once(cfg)
        self.train = PackedSequenceDataset(
            prefix, cfg.seq_length, split="train", val_fraction=cfg.val_fraction, seed=cfg.seed
        )
        self.val = PackedSequenceDataset(
            prefix, cfg.seq_length, split="val", val_fraction=cfg.val_fraction, seed=cfg.seed
        )
        if self.train.vocab_size > vocab_size:
            raise ValueError(
                f"the tokenizer {cfg.tokenizer} has {self.train.vocab_size} tokens but "
                f"model.vocab_size is {vocab_size}; raise model.vocab_size"
            )
        if len(self.train) < dp_size * micro_batch_size:
            raise ValueError(
                f"the training split of {cfg.corpus} holds {len(self.train)} sequences of "
                f"{cfg.seq_length} tokens, fewer than one step needs ({dp_size} x {micro_batch_size})"
            )
        self.cfg = cfg
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def _collate(self, samples):
        from deltatron.data.packed import collate_packed

        return collate_packed(samples, document_boundaries=self.cfg.document_boundaries)

    def train_batches(self) -> Iterator[dict]:
        epoch = 0
        while True:
            self.train.set_epoch(epoch)
            mine = range(self.dp_rank, len(self.train), self.dp_size)
            usable = len(mine) - len(mine) % self.micro_batch_size
            for start in range(0, usable, self.micro_batch_size):
                yield self._collate([self.train[i] for i in mine[start : start + self.micro_batch_size]])
            epoch += 1

    def val_batches(self, n: int) -> list[dict]:
        mine = list(range(self.dp_rank, len(self.val), self.dp_size))
        batches = []
        for b in range(n):
            idx = [mine[(b * self.micro_batch_size + j) % len(mine)] for j in range(self.micro_batch_size)]
            batches.append(self._collate([self.val[i] for i in idx]))
        return batches

    def describe(self) -> str:
        return (
            f"{os.path.basename(self.cfg.corpus)}: {len(self.train)} training and {len(self.val)} "
            f"validation sequences of {self.cfg.seq_length} tokens per epoch"
        )


def build_data(cfg: DataConfig, *, micro_batch_size: int, dp_rank: int, dp_size: int, vocab_size: int):
    if cfg.mock:
        from deltatron.data.mock import MockData

        return MockData(cfg, micro_batch_size, dp_rank, dp_size, vocab_size)
    return CorpusData(cfg, micro_batch_size, dp_rank, dp_size, vocab_size)
