"""The minimal data path: bundled corpus and tokenizer, tokenize_corpus (IndexedDataset), packing
into fixed-length samples with document boundaries, collation into cu_seqlens, the prepare CLI.

Most tests use a small corpus built here (with a tokenizer trained on it); the bundled corpus and
tokenizer get their own tests.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from megatron.core.datasets.indexed_dataset import IndexedDataset

from deltatron.data import prepare
from deltatron.data.corpus import read_jsonl_texts
from deltatron.data.packed import PackedSequenceDataset, collate_packed, tokenize_corpus
from deltatron.data.tokenizer import (
    EOS, PAD, eos_id, load_tokenizer, pad_id, train_tokenizer, vocab_size,
)

from conftest import REPO

BUNDLED_CORPUS = os.path.join(REPO, "data/corpus/shakespeare.jsonl.gz")
BUNDLED_TOKENIZER = os.path.join(REPO, "data/tokenizer/tokenizer.json")
T = 16  # sequence length of the small-corpus tests


def _write_jsonl(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    return str(path)


def _small_texts(n=60, seed=0):
    rng = np.random.default_rng(seed)
    words = ("thou art more lovely and temperate rough winds do shake the darling buds of may "
             "café naïve — 😀 \t tab\nnewline").split(" ")
    texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) for _ in range(n)]
    texts[5] = ""  # a document that is only its EOS
    texts[6] = "x"  # and very short ones: several boundaries inside one sample
    texts[7] = "a literal <|endoftext|> inside a document is plain text"
    return texts


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 60-document corpus, a tokenizer trained on it, and its IndexedDataset."""
    d = tmp_path_factory.mktemp("small")
    texts = _small_texts()
    corpus = _write_jsonl(d / "small.jsonl", texts)
    tok = train_tokenizer(iter(texts), 300, str(d / "tokenizer.json"))
    result = tokenize_corpus(corpus, str(d / "tokenizer.json"), str(d / "cache" / "small"))
    return {"dir": d, "texts": texts, "corpus": corpus, "tok": tok, "eos": eos_id(tok),
            "tokenizer": str(d / "tokenizer.json"), "prefix": result.prefix, "result": result}


def _encode(tok, text):
    """Document ids as tokenize_corpus stores them (special-token text encoded as plain text)."""
    enc = type(tok).from_str(tok.to_str())
    enc.encode_special_tokens = True
    return enc.encode(text).ids


def _expected_stream(small, ds):
    """The epoch's token stream, rebuilt from the texts (not from the IndexedDataset)."""
    tok, eos = small["tok"], small["eos"]
    return np.array(
        [i for d in ds.document_order for i in _encode(tok, small["texts"][d]) + [eos]], dtype=np.int64
    )


# ---------------------------------------------------------------- the bundled corpus and tokenizer

def test_bundled_corpus_and_tokenizer_round_trip():
    texts = list(read_jsonl_texts(BUNDLED_CORPUS))
    assert len(texts) == 778 and all(t.strip() for t in texts)
    assert os.path.getsize(BUNDLED_CORPUS) < 5 * 2**20
    tok = load_tokenizer(BUNDLED_TOKENIZER)
    assert vocab_size(tok) == 4096 and eos_id(tok) == 0 and pad_id(tok) == 1
    for text in texts[::50] + [texts[-1]]:
        assert tok.decode(tok.encode(text).ids) == text
    # a real subword tokenizer: English text takes well under one token per two characters
    sample = texts[100]
    assert len(tok.encode(sample).ids) < len(sample) / 2


def test_bundled_tokenizer_is_reproduced_by_training(tmp_path):
    out = tmp_path / "tokenizer.json"
    train_tokenizer(read_jsonl_texts(BUNDLED_CORPUS), 4096, str(out))
    assert out.read_bytes() == open(BUNDLED_TOKENIZER, "rb").read()


def test_bundled_corpus_tokenizes_and_packs(tmp_path):
    result = tokenize_corpus(BUNDLED_CORPUS, BUNDLED_TOKENIZER, str(tmp_path / "bundled"))
    assert (result.documents, result.tokens, result.vocab_size) == (778, 1_596_759, 4096)
    data = IndexedDataset(result.prefix, mmap=True)
    assert data[0].dtype == np.uint16 and data[0][-1] == result.eos_id
    train = PackedSequenceDataset(result.prefix, 256, split="train", val_fraction=0.02, seed=1234)
    val = PackedSequenceDataset(result.prefix, 256, split="val", val_fraction=0.02, seed=1234)
    assert len(train.doc_ids) == 762 and len(val.doc_ids) == 16
    assert len(train) == (train.num_tokens - 1) // 256 and len(train) > 5000
    batch = collate_packed([train[i] for i in range(4)])
    assert batch["tokens"].shape == (4, 256) and batch["cu_seqlens"][-1] == 4 * 256


# ------------------------------------------------------------------------------- tokenizer

def test_tokenizer_training_is_deterministic_with_special_tokens_first(tmp_path, small):
    a = train_tokenizer(iter(small["texts"]), 300, str(tmp_path / "a.json"))
    assert (tmp_path / "a.json").read_bytes() == open(small["tokenizer"], "rb").read()
    assert a.token_to_id(EOS) == 0 and a.token_to_id(PAD) == 1 and vocab_size(a) <= 300
    for text in small["texts"]:
        assert a.decode(a.encode(text).ids, skip_special_tokens=False) == text
    assert a.decode(a.encode("x<|endoftext|>y").ids) == "xy"  # the EOS token, dropped by default
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer(iter(small["texts"]), 100)


# ------------------------------------------------------------------------------ tokenize_corpus

def test_tokenize_corpus_round_trip(small):
    result, tok, eos = small["result"], small["tok"], small["eos"]
    assert not result.reused and result.documents == 60
    data = IndexedDataset(result.prefix, mmap=True)
    assert len(data) == 60 and data[0].dtype == np.uint16
    for i, text in enumerate(small["texts"]):
        ids = data[i].tolist()
        assert ids == _encode(tok, text) + [eos]
        assert tok.decode(ids[:-1]) == text
    assert data[5].tolist() == [eos]
    # EOS only ever ends a document, even where the text spells it out
    assert all(int((data[i] == eos).sum()) == 1 for i in range(60))
    assert result.tokens == int(data.sequence_lengths.sum())


def test_tokenize_corpus_skips_matching_outputs_and_redoes_changed_ones(small, tmp_path):
    prefix = str(tmp_path / "c")
    corpus = _write_jsonl(tmp_path / "c.jsonl", small["texts"][:10])
    assert not tokenize_corpus(corpus, small["tokenizer"], prefix).reused
    mtimes = [os.stat(prefix + ext).st_mtime_ns for ext in (".bin", ".idx")]
    again = tokenize_corpus(corpus, small["tok"], prefix)  # a Tokenizer object works as well
    assert again.reused and [os.stat(prefix + ext).st_mtime_ns for ext in (".bin", ".idx")] == mtimes
    _write_jsonl(tmp_path / "c.jsonl", small["texts"][:12])  # the corpus changed
    changed = tokenize_corpus(corpus, small["tokenizer"], prefix)
    assert not changed.reused and len(IndexedDataset(prefix, mmap=True)) == 12
    # a truncated .bin no longer matches either
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(10)
    assert not tokenize_corpus(corpus, small["tokenizer"], prefix).reused
    assert len(IndexedDataset(prefix, mmap=True)) == 12


def _pairs(directory):
    names = os.listdir(directory)
    return [n[:-4] for n in names if n.endswith(".bin") and n[:-4] + ".idx" in names]


def test_interrupted_tokenization_leaves_no_pair(small, tmp_path, monkeypatch):
    from megatron.core.datasets import indexed_dataset

    real_add = indexed_dataset.IndexedDatasetBuilder.add_document
    calls = []

    def add_then_interrupt(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 30:  # half way through the corpus
            raise KeyboardInterrupt
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(indexed_dataset.IndexedDatasetBuilder, "add_document", add_then_interrupt)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus(small["corpus"], small["tokenizer"], str(out / "x"))
    assert os.listdir(out) == []  # no pair, no meta, no partial files
    monkeypatch.undo()
    assert not tokenize_corpus(small["corpus"], small["tokenizer"], str(out / "x")).reused


def test_interrupted_swap_never_pairs_new_bin_with_old_idx(small, tmp_path, monkeypatch):
    prefix = str(tmp_path / "x")
    old_corpus = _write_jsonl(tmp_path / "old.jsonl", ["an older corpus"] * 3)
    tokenize_corpus(old_corpus, small["tokenizer"], prefix)
    assert _pairs(tmp_path) == ["x"]

    real_replace = os.replace

    def replace_then_die(src, dst):
        real_replace(src, dst)
        if dst.endswith(".bin"):  # killed right after the new .bin is in place
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus(small["corpus"], small["tokenizer"], prefix)
    monkeypatch.undo()
    assert _pairs(tmp_path) == [] and not os.path.exists(prefix + ".meta.json")
    assert not [n for n in os.listdir(tmp_path) if ".partial-" in n]
    redone = tokenize_corpus(small["corpus"], small["tokenizer"], prefix)
    assert not redone.reused and len(IndexedDataset(prefix, mmap=True)) == 60


def test_malformed_jsonl_names_file_and_line(small, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    cases = [
        ('{"text": "fine"}\n\n{"text": oops}\n', r"bad\.jsonl:3: not valid JSON"),
        ('{"text": "fine"}\n["text"]\n', r"bad\.jsonl:2: expected an object with a string 'text' field"),
        ('{"text": "fine"}\n{"text": "ok"}\n{"body": "no text"}\n', r"bad\.jsonl:3: expected an object"),
        ('{"text": 7}\n', r"bad\.jsonl:1: expected an object"),
    ]
    for content, pattern in cases:
        bad.write_text(content)
        with pytest.raises(ValueError, match=pattern):
            tokenize_corpus(str(bad), small["tokenizer"], str(tmp_path / "out" / "bad"))
        assert prepare.main(["--corpus", str(bad), "--tokenizer", small["tokenizer"],
                             "--out", str(tmp_path / "out" / "bad")]) == 1
        err = capsys.readouterr().err
        assert str(bad) in err and ":" + pattern.split(":")[1] + ":" in err
    assert os.listdir(tmp_path / "out") == []
    bad.write_text("")
    with pytest.raises(ValueError, match="holds no documents"):
        tokenize_corpus(str(bad), small["tokenizer"], str(tmp_path / "out" / "bad"))


def test_prepare_cli(small, tmp_path, capsys):
    out = str(tmp_path / "bundle")
    argv = ["--corpus", small["corpus"], "--tokenizer", small["tokenizer"], "--out", out]
    assert prepare.main(argv) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "60 documents" in line and f"{small['result'].tokens} tokens" in line
    assert "written" in line and IndexedDataset.exists(out)
    assert prepare.main(argv) == 0 and "up to date" in capsys.readouterr().out
    assert prepare.main(["--corpus", str(tmp_path / "missing.jsonl"), "--out", out]) == 1
    assert "missing.jsonl" in capsys.readouterr().err
    assert prepare.main(["--corpus", small["corpus"], "--tokenizer", str(tmp_path / "no.json"), "--out", out]) == 1
    assert "no.json" in capsys.readouterr().err
    # without --out: the content-named cache that the trainer reads
    assert prepare.main(["--corpus", small["corpus"], "--tokenizer", small["tokenizer"],
                         "--cache-dir", str(tmp_path / "cache")]) == 0
    assert len(_pairs(tmp_path / "cache")) == 1


# ---------------------------------------------------------------------------------- packing

def test_samples_reproduce_the_document_stream(small):
    ds = PackedSequenceDataset(small["prefix"], T, split="train", val_fraction=0.1, seed=3)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        stream = _expected_stream(small, ds)
        assert sorted(ds.document_order.tolist()) == ds.doc_ids.tolist()
        assert len(ds) == ds.samples_per_epoch == (len(stream) - 1) // T > 10
        tokens = torch.cat([ds[i]["tokens"] for i in range(len(ds))]).numpy()
        labels = torch.cat([ds[i]["labels"] for i in range(len(ds))]).numpy()
        assert (tokens == stream[: len(ds) * T]).all()
        assert (labels == stream[1 : len(ds) * T + 1]).all()
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_sample_fields_and_labels_shifted_by_one(small):
    ds = PackedSequenceDataset(small["prefix"], T, split="train", val_fraction=0.1, seed=3)
    eos = small["eos"]
    for i in range(len(ds)):
        s = ds[i]
        assert s["tokens"].dtype == s["labels"].dtype == torch.int64 and s["tokens"].shape == (T,)
        assert s["loss_mask"].dtype == torch.float32 and bool((s["loss_mask"] == 1).all())
        assert torch.equal(s["labels"][:-1], s["tokens"][1:])
        if i + 1 < len(ds):
            assert s["labels"][-1] == ds[i + 1]["tokens"][0]
        starts = [0] + [j + 1 for j in range(T - 1) if s["tokens"][j] == eos]
        assert s["doc_starts"] == starts
        assert sum(s["doc_lens"]) == T and all(n > 0 for n in s["doc_lens"])
        assert np.cumsum([0] + s["doc_lens"][:-1]).tolist() == starts


def _independent_cu_seqlens(tokens: torch.Tensor, eos: int) -> list[int]:
    """Starts of documents in the flattened batch: each sample start, and after each EOS."""
    b, t = tokens.shape
    flat = tokens.reshape(-1).tolist()
    starts = {k * t for k in range(b)} | {p + 1 for p, x in enumerate(flat) if x == eos and p + 1 < b * t}
    return sorted(starts) + [b * t]


def test_collate_cu_seqlens_match_eos_positions_and_sample_boundaries(small):
    ds = PackedSequenceDataset(small["prefix"], T, split="train", val_fraction=0.1, seed=3)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_packed, drop_last=True)
    n_docs_seen = 0
    for batch in loader:
        b = batch["tokens"].shape[0]
        assert batch["tokens"].shape == batch["labels"].shape == batch["loss_mask"].shape == (b, T)
        assert batch["loss_mask"].dtype == torch.float32
        cu = batch["cu_seqlens"]
        assert cu.dtype == torch.int32 and cu.dim() == 1
        assert cu.tolist() == _independent_cu_seqlens(batch["tokens"], small["eos"])
        assert batch["max_seqlen"] == int((cu[1:] - cu[:-1]).max()) and isinstance(batch["max_seqlen"], int)
        n_docs_seen += len(cu) - 1 - b
    assert n_docs_seen > 20  # the corpus does put many boundaries inside samples
    samples = [ds[i] for i in range(3)]
    off = collate_packed(samples, document_boundaries=False)
    assert off["cu_seqlens"].tolist() == [0, T, 2 * T, 3 * T] and off["max_seqlen"] == T
    assert torch.equal(off["tokens"], collate_packed(samples)["tokens"])


def test_indexing_is_deterministic_for_a_seed(small):
    def all_tokens(ds):
        return torch.stack([ds[i]["tokens"] for i in range(len(ds))])

    a = PackedSequenceDataset(small["prefix"], T, split="train", val_fraction=0.1, seed=5)
    b = PackedSequenceDataset(small["prefix"], T, split="train", val_fraction=0.1, seed=5)
    c = PackedSequenceDataset(small["prefix"], T, split="train", val_fraction=0.1, seed=6)
    assert torch.equal(all_tokens(a), all_tokens(b))
    assert [a[i]["doc_starts"] for i in range(len(a))] == [b[i]["doc_starts"] for i in range(len(b))]
    assert not torch.equal(all_tokens(a)[:10], all_tokens(c)[:10])
    epoch0 = all_tokens(a)
    a.set_epoch(1)
    assert not torch.equal(all_tokens(a)[:10], epoch0[:10])
    b.set_epoch(1)
    assert torch.equal(all_tokens(a), all_tokens(b))
    a.set_epoch(0)
    assert torch.equal(all_tokens(a), epoch0)
    # the validation split keeps one order whatever the epoch
    v = PackedSequenceDataset(small["prefix"], T, split="val", val_fraction=0.2, seed=5)
    first = all_tokens(v)
    v.set_epoch(3)
    assert torch.equal(all_tokens(v), first)


def test_train_and_val_are_disjoint_by_document(small):
    train = PackedSequenceDataset(small["prefix"], T, split="train", val_fraction=0.2, seed=7)
    val = PackedSequenceDataset(small["prefix"], T, split="val", val_fraction=0.2, seed=7)
    tr, va = set(train.doc_ids.tolist()), set(val.doc_ids.tolist())
    assert not tr & va and tr | va == set(range(60)) and len(va) == 12
    # the validation samples are cut from the validation documents only
    stream = _expected_stream(small, val)
    got = torch.cat([val[i]["tokens"] for i in range(len(val))]).numpy()
    assert len(val) > 0 and (got == stream[: len(got)]).all()
    other = PackedSequenceDataset(small["prefix"], T, split="val", val_fraction=0.2, seed=8)
    assert set(other.doc_ids.tolist()) != va
    with pytest.raises(ValueError, match="split"):
        PackedSequenceDataset(small["prefix"], T, split="test")
