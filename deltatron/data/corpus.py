"""Reading a jsonl corpus: one JSON object per line with a string "text" field (a document).

Plain `.jsonl` or gzipped `.jsonl.gz`. Blank lines are skipped. Errors name the file and line.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from typing import Iterator


def read_jsonl_texts(path: str, field: str = "text") -> Iterator[str]:
    """Yield the `field` of each line of a jsonl / jsonl.gz file, with errors naming file:line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"corpus file {path!r} not found")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(
                        f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})"
                    ) from None
                if not isinstance(record, dict) or not isinstance(record.get(field), str):
                    raise ValueError(f"{path}:{lineno}: expected an object with a string {field!r} field")
                yield record[field]
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}:{lineno + 1}: not UTF-8 text ({exc.reason})") from None
        except (gzip.BadGzipFile, EOFError) as exc:
            raise ValueError(f"{path}: not a complete gzip file ({exc})") from None


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
