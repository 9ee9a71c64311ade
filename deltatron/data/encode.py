"""Turning a batch of records into token ids: the work that preprocessing spreads over processes.

Kept apart from the writer so that a spawned worker imports only tokenizers, numpy and the corpus
reader (not torch or megatron-core).
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from deltatron.data.corpus import RecordBatch, batch_texts


class Encoder:
    """Documents -> ids + EOS, in the shard dtype.

    Text that happens to spell a special token (e.g. "<|endoftext|>") is encoded as plain text and
    no post-processor tokens (BOS etc.) are added, so the only special token in the data is the EOS
    that ends each document: EOS ids in a shard are exactly the document ends.
    """

    def __init__(self, serialized_tokenizer: str, eos_id: int, dtype: str, field: str):
        self.tok = Tokenizer.from_str(serialized_tokenizer)
        self.tok.encode_special_tokens = True
        self.eos_id, self.dtype, self.field = eos_id, np.dtype(dtype), field

    def encode(self, batch: RecordBatch) -> tuple[np.ndarray, np.ndarray]:
        """Returns (ids [sum of lengths] in the shard dtype, lengths int64 [documents]): the
        documents' ids one after the other, each followed by EOS."""
        encodings = self.tok.encode_batch(batch_texts(batch, self.field), add_special_tokens=False)
        lengths = np.fromiter((len(e.ids) + 1 for e in encodings), dtype=np.int64, count=len(encodings))
        ids = np.empty(int(lengths.sum()), dtype=self.dtype)
        pos = 0
        for e, n in zip(encodings, lengths.tolist()):
            ids[pos : pos + n - 1] = e.ids
            ids[pos + n - 1] = self.eos_id
            pos += n
        return ids, lengths


_worker: Encoder | None = None


def init_worker(serialized_tokenizer: str, eos_id: int, dtype: str, field: str) -> None:
    """Process-pool initializer: one Encoder per worker process, single-threaded (the processes are
    the parallelism; the tokenizers library's own threads would oversubscribe the cores)."""
    import os

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _worker
    _worker = Encoder(serialized_tokenizer, eos_id, dtype, field)


def encode_in_worker(batch: RecordBatch) -> tuple[np.ndarray, np.ndarray]:
    assert _worker is not None, "init_worker was not run in this process"
    return _worker.encode(batch)
