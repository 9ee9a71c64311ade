"""The bundled corpus, tokenizer, tokenized cache and sequence packing."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest
import torch

from deltatron.data.packed import (
    PackedSequenceDataset,
    collate_packed,
    prepare_corpus,
    read_jsonl_texts,
)
from deltatron.data.tokenizer import EOS, eos_id, load_tokenizer, train_tokenizer

from conftest import REPO

CORPUS = os.path.join(REPO, "data/corpus/shakespeare.jsonl.gz")
TOKENIZER = os.path.join(REPO, "data/tokenizer/tokenizer.json")


def _write_corpus(path, texts):
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return str(path)


@pytest.fixture
def small_corpus(tmp_path):
    rng = np.random.default_rng(0)
    words = "to be or not that is the question whether tis nobler in mind".split()
    texts = [" ".join(rng.choice(words, size=rng.integers(3, 60))) for _ in range(40)]
    return _write_corpus(tmp_path / "c.jsonl", texts), texts


def test_bundled_corpus_and_tokenizer_round_trip():
    texts = list(read_jsonl_texts(CORPUS))
    assert len(texts) == 778 and texts[0].startswith("A Midsummer Night's Dream, ACT I, SCENE I.")
    tok = load_tokenizer(TOKENIZER)
    assert tok.get_vocab_size() == 4096 and tok.token_to_id(EOS) is not None
    for text in texts[::97]:
        assert tok.decode(tok.encode(text).ids) == text


def test_tokenizer_training_is_deterministic(tmp_path):
    texts = list(read_jsonl_texts(CORPUS))[:40]
    a = train_tokenizer(texts, 600, str(tmp_path / "a.json"))
    b = train_tokenizer(texts, 600, str(tmp_path / "b.json"))
    assert open(tmp_path / "a.json").read() == open(tmp_path / "b.json").read()
    assert a.get_vocab_size() == 600


def test_prepared_corpus_holds_each_document_then_eos(small_corpus, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    path, texts = small_corpus
    prefix = prepare_corpus(path, TOKENIZER, str(tmp_path / "cache"))
    tok = load_tokenizer(TOKENIZER)
    data = IndexedDataset(prefix, mmap=True)
    assert len(data) == len(texts)
    for i in (0, 17, 39):
        assert data[i].tolist() == tok.encode(texts[i]).ids + [eos_id(tok)]
    assert prepare_corpus(path, TOKENIZER, str(tmp_path / "cache")) == prefix  # cached


def test_packing_reproduces_the_document_stream(small_corpus, tmp_path):
    path, _ = small_corpus
    prefix = prepare_corpus(path, TOKENIZER, str(tmp_path / "cache"))
    eos = eos_id(load_tokenizer(TOKENIZER))
    ds = PackedSequenceDataset(prefix, 16, split="train", val_fraction=0.1, seed=3)
    ds.set_epoch(2)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    data = IndexedDataset(prefix, mmap=True)
    stream = np.concatenate([data[int(d)] for d in ds._order]).astype(np.int64)
    got = torch.cat([ds[i]["tokens"] for i in range(len(ds))]).numpy()
    assert len(ds) == (len(stream) - 1) // 16
    assert (got == stream[: len(got)]).all()
    for i in range(len(ds)):
        s = ds[i]
        assert torch.equal(s["labels"][:-1], s["tokens"][1:])
        # a document starts at 0 and after every EOS inside the sample
        expected = [0] + [j + 1 for j in range(15) if s["tokens"][j] == eos]
        assert s["doc_starts"] == expected


def test_collate_turns_document_starts_into_cu_seqlens():
    t = 8
    samples = [
        {"tokens": torch.arange(t), "labels": torch.arange(t), "doc_starts": [0, 3]},
        {"tokens": torch.arange(t), "labels": torch.arange(t), "doc_starts": [0]},
        {"tokens": torch.arange(t), "labels": torch.arange(t), "doc_starts": [0, 1, 7]},
    ]
    batch = collate_packed(samples)
    assert batch["cu_seqlens"].tolist() == [0, 3, 8, 16, 17, 23, 24]
    assert batch["max_seqlen"] == 8 and batch["tokens"].shape == (3, t)
    assert collate_packed(samples, document_boundaries=False)["cu_seqlens"].tolist() == [0, 8, 16, 24]


def test_splits_are_disjoint_by_document_and_seeded(small_corpus, tmp_path):
    path, _ = small_corpus
    prefix = prepare_corpus(path, TOKENIZER, str(tmp_path / "cache"))
    train = PackedSequenceDataset(prefix, 16, split="train", val_fraction=0.1, seed=5)
    val = PackedSequenceDataset(prefix, 16, split="val", val_fraction=0.1, seed=5)
    assert len(set(train.doc_ids) & set(val.doc_ids)) == 0
    assert len(train.doc_ids) + len(val.doc_ids) == 40 and len(val.doc_ids) == 4
    again = PackedSequenceDataset(prefix, 16, split="train", val_fraction=0.1, seed=5)
    assert torch.equal(train[3]["tokens"], again[3]["tokens"])
    other = PackedSequenceDataset(prefix, 16, split="train", val_fraction=0.1, seed=6)
    assert not torch.equal(train[3]["tokens"], other[3]["tokens"])
    train.set_epoch(1)
    assert not torch.equal(train[3]["tokens"], again[3]["tokens"])


def test_malformed_corpus_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        list(read_jsonl_texts(str(path)))
    path.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with a string 'text'"):
        list(read_jsonl_texts(str(path)))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        prepare_corpus(str(tmp_path / "nope.jsonl"), TOKENIZER, str(tmp_path / "cache"))


def test_interrupted_preparation_leaves_nothing_that_looks_complete(tmp_path):
    path = tmp_path / "c.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"text": "a whole document"}) + "\n")
        f.write("{broken\n")  # fails after the first document was written
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="c.jsonl.gz:2"):
        prepare_corpus(str(path), TOKENIZER, str(cache))
    assert not [p for p in os.listdir(cache) if p.endswith((".bin", ".idx"))]
