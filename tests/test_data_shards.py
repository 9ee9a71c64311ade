"""Sharded token streams: preprocessing into shards (formats, workers, restarts, interruptions),
the loader over a weighted blend (round trip, proportions, resume, DP-size changes) and each bad
input failing with a message that names the file. CPU only, small corpora built here.
"""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from deltatron.data import preprocess as cli
from deltatron.data.config import DataConfig
from deltatron.data.loader import CorpusData
from deltatron.data.packed import PackedSequenceDataset, TokenDataset
from deltatron.data.preprocess import PreprocessConfig, preprocess
from deltatron.data.shards import MANIFEST, ShardWriter
from deltatron.data.tokenizer import eos_id, train_tokenizer

T = 16  # sequence length of these tests
VOCAB = 1000  # model.vocab_size given to the loader


def _write_jsonl(path, texts, field="text"):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({field: t}, ensure_ascii=False) + "\n")
    return str(path)


def _texts(n, seed, words="alpha beta gamma delta epsilon zeta eta theta iota kappa"):
    rng = np.random.default_rng(seed)
    vocab = words.split()
    return [" ".join(rng.choice(vocab, size=int(rng.integers(1, 30)))) for _ in range(n)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Two corpora with disjoint words (so a sample shows which one it came from) and one tokenizer."""
    d = tmp_path_factory.mktemp("shards")
    a = _texts(120, 1)
    b = _texts(80, 2, words="red green blue cyan magenta yellow black white")
    train_tokenizer(iter(a + b), 400, str(d / "tok.json"))
    corpus_a = _write_jsonl(d / "a.jsonl", a)
    corpus_b = _write_jsonl(d / "b.jsonl.gz", b)
    ds_a = _run(d / "ds_a", [corpus_a], d / "tok.json", max_shard_tokens=300).directory
    ds_b = _run(d / "ds_b", [corpus_b], d / "tok.json", max_shard_tokens=300).directory
    return {"dir": d, "a": a, "b": b, "tok": str(d / "tok.json"), "corpus_a": corpus_a,
            "corpus_b": corpus_b, "ds_a": ds_a, "ds_b": ds_b}


def _run(out, inputs, tokenizer, **kw):
    kw.setdefault("progress", False)
    return preprocess(PreprocessConfig(inputs=[str(i) for i in inputs], tokenizer=str(tokenizer), out=str(out), **kw))


def _data(env, blend, dp_rank=0, dp_size=1, mbs=2, **kw):
    cfg = DataConfig(blend=blend, tokenizer=env["tok"], seq_length=T, val_fraction=0.1, seed=3, **kw)
    return CorpusData(cfg, mbs, dp_rank, dp_size, VOCAB)


def _rows(batches):
    """Each sample of some batches as a tuple of its T + 1 tokens."""
    out = []
    for b in batches:
        full = np.concatenate([b["tokens"].numpy(), b["labels"].numpy()[:, -1:]], axis=1)
        out += [tuple(r) for r in full.tolist()]
    return out


def _take(it, n):
    return [next(it) for _ in range(n)]


def _files(directory):
    return sorted(os.listdir(directory))


# ------------------------------------------------------------------------------- preprocessing

def test_shards_are_bounded_and_described_by_the_manifest(env):
    m = TokenDataset(env["ds_a"]).manifest
    assert len(m.shards) > 3 and m.documents == 120 and m.settings.dtype == "uint16"
    # bounded: only a shard's first document may take it past the limit
    for s in m.shards:
        assert s.tokens <= 300 or s.documents == 1
    assert sum(s.documents for s in m.shards) == m.documents and sum(s.tokens for s in m.shards) == m.tokens
    assert [s.first_record for s in m.shards] == list(np.cumsum([0] + [s.documents for s in m.shards[:-1]]))
    with open(os.path.join(env["ds_a"], MANIFEST)) as f:
        raw = json.load(f)
    assert raw["settings"]["tokenizer_sha256"] == m.settings.tokenizer_sha256 and len(raw["shards"][0]["bin_sha256"]) == 64


def test_round_trip_text_to_shards_to_batches(env):
    """Every training sample of an epoch, read through the loader, is the epoch's document stream
    rebuilt from the texts with the tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(env["tok"])
    tok.encode_special_tokens = True
    eos = eos_id(tok)
    data = _data(env, [[1.0, env["ds_a"]]], mbs=4)
    train = data.train[0]
    stream = np.array([i for d in train.document_order for i in tok.encode(env["a"][d]).ids + [eos]])
    n = len(train) // 4
    rows = np.array(_rows(_take(data.train_batches(), n)))
    assert rows.shape == (4 * n, T + 1)
    for k, row in enumerate(rows):
        assert (row == stream[k * T : k * T + T + 1]).all()


def test_workers_and_formats_give_the_same_shards(env, tmp_path):
    """--workers 2 writes the same bytes as one process; jsonl.gz, txt lines/paragraphs/files."""
    one = _run(tmp_path / "one", [env["corpus_a"]], env["tok"], max_shard_tokens=300)
    two = _run(tmp_path / "two", [env["corpus_a"]], env["tok"], max_shard_tokens=300, workers=2, batch_size=16)
    assert [s.bin_sha256 for s in one.manifest.shards] == [s.bin_sha256 for s in two.manifest.shards]
    assert [s.idx_sha256 for s in one.manifest.shards] == [s.idx_sha256 for s in two.manifest.shards]

    texts = env["a"][:6]
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "lines.txt").write_text("\n".join(texts) + "\n\n")
    (tmp_path / "txt" / "paras.txt").write_text("\n\n".join(texts[:3]) + "\n")
    for unit, docs in (("line", 6 + 3), ("paragraph", 1 + 3), ("file", 2)):
        m = _run(tmp_path / f"txt-{unit}", [tmp_path / "txt"], env["tok"], text_unit=unit).manifest
        assert m.documents == docs, unit
    # a custom field, and a jsonl.gz the same as its jsonl
    _write_jsonl(tmp_path / "c.jsonl.gz", texts, field="body")
    gz = TokenDataset(_run(tmp_path / "gz", [tmp_path / "c.jsonl.gz"], env["tok"], field="body").directory)
    _write_jsonl(tmp_path / "c.jsonl", texts)
    plain = TokenDataset(_run(tmp_path / "plain", [tmp_path / "c.jsonl"], env["tok"]).directory)
    assert all((gz.document(i) == plain.document(i)).all() for i in range(6))


def test_tokenizer_directory_with_its_eos_token(env, tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "tokenizer.json").write_bytes(open(env["tok"], "rb").read())
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|pad|>"}))
    m = _run(tmp_path / "out", [env["corpus_a"]], d).manifest
    assert m.settings.eos_id == 1 and m.tokenizer.endswith("tokenizer.json")
    assert TokenDataset(str(tmp_path / "out")).document(0)[-1] == 1


def test_parquet_input(env, tmp_path):
    """Without pyarrow (not a dependency): a clear error. With it: the same shards as jsonl."""
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        (tmp_path / "x.parquet").write_bytes(b"PAR1")
        with pytest.raises(ValueError, match=r"x\.parquet: reading parquet needs pyarrow.*pip install pyarrow"):
            _run(tmp_path / "out", [tmp_path / "x.parquet"], env["tok"])
        return
    pq.write_table(pyarrow.table({"id": list(range(120)), "body": env["a"]}), tmp_path / "a.parquet", row_group_size=50)
    got = _run(tmp_path / "pq", [tmp_path / "a.parquet"], env["tok"], field="body", max_shard_tokens=300, batch_size=16)
    assert [s.bin_sha256 for s in got.manifest.shards] == [s.bin_sha256 for s in TokenDataset(env["ds_a"]).manifest.shards]
    with pytest.raises(ValueError, match=r"a\.parquet: no column 'text' \(columns: id, body\)"):
        _run(tmp_path / "pq2", [tmp_path / "a.parquet"], env["tok"])


def test_restart_skips_finished_shards_and_refuses_other_settings(env, tmp_path):
    out = tmp_path / "ds"
    first = _run(out, [env["corpus_a"]], env["tok"], max_shard_tokens=300)
    mtimes = {n: os.stat(out / n).st_mtime_ns for n in _files(out)}
    again = _run(out, [env["corpus_a"]], env["tok"], max_shard_tokens=300)
    assert again.up_to_date and again.reused == len(first.manifest.shards)
    assert {n: os.stat(out / n).st_mtime_ns for n in _files(out)} == mtimes
    with pytest.raises(ValueError, match=r"shard-00000-00000\.json was made with other settings.*max_shard_tokens.*--overwrite"):
        _run(out, [env["corpus_a"]], env["tok"], max_shard_tokens=500)
    redone = _run(out, [env["corpus_a"]], env["tok"], max_shard_tokens=500, overwrite=True)
    assert redone.written == len(redone.manifest.shards) < len(first.manifest.shards)
    assert len([n for n in _files(out) if n.endswith(".bin")]) == len(redone.manifest.shards)  # no stale shards


def _complete_looking(directory):
    names = _files(directory)
    return sorted(n[:-4] for n in names if n.endswith(".bin") and n[:-4] + ".idx" in names)


def test_interrupted_preprocess_leaves_no_complete_looking_shard(env, tmp_path, monkeypatch):
    reference = _run(tmp_path / "ref", [env["corpus_a"]], env["tok"], max_shard_tokens=300).manifest
    out = tmp_path / "ds"
    real_add, calls = ShardWriter.add, []

    def add_then_crash(self, ids):
        calls.append(1)
        if len(calls) == 50:  # a few shards in, in the middle of one
            raise KeyboardInterrupt
        real_add(self, ids)

    monkeypatch.setattr(ShardWriter, "add", add_then_crash)
    with pytest.raises(KeyboardInterrupt):
        _run(out, [env["corpus_a"]], env["tok"], max_shard_tokens=300)
    monkeypatch.undo()
    names = _files(out)
    assert MANIFEST not in names and not [n for n in names if ".partial-" in n]
    pairs = _complete_looking(out)
    assert 0 < len(pairs) < len(reference.shards)
    assert all(p + ".json" in names for p in pairs)  # every pair is a finished shard with its record
    with pytest.raises(FileNotFoundError, match="not a finished preprocessed dataset"):
        TokenDataset(str(out))

    # killed between renaming the new .bin and the .idx: no pair; and a SIGKILLed run's temp file
    real_replace = os.replace

    def replace_then_die(src, dst):
        real_replace(src, dst)
        if dst.endswith(".json") and "shard-" in dst:
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(out, [env["corpus_a"]], env["tok"], max_shard_tokens=300)
    monkeypatch.undo()
    assert _complete_looking(out) == pairs  # the shard being committed has no .idx
    (out / "shard-00000-00099.bin.partial-999999999").write_bytes(b"x")  # pid that cannot exist

    resumed = _run(out, [env["corpus_a"]], env["tok"], max_shard_tokens=300)
    assert resumed.reused == len(pairs) and resumed.written == len(reference.shards) - len(pairs)
    assert [s.bin_sha256 for s in resumed.manifest.shards] == [s.bin_sha256 for s in reference.shards]
    assert not [n for n in _files(out) if ".partial-" in n]


def test_cli_writes_verifies_and_reports_errors(env, tmp_path, capsys):
    out = str(tmp_path / "ds")
    argv = [env["corpus_a"], env["corpus_b"], "--tokenizer", env["tok"], "--out", out, "--no-progress",
            "--max-shard-tokens", "1000"]
    assert cli.main(argv) == 0
    line = capsys.readouterr().out.strip()
    assert "2 inputs: 200 documents" in line and "written" in line
    assert cli.main(argv) == 0 and "up to date" in capsys.readouterr().out
    assert cli.main(["--verify", out]) == 0 and "all match" in capsys.readouterr().out
    m = TokenDataset(out).manifest
    assert sorted({s.input for s in m.shards}) == [0, 1]  # a shard never spans two inputs
    assert cli.main([str(tmp_path / "missing.jsonl"), "--out", out]) == 1
    assert "missing.jsonl" in capsys.readouterr().err
    assert cli.main([env["corpus_a"], "--tokenizer", str(tmp_path / "no.json"), "--out", out]) == 1
    assert "no.json" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- loader

def test_blend_proportions(env):
    data = _data(env, [[0.7, env["ds_a"]], [0.3, env["ds_b"]]])
    which, _ = data.schedule.locate(np.arange(20000))
    assert abs(np.mean(which == 0) - 0.7) < 0.005
    for n in (10, 100, 1000):  # every prefix is within a sample of the weights
        assert abs(int((which[:n] == 0).sum()) - 0.7 * n) <= 1
    # the samples really come from the dataset the schedule names: b's words never appear in a's
    a_ids = set(np.concatenate([data.train[0].data.document(d) for d in range(120)]).tolist())
    b_only = set(np.concatenate([data.train[1].data.document(d) for d in range(80)]).tolist()) - a_ids
    batches = _take(data.train_batches(), 200)
    from_b = [bool(set(r) & b_only) for r in _rows(batches)]
    assert from_b == [bool(j) for j in which[:400]]
    three = _data(env, [[5, env["ds_a"]], [3, env["ds_b"]], [2, env["ds_a"] + "/"]])
    which, _ = three.schedule.locate(np.arange(10000))
    assert np.allclose(np.bincount(which) / 10000, [0.5, 0.3, 0.2], atol=0.005)


def test_deterministic_for_a_seed(env):
    blend = [[0.6, env["ds_a"]], [0.4, env["ds_b"]]]
    a = _rows(_take(_data(env, blend).train_batches(), 30))
    assert a == _rows(_take(_data(env, blend).train_batches(), 30))
    other = DataConfig(blend=blend, tokenizer=env["tok"], seq_length=T, val_fraction=0.1, seed=4)
    assert a != _rows(_take(CorpusData(other, 2, 0, 1, VOCAB).train_batches(), 30))


def test_resume_mid_epoch_gives_the_identical_next_batches(env):
    blend = [[0.6, env["ds_a"]], [0.4, env["ds_b"]]]
    for dp_size in (1, 2):
        runs = [_data(env, blend, dp_rank=r, dp_size=dp_size) for r in range(dp_size)]
        iters = [r.train_batches() for r in runs]
        for it in iters:
            _take(it, 90)  # into a later epoch of both datasets, mid-epoch (105 and 67 samples each)
        states = [r.state_dict() for r in runs]
        assert all(s == states[0] for s in states)  # one global cursor, the same on every rank
        expected = [_take(it, 10) for it in iters]
        for rank in range(dp_size):
            resumed = _data(env, blend, dp_rank=rank, dp_size=dp_size)
            resumed.load_state_dict(json.loads(json.dumps(states[0])))  # survives serialisation
            got = _take(resumed.train_batches(), 10)
            for g, e in zip(got, expected[rank]):
                for key in ("tokens", "labels", "loss_mask", "cu_seqlens"):
                    assert (g[key] == e[key]).all()
                assert g["max_seqlen"] == e["max_seqlen"]


def test_dp_size_change_on_resume_keeps_coverage_without_duplicates(env):
    blend = [[0.6, env["ds_a"]], [0.4, env["ds_b"]]]
    reference = _rows(_take(_data(env, blend, mbs=1).train_batches(), 2 * 2 * 23 + 3 * 2 * 17))
    before = [_data(env, blend, dp_rank=r, dp_size=2) for r in range(2)]
    seen = []
    for run in before:
        seen += _rows(_take(run.train_batches(), 23))
    state = before[0].state_dict()
    assert state["consumed_samples"] == 2 * 2 * 23
    for r in range(3):
        after = _data(env, blend, dp_rank=r, dp_size=3)
        after.load_state_dict(state)
        seen += _rows(_take(after.train_batches(), 17))
    assert sorted(seen) == sorted(reference)
    # and a different micro-batch size resumes at the same sample too
    smaller = _data(env, blend, mbs=1)
    smaller.load_state_dict(state)
    assert _rows(_take(smaller.train_batches(), 1)) == reference[2 * 2 * 23 : 2 * 2 * 23 + 1]


def test_validation_is_held_out_by_document_and_fixed(env):
    data = _data(env, [[0.5, env["ds_a"]], [0.5, env["ds_b"]]], dp_size=2)
    for train, val in zip(data.train, data.val):
        assert not set(train.doc_ids.tolist()) & set(val.doc_ids.tolist())
        assert len(val.doc_ids) == round(0.1 * len(train.data))
    a, b = data.val_batches(3), data.val_batches(3)
    assert all((x["tokens"] == y["tokens"]).all() for x, y in zip(a, b))
    other_rank = _data(env, [[0.5, env["ds_a"]], [0.5, env["ds_b"]]], dp_rank=1, dp_size=2).val_batches(3)
    assert _rows(a) != _rows(other_rank)
    # resuming needs the same stream
    state = data.state_dict()
    with pytest.raises(ValueError, match="cannot resume the data stream"):
        _data(env, [[0.7, env["ds_a"]], [0.3, env["ds_b"]]]).load_state_dict(state)


def test_document_boundaries_switch(env):
    on = next(_data(env, [[1, env["ds_a"]]], mbs=3).train_batches())
    off = next(_data(env, [[1, env["ds_a"]]], mbs=3, document_boundaries=False).train_batches())
    assert (on["tokens"] == off["tokens"]).all()
    assert off["cu_seqlens"].tolist() == [0, T, 2 * T, 3 * T] and len(on["cu_seqlens"]) > 4


# ---------------------------------------------------------------------------------- bad input

@pytest.fixture
def copy_a(env, tmp_path):
    """A private copy of dataset a, to damage."""
    import shutil

    dst = tmp_path / "a"
    shutil.copytree(env["ds_a"], dst)
    return str(dst)


def test_missing_shard_fails_naming_it(env, copy_a):
    os.remove(os.path.join(copy_a, "shard-00000-00001.bin"))
    with pytest.raises(FileNotFoundError, match=r"shard-00000-00001\.bin is missing"):
        _data(env, [[1, copy_a]])


def test_truncated_shard_fails_naming_it(env, copy_a):
    path = os.path.join(copy_a, "shard-00000-00002.bin")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 2)
    with pytest.raises(ValueError, match=r"shard-00000-00002\.bin is \d+ bytes but the manifest says \d+ \(truncated\)"):
        _data(env, [[1, copy_a]])


def _flip_byte(path, at=20):
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_checksum_mismatch_fails_naming_the_shard(env, copy_a):
    _flip_byte(os.path.join(copy_a, "shard-00000-00000.idx"), at=40)
    with pytest.raises(ValueError, match=r"shard-00000-00000\.idx does not match its sha256"):
        _data(env, [[1, copy_a]])  # .idx checksums are checked on every open
    bin_path = os.path.join(copy_a, "shard-00000-00001.bin")
    _flip_byte(os.path.join(copy_a, "shard-00000-00000.idx"), at=40)  # repaired
    _flip_byte(bin_path)
    _data(env, [[1, copy_a]])  # the default check does not read the .bin (cheap)
    with pytest.raises(ValueError, match=r"shard-00000-00001\.bin does not match its sha256"):
        _data(env, [[1, copy_a]], verify="full")
    assert cli.main(["--verify", copy_a]) == 1


def test_tokenizer_hash_mismatch_fails_naming_the_manifest(env, tmp_path):
    other = tmp_path / "other.json"
    train_tokenizer(iter(env["a"]), 300, str(other))
    cfg = DataConfig(blend=[[1, env["ds_a"]]], tokenizer=str(other), seq_length=T)
    with pytest.raises(ValueError, match=r"ds_a/manifest\.json was made with tokenizer sha256 .*other\.json"):
        CorpusData(cfg, 2, 0, 1, VOCAB)


def test_empty_dataset_fails_naming_it(env, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl\) hold no documents"):
        _run(tmp_path / "out", [empty], env["tok"])
    assert not os.path.exists(tmp_path / "out" / MANIFEST)
    with pytest.raises(FileNotFoundError, match=r"out/manifest\.json not found"):
        _data(env, [[1, str(tmp_path / "out")]])
    with pytest.raises(FileNotFoundError, match=r"dataset '.*nowhere' not found"):
        _data(env, [[1, str(tmp_path / "nowhere")]])
    tiny = _write_jsonl(tmp_path / "tiny.jsonl", ["alpha"] * 5)  # fewer tokens than a sequence
    _run(tmp_path / "tiny", [tiny], env["tok"])
    with pytest.raises(ValueError, match=r"the train split of .*tiny holds \d+ tokens, fewer than one sequence"):
        _data(env, [[1, str(tmp_path / "tiny")]])


@pytest.mark.parametrize("weight", [0, -0.5])
def test_blend_weight_must_be_positive(env, weight):
    with pytest.raises(ValueError, match=f"data.blend weight {weight} of .*ds_b must be > 0"):
        DataConfig(blend=[[0.5, env["ds_a"]], [weight, env["ds_b"]]])
    with pytest.raises(ValueError, match="must be a pair"):
        DataConfig(blend=[[0.5, env["ds_a"], 3]])
