"""`python -m deltatron.data.prepare`: tokenize a jsonl corpus into the cache the trainer reads.

With --train-tokenizer it first (re)trains the byte-level BPE tokenizer on the corpus.
Defaults are the bundled corpus and tokenizer, so `make train` needs no arguments.
"""

from __future__ import annotations

import argparse
import sys
import time

from deltatron.data.config import DataConfig


def main(argv=None) -> int:
    defaults = DataConfig()
    p = argparse.ArgumentParser(prog="deltatron-prepare", description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=defaults.corpus, help="jsonl or jsonl.gz with a 'text' field")
    p.add_argument("--tokenizer", default=defaults.tokenizer, help="tokenizer.json to use (or write)")
    p.add_argument("--cache-dir", default=defaults.cache_dir)
    p.add_argument("--train-tokenizer", action="store_true", help="train the tokenizer on the corpus first")
    p.add_argument("--vocab-size", type=int, default=4096)
    args = p.parse_args(argv)

    from deltatron.data.packed import prepare_corpus, read_jsonl_texts
    from deltatron.data.tokenizer import train_tokenizer

    start = time.time()
    try:
        if args.train_tokenizer:
            train_tokenizer(read_jsonl_texts(args.corpus), args.vocab_size, args.tokenizer)
            print(f"trained a {args.vocab_size}-token tokenizer -> {args.tokenizer}")
        prefix = prepare_corpus(args.corpus, args.tokenizer, args.cache_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"deltatron-prepare: {exc}", file=sys.stderr)
        return 1
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    data = IndexedDataset(prefix, mmap=True)
    print(
        f"{args.corpus}: {len(data)} documents, {int(data.sequence_lengths.sum()):,} tokens "
        f"-> {prefix}.bin/.idx ({time.time() - start:.1f}s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
