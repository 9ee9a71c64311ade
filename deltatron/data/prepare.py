"""`python -m deltatron.data.prepare`: tokenize a jsonl corpus into a megatron-core IndexedDataset.

    python -m deltatron.data.prepare --corpus data/corpus/shakespeare.jsonl.gz \\
        --tokenizer data/tokenizer/tokenizer.json --out data_cache/bundled

writes data_cache/bundled.{bin,idx,meta.json}. Without --out it writes the cache the trainer reads
(a name derived from the corpus and tokenizer contents inside --cache-dir), so `make train` needs
no arguments. Nothing is rewritten when the outputs already match the corpus and tokenizer.
With --train-tokenizer it first (re)trains the tokenizer on the corpus and writes --tokenizer.
"""

from __future__ import annotations

import argparse
import sys
import time

from deltatron.data.config import DataConfig


def main(argv=None) -> int:
    defaults = DataConfig()
    p = argparse.ArgumentParser(
        prog="python -m deltatron.data.prepare",
        description="Tokenize a jsonl corpus into a megatron-core IndexedDataset (.bin/.idx).",
    )
    p.add_argument("--corpus", default=defaults.corpus, help="jsonl or jsonl.gz with a 'text' field per line")
    p.add_argument("--tokenizer", default=defaults.tokenizer, help="tokenizer.json to use (or write)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", help="output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.meta.json")
    where.add_argument("--cache-dir", default=defaults.cache_dir,
                       help="without --out: the cache directory the trainer reads (default %(default)s)")
    p.add_argument("--train-tokenizer", action="store_true", help="train the tokenizer on the corpus first")
    p.add_argument("--vocab-size", type=int, default=4096, help="with --train-tokenizer")
    args = p.parse_args(argv)

    from deltatron.data.packed import cache_prefix, read_jsonl_texts, tokenize_corpus
    from deltatron.data.tokenizer import train_tokenizer, vocab_size

    start = time.time()
    try:
        if args.train_tokenizer:
            tok = train_tokenizer(read_jsonl_texts(args.corpus), args.vocab_size, args.tokenizer)
            print(f"trained a {vocab_size(tok)}-token tokenizer -> {args.tokenizer}")
        prefix = args.out or cache_prefix(args.corpus, args.tokenizer, args.cache_dir)
        result = tokenize_corpus(args.corpus, args.tokenizer, prefix)
    except (FileNotFoundError, ValueError) as exc:
        print(f"deltatron.data.prepare: error: {exc}", file=sys.stderr)
        return 1
    status = "up to date, nothing written" if result.reused else "written"
    print(
        f"{args.corpus}: {result.documents} documents, {result.tokens} tokens "
        f"-> {result.prefix}.bin/.idx ({status}, {time.time() - start:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
