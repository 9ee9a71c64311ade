"""What every benchmark needs: the run config from Hydra overrides, CUDA-synchronised timing and
the record of the machine, versions and date that goes into each results file."""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def compose(overrides: list[str]):
    """(RunConfig, resolved dict) from conf/ and Hydra overrides, as `python -m deltatron.train`
    would build them."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from deltatron.train.__main__ import conf_dir, to_run_config
    from deltatron.train.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        return to_run_config(hydra_compose(config_name="config", overrides=overrides))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def device_tag(name: str) -> str:
    """Short tag for result file names: "NVIDIA H200" -> "h200", "cpu" -> "cpu"."""
    return name.split()[1].lower() if name.startswith("NVIDIA ") else name.split()[0].lower()


def environment() -> dict:
    """Machine, versions and date for a results file. Versions are the installed distributions'
    (megatron.core.__version__ appends the git hash of the working directory)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("torch", "triton", "megatron-core", "fla-core", "flash-linear-attention"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "absent"
    if torch.cuda.is_available() and torch.cuda.nccl.is_available([torch.zeros(1, device="cuda")]):
        versions["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return {
        "device": device_name(),
        "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "versions": versions,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


class ResultsFile:
    """A benchmark's results JSON, rewritten after every part so that a run cut short keeps what it
    measured. With `update`, the parts an earlier run wrote to the file stay unless measured
    again; each part carries the date it was measured ("<part>_date")."""

    def __init__(self, path: str, record: dict, update: bool = False):
        import json

        self.path = path
        self.record = record
        if update and os.path.exists(path):
            with open(path) as f:
                earlier = json.load(f)
            if earlier.get("device") != record.get("device"):
                raise SystemExit(f"--update: {path} holds results measured on {earlier.get('device')}, "
                                 f"this run is on {record.get('device')}; write to another --out")
            self.record = {**earlier, **record}

    def save(self, part: str) -> None:
        import json

        self.record[f"{part}_date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "w") as f:
            json.dump(self.record, f, indent=2)


def timed_steps(trainer, steps: int) -> tuple[list[dict], list[float]]:
    """Train `steps` optimizer steps on the trainer's own batches; each step's train_step output
    and its CUDA-synchronised wall time in seconds."""
    import time

    it = trainer.data.train_batches()
    outs, seconds = [], []
    for _ in range(steps):
        batches = [next(it) for _ in range(trainer.num_microbatches)]
        sync()
        start = time.perf_counter()
        outs.append(trainer.train_step(batches))
        sync()
        seconds.append(time.perf_counter() - start)
    return outs, seconds


def fit_losses(overrides: list[str], steps: int) -> dict:
    """Train `steps` steps with Trainer.fit (validation at a third, two thirds and the end); the
    train and validation loss histories."""
    from deltatron.train.trainer import Trainer

    cfg, resolved = compose([*overrides, f"train.steps={steps}", f"train.eval_interval={max(steps // 3, 1)}"])
    history = Trainer(cfg, resolved).fit()
    return {"losses": history["loss"], "val_losses": history["val_loss"]}


# Triton writes a kernel's autotuning result to <cache dir>/<key>/<kernel>.autotune.json when
# TRITON_CACHE_AUTOTUNING=1; the key covers the Triton version, the GPU, the kernel's source, the
# tuning key (shapes) and the candidate configs, so a result is only reused where it applies.
AUTOTUNE_SUFFIX = ".autotune.json"


def autotune_results(cache_dir: str) -> list[str]:
    """Paths, relative to cache_dir, of the autotuning results it holds (none if it is absent)."""
    found = []
    for root, _, files in os.walk(cache_dir):
        found += [os.path.relpath(os.path.join(root, f), cache_dir)
                  for f in files if f.endswith(AUTOTUNE_SUFFIX)]
    return sorted(found)


def copy_autotune_results(src: str, dst: str) -> int:
    """Copy the autotuning results of Triton cache src into cache dst (keeping their key folders,
    leaving the compiled kernels behind: those are rebuilt in seconds, the tuning took minutes).
    Returns how many were copied. fla's kernels autotune for 200-300 s on a fresh GPU machine; the
    benchmarks carry these files from one device call to the next (--autotune-cache) and say so in
    their results, since a reference's first step is then no longer a cold start."""
    results = autotune_results(src)
    for rel in results:
        os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        shutil.copy2(os.path.join(src, rel), os.path.join(dst, rel))
    return len(results)
