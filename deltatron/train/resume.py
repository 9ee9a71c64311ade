"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is one megatron-core dist_checkpointing directory, `<save_dir>/step_0000300`:
  sharded   the model's weights and the optimizer's state, laid out by parameter, so a checkpoint
            saved under one parallel layout loads under another (megatron-core's distributed
            optimizer in its "fully_reshardable" format)
  common    (written once, by rank 0) the step, tokens consumed, the LR scheduler, the data
            position, the model config it was made with and the world size
  per rank  the random generators (Python, NumPy, torch, CUDA, megatron-core's model-parallel
            tracker) and the data position of every rank (a sharded object indexed by rank);
            restored only when the world size is the same, reseeded from train.seed otherwise
It is written under `step_0000300.tmp` and renamed when every rank has finished
(checkpoint.save_sharded), so a directory named `step_*` without `.tmp` is always complete; the
newest of those is what `train.resume=auto` loads, and all but the newest `train.keep_last` are
removed after each save. With train.async_save the files are written by a background process
while training continues (CheckpointSaver).
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import shutil
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from torch.distributed.checkpoint.api import CheckpointException

from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.optimizer import MegatronOptimizer

from deltatron.train.checkpoint import check_complete, gather_params, model_sharded_state_dict, save_sharded, unwrap
from deltatron.train.optim import prepare_for_loading

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{7,})$")
# the distributed optimizer's state in parameter space: loadable under any layout
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
# model fields that do not change the weights' shapes or meaning
RUNTIME_MODEL_FIELDS = ("name", "kda_backend")


@dataclass
class Progress:
    """Where a run stands: optimizer steps taken and tokens trained on."""

    step: int = 0
    consumed_tokens: int = 0


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def list_checkpoints(save_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in save_dir as (step, path), oldest first."""
    if not os.path.isdir(save_dir):
        return []
    found = []
    for name in os.listdir(save_dir):
        match = CHECKPOINT_PATTERN.match(name)
        if match and os.path.isdir(os.path.join(save_dir, name)):
            found.append((int(match.group(1)), os.path.join(save_dir, name)))
    return sorted(found)


def latest_checkpoint(save_dir: str) -> Optional[str]:
    found = list_checkpoints(save_dir)
    return found[-1][1] if found else None


def resolve_resume(resume: str, save_dir: str) -> Optional[str]:
    """train.resume -> the checkpoint directory to load, or None to start fresh.

    "none": start fresh. "auto": the newest complete checkpoint in save_dir, if any. Anything
    else: a checkpoint directory (or a save directory, whose newest checkpoint is taken), which
    must exist.
    """
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(save_dir)
    if not os.path.isdir(resume):
        raise FileNotFoundError(
            f"train.resume={resume!r}: no such directory; give a checkpoint directory "
            f"(step_NNNNNNN), a save directory holding some, auto or none"
        )
    if CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(resume))):
        return os.path.abspath(resume)
    newest = latest_checkpoint(resume)
    if newest is None:
        raise FileNotFoundError(f"train.resume={resume!r} holds no complete checkpoint (step_NNNNNNN)")
    return newest


def _rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _architecture(model_config) -> dict:
    fields = dataclasses.asdict(model_config)
    return {k: v for k, v in fields.items() if k not in RUNTIME_MODEL_FIELDS}


def _optimizer_state(optimizer, model: dict, loading: bool) -> dict:
    if isinstance(optimizer, MegatronOptimizer):  # the distributed one needs its format named
        if loading:
            prepare_for_loading(optimizer)
        return optimizer.sharded_state_dict(model, is_loading=loading, metadata=OPTIMIZER_METADATA)
    return optimizer.sharded_state_dict(model, is_loading=loading)  # MuonClip: parameter space


def _state_dict(chunks, optimizer, scheduler, data, progress: Progress, model_config, loading: bool) -> dict:
    """The sharded state dict of a training checkpoint (see the module docstring)."""
    model = model_sharded_state_dict(chunks)
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = None if loading else {"rng": _rng_state(), "data": data.state_dict()}
    return {
        "model": model,
        "optimizer": _optimizer_state(optimizer, model, loading),
        "rank_state": ShardedObject("rank_state", per_rank, (world,), (rank,), replica_id=0),
        "progress": dataclasses.asdict(progress),
        "scheduler": scheduler.state_dict(),
        "model_config": _architecture(model_config),
        "world_size": world,
        # rank 0's data position, for a resume under another world size (the corpus loader's
        # position is one global cursor, the same on every rank)
        "data_rank0": None if loading else data.state_dict(),
    }


class CheckpointSaver:
    """Saves training checkpoints into save_dir and keeps the newest keep_last.

    With async_save the state is staged to host memory at the step boundary and written by a
    background process (megatron-core's AsyncCallsQueue), so training goes on while the file
    system works; the checkpoint becomes visible (renamed from .tmp) when `poll()` or `wait()`
    finds every rank's writer done. One save is in flight at a time: the next save waits for
    the previous one. Every method is collective (every rank calls it at the same step).
    """

    def __init__(self, save_dir: str, keep_last: int, async_save: bool = False):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.save_dir = os.path.abspath(save_dir)
        self.keep_last = keep_last
        self.queue = AsyncCallsQueue() if async_save else None
        self.latest: Optional[str] = None  # the newest complete checkpoint this saver wrote

    def save(self, chunks, optimizer, scheduler, data, progress: Progress, model_config) -> str:
        """Save the training state after `progress.step` steps: complete on return, or with
        async_save staged and being written. Returns the checkpoint's directory."""
        self.wait()
        gather_params(chunks)
        path = os.path.join(self.save_dir, checkpoint_name(progress.step))
        state = _state_dict(chunks, optimizer, scheduler, data, progress, model_config, False)
        save_sharded(state, path, self.queue, on_visible=lambda: self._visible(path))
        return path

    def poll(self) -> Optional[str]:
        """Publish a finished background save without waiting; returns its directory, if any."""
        return self._finalize(blocking=False)

    def wait(self) -> Optional[str]:
        """Finish and publish the save in flight; returns its directory, if there was one."""
        return self._finalize(blocking=True)

    def _finalize(self, blocking: bool) -> Optional[str]:
        if self.queue is None or not self.queue.get_num_unfinalized_calls():
            return None
        before = self.latest
        self.queue.maybe_finalize_async_calls(blocking=blocking)
        return self.latest if self.latest != before else None

    def _visible(self, path: str) -> None:
        self.latest = path
        if dist.get_rank() == 0:
            for _, old in list_checkpoints(self.save_dir)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()


def load_checkpoint(path: str, chunks, optimizer, scheduler, data, model_config) -> Progress:
    """Restore the state saved by CheckpointSaver.save into these (already built) components and
    return the progress it was saved at. Bad checkpoints stop with the reason and the fix."""
    check_complete(path)
    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except Exception as exc:  # a torn or foreign directory: say which, not a pickle traceback
        raise ValueError(
            f"checkpoint {path!r} is corrupt or not a deltatron training checkpoint: its common state "
            f"cannot be read ({type(exc).__name__}); remove it or resume from an older one (train.resume=<dir>)"
        ) from exc
    saved, ours = common.get("model_config"), _architecture(model_config)
    if saved != ours:
        diff = {k: (saved.get(k) if saved else None, ours.get(k)) for k in ours if not saved or saved.get(k) != ours.get(k)}
        raise ValueError(
            f"checkpoint {path!r} was made for another model: (saved, configured) differ in {diff}; "
            "resume with the model config it was saved with, or start a fresh run (train.resume=none)"
        )
    same_world = common["world_size"] == dist.get_world_size()
    template = _state_dict(chunks, optimizer, scheduler, data, Progress(), model_config, True)
    if not same_world:
        del template["rank_state"]  # its shape is the old world size; reseeded instead
    try:
        state = dist_checkpointing.load(template, path)
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(
            f"checkpoint {path!r} is corrupt or incomplete: loading it failed ({type(exc).__name__}: "
            f"{first_line}); remove it or resume from an older one (train.resume=<dir>)"
        ) from exc
    for i, chunk in enumerate(chunks):
        unwrap(chunk).load_state_dict(state["model"] if len(chunks) == 1 else state["model"][f"model{i}"], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    if hasattr(optimizer, "reload_model_params"):  # fp32/bf16 masters -> model parameters
        optimizer.reload_model_params()
    # megatron-core's load_state_dict steps the scheduler forward by the saved count, from
    # wherever it stands (build_scheduler already took the first step)
    scheduler.num_steps = 0
    scheduler.load_state_dict(state["scheduler"])
    if same_world:
        _set_rng_state(state["rank_state"]["rng"])
        data.load_state_dict(state["rank_state"]["data"])
    else:
        data.load_state_dict(common["data_rank0"])
    return Progress(**state["progress"])
