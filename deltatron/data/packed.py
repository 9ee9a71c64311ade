"""A tokenized corpus (megatron-core IndexedDataset) packed into fixed-length training sequences.

- `prepare_corpus` tokenizes a jsonl corpus once into `.bin/.idx` (one item per document, EOS
  appended), cached under a name derived from the corpus and tokenizer contents, written under
  temporary names and renamed, so an interrupted run never leaves a valid-looking pair behind.
- `PackedSequenceDataset` concatenates documents in a seeded per-epoch order and cuts the stream
  into samples of seq_length + 1 tokens (inputs and labels shifted by one). Each sample also
  reports where documents start inside it, so the model can reset KDA's state and mask MLA there.
  Validation documents are held out by document (a seeded choice), never by token range.
- `collate_packed` stacks samples and turns the starts into `cu_seqlens` over the flattened batch.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os

import numpy as np
import torch

from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from deltatron.data.tokenizer import eos_id, load_tokenizer, tokenizer_hash


def read_jsonl_texts(path: str, field: str = "text"):
    """Yield the `field` of each line of a jsonl / jsonl.gz file, with errors naming file:line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"corpus file {path!r} not found")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise ValueError(f"{path}:{lineno}: expected an object with a string {field!r} field")
            yield record[field]


def _corpus_key(corpus: str, tokenizer: str) -> str:
    h = hashlib.sha256()
    with open(corpus, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"{h.hexdigest()[:12]}-{tokenizer_hash(tokenizer)}"


def prepare_corpus(corpus: str, tokenizer: str, cache_dir: str) -> str:
    """Tokenize `corpus` into an IndexedDataset under cache_dir (once); returns its path prefix."""
    tok = load_tokenizer(tokenizer)
    name = os.path.basename(corpus).split(".")[0]
    prefix = os.path.join(cache_dir, f"{name}-{_corpus_key(corpus, tokenizer)}")
    if os.path.exists(prefix + ".bin") and os.path.exists(prefix + ".idx"):
        return prefix
    os.makedirs(cache_dir, exist_ok=True)
    vocab = tok.get_vocab_size()
    dtype = np.uint16 if vocab < 65536 else np.int32
    eos = eos_id(tok)
    tmp = f"{prefix}.tmp{os.getpid()}"
    try:
        builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
        batch = []

        def flush():
            for enc in tok.encode_batch(batch):
                ids = enc.ids + [eos]
                builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
            batch.clear()

        for text in read_jsonl_texts(corpus):
            batch.append(text)
            if len(batch) == 256:
                flush()
        flush()
        builder.finalize(tmp + ".idx")
        meta = {
            "corpus": os.path.abspath(corpus), "tokenizer": os.path.abspath(tokenizer),
            "tokenizer_hash": tokenizer_hash(tokenizer), "vocab_size": vocab, "eos_id": eos,
            "dtype": np.dtype(dtype).name,
        }
        with open(tmp + ".meta.json", "w") as f:
            json.dump(meta, f, indent=1)
        # The .idx goes last: a prefix counts as prepared only once its .idx exists.
        os.replace(tmp + ".meta.json", prefix + ".meta.json")
        os.replace(tmp + ".bin", prefix + ".bin")
        os.replace(tmp + ".idx", prefix + ".idx")
    finally:
        for ext in (".bin", ".idx", ".meta.json"):
            if os.path.exists(tmp + ext):
                os.remove(tmp + ext)
    return prefix


class PackedSequenceDataset(torch.utils.data.Dataset):
    """Fixed-length samples cut from the concatenated documents of one split.

    Item i: tokens/labels int64 [seq_length], doc_starts (list of positions in [0, seq_length)
    where a document begins; always includes 0).
    """

    def __init__(self, prefix: str, seq_length: int, *, split: str = "train",
                 val_fraction: float = 0.02, seed: int = 1234):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        self.data = IndexedDataset(prefix, mmap=True)
        self.seq_length = seq_length
        self.seed = seed
        n = len(self.data)
        if n < 2:
            raise ValueError(f"{prefix}: a corpus needs at least 2 documents (one for validation)")
        order = np.random.default_rng(seed).permutation(n)
        n_val = max(1, int(round(val_fraction * n)))
        self.doc_ids = np.sort(order[-n_val:] if split == "val" else order[:-n_val])
        self.doc_lengths = self.data.sequence_lengths[self.doc_ids].astype(np.int64)
        self.num_tokens = int(self.doc_lengths.sum())
        self.split = split
        with open(prefix + ".meta.json") as f:
            meta = json.load(f)
        self.vocab_size = meta["vocab_size"]
        self.eos_id = meta["eos_id"]
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Document order for this epoch (the validation split keeps one fixed order)."""
        rng = np.random.default_rng([self.seed, epoch if self.split == "train" else 0])
        perm = rng.permutation(len(self.doc_ids))
        self._order = self.doc_ids[perm]
        lengths = self.doc_lengths[perm]
        self._starts = np.concatenate([[0], np.cumsum(lengths)])  # stream offset of each document

    def __len__(self) -> int:
        return max(0, (self.num_tokens - 1) // self.seq_length)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        begin, end = i * self.seq_length, i * self.seq_length + self.seq_length + 1
        first = int(np.searchsorted(self._starts, begin, side="right")) - 1
        pieces, pos, d = [], begin, first
        while pos < end:
            doc_start, doc_end = self._starts[d], self._starts[d + 1]
            take = min(end, doc_end) - pos
            pieces.append(self.data.get(int(self._order[d]), offset=int(pos - doc_start), length=int(take)))
            pos += take
            d += 1
        stream = torch.from_numpy(np.concatenate(pieces).astype(np.int64))
        inner = self._starts[(self._starts > begin) & (self._starts < begin + self.seq_length)]
        return {
            "tokens": stream[:-1],
            "labels": stream[1:],
            "doc_starts": [0] + [int(s - begin) for s in inner],
        }


def collate_packed(samples: list[dict], document_boundaries: bool = True) -> dict:
    """Stack samples; cu_seqlens marks document starts in the flattened [B*T] stream.

    Sample boundaries are always boundaries. With document_boundaries=False only they are.
    """
    t = samples[0]["tokens"].numel()
    starts = []
    for j, s in enumerate(samples):
        starts += [j * t + d for d in (s["doc_starts"] if document_boundaries else [0])]
    cu = torch.tensor(starts + [len(samples) * t], dtype=torch.int32)
    return {
        "tokens": torch.stack([s["tokens"] for s in samples]),
        "labels": torch.stack([s["labels"] for s in samples]),
        "loss_mask": torch.ones(len(samples), t),
        "cu_seqlens": cu,
        "max_seqlen": int((cu[1:] - cu[:-1]).max()),
    }
