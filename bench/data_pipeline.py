"""Throughput of the data path on this machine: preprocessing (text -> shards) and loading
(shards -> collated micro-batches), in tokens per second.

    .venv/bin/python bench/data_pipeline.py [--copies 8] [--seconds 5] [--out bench/results/data_pipeline.json]

Preprocessing tokenizes `--copies` copies of the bundled corpus (one input file each) with the
bundled tokenizer, once with --workers 1 (the tokenizers library single-threaded: one process's
rate) and once with --workers equal to the number of cores; the reported rate is the faster.
Loading reads a 0.7/0.3 blend of two of the datasets through the trainer's interface
(CorpusData.train_batches) for `--seconds` per configuration, in this one process (no DataLoader
workers), and reports the slowest configuration as loader_tokens_per_sec_per_process. This is a
measurement, not a test: the numbers depend on the machine and on what else runs on it (the load
average at the start is recorded).
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CORPUS = os.path.join(REPO, "data/corpus/shakespeare.jsonl.gz")
TOKENIZER = os.path.join(REPO, "data/tokenizer/tokenizer.json")
LOADER_CONFIGS = [  # (seq_length, micro_batch_size): the tiny preset's, and a long-context one
    (256, 8),
    (4096, 2),
]


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        with open("/proc/meminfo") as f:
            mem_gb = int(f.readline().split()[1]) / 2**20
    except OSError:
        mem_gb = None
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem_gb, 1) if mem_gb else None,
        "os": platform.platform(), "load_average_at_start": list(os.getloadavg()),
    }


def versions() -> dict:
    from importlib.metadata import version

    try:
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    # installed distributions' versions (megatron.core.__version__ appends the git hash of the cwd)
    return {"python": platform.python_version(),
            **{name: version(name) for name in ("torch", "megatron-core", "tokenizers", "numpy")},
            "deltatron_commit": commit}


def bench_preprocess(work: str, copies: int, workers: int) -> dict:
    import deltatron.data.shards  # noqa: F401  (imports torch: not part of the timing)
    from deltatron.data.preprocess import PreprocessConfig, preprocess

    with gzip.open(CORPUS, "rb") as f:
        text = f.read()
    inputs = []
    for i in range(copies):
        path = os.path.join(work, f"corpus-{i}.jsonl")
        with open(path, "wb") as f:
            f.write(text)
        inputs.append(path)
    out = os.path.join(work, f"ds-w{workers}")
    start = time.perf_counter()
    result = preprocess(PreprocessConfig(inputs=inputs, tokenizer=TOKENIZER, out=out, workers=workers, progress=False))
    seconds = time.perf_counter() - start
    m = result.manifest
    return {"workers": workers, "inputs": copies, "input_bytes": len(text) * copies, "documents": m.documents,
            "tokens": m.tokens, "shards": len(m.shards), "seconds": round(seconds, 3),
            "tokens_per_sec": round(m.tokens / seconds), "directory": out}


def bench_loader(paths: list[str], seq_length: int, micro_batch_size: int, seconds: float) -> dict:
    from deltatron.data.config import DataConfig
    from deltatron.data.loader import CorpusData

    cfg = DataConfig(blend=[[0.7, paths[0]], [0.3, paths[1]]], tokenizer=TOKENIZER, seq_length=seq_length)
    data = CorpusData(cfg, micro_batch_size, dp_rank=0, dp_size=1, vocab_size=4096)
    batches = data.train_batches()
    next(batches)  # first epoch's order
    tokens, n, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = next(batches)
        tokens += batch["tokens"].numel()
        n += 1
    elapsed = time.perf_counter() - start
    return {"seq_length": seq_length, "micro_batch_size": micro_batch_size, "batches": n,
            "tokens": tokens, "seconds": round(elapsed, 3), "tokens_per_sec": round(tokens / elapsed)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--copies", type=int, default=8, help="copies of the bundled corpus to preprocess")
    p.add_argument("--seconds", type=float, default=5.0, help="loading time per configuration")
    p.add_argument("--out", default=os.path.join(REPO, "bench/results/data_pipeline.json"))
    args = p.parse_args()

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # --workers 1 is then one core's rate
    info = {"machine": machine(), "versions": versions(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    work = tempfile.mkdtemp(prefix="deltatron-bench-")
    try:
        prep = [bench_preprocess(work, args.copies, w) for w in sorted({1, os.cpu_count() or 1})]
        for r in prep:
            print(f"preprocess --workers {r['workers']}: {r['tokens']:,} tokens in {r['seconds']:.1f} s "
                  f"= {r['tokens_per_sec']:,} tokens/s")
        datasets = [prep[0]["directory"], prep[-1]["directory"]]
        load = [bench_loader(datasets, t, b, args.seconds) for t, b in LOADER_CONFIGS]
        for r in load:
            print(f"loader seq {r['seq_length']} x {r['micro_batch_size']}: {r['tokens_per_sec']:,} tokens/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for r in prep:
        del r["directory"]
    result = {
        "preprocess_tokens_per_sec": max(r["tokens_per_sec"] for r in prep),
        "loader_tokens_per_sec_per_process": min(r["tokens_per_sec"] for r in load),
        "loader_target_tokens_per_sec_per_process": 2_000_000,
        "preprocess": prep,
        "loader": load,
        **info,
        "load_average_at_end": list(os.getloadavg()),
        "command": "python bench/data_pipeline.py " + " ".join(sys.argv[1:]),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
