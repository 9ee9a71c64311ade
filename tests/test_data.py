"""The minimal data path: bundled corpus and tokenizer, preprocessing into shards (round trip,
malformed input), packing into fixed-length samples with document boundaries, collation into
cu_seqlens. Shards, blends, resuming and bad shards: test_data_shards.py.

Most tests use a small corpus built here (with a tokenizer trained on it); the bundled corpus and
tokenizer get their own tests.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from deltatron.data import preprocess as preprocess_cli
from deltatron.data.corpus import read_jsonl_texts
from deltatron.data.packed import PackedSequenceDataset, TokenDataset, collate_packed
from deltatron.data.preprocess import PreprocessConfig, preprocess
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


def _preprocess(corpus, tokenizer, out, **kw):
    return preprocess(PreprocessConfig(inputs=[str(corpus)], tokenizer=str(tokenizer), out=str(out),
                                       progress=False, **kw))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 60-document corpus, a tokenizer trained on it, and its preprocessed dataset."""
    d = tmp_path_factory.mktemp("small")
    texts = _small_texts()
    corpus = _write_jsonl(d / "small.jsonl", texts)
    tok = train_tokenizer(iter(texts), 300, str(d / "tokenizer.json"))
    result = _preprocess(corpus, d / "tokenizer.json", d / "dataset")
    return {"dir": d, "texts": texts, "corpus": corpus, "tok": tok, "eos": eos_id(tok),
            "tokenizer": str(d / "tokenizer.json"), "dataset": result.directory, "result": result}


def _encode(tok, text):
    """Document ids as preprocessing stores them (special-token text encoded as plain text)."""
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
    result = _preprocess(BUNDLED_CORPUS, BUNDLED_TOKENIZER, tmp_path / "bundled")
    m = result.manifest
    assert (m.documents, m.tokens, m.settings.vocab_size, m.settings.dtype) == (778, 1_596_759, 4096, "uint16")
    data = TokenDataset(result.directory)
    assert data.document(0).dtype == np.uint16 and data.document(0)[-1] == m.settings.eos_id
    train = PackedSequenceDataset(data, 256, split="train", val_fraction=0.02, seed=1234)
    val = PackedSequenceDataset(data, 256, split="val", val_fraction=0.02, seed=1234)
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


# ------------------------------------------------------------------------------ preprocessing

def test_preprocess_round_trip(small):
    result, tok, eos = small["result"], small["tok"], small["eos"]
    assert result.written == 1 and result.reused == 0 and result.manifest.documents == 60
    data = TokenDataset(small["dataset"])
    assert len(data) == 60 and data.document(0).dtype == np.uint16
    for i, text in enumerate(small["texts"]):
        ids = data.document(i).tolist()
        assert ids == _encode(tok, text) + [eos]
        assert tok.decode(ids[:-1]) == text
    assert data.document(5).tolist() == [eos]
    # EOS only ever ends a document, even where the text spells it out
    assert all(int((data.document(i) == eos).sum()) == 1 for i in range(60))
    assert result.manifest.tokens == int(data.doc_lengths.sum())


def test_malformed_jsonl_names_file_and_line(small, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    cases = [
        ('{"text": "fine"}\n\n{"text": oops}\n', r"bad\.jsonl:3: not valid JSON"),
        ('{"text": "fine"}\n["text"]\n', r"bad\.jsonl:2: expected an object with a string 'text' field"),
        ('{"text": "fine"}\n{"text": "ok"}\n{"body": "no text"}\n', r"bad\.jsonl:3: expected an object"),
        ('{"text": 7}\n', r"bad\.jsonl:1: expected an object"),
    ]
    out = tmp_path / "out"
    for content, pattern in cases:
        bad.write_text(content)
        with pytest.raises(ValueError, match=pattern):
            _preprocess(bad, small["tokenizer"], out)
        assert preprocess_cli.main([str(bad), "--tokenizer", small["tokenizer"], "--out", str(out),
                                    "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert str(bad) in err and ":" + pattern.split(":")[1] + ":" in err
    assert os.listdir(out) == []
    bad.write_text("")
    with pytest.raises(ValueError, match="hold no documents"):
        _preprocess(bad, small["tokenizer"], out)


# ---------------------------------------------------------------------------------- packing

def test_samples_reproduce_the_document_stream(small):
    ds = PackedSequenceDataset(small["dataset"], T, split="train", val_fraction=0.1, seed=3)
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
    ds = PackedSequenceDataset(small["dataset"], T, split="train", val_fraction=0.1, seed=3)
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
    ds = PackedSequenceDataset(small["dataset"], T, split="train", val_fraction=0.1, seed=3)
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

    a = PackedSequenceDataset(small["dataset"], T, split="train", val_fraction=0.1, seed=5)
    b = PackedSequenceDataset(small["dataset"], T, split="train", val_fraction=0.1, seed=5)
    c = PackedSequenceDataset(small["dataset"], T, split="train", val_fraction=0.1, seed=6)
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
    v = PackedSequenceDataset(small["dataset"], T, split="val", val_fraction=0.2, seed=5)
    first = all_tokens(v)
    v.set_epoch(3)
    assert torch.equal(all_tokens(v), first)


def test_train_and_val_are_disjoint_by_document(small):
    train = PackedSequenceDataset(small["dataset"], T, split="train", val_fraction=0.2, seed=7)
    val = PackedSequenceDataset(small["dataset"], T, split="val", val_fraction=0.2, seed=7)
    tr, va = set(train.doc_ids.tolist()), set(val.doc_ids.tolist())
    assert not tr & va and tr | va == set(range(60)) and len(va) == 12
    # the validation samples are cut from the validation documents only
    stream = _expected_stream(small, val)
    got = torch.cat([val[i]["tokens"] for i in range(len(val))]).numpy()
    assert len(val) > 0 and (got == stream[: len(got)]).all()
    other = PackedSequenceDataset(small["dataset"], T, split="val", val_fraction=0.2, seed=8)
    assert set(other.doc_ids.tolist()) != va
    with pytest.raises(ValueError, match="split"):
        PackedSequenceDataset(small["dataset"], T, split="test")
