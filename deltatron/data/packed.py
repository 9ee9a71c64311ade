"""A preprocessed dataset (deltatron/data/shards.py) packed into fixed-length training sequences.

`TokenDataset` opens a dataset directory: it checks the manifest (tokenizer, and each shard's
sizes and .idx sha256; the .bin sha256 too with verify="full"), maps every shard's tokens and
treats the documents of all shards, in manifest order, as one list.

`PackedSequenceDataset` holds one split of it (train or val; validation documents are held out by
document, never by token range). For each epoch it concatenates the split's documents in a seeded
order into one token stream and cuts it into samples of seq_length + 1 tokens that overlap by one:
sample i is stream[i*T : i*T + T + 1], inputs are its first T tokens and labels its last T. An
epoch holds (tokens_in_split - 1) // T samples; the tail that does not fill a sample is dropped (a
different tail each epoch, since the order changes). Each sample also says where documents start
inside it, and `collate_packed` / `batch_from_rows` turn that into `cu_seqlens` over the flattened
batch, so the model can reset KDA's state and mask MLA at document boundaries.

Memory: per process, 16 bytes per document of the dataset plus 16 per training document for the
epoch order; the tokens themselves stay in the page cache (memory-mapped).
"""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np
import torch

from deltatron.data.config import VERIFY_MODES
from deltatron.data.shards import Manifest, Shard, read_manifest, verify_shard

__all__ = ["TokenDataset", "PackedSequenceDataset", "collate_packed", "batch_from_rows"]


class TokenDataset:
    """All documents of one preprocessed dataset directory, memory-mapped.

    doc_lengths int32 [D] (EOS included), doc_offsets int64 [D] (token offset in its shard),
    doc_shard int32 [D]; documents are numbered across shards in manifest order.
    """

    def __init__(self, directory: str, *, tokenizer_sha256: str | None = None,
                 tokenizer: str | None = None, verify: str = "index"):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify={verify!r}: choose one of {', '.join(VERIFY_MODES)}")
        self.directory = directory
        self.manifest: Manifest = read_manifest(directory)
        mine = self.manifest.settings.tokenizer_sha256
        if tokenizer_sha256 is not None and tokenizer_sha256 != mine:
            raise ValueError(
                f"{os.path.join(directory, 'manifest.json')} was made with tokenizer sha256 {mine[:16]}... "
                f"({self.manifest.tokenizer}), but the configured tokenizer "
                f"{tokenizer or ''} has sha256 {tokenizer_sha256[:16]}...: re-run preprocessing with it"
            )
        dtype = self.manifest.dtype
        self.shards: list[Shard] = []
        for info in self.manifest.shards:
            verify_shard(directory, info, full=verify == "full")
            self.shards.append(Shard.open(directory, info, dtype))
        self.doc_lengths = np.concatenate([s.doc_lengths for s in self.shards])
        self.doc_offsets = np.concatenate([s.doc_offsets for s in self.shards])
        self.doc_shard = np.repeat(np.arange(len(self.shards), dtype=np.int32),
                                   [len(s.doc_lengths) for s in self.shards])
        self._tokens = [s.tokens for s in self.shards]

    def __len__(self) -> int:
        return len(self.doc_lengths)

    @property
    def vocab_size(self) -> int:
        return self.manifest.settings.vocab_size

    @property
    def eos_id(self) -> int:
        return self.manifest.settings.eos_id

    def document(self, d: int) -> np.ndarray:
        """Document d's tokens (a read-only view of the mapped shard)."""
        off = int(self.doc_offsets[d])
        return self._tokens[int(self.doc_shard[d])][off : off + int(self.doc_lengths[d])]


class PackedSequenceDataset(torch.utils.data.Dataset):
    """Fixed-length samples cut from the concatenated documents of one split (module docstring).

    Split: the documents are shuffled once with `seed`; the last round(val_fraction * n) of that
    order (at least 1) are "val", the rest "train" (sorted by index in `doc_ids`).
    Epoch order: "train" reshuffles its documents for each epoch (from (seed, epoch)); "val" keeps
    one order. Everything is a function of (dataset contents, seq_length, split, val_fraction,
    seed, epoch): indexing is deterministic.

    `sample(n)` is sample n of the endless stream of epochs (epoch n // len, item n % len);
    `self[i]` is item i of the epoch chosen by `set_epoch`. Item, with T = seq_length:
      tokens     int64 [T]    stream[i*T : i*T + T]
      labels     int64 [T]    stream[i*T + 1 : i*T + T + 1] (the next token at every position)
      loss_mask  float32 [T]  1 everywhere: samples are always full (no padding), and the
                              position of a document's EOS keeps its loss too (it learns how
                              documents begin, as Megatron-LM does without --eod-mask-loss)
      doc_starts list[int]    positions in [0, T) where a document starts; always begins with 0
                              (the document running into the sample from before counts as
                              starting there) and has a start right after each EOS inside the
                              sample (the EOS belongs to the document it ends)
      doc_lens   list[int]    lengths of those document pieces; they sum to T
    """

    def __init__(self, source: TokenDataset | str, seq_length: int, *, split: str = "train",
                 val_fraction: float = 0.02, seed: int = 1234, epoch: int = 0):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        if seq_length < 1:
            raise ValueError(f"seq_length={seq_length} must be >= 1")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
        self.data = TokenDataset(source) if isinstance(source, str) else source
        self.seq_length, self.split, self.seed = seq_length, split, seed
        n = len(self.data)
        n_val = max(1, int(round(val_fraction * n)))
        if n_val >= n:
            raise ValueError(
                f"{self.data.directory}: {n} documents leave none for training with val_fraction={val_fraction}"
            )
        order = np.random.default_rng(seed).permutation(n)
        self.doc_ids = np.sort(order[-n_val:] if split == "val" else order[:-n_val])
        self.doc_lengths = self.data.doc_lengths[self.doc_ids].astype(np.int64)
        self.num_tokens = int(self.doc_lengths.sum())
        self.vocab_size, self.eos_id = self.data.vocab_size, self.data.eos_id
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.set_epoch(epoch)

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, stream offset where each starts + the stream end) of an epoch; the two
        most recent epochs are kept (a batch may straddle an epoch boundary)."""
        if self.split == "val":
            epoch = 0
        if epoch not in self._epochs:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.doc_ids))
            starts = np.concatenate([[0], np.cumsum(self.doc_lengths[perm])])
            self._epochs[epoch] = (self.doc_ids[perm], starts)
            while len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        self._epochs.move_to_end(epoch)
        return self._epochs[epoch]

    def set_epoch(self, epoch: int) -> None:
        """The epoch that `self[i]` reads (the validation split keeps one order)."""
        self.epoch = epoch
        self._epoch(epoch)

    @property
    def document_order(self) -> np.ndarray:
        """The split's document indices (into the dataset) in this epoch's stream order."""
        return self._epoch(self.epoch)[0]

    @property
    def samples_per_epoch(self) -> int:
        return max(0, (self.num_tokens - 1) // self.seq_length)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def fill(self, epoch: int, i: int, out: np.ndarray) -> list[int]:
        """Write item i of `epoch` (T + 1 tokens) into out [T + 1]; returns its doc_starts."""
        order, starts = self._epoch(epoch)
        t = self.seq_length
        begin, end = i * t, i * t + t + 1
        d = int(np.searchsorted(starts, begin, side="right")) - 1  # document holding `begin`
        data = self.data
        doc_starts, pos = [0], begin
        while pos < end:
            doc_start, doc_end = int(starts[d]), int(starts[d + 1])
            take = min(end, doc_end) - pos
            g = int(order[d])
            off = int(data.doc_offsets[g]) + pos - doc_start
            out[pos - begin : pos - begin + take] = data._tokens[int(data.doc_shard[g])][off : off + take]
            pos += take
            if pos == doc_end and doc_end < begin + t:
                doc_starts.append(doc_end - begin)
            d += 1
        return doc_starts

    def sample(self, n: int, out: np.ndarray) -> list[int]:
        """Sample n of the endless stream of epochs, written into out [T + 1]."""
        per_epoch = self.samples_per_epoch
        return self.fill(n // per_epoch, n % per_epoch, out)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        t = self.seq_length
        row = np.empty(t + 1, dtype=np.int64)
        starts = self.fill(self.epoch, i, row)
        stream = torch.from_numpy(row)
        return {
            "tokens": stream[:-1],
            "labels": stream[1:],
            "loss_mask": torch.ones(t, dtype=torch.float32),
            "doc_starts": starts,
            "doc_lens": [b - a for a, b in zip(starts, starts[1:] + [t])],
        }


def _cu_seqlens(doc_starts: list[list[int]], t: int, document_boundaries: bool) -> torch.Tensor:
    starts = []
    for j, s in enumerate(doc_starts):
        starts += [j * t + d for d in (s if document_boundaries else [0])]
    return torch.tensor(starts + [len(doc_starts) * t], dtype=torch.int32)


def batch_from_rows(rows: np.ndarray, doc_starts: list[list[int]], document_boundaries: bool = True) -> dict:
    """A micro-batch from B samples of T + 1 tokens (rows int64 [B, T + 1]) and their doc_starts;
    the same dict as collate_packed."""
    b, t = rows.shape[0], rows.shape[1] - 1
    stream = torch.from_numpy(rows)
    cu = _cu_seqlens(doc_starts, t, document_boundaries)
    return {
        "tokens": stream[:, :-1].contiguous(),
        "labels": stream[:, 1:].contiguous(),
        "loss_mask": torch.ones(b, t, dtype=torch.float32),
        "cu_seqlens": cu,
        "max_seqlen": int((cu[1:] - cu[:-1]).max()),
    }


def collate_packed(samples: list[dict], document_boundaries: bool = True) -> dict:
    """Stack samples into a micro-batch.

    Returns tokens/labels int64 [B, T], loss_mask float32 [B, T] (ones where a sample has none),
    cu_seqlens int32 [N + 1]: the start of every document piece in the flattened B*T stream, then
    B*T (sample boundaries are always boundaries; with document_boundaries=False only they are:
    [0, T, 2T, ..., B*T]), and max_seqlen (int): the longest piece.
    """
    if not samples:
        raise ValueError("collate_packed needs at least one sample")
    t = samples[0]["tokens"].numel()
    cu = _cu_seqlens([s["doc_starts"] for s in samples], t, document_boundaries)
    if all("loss_mask" in s for s in samples):
        loss_mask = torch.stack([s["loss_mask"] for s in samples]).to(torch.float32)
    else:
        loss_mask = torch.ones(len(samples), t, dtype=torch.float32)
    return {
        "tokens": torch.stack([s["tokens"] for s in samples]),
        "labels": torch.stack([s["labels"] for s in samples]),
        "loss_mask": loss_mask,
        "cu_seqlens": cu,
        "max_seqlen": int((cu[1:] - cu[:-1]).max()),
    }
