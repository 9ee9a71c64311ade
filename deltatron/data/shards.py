"""The on-disk format of a tokenized dataset: a directory of shards and a manifest.

    <dir>/manifest.json                  what the dataset is (below); written last
    <dir>/shard-IIIII-SSSSS.bin / .idx   megatron-core mmap IndexedDataset pairs, shard S of input I
    <dir>/shard-IIIII-SSSSS.json         the shard's own record (restarts read it)

Each shard is a megatron-core IndexedDataset: one item (and one document) per corpus document,
the document's token ids followed by EOS. Token dtype is megatron-core's choice for the vocabulary
(`DType.optimal_dtype`): uint16 below 65500 tokens, else int32 (IndexedDataset has no uint32 code;
int32 holds any vocabulary below 2^31). A shard holds at most `max_shard_tokens` tokens unless a
single document is longer (documents are never split across shards).

manifest.json: format version, tokenizer (path and sha256 of its tokenizer.json), vocab size, EOS
id, dtype, how text was read (field, text unit), totals (documents, tokens), the inputs (path,
size, mtime) and, per shard in order: name, input, first record, documents, tokens, and size and
sha256 of both files.

Writing is atomic per shard (`ShardWriter`): the files are written as `*.partial-<pid>` (names that
end in neither .bin, .idx nor .json), then renamed: .bin, then the shard record, then .idx last. So
a .bin/.idx pair that looks complete always has its record, and a run killed at any moment leaves
at worst files that a restart recognises as unfinished and rewrites.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

FORMAT = "deltatron-token-shards"
VERSION = 1
MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """megatron-core's token dtype for a vocabulary (uint16 or int32)."""
    return np.dtype(DType.optimal_dtype(vocab_size))


def shard_name(input_index: int, seq: int) -> str:
    return f"shard-{input_index:05d}-{seq:05d}"


def sha256_file(path: str, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class ShardInfo:
    name: str
    input: int  # index into Manifest.inputs
    first_record: int  # record number (within the input) of the shard's first document
    documents: int
    tokens: int  # EOS included
    bin_bytes: int
    idx_bytes: int
    bin_sha256: str
    idx_sha256: str


@dataclass(frozen=True)
class InputInfo:
    path: str
    bytes: int
    mtime_ns: int

    @staticmethod
    def of(path: str) -> "InputInfo":
        st = os.stat(path)
        return InputInfo(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class Settings:
    """Everything besides the inputs that decides the shards' contents: shards made with other
    settings are never reused."""

    tokenizer_sha256: str
    eos_id: int
    vocab_size: int
    dtype: str
    field: str
    text_unit: str
    max_shard_tokens: int
    version: int = VERSION


@dataclass
class Manifest:
    settings: Settings
    tokenizer: str
    documents: int
    tokens: int
    inputs: list[InputInfo]
    shards: list[ShardInfo] = field(default_factory=list)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.settings.dtype)

    def to_json(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    @staticmethod
    def from_json(data: dict, where: str) -> "Manifest":
        try:
            if data.get("format") != FORMAT or data["settings"]["version"] != VERSION:
                raise ValueError(f"not a {FORMAT} v{VERSION} manifest")
            return Manifest(
                settings=Settings(**data["settings"]),
                tokenizer=data["tokenizer"],
                documents=int(data["documents"]),
                tokens=int(data["tokens"]),
                inputs=[InputInfo(**i) for i in data["inputs"]],
                shards=[ShardInfo(**s) for s in data["shards"]],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{where}: not a valid shard manifest ({exc})") from None


def write_json_atomic(path: str, data: dict) -> None:
    tmp = f"{path}.partial-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_manifest(directory: str) -> Manifest:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"dataset {directory!r} not found (make it with `python -m deltatron.data.preprocess`)"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: {directory!r} is not a finished preprocessed dataset "
            f"(run `python -m deltatron.data.preprocess ... --out {directory}` to finish it)"
        )
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    manifest = Manifest.from_json(data, path)
    if manifest.documents == 0 or not manifest.shards:
        raise ValueError(f"{path}: the dataset is empty (no documents)")
    return manifest


def verify_shard(directory: str, shard: ShardInfo, *, full: bool) -> None:
    """Check one shard's files against the manifest: both exist with the recorded sizes (a cheap
    truncation check) and the .idx has its sha256; with full=True the .bin's sha256 as well (it
    reads the whole shard)."""
    prefix = os.path.join(directory, shard.name)
    for ext, size in ((".bin", shard.bin_bytes), (".idx", shard.idx_bytes)):
        path = prefix + ext
        if not os.path.isfile(path):
            raise FileNotFoundError(f"shard file {path} is missing (listed in {directory}/{MANIFEST})")
        actual = os.path.getsize(path)
        if actual != size:
            raise ValueError(
                f"shard file {path} is {actual} bytes but the manifest says {size} "
                f"({'truncated' if actual < size else 'changed'})"
            )
    checks = [(".idx", shard.idx_sha256)] + ([(".bin", shard.bin_sha256)] if full else [])
    for ext, digest in checks:
        if sha256_file(prefix + ext) != digest:
            raise ValueError(f"shard file {prefix + ext} does not match its sha256 in the manifest (corrupted)")


class ShardWriter:
    """Writes one shard atomically (module docstring); use as a context manager so that an error
    or interrupt removes the temporary files."""

    def __init__(self, directory: str, name: str, dtype: np.dtype):
        self.directory, self.name, self.dtype = directory, name, np.dtype(dtype)
        self.prefix = os.path.join(directory, name)
        self.tmp = {ext: f"{self.prefix}{ext}.partial-{os.getpid()}" for ext in (".bin", ".idx", ".json")}
        self.documents = self.tokens = 0
        self._hash = hashlib.sha256()
        self._builder = IndexedDatasetBuilder(self.tmp[".bin"], dtype=self.dtype.type)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()

    def add(self, ids: np.ndarray) -> None:
        """Add one document (its ids, EOS included), already in the shard's dtype."""
        self._hash.update(ids.data)  # the exact bytes the builder writes, hashed as they go by
        self._builder.add_document(ids, [len(ids)])
        self.documents += 1
        self.tokens += len(ids)

    def commit(self, *, input_index: int, first_record: int, record: dict) -> ShardInfo:
        """Finish the shard and move it into place; `record` goes into its .json with the info."""
        self._builder.finalize(self.tmp[".idx"])
        info = ShardInfo(
            name=self.name, input=input_index, first_record=first_record,
            documents=self.documents, tokens=self.tokens,
            bin_bytes=os.path.getsize(self.tmp[".bin"]), idx_bytes=os.path.getsize(self.tmp[".idx"]),
            bin_sha256=self._hash.hexdigest(), idx_sha256=sha256_file(self.tmp[".idx"]),
        )
        with open(self.tmp[".json"], "w") as f:
            json.dump({**record, "shard": asdict(info)}, f, indent=1)
        # An older shard of this name goes first, its .idx before anything else, so that no moment
        # pairs a new .bin with an old .idx or leaves a pair without its record.
        for ext in (".idx", ".json", ".bin"):
            _remove_if_there(self.prefix + ext)
        for ext in (".bin", ".json", ".idx"):
            os.replace(self.tmp[ext], self.prefix + ext)
        return info

    def discard(self) -> None:
        if not self._builder.data_file.closed:
            self._builder.data_file.close()
        for path in self.tmp.values():
            if os.path.exists(path):
                os.remove(path)


def _remove_if_there(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:  # absent, or another process (a second rank) removed it just now
        pass


def read_shard_record(directory: str, name: str) -> dict | None:
    """A finished shard's record, or None when the shard is missing, unfinished or its files do
    not have the recorded sizes."""
    prefix = os.path.join(directory, name)
    try:
        with open(prefix + ".json") as f:
            record = json.load(f)
        info = ShardInfo(**record["shard"])
        if (os.path.getsize(prefix + ".bin"), os.path.getsize(prefix + ".idx")) != (info.bin_bytes, info.idx_bytes):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    record["shard"] = info
    return record


@dataclass
class Shard:
    """One opened shard: its tokens memory-mapped, and where each document starts in them."""

    name: str
    tokens: np.ndarray  # [shard tokens], the .bin mapped read-only
    doc_offsets: np.ndarray  # int64 [documents], token offset of each document
    doc_lengths: np.ndarray  # int32 [documents], EOS included

    @staticmethod
    def open(directory: str, info: ShardInfo, dtype: np.dtype) -> "Shard":
        prefix = os.path.join(directory, info.name)
        try:
            index = IndexedDataset(prefix, mmap=True)
        except (AssertionError, ValueError, OSError) as exc:
            raise ValueError(f"shard {prefix}.idx cannot be read by megatron-core ({exc})") from None
        if index.index.dtype != dtype.type or len(index) != info.documents:
            raise ValueError(
                f"shard {prefix}.idx holds {len(index)} {np.dtype(index.index.dtype).name} documents, "
                f"the manifest says {info.documents} {dtype.name}"
            )
        # copies: megatron-core closes the index's mmap when `index` is collected
        lengths = np.array(index.sequence_lengths, dtype=np.int32)
        offsets = index.index.sequence_pointers // dtype.itemsize
        tokens = np.memmap(prefix + ".bin", dtype=dtype, mode="r")
        if int(lengths.sum()) != info.tokens or len(tokens) != info.tokens:
            raise ValueError(f"shard {prefix}: index and data disagree with the manifest's {info.tokens} tokens")
        return Shard(info.name, tokens, offsets.astype(np.int64), lengths)


def settings_diff(a: Settings, b: Settings) -> list[str]:
    return [f"{f.name}: {getattr(a, f.name)!r} vs {getattr(b, f.name)!r}"
            for f in fields(Settings) if getattr(a, f.name) != getattr(b, f.name)]
