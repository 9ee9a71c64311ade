"""A tokenized corpus (megatron-core IndexedDataset) packed into fixed-length training sequences.

On disk, `tokenize_corpus` writes `<prefix>.bin` / `<prefix>.idx` (megatron-core's mmap
IndexedDataset: one item per document, the document's token ids followed by EOS; uint16 when the
vocabulary has fewer than 65536 tokens, else int32) and `<prefix>.meta.json` (what made it: corpus
and tokenizer hashes, vocab size, EOS id, counts). The files are written under temporary names
(`*.partial-<pid>`, which never end in .bin/.idx) and renamed, the `.idx` last, so an interrupted
run never leaves a valid-looking pair behind; a run whose outputs already exist and match its
corpus and tokenizer does nothing. `prepare_corpus` picks the prefix in a cache directory from the
corpus and tokenizer contents.

In memory, `PackedSequenceDataset` holds one split (train or val; validation documents are held
out by document, never by token range). For each epoch it concatenates the split's documents in a
seeded order into one token stream and cuts it into samples of seq_length + 1 tokens that overlap
by one: sample i is stream[i*T : i*T + T + 1], inputs are its first T tokens and labels its last
T. An epoch holds (tokens_in_split - 1) // T samples; the tail that does not fill a sample is
dropped (a different tail each epoch, since the order changes). Each sample also says where
documents start inside it, and `collate_packed` turns that into `cu_seqlens` over the flattened
batch, so the model can reset KDA's state and mask MLA at document boundaries.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer

from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from deltatron.data.corpus import file_sha256, read_jsonl_texts
from deltatron.data.tokenizer import eos_id, load_tokenizer, tokenizer_hash, vocab_size

__all__ = [
    "TokenizedCorpus", "tokenize_corpus", "cache_prefix", "prepare_corpus", "read_jsonl_texts",
    "PackedSequenceDataset", "collate_packed",
]

# Bump when the way documents are turned into ids changes: older caches then no longer match.
FORMAT_VERSION = 1
_ENCODE_BATCH = 256


@dataclass(frozen=True)
class TokenizedCorpus:
    prefix: str  # <prefix>.bin / <prefix>.idx / <prefix>.meta.json
    documents: int
    tokens: int  # EOS tokens included
    vocab_size: int
    eos_id: int
    reused: bool  # True when matching files already existed and nothing was written


def _token_dtype(vocab: int):
    return np.uint16 if vocab < 65536 else np.int32


def _read_meta(prefix: str) -> dict | None:
    try:
        with open(prefix + ".meta.json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _matching(prefix: str, want: dict) -> dict | None:
    """The stored meta if <prefix>.bin/.idx/.meta.json exist, are consistent and match `want`."""
    meta = _read_meta(prefix)
    if meta is None or any(meta.get(k) != v for k, v in want.items()):
        return None
    try:
        itemsize = np.dtype(meta["dtype"]).itemsize
        if os.path.getsize(prefix + ".bin") != meta["tokens"] * itemsize:
            return None
        data = IndexedDataset(prefix, mmap=True)
        if len(data) != meta["documents"] or int(data.sequence_lengths.sum()) != meta["tokens"]:
            return None
    except (OSError, KeyError, TypeError, ValueError, AssertionError):
        return None
    return meta


def _stats(meta: dict, prefix: str, reused: bool) -> TokenizedCorpus:
    return TokenizedCorpus(prefix, meta["documents"], meta["tokens"], meta["vocab_size"], meta["eos_id"], reused)


def tokenize_corpus(jsonl_path: str, tokenizer: Tokenizer | str, out_prefix: str) -> TokenizedCorpus:
    """Tokenize a jsonl corpus into the IndexedDataset `out_prefix`.{bin,idx} (+ .meta.json).

    `tokenizer` is a Tokenizer or the path of a tokenizer.json. Each document becomes one item:
    its ids, then EOS. Text that happens to spell a special token (e.g. "<|endoftext|>") is
    encoded as plain text, so EOS ids in the data are exactly the document ends. Skips the work
    when the outputs exist and were made from the same corpus bytes and tokenizer.
    """
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    if not os.path.isfile(jsonl_path):
        raise FileNotFoundError(f"corpus file {jsonl_path!r} not found")
    serialized = tok.to_str()
    vocab, eos = vocab_size(tok), eos_id(tok)
    dtype = _token_dtype(vocab)
    want = {
        "format": FORMAT_VERSION,
        "corpus_sha256": file_sha256(jsonl_path),
        "tokenizer_sha256": hashlib.sha256(serialized.encode()).hexdigest(),
        "vocab_size": vocab,
        "eos_id": eos,
        "dtype": np.dtype(dtype).name,
    }
    meta = _matching(out_prefix, want)
    if meta is not None:
        return _stats(meta, out_prefix, reused=True)

    encoder = Tokenizer.from_str(serialized)  # a copy: the caller's tokenizer keeps its settings
    encoder.encode_special_tokens = True
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    tmp = {ext: f"{out_prefix}{ext}.partial-{os.getpid()}" for ext in (".bin", ".idx", ".meta.json")}
    builder = None
    try:
        builder = IndexedDatasetBuilder(tmp[".bin"], dtype=dtype)
        documents = tokens = 0
        batch: list[str] = []

        def flush():
            nonlocal documents, tokens
            for enc in encoder.encode_batch(batch):
                ids = np.asarray(enc.ids + [eos], dtype=np.int64)
                builder.add_document(ids, [len(ids)])
                documents += 1
                tokens += len(ids)
            batch.clear()

        for text in read_jsonl_texts(jsonl_path):
            batch.append(text)
            if len(batch) == _ENCODE_BATCH:
                flush()
        flush()
        if documents == 0:
            raise ValueError(f"{jsonl_path}: the corpus holds no documents")
        builder.finalize(tmp[".idx"])
        meta = dict(want, documents=documents, tokens=tokens,
                    corpus=os.path.abspath(jsonl_path),
                    tokenizer=os.path.abspath(tokenizer) if isinstance(tokenizer, str) else None)
        with open(tmp[".meta.json"], "w") as f:
            json.dump(meta, f, indent=1)
        # Another process (a second rank) may have finished the same work meanwhile: keep its files.
        if _matching(out_prefix, want) is not None:
            return _stats(meta, out_prefix, reused=True)
        # Swap in. The old .idx goes first and the new one comes last, so no moment leaves a
        # new .bin paired with an old .idx, nor a pair without its matching meta.
        for ext in (".idx", ".meta.json"):
            if os.path.exists(out_prefix + ext):
                os.remove(out_prefix + ext)
        os.replace(tmp[".bin"], out_prefix + ".bin")
        os.replace(tmp[".meta.json"], out_prefix + ".meta.json")
        os.replace(tmp[".idx"], out_prefix + ".idx")
    finally:
        if builder is not None and not builder.data_file.closed:
            builder.data_file.close()
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
    return _stats(meta, out_prefix, reused=False)


def cache_prefix(corpus: str, tokenizer: str, cache_dir: str) -> str:
    """The prefix in cache_dir for this corpus and tokenizer file, named after their contents, so
    caches of different corpora or tokenizers live side by side."""
    for kind, path in (("corpus", corpus), ("tokenizer", tokenizer)):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{kind} file {path!r} not found")
    name = os.path.basename(corpus).split(".")[0]
    return os.path.join(cache_dir, f"{name}-{file_sha256(corpus)[:12]}-{tokenizer_hash(tokenizer)}")


def prepare_corpus(corpus: str, tokenizer: str, cache_dir: str) -> str:
    """Tokenize `corpus` into its `cache_prefix` in cache_dir (once); returns the prefix."""
    return tokenize_corpus(corpus, tokenizer, cache_prefix(corpus, tokenizer, cache_dir)).prefix


class PackedSequenceDataset(torch.utils.data.Dataset):
    """Fixed-length samples cut from the concatenated documents of one split (module docstring).

    Split: the documents are shuffled once with `seed`; the last round(val_fraction * n) of that
    order (at least 1) are "val", the rest "train" (sorted by index in `doc_ids`).
    Epoch order: "train" reshuffles its documents for each epoch (`set_epoch`, from (seed, epoch));
    "val" keeps one order. Everything is a function of (prefix contents, seq_length, split,
    val_fraction, seed, epoch): indexing is deterministic.

    Item i, with T = seq_length:
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

    def __init__(self, prefix: str, seq_length: int, *, split: str = "train",
                 val_fraction: float = 0.02, seed: int = 1234, epoch: int = 0):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        if seq_length < 1:
            raise ValueError(f"seq_length={seq_length} must be >= 1")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
        self.data = IndexedDataset(prefix, mmap=True)
        self.prefix, self.seq_length, self.split, self.seed = prefix, seq_length, split, seed
        n = len(self.data)
        n_val = max(1, int(round(val_fraction * n)))
        if n_val >= n:
            raise ValueError(
                f"{prefix}: {n} documents leave none for training with val_fraction={val_fraction}"
            )
        order = np.random.default_rng(seed).permutation(n)
        self.doc_ids = np.sort(order[-n_val:] if split == "val" else order[:-n_val])
        self.doc_lengths = self.data.sequence_lengths[self.doc_ids].astype(np.int64)
        self.num_tokens = int(self.doc_lengths.sum())
        meta = _read_meta(prefix) or {}
        self.vocab_size = meta.get("vocab_size")
        self.eos_id = meta.get("eos_id")
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Document order for this epoch (the validation split keeps one fixed order)."""
        self.epoch = epoch
        rng = np.random.default_rng([self.seed, epoch if self.split == "train" else 0])
        perm = rng.permutation(len(self.doc_ids))
        self._order = self.doc_ids[perm]
        # stream offset where each document of the order starts, then the stream's end
        self._starts = np.concatenate([[0], np.cumsum(self.doc_lengths[perm])])

    @property
    def document_order(self) -> np.ndarray:
        """The split's document indices (into the IndexedDataset) in this epoch's stream order."""
        return self._order

    @property
    def samples_per_epoch(self) -> int:
        return max(0, (self.num_tokens - 1) // self.seq_length)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        t = self.seq_length
        begin, end = i * t, i * t + t + 1
        d = int(np.searchsorted(self._starts, begin, side="right")) - 1  # document holding `begin`
        pieces, pos = [], begin
        while pos < end:
            doc_start, doc_end = int(self._starts[d]), int(self._starts[d + 1])
            take = min(end, doc_end) - pos
            pieces.append(self.data.get(int(self._order[d]), offset=pos - doc_start, length=take))
            pos += take
            d += 1
        stream = torch.from_numpy(np.concatenate(pieces).astype(np.int64))
        lo = np.searchsorted(self._starts, begin, side="right")
        hi = np.searchsorted(self._starts, begin + t, side="left")
        starts = [0] + [int(s) - begin for s in self._starts[lo:hi]]
        return {
            "tokens": stream[:-1],
            "labels": stream[1:],
            "loss_mask": torch.ones(t, dtype=torch.float32),
            "doc_starts": starts,
            "doc_lens": [b - a for a, b in zip(starts, starts[1:] + [t])],
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
    starts = []
    for j, s in enumerate(samples):
        starts += [j * t + d for d in (s["doc_starts"] if document_boundaries else [0])]
    cu = torch.tensor(starts + [len(samples) * t], dtype=torch.int32)
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
