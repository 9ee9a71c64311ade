"""Model weights (and MuonClip's optimizer state) through megatron-core's dist_checkpointing.

A checkpoint saved under one parallel layout loads under any other: every rank saves and loads
only its shards, described by the model's `sharded_state_dict`, and dist_checkpointing maps them
onto the global tensors (TP slices, pipeline layer offsets, expert indices, fused GLU halves).
A directory becomes visible only when complete: it is written under a temporary name and renamed.
"""

from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The HybridModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def model_sharded_state_dict(chunks: list) -> dict:
    if len(chunks) == 1:
        return unwrap(chunks[0]).sharded_state_dict()
    return {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def gather_params(chunks: list) -> None:
    """Bring every replica's parameters up to date where megatron-core DDP leaves the all-gather of
    the owners' updates to the next forward (overlap_param_gather: until then non-owners hold the
    previous step's weights). Call before reading weights outside a training forward (saving,
    evaluation). Collective over the data-parallel groups; nothing to do otherwise."""
    for chunk in chunks:
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is not None and ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def save_model(chunks: list, checkpoint_dir: str) -> None:
    """Save the weights of all model chunks (collective: every rank calls it)."""
    gather_params(chunks)
    save_sharded(model_sharded_state_dict(chunks), checkpoint_dir)


def save_optimizer(chunks: list, optimizer, checkpoint_dir: str) -> None:
    """Save an optimizer's state laid out like the model's parameters (megatron-core's optimizer
    contract `sharded_state_dict(model_sharded_state_dict)`; checked for MuonClip), loadable under
    any layout by `load_optimizer`. Collective."""
    save_sharded(optimizer.sharded_state_dict(model_sharded_state_dict(chunks)), checkpoint_dir)


def load_optimizer(chunks: list, optimizer, checkpoint_dir: str) -> None:
    """Load optimizer state saved by `save_optimizer` under any layout into `optimizer`."""
    check_complete(checkpoint_dir)
    template = optimizer.sharded_state_dict(model_sharded_state_dict(chunks), is_loading=True)
    optimizer.load_state_dict(dist_checkpointing.load(template, checkpoint_dir))


def save_sharded(sharded_state_dict: dict, checkpoint_dir: str, async_queue=None, on_visible=None) -> None:
    """Write a sharded state dict to checkpoint_dir, which appears (renamed from `<dir>.tmp`) only
    once every rank has written its part. Collective.

    async_queue: a megatron-core AsyncCallsQueue: the tensors are staged to host memory now, the
    files are written by a background process, and the rename happens when the queue finalizes
    the call (its maybe_finalize_async_calls, on every rank). on_visible() runs on every rank
    right after the rename, in either mode.
    """
    checkpoint_dir = os.path.abspath(checkpoint_dir)
    tmp = checkpoint_dir + ".tmp"
    if dist.get_rank() == 0:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    dist.barrier()

    def publish() -> None:
        dist.barrier()  # every rank's files and megatron-core's metadata.json are written
        if dist.get_rank() == 0:
            if os.path.exists(checkpoint_dir):
                shutil.rmtree(checkpoint_dir)
            os.rename(tmp, checkpoint_dir)
        dist.barrier()
        if on_visible is not None:
            on_visible()

    if async_queue is None:
        dist_checkpointing.save(sharded_state_dict, tmp, async_sharded_save=False)
        publish()
        return
    # megatron-core's own background writer ("mcore"); its default, "nvrx", needs
    # nvidia-resiliency-ext
    request = dist_checkpointing.save(sharded_state_dict, tmp, async_sharded_save=True, async_strategy="mcore")
    request.add_finalize_fn(publish)
    async_queue.schedule_async_request(request)


def load_model(chunks: list, checkpoint_dir: str) -> None:
    """Load weights saved by `save_model` (or the model part of a training checkpoint,
    deltatron.train.resume) under any parallel layout into these chunks."""
    check_complete(checkpoint_dir)
    template = model_sharded_state_dict(chunks)
    state = dist_checkpointing.load(template, checkpoint_dir)
    # a training checkpoint's common state (progress, scheduler, ...) comes back too: drop it
    state = {key: state[key] for key in template}
    if len(chunks) == 1:
        unwrap(chunks[0]).load_state_dict(state, strict=True)
    else:
        for i, c in enumerate(chunks):
            unwrap(c).load_state_dict(state[f"model{i}"], strict=True)


def check_complete(checkpoint_dir: str) -> None:
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(
            f"checkpoint directory {checkpoint_dir!r} does not exist (was it saved completely?)"
        )
    if not os.path.exists(os.path.join(checkpoint_dir, "metadata.json")):
        raise ValueError(
            f"{checkpoint_dir!r} is not a complete dist_checkpointing checkpoint (no metadata.json)"
        )
