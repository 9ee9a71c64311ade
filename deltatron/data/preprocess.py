"""`python -m deltatron.data.preprocess` (`deltatron-preprocess`): corpus files -> token shards.

    python -m deltatron.data.preprocess corpus/*.jsonl.gz more/ --tokenizer tok/ --out data/web \\
        --workers 8 --field text --max-shard-tokens 268435456

reads jsonl / jsonl.gz / parquet / txt files (directories are searched), tokenizes every document
with a Hugging Face `tokenizers` tokenizer (a tokenizer.json or a directory holding one), appends
EOS, and writes bounded shards plus manifest.json into --out (format: deltatron/data/shards.py).
Without arguments it preprocesses the bundled corpus into the cache directory the trainer reads.

Restartable: each shard is complete or absent (atomic writes); a rerun keeps the finished shards
whose inputs and settings are unchanged, continues each input after its last finished shard, and
rewrites nothing when all is done ("up to date"). Shards of one input are cut in input order, so a
rerun reproduces the same shards. The manifest is written last: a dataset without one is not done.
Refuses (unless --overwrite) to replace shards made with other settings (another tokenizer, text
field, shard size) in the same directory.

--workers N tokenizes in N processes; the main process reads the inputs and writes the shards in
order. With --workers 1 everything runs in this process.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Iterator

from deltatron.data.corpus import TEXT_UNITS, expand_inputs, read_batches
from deltatron.data.tokenizer import eos_id, eos_token, load_tokenizer, tokenizer_file, tokenizer_sha256, vocab_size

if TYPE_CHECKING:
    from deltatron.data.shards import InputInfo, Manifest, Settings, ShardInfo

# deltatron.data.shards (megatron-core, torch) is imported inside the functions: spawned tokenizer
# workers import this module again as their __main__ and should not pay for torch.

DEFAULT_MAX_SHARD_TOKENS = 1 << 28  # 512 MiB of uint16 tokens
_SHARD_FILE = re.compile(r"^shard-(\d{5})-(\d{5})\.(bin|idx|json)(\.partial-(\d+))?$")


@dataclass
class PreprocessConfig:
    inputs: list[str]
    tokenizer: str
    out: str
    field: str = "text"  # jsonl key / parquet column holding the document
    text_unit: str = "file"  # what a document of a .txt file is: file, line or paragraph
    eos_token: str | None = None  # default: the tokenizer directory's eos_token, else <|endoftext|>
    max_shard_tokens: int = DEFAULT_MAX_SHARD_TOKENS
    workers: int = 1
    batch_size: int = 512  # documents per task handed to a worker
    progress: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("no input files given")
        if self.max_shard_tokens < 1 or self.workers < 1 or self.batch_size < 1:
            raise ValueError("max_shard_tokens, workers and batch_size must be >= 1")
        if self.text_unit not in TEXT_UNITS:
            raise ValueError(f"text_unit={self.text_unit!r}: choose one of {', '.join(TEXT_UNITS)}")


@dataclass(frozen=True)
class PreprocessResult:
    directory: str
    manifest: Manifest
    written: int  # shards this run wrote
    reused: int  # finished shards it kept

    @property
    def up_to_date(self) -> bool:
        return self.written == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_partials(out: str) -> None:
    """Temporary files of runs that were killed (SIGKILL leaves no chance to clean up)."""
    for name in os.listdir(out):
        m = _SHARD_FILE.match(name)
        if m and m.group(5) and not _pid_alive(int(m.group(5))):
            os.remove(os.path.join(out, name))


def _finished_prefix(out: str, index: int, settings: Settings, source: InputInfo) -> tuple[list[ShardInfo], bool]:
    """The finished shards at the start of an input (same settings, same input file), and whether
    they hold the whole input."""
    from deltatron.data.shards import read_shard_record, shard_name

    shards, done, seq = [], False, 0
    while not done:
        record = read_shard_record(out, shard_name(index, seq))
        if record is None or record.get("settings") != asdict(settings) or record.get("input") != asdict(source):
            break
        shards.append(record["shard"])
        done = bool(record.get("last"))
        seq += 1
    return shards, done


def _foreign_settings(out: str, settings: Settings) -> str | None:
    """Why the directory holds shards of other settings, or None."""
    from deltatron.data.shards import Settings, read_shard_record, settings_diff

    names = sorted({m.group(0).rsplit(".", 1)[0] for n in os.listdir(out) if (m := _SHARD_FILE.match(n))
                    and n.endswith(".json")})
    for name in names:
        record = read_shard_record(out, name)
        if record is not None and record.get("settings") != asdict(settings):
            diff = settings_diff(Settings(**record["settings"]), settings)
            return f"{os.path.join(out, name)}.json was made with other settings ({'; '.join(diff)})"
    return None


def _tasks(cfg: PreprocessConfig, plan: list[tuple[int, str, int]]) -> Iterator[tuple[int, object]]:
    """(input index, record batch) for all unfinished inputs, then (input index, None) at its end."""
    for index, path, skip in plan:
        for batch in read_batches(path, field=cfg.field, text_unit=cfg.text_unit,
                                  batch_size=cfg.batch_size, skip=skip):
            yield index, batch
        yield index, None


def _encoded(cfg: PreprocessConfig, tasks, encoder_args: tuple) -> Iterator[tuple[int, object, object]]:
    """(input index, batch or None, (ids, lengths) or None) in task order; the encoding runs in
    worker processes with at most a few batches in flight (bounded memory)."""
    from deltatron.data.encode import Encoder, encode_in_worker, init_worker

    if cfg.workers == 1:
        encoder = Encoder(*encoder_args)
        for index, batch in tasks:
            yield index, batch, None if batch is None else encoder.encode(batch)
        return

    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: workers import only deltatron.data.encode, and inherit no threads from this process
    with ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=init_worker, initargs=encoder_args) as pool:
        pending: deque = deque()
        try:
            for index, batch in tasks:
                pending.append((index, batch, None if batch is None else pool.submit(encode_in_worker, batch)))
                while len(pending) > 4 * cfg.workers or (pending and pending[0][2] is None):
                    i, b, fut = pending.popleft()
                    yield i, b, None if fut is None else fut.result()
            while pending:
                i, b, fut = pending.popleft()
                yield i, b, None if fut is None else fut.result()
        finally:
            for _, _, fut in pending:
                if fut is not None:
                    fut.cancel()


def preprocess(cfg: PreprocessConfig) -> PreprocessResult:
    """Tokenize cfg.inputs into shards in cfg.out (module docstring). Returns the manifest and
    how many shards were written and kept."""
    from deltatron.data.shards import (
        MANIFEST, InputInfo, Manifest, Settings, ShardWriter, read_manifest, shard_name, token_dtype,
        write_json_atomic,
    )

    tok = load_tokenizer(cfg.tokenizer)
    vocab = vocab_size(tok)
    eos = eos_id(tok, eos_token(cfg.tokenizer, cfg.eos_token))
    dtype = token_dtype(vocab)
    settings = Settings(
        tokenizer_sha256=tokenizer_sha256(cfg.tokenizer), eos_id=eos, vocab_size=vocab,
        dtype=dtype.name, field=cfg.field, text_unit=cfg.text_unit, max_shard_tokens=cfg.max_shard_tokens,
    )
    paths = expand_inputs(cfg.inputs)
    sources = [InputInfo.of(p) for p in paths]
    out = cfg.out
    os.makedirs(out, exist_ok=True)
    _remove_dead_partials(out)
    if not cfg.overwrite and (why := _foreign_settings(out, settings)):
        raise ValueError(f"{why}; write to another --out directory, or pass --overwrite to replace them")

    finished = [_finished_prefix(out, i, settings, s) for i, s in enumerate(sources)]
    shards: list[list[ShardInfo]] = [list(f[0]) for f in finished]
    plan = [(i, paths[i], (s[-1].first_record + s[-1].documents) if s else 0)
            for i, (s, done) in enumerate(finished) if not done]
    reused = sum(len(s) for s in shards)
    written = 0
    manifest_path = os.path.join(out, MANIFEST)
    if plan:
        try:
            os.remove(manifest_path)  # it describes shards this run may replace
        except FileNotFoundError:
            pass

    if plan:
        from tqdm import tqdm

        todo = sum(sources[i].bytes for i, _, _ in plan)
        bar = tqdm(total=todo, unit="B", unit_scale=True, desc=f"preprocess -> {out}",
                   disable=not cfg.progress, file=sys.stderr, dynamic_ncols=True)
        encoder_args = (tok.to_str(), eos, dtype.name, cfg.field)
        writer: ShardWriter | None = None
        read_bytes = {i: 0 for i, _, _ in plan}
        next_record = {i: skip for i, _, skip in plan}
        tokens_done = 0

        def commit(index: int, last: bool) -> None:
            nonlocal writer, written
            record = {"settings": asdict(settings), "input": asdict(sources[index]), "last": last}
            first = next_record[index] - writer.documents
            shards[index].append(writer.commit(input_index=index, first_record=first, record=record))
            writer, written = None, written + 1

        try:
            for index, batch, result in _encoded(cfg, _tasks(cfg, plan), encoder_args):
                if batch is None:  # the input ended: its last shard (or an empty input: none)
                    if writer is not None:
                        commit(index, last=True)
                    elif shards[index]:  # ended exactly at a shard boundary: mark that shard last
                        _mark_last(out, shards[index][-1])
                    continue
                ids, lengths = result
                pos = 0
                for n in lengths.tolist():
                    if writer is not None and writer.tokens + n > cfg.max_shard_tokens:
                        commit(index, last=False)
                    if writer is None:
                        writer = ShardWriter(out, shard_name(index, len(shards[index])), dtype)
                    writer.add(ids[pos : pos + n])
                    next_record[index] += 1
                    pos += n
                tokens_done += len(ids)
                bar.update(batch.position - read_bytes[index])
                read_bytes[index] = batch.position
                bar.set_postfix_str(f"{tokens_done:,} tokens", refresh=False)
        finally:
            if writer is not None:
                writer.discard()
            bar.close()

    flat = [s for per_input in shards for s in per_input]
    _remove_stale_shards(out, {s.name for s in flat})
    documents, tokens = sum(s.documents for s in flat), sum(s.tokens for s in flat)
    if documents == 0:
        raise ValueError(f"the inputs ({', '.join(paths)}) hold no documents: the dataset would be empty")
    manifest = Manifest(settings=settings, tokenizer=os.path.abspath(tokenizer_file(cfg.tokenizer)),
                        documents=documents, tokens=tokens, inputs=sources, shards=flat)
    if plan or not os.path.exists(manifest_path) or read_manifest(out).to_json() != manifest.to_json():
        write_json_atomic(manifest_path, manifest.to_json())
    return PreprocessResult(out, manifest, written, reused)


def _mark_last(out: str, shard: ShardInfo) -> None:
    """Record that an input's last finished shard is its final one (the input ended right at a
    shard boundary, found only by a rerun that read nothing after it)."""
    import json

    from deltatron.data.shards import write_json_atomic

    path = os.path.join(out, shard.name + ".json")
    with open(path) as f:
        record = json.load(f)
    record["last"] = True
    write_json_atomic(path, record)


def _remove_stale_shards(out: str, keep: set[str]) -> None:
    """Shard files this dataset does not list (left by a run over other inputs or shard sizes)."""
    for name in os.listdir(out):
        m = _SHARD_FILE.match(name)
        if m and not m.group(4) and name.rsplit(".", 1)[0] not in keep:
            os.remove(os.path.join(out, name))


def default_dataset_dir(corpus: str, tokenizer: str, cache_dir: str) -> str:
    """The cache directory for a corpus and tokenizer, named after their contents, so datasets of
    different corpora or tokenizers live side by side (the trainer's default dataset)."""
    from deltatron.data.corpus import file_sha256
    from deltatron.data.tokenizer import tokenizer_hash

    if not os.path.isfile(corpus):
        raise FileNotFoundError(f"corpus file {corpus!r} not found")
    name = os.path.basename(corpus).split(".")[0]
    return os.path.join(cache_dir, f"{name}-{file_sha256(corpus)[:12]}-{tokenizer_hash(tokenizer)}")


def main(argv=None) -> int:
    from deltatron.data.config import DataConfig

    defaults = DataConfig()
    p = argparse.ArgumentParser(
        prog="deltatron-preprocess",
        description="Tokenize corpus files into megatron-core IndexedDataset shards plus a manifest.",
    )
    p.add_argument("inputs", nargs="*",
                   help="jsonl, jsonl.gz, parquet or txt files, or directories of them "
                        f"(default: the bundled corpus {defaults.corpus})")
    p.add_argument("--tokenizer", default=defaults.tokenizer, help="tokenizer.json or a directory holding one")
    p.add_argument("--out", help="dataset directory to write (default, for the bundled corpus: "
                                 f"a content-named directory in {defaults.cache_dir}/, which the trainer reads)")
    p.add_argument("--cache-dir", default=defaults.cache_dir, help="where the default --out goes")
    p.add_argument("--field", default="text", help="jsonl key / parquet column of the text (default %(default)s)")
    p.add_argument("--text-unit", default="file", choices=TEXT_UNITS,
                   help="what one document of a .txt file is (default %(default)s)")
    p.add_argument("--eos-token", help="token appended to each document (default: the tokenizer "
                                       "directory's eos_token, else <|endoftext|>)")
    p.add_argument("--max-shard-tokens", type=int, default=DEFAULT_MAX_SHARD_TOKENS,
                   help="tokens per shard at most, unless one document is longer (default %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace shards made with other settings")
    p.add_argument("--verify", metavar="DIR", help="only check a finished dataset's shards against its manifest "
                                                   "(sizes and sha256 of every file) and exit")
    args = p.parse_args(argv)

    start = time.time()
    try:
        if args.verify:
            from deltatron.data.shards import read_manifest, verify_shard

            manifest = read_manifest(args.verify)
            for shard in manifest.shards:
                verify_shard(args.verify, shard, full=True)
            print(f"{args.verify}: {len(manifest.shards)} shards, {manifest.tokens:,} tokens: all match the manifest")
            return 0
        inputs = args.inputs or [defaults.corpus]
        out = args.out
        if out is None:
            if args.inputs:
                p.error("--out is required when input files are given")
            out = default_dataset_dir(defaults.corpus, args.tokenizer, args.cache_dir)
        cfg = PreprocessConfig(
            inputs=inputs, tokenizer=args.tokenizer, out=out, field=args.field, text_unit=args.text_unit,
            eos_token=args.eos_token, max_shard_tokens=args.max_shard_tokens, workers=args.workers,
            progress=not args.no_progress, overwrite=args.overwrite,
        )
        result = preprocess(cfg)
    except (FileNotFoundError, ValueError) as exc:
        print(f"deltatron-preprocess: error: {exc}", file=sys.stderr)
        return 1
    m = result.manifest
    status = ("up to date, nothing written" if result.up_to_date
              else f"{result.written} shards written, {result.reused} kept")
    print(f"{len(m.inputs)} inputs: {m.documents:,} documents, {m.tokens:,} tokens ({m.settings.dtype}) "
          f"-> {result.directory} ({len(m.shards)} shard{'' if len(m.shards) == 1 else 's'}; {status}; "
          f"{time.time() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
