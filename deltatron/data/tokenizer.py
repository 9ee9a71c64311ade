"""Byte-level BPE tokenizers (Hugging Face `tokenizers`): training, loading, identity.

The bundled tokenizer (data/tokenizer/tokenizer.json, 4096 tokens) was trained on the bundled
corpus with `python -m deltatron.data.prepare --train-tokenizer`; training is deterministic.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_path: str) -> Tokenizer:
    """Train a byte-level BPE tokenizer with EOS and PAD special tokens and save it as JSON."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    tok.save(tmp)
    os.replace(tmp, out_path)
    return tok


def load_tokenizer(path: str) -> Tokenizer:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"tokenizer file {path!r} not found (train one with "
            "`python -m deltatron.data.prepare --train-tokenizer`)"
        )
    return Tokenizer.from_file(path)


def eos_id(tok: Tokenizer) -> int:
    i = tok.token_to_id(EOS)
    if i is None:
        raise ValueError(f"tokenizer has no {EOS} token to end documents with")
    return i


def tokenizer_hash(path: str) -> str:
    """Content hash of a tokenizer file: caches and shards record which tokenizer made them."""
    return hashlib.sha256(open(path, "rb").read()).hexdigest()[:16]
