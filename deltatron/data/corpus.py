"""Reading corpus files as documents, in batches that tokenizer workers can take.

Formats, chosen by file name:
  .jsonl / .jsonl.gz   one JSON object per line; the document is its `field` (a string). Blank
                       lines are skipped. Errors name file:line.
  .parquet             the string column `field`; needs pyarrow (not a dependency of deltatron).
  .txt / .txt.gz       UTF-8 text; `text_unit` says what a document is: the whole file, each
                       non-blank line, or each paragraph (blocks separated by blank lines).

A record is one document; records are numbered from 0 in file order, so a restarted run can skip
the records that finished shards already hold (`read_batches(..., skip=n)`). The reading side
(`read_batches`) only splits the input into records; decoding JSON (`batch_texts`) happens in the
workers, where it runs in parallel with tokenization.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Iterator

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".txt.gz")
TEXT_UNITS = ("file", "line", "paragraph")


def input_format(path: str) -> str:
    """"jsonl", "parquet" or "text", from the file name."""
    for fmt, suffixes in (("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES), ("text", TEXT_SUFFIXES)):
        if path.endswith(suffixes):
            return fmt
    raise ValueError(
        f"{path}: unknown input format; expected one of "
        f"{', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES)}"
    )


def expand_inputs(paths: list[str]) -> list[str]:
    """Files named, plus the corpus files under directories named (recursively, sorted), in the
    order given. A named file must exist and have a known format; a directory must hold some."""
    known = JSONL_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES
    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(path)
                for name in names
                if name.endswith(known)
            )
            if not found:
                raise FileNotFoundError(f"input directory {path!r} holds no {'/'.join(known)} files")
            files += found
        elif os.path.isfile(path):
            input_format(path)
            files.append(path)
        else:
            raise FileNotFoundError(f"input {path!r} not found")
    if len(set(map(os.path.abspath, files))) != len(files):
        raise ValueError("an input file is named more than once")
    return files


@dataclass
class RecordBatch:
    """Consecutive records of one input file.

    items: jsonl -> (line number, raw line bytes) pairs, decoded by `batch_texts`; parquet and
    text -> the document strings themselves.
    """

    path: str
    fmt: str
    first_record: int
    items: list
    position: int  # bytes of the input consumed so far (for progress)


def _open_binary(path: str):
    raw = open(path, "rb")
    return raw, (gzip.GzipFile(fileobj=raw, mode="rb") if path.endswith(".gz") else raw)


def _jsonl_records(path: str) -> Iterator[tuple[int, int, bytes]]:
    """(position, line number, line) of each non-blank line."""
    raw, stream = _open_binary(path)
    try:
        lineno = 0
        try:
            for lineno, line in enumerate(stream, 1):
                if line.strip():
                    yield raw.tell(), lineno, line
        except (gzip.BadGzipFile, EOFError, OSError) as exc:
            raise ValueError(f"{path}: not a complete gzip file ({exc})") from None
    finally:
        stream.close()
        raw.close()


def _text_records(path: str, unit: str) -> Iterator[tuple[int, int, str]]:
    """(position, line number, document) of each document of a text file."""
    raw, stream = _open_binary(path)
    try:
        try:
            data = stream.read()
        except (gzip.BadGzipFile, EOFError, OSError) as exc:
            raise ValueError(f"{path}: not a complete gzip file ({exc})") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise ValueError(f"{path}:{line}: not UTF-8 text ({exc.reason})") from None
        end = raw.tell()
    finally:
        stream.close()
        raw.close()
    if unit == "file":
        yield end, 1, text
        return
    lines = text.split("\n")
    if unit == "line":
        for lineno, line in enumerate(lines, 1):
            if line.strip():
                yield end, lineno, line
        return
    block: list[str] = []
    for lineno, line in enumerate(lines + [""], 1):
        if line.strip():
            block.append(line)
        elif block:
            yield end, lineno - len(block), "\n".join(block)
            block = []


def _parquet_records(path: str, field: str, batch_size: int) -> Iterator[tuple[int, int, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(
            f"{path}: reading parquet needs pyarrow, which is not installed; "
            f"install it (`pip install pyarrow`) or convert the file to jsonl"
        ) from None
    f = pq.ParquetFile(path)
    if field not in f.schema_arrow.names:
        raise ValueError(f"{path}: no column {field!r} (columns: {', '.join(f.schema_arrow.names)})")
    total, size, row = max(1, f.metadata.num_rows), os.path.getsize(path), 0
    for batch in f.iter_batches(batch_size=batch_size, columns=[field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if not isinstance(value, str):
                raise ValueError(f"{path}: row {row}: column {field!r} is not a string ({value!r})")
            yield size * row // total, row, value


def read_batches(path: str, *, field: str = "text", text_unit: str = "file",
                 batch_size: int = 256, skip: int = 0) -> Iterator[RecordBatch]:
    """The records of one input in batches of up to batch_size, leaving out the first `skip`."""
    fmt = input_format(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"corpus file {path!r} not found")
    if text_unit not in TEXT_UNITS:
        raise ValueError(f"text_unit={text_unit!r}: choose one of {', '.join(TEXT_UNITS)}")
    if fmt == "jsonl":
        records = _jsonl_records(path)
    elif fmt == "parquet":
        records = _parquet_records(path, field, batch_size)
    else:
        records = _text_records(path, text_unit)
    items: list = []
    first = skip
    position = 0
    for number, (position, lineno, record) in enumerate(records):
        if number < skip:
            continue
        items.append((lineno, record) if fmt == "jsonl" else record)
        if len(items) == batch_size:
            yield RecordBatch(path, fmt, first, items, position)
            first += len(items)
            items = []
    if items:
        yield RecordBatch(path, fmt, first, items, position)


def batch_texts(batch: RecordBatch, field: str = "text") -> list[str]:
    """The document strings of a batch (decoding JSON lines, with errors naming file:line)."""
    if batch.fmt != "jsonl":
        return batch.items
    texts = []
    for lineno, line in batch.items:
        try:
            record = json.loads(line)
        except UnicodeDecodeError as exc:
            raise ValueError(f"{batch.path}:{lineno}: not UTF-8 text ({exc.reason})") from None
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{batch.path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise ValueError(f"{batch.path}:{lineno}: expected an object with a string {field!r} field")
        texts.append(record[field])
    return texts


def read_jsonl_texts(path: str, field: str = "text") -> Iterator[str]:
    """Yield the `field` of each line of a jsonl / jsonl.gz file, with errors naming file:line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"corpus file {path!r} not found")
    for batch in read_batches(path, field=field):
        yield from batch_texts(batch, field)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
