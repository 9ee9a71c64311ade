"""The trainer's batch source: `build_data(cfg, ...)` returns an object with `train_batches()`
(an endless iterator of this data-parallel rank's collated micro-batches), `val_batches(n)` (a
fixed list), `describe()`, and `state_dict()` / `load_state_dict()` for resuming.

Micro-batches are dicts: tokens/labels int64 [B, T], loss_mask float [B, T], cu_seqlens int32
[N+1] (document starts in the flattened B*T stream; every sample boundary is one) and max_seqlen.

Which samples a rank reads: the blend (deltatron/data/blend.py) is one global sequence of samples,
the same for every DP size. The ranks read it in rounds of dp_size * B samples: in a round starting
at global sample c, DP rank r takes samples c + r*B ... c + r*B + B - 1. The state is c, the number
of global samples handed out, so a resumed run continues at exactly the next sample whatever its
DP size or micro-batch size: every sample before c was read once, every sample from c on will be.
TP/PP/EP ranks of one DP replica have the same dp_rank and so read the same batches.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch

from deltatron.data.config import BlendEntry, DataConfig, parse_blend


def _prepare_once(cfg: DataConfig) -> str:
    """Preprocess the configured corpus into its cache directory (or find it there): rank 0
    first, then the others, who find its files (or, with a cache directory local to each node,
    write their node's copy)."""
    from deltatron.data.preprocess import PreprocessConfig, default_dataset_dir, preprocess

    def run() -> str:
        out = default_dataset_dir(cfg.corpus, cfg.tokenizer, cfg.cache_dir)
        preprocess(PreprocessConfig(inputs=[cfg.corpus], tokenizer=cfg.tokenizer, out=out, progress=False))
        return out

    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return run()
    if dist.get_rank() == 0:
        try:
            return run()
        finally:
            dist.barrier()  # also on an error: the other ranks then meet it themselves, not a hang
    dist.barrier()
    return run()


class CorpusData:
    """Packed sequences of a weighted blend of preprocessed datasets (module docstring)."""

    def __init__(self, cfg: DataConfig, micro_batch_size: int, dp_rank: int, dp_size: int, vocab_size: int):
        from deltatron.data.blend import BlendSchedule
        from deltatron.data.packed import PackedSequenceDataset, TokenDataset
        from deltatron.data.tokenizer import tokenizer_sha256

        entries = parse_blend(list(cfg.blend)) or [BlendEntry(1.0, _prepare_once(cfg))]
        want_tokenizer = tokenizer_sha256(cfg.tokenizer)
        self.entries, self.train, self.val = entries, [], []
        for entry in entries:
            data = TokenDataset(entry.path, tokenizer_sha256=want_tokenizer, tokenizer=cfg.tokenizer, verify=cfg.verify)
            if data.vocab_size > vocab_size:
                raise ValueError(
                    f"{entry.path} was tokenized with {data.vocab_size} token ids but model.vocab_size "
                    f"is {vocab_size}; raise model.vocab_size"
                )
            split = dict(val_fraction=cfg.val_fraction, seed=cfg.seed)
            train = PackedSequenceDataset(data, cfg.seq_length, split="train", **split)
            val = PackedSequenceDataset(data, cfg.seq_length, split="val", **split)
            for part in (train, val):
                if len(part) == 0:
                    raise ValueError(
                        f"the {part.split} split of {entry.path} holds {part.num_tokens} tokens, fewer than "
                        f"one sequence of {cfg.seq_length} + 1; use more data"
                        + (" or raise data.val_fraction" if part.split == "val" else "")
                    )
            self.train.append(train)
            self.val.append(val)
        self.schedule = BlendSchedule([e.weight for e in entries])
        self.cfg = cfg
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = 0  # global samples handed out to all DP ranks together

    def _batch(self, datasets: list, first: int) -> dict:
        """Global samples first .. first + B - 1 of the blend of `datasets`, collated."""
        from deltatron.data.packed import batch_from_rows

        b, t = self.micro_batch_size, self.cfg.seq_length
        which, index = self.schedule.locate(np.arange(first, first + b))
        rows = np.empty((b, t + 1), dtype=np.int64)
        starts = [datasets[j].sample(n, rows[r]) for r, (j, n) in enumerate(zip(which.tolist(), index.tolist()))]
        batch = batch_from_rows(rows, starts, self.cfg.document_boundaries)
        batch["dataset"] = torch.from_numpy(which)  # [B] blend entry of each row (data/loss/{name})
        return batch

    def dataset_names(self) -> list[str]:
        """A short unique name per blend entry (its directory's name), for data/ metrics."""
        names = [os.path.basename(os.path.normpath(e.path)) for e in self.entries]
        return [n if names.count(n) == 1 else f"{i}_{n}" for i, n in enumerate(names)]

    def train_batches(self) -> Iterator[dict]:
        """This rank's micro-batches from the current position on (endless). The position moves
        when a batch is handed out, so state_dict() taken between batches resumes at the next."""
        while True:
            first = self.consumed_samples + self.dp_rank * self.micro_batch_size
            self.consumed_samples += self.dp_size * self.micro_batch_size
            yield self._batch(self.train, first)

    def val_batches(self, n: int) -> list[dict]:
        """n fixed micro-batches of this rank from the validation split (the same each call)."""
        per_round = self.dp_size * self.micro_batch_size
        return [self._batch(self.val, k * per_round + self.dp_rank * self.micro_batch_size) for k in range(n)]

    def _stream(self) -> dict:
        """What the sample sequence depends on: a resumed run must agree on it."""
        return {
            "seq_length": self.cfg.seq_length, "seed": self.cfg.seed, "val_fraction": self.cfg.val_fraction,
            "datasets": [
                {"path": e.path, "weight": e.weight, "documents": d.data.manifest.documents,
                 "tokens": d.data.manifest.tokens}
                for e, d in zip(self.entries, self.train)
            ],
        }

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "stream": self._stream()}

    def load_state_dict(self, state: dict) -> None:
        mine, theirs = self._stream(), state["stream"]

        def comparable(stream: dict) -> dict:  # datasets may have moved: compare all but paths
            return {**stream, "datasets": [{k: v for k, v in d.items() if k != "path"} for d in stream["datasets"]]}

        if comparable(mine) != comparable(theirs):
            raise ValueError(
                "cannot resume the data stream: the saved state was made with another blend, sequence "
                f"length, seed or validation split (saved {theirs}, now {mine})"
            )
        self.consumed_samples = int(state["consumed_samples"])

    def describe(self) -> str:
        names = ", ".join(
            f"{e.weight:g} x {os.path.basename(os.path.normpath(e.path))} ({d.data.manifest.tokens:,} tokens, "
            f"{len(d.data.shards)} shard{'' if len(d.data.shards) == 1 else 's'})"
            for e, d in zip(self.entries, self.train)
        )
        return (
            f"{names}: {sum(len(d) for d in self.train)} training and {sum(len(d) for d in self.val)} "
            f"validation sequences of {self.cfg.seq_length} tokens per epoch"
        )


def build_data(cfg: DataConfig, *, micro_batch_size: int, dp_rank: int, dp_size: int, vocab_size: int):
    if cfg.mock:
        from deltatron.data.mock import MockData

        return MockData(cfg, micro_batch_size, dp_rank, dp_size, vocab_size)
    return CorpusData(cfg, micro_batch_size, dp_rank, dp_size, vocab_size)
