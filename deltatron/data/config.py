"""The `data` config group: which datasets to train on and how they are cut into sequences."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

VERIFY_MODES = ("index", "full")


@dataclass
class DataConfig:
    # Preprocessed datasets (directories written by `python -m deltatron.data.preprocess`) and
    # their weights: data.blend=[[0.7,data/web],[0.3,data/code]]. Empty: the `corpus` below,
    # preprocessed into `cache_dir` on first use.
    blend: list[Any] = field(default_factory=list)
    # jsonl corpus (one {"text": ...} object per line); the bundled one ships with the repo
    corpus: str = "data/corpus/shakespeare.jsonl.gz"
    # the model's tokenizer (tokenizer.json or a directory holding one); every dataset's manifest
    # must name this tokenizer's sha256
    tokenizer: str = "data/tokenizer/tokenizer.json"
    # where `corpus` is preprocessed to (a directory named after the corpus and tokenizer contents)
    cache_dir: str = "data_cache"
    seq_length: int = 256
    # pass document boundaries to the model (KDA resets its state, MLA masks across documents)
    document_boundaries: bool = True
    val_fraction: float = 0.02  # held out by document, in every dataset of the blend
    seed: int = 1234
    # shard checks on opening: "index" (sizes of every file and sha256 of every .idx: cheap) or
    # "full" (also the sha256 of every .bin: reads the whole dataset once per process)
    verify: str = "index"
    # random tokens instead of the corpus (throughput runs, smoke tests); nothing is read
    mock: bool = False

    def __post_init__(self) -> None:
        if self.seq_length < 2:
            raise ValueError(f"data.seq_length={self.seq_length} must be >= 2")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"data.verify={self.verify!r}: choose one of {', '.join(VERIFY_MODES)}")
        parse_blend(list(self.blend))


@dataclass(frozen=True)
class BlendEntry:
    weight: float
    path: str


def parse_blend(blend: list) -> list[BlendEntry]:
    """[[weight, path], ...] (the Hydra form of data.blend) -> entries; every weight must be a
    number > 0 and every path a string, named in the error otherwise."""
    entries = []
    for item in blend:
        if not (isinstance(item, (list, tuple)) and len(item) == 2):
            raise ValueError(f"data.blend entry {item!r} must be a pair [weight, path]")
        weight, path = item
        if not isinstance(path, str) or not path:
            raise ValueError(f"data.blend entry {list(item)!r}: the path must be a non-empty string")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"data.blend weight {weight!r} of {path} must be a number")
        if weight <= 0:
            raise ValueError(f"data.blend weight {weight} of {path} must be > 0")
        entries.append(BlendEntry(float(weight), path))
    if len({e.path for e in entries}) != len(entries):
        raise ValueError("data.blend names a dataset more than once")
    return entries
