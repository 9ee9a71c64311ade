"""The `data` config group: which corpus to train on and how it is cut into sequences."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    # jsonl corpus (one {"text": ...} object per line); the bundled one ships with the repo
    corpus: str = "data/corpus/shakespeare.jsonl.gz"
    tokenizer: str = "data/tokenizer/tokenizer.json"
    # where the tokenized corpus (megatron-core IndexedDataset .bin/.idx) is cached
    cache_dir: str = "data_cache"
    seq_length: int = 256
    # pass document boundaries to the model (KDA resets its state, MLA masks across documents)
    document_boundaries: bool = True
    val_fraction: float = 0.02  # held out by document
    seed: int = 1234
    # random tokens instead of the corpus (throughput runs, smoke tests); nothing is read
    mock: bool = False

    def __post_init__(self) -> None:
        if self.seq_length < 2:
            raise ValueError(f"data.seq_length={self.seq_length} must be >= 2")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
