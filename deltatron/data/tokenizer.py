"""Byte-level BPE tokenizers (Hugging Face `tokenizers`): training, loading, identity.

Byte-level means any string round-trips: decode(encode(text).ids) == text. (A text that spells a
special token, "<|endoftext|>", encodes to that token, which decode drops unless given
skip_special_tokens=False; preprocessing (`encode.Encoder`) encodes such text as plain bytes instead.)
Two special tokens come first in the vocabulary: `<|endoftext|>` (id 0), appended to every
document as its end (EOS) and so the document separator in a packed stream, and `<|pad|>` (id 1).

The bundled tokenizer (data/tokenizer/tokenizer.json, 4096 tokens) was trained on the bundled
corpus; training is deterministic, and this reproduces the file byte for byte:

    python -m deltatron.data.tokenizer --corpus data/corpus/shakespeare.jsonl.gz \
        --vocab-size 4096 --out data/tokenizer/tokenizer.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOS, PAD)
DEFAULT_VOCAB_SIZE = 4096
# the 256 byte symbols plus the special tokens
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE,
                    out_path: str | None = None) -> Tokenizer:
    """Train a byte-level BPE tokenizer with EOS and PAD special tokens; save it to out_path.

    Deterministic: the same texts (in the same order) and vocab_size give the same file. On a
    small corpus BPE may run out of merges before vocab_size; `vocab_size(tok)` gives the size.
    The file is written under a temporary name and renamed.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size} must be at least {MIN_VOCAB_SIZE} (256 bytes + specials)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if out_path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        tmp = f"{out_path}.partial-{os.getpid()}"
        try:
            tok.save(tmp)
            os.replace(tmp, out_path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return tok


def tokenizer_file(path: str) -> str:
    """The tokenizer.json behind `path`: the file itself, or `tokenizer.json` inside a Hugging Face
    tokenizer directory (as saved by `save_pretrained`)."""
    if os.path.isdir(path):
        inner = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(inner):
            raise FileNotFoundError(f"tokenizer directory {path!r} has no tokenizer.json")
        return inner
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"tokenizer file {path!r} not found (train one with `python -m deltatron.data.tokenizer`)"
        )
    return path


def load_tokenizer(path: str) -> Tokenizer:
    """A tokenizer from a tokenizer.json file or a directory holding one."""
    path = tokenizer_file(path)
    try:
        return Tokenizer.from_file(path)
    except Exception as exc:  # the Rust side raises a bare Exception for a bad file
        raise ValueError(f"{path}: not a tokenizers JSON file ({exc})") from None


def eos_token(path: str, override: str | None = None) -> str:
    """The token that ends documents: `override`, else the eos_token of a Hugging Face
    directory's tokenizer_config.json, else <|endoftext|> (the bundled tokenizer's)."""
    if override:
        return override
    config = os.path.join(path, "tokenizer_config.json") if os.path.isdir(path) else None
    if config and os.path.isfile(config):
        with open(config) as f:
            value = json.load(f).get("eos_token")
        if isinstance(value, dict):  # older transformers save AddedToken objects
            value = value.get("content")
        if isinstance(value, str) and value:
            return value
    return EOS


def eos_id(tok: Tokenizer, token: str = EOS) -> int:
    i = tok.token_to_id(token)
    if i is None:
        raise ValueError(f"tokenizer has no {token} token to end documents with (choose one with --eos-token)")
    return i


def pad_id(tok: Tokenizer) -> int:
    i = tok.token_to_id(PAD)
    if i is None:
        raise ValueError(f"tokenizer has no {PAD} token")
    return i


def vocab_size(tok: Tokenizer) -> int:
    """Number of token ids (special tokens included): ids are 0 .. vocab_size - 1."""
    return tok.get_vocab_size(with_added_tokens=True)


def tokenizer_sha256(path: str) -> str:
    """Content hash of a tokenizer (its tokenizer.json): shard manifests record which tokenizer
    made them, and the loader refuses shards made by another."""
    with open(tokenizer_file(path), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def tokenizer_hash(path: str) -> str:
    """Short form of tokenizer_sha256, for cache names."""
    return tokenizer_sha256(path)[:16]


def main(argv=None) -> int:
    from deltatron.data.corpus import read_jsonl_texts

    p = argparse.ArgumentParser(
        prog="python -m deltatron.data.tokenizer",
        description="Train a byte-level BPE tokenizer on a jsonl corpus (deterministic).",
    )
    p.add_argument("--corpus", default="data/corpus/shakespeare.jsonl.gz", help="jsonl or jsonl.gz with a 'text' field")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    p.add_argument("--out", default="data/tokenizer/tokenizer.json", help="tokenizer.json to write")
    args = p.parse_args(argv)
    start = time.time()
    try:
        tok = train_tokenizer(read_jsonl_texts(args.corpus), args.vocab_size, args.out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"deltatron.data.tokenizer: {exc}", file=sys.stderr)
        return 1
    print(f"{args.corpus}: trained a {vocab_size(tok)}-token byte-level BPE tokenizer -> {args.out} "
          f"({time.time() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
