"""torch.distributed and megatron-core process groups for one run.

Works under torchrun (RANK/WORLD_SIZE/MASTER_ADDR set) and in a plain single process, where it
creates a world of one on a free local port so megatron-core's process groups exist. Uses NCCL on
GPUs and gloo (with the CPU compatibility layer) otherwise.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from deltatron.parallel import cpu_compat


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flight_recorder_env(trace_dir: str) -> dict[str, str]:
    """Environment that makes NCCL collectives that time out dump torch's flight recorder (the
    last collectives of every rank, with their state) to <trace_dir>/nccl_trace_rank_<r> and
    then end the process with an error, instead of hanging until the job's wall time. Read with
    `python -m torch.distributed.flight_recorder.fr_trace <trace_dir>`."""
    return {
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",  # records kept per rank (0 turns it off)
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": os.path.join(os.path.abspath(trace_dir), "nccl_trace_rank_"),
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",  # a failed or timed-out collective ends the process
    }


def init_distributed(timeout_minutes: int = 30, trace_dir: str | None = None) -> None:
    """Initialise torch.distributed once (idempotent). On GPUs, collectives time out after
    timeout_minutes and, with trace_dir, dump the NCCL flight recorder there (settings the user
    exported win)."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if trace_dir is not None:
            os.makedirs(trace_dir, exist_ok=True)
            for key, value in flight_recorder_env(trace_dir).items():
                os.environ.setdefault(key, value)
    else:
        cpu_compat.enable()
    dist.init_process_group(
        backend="nccl" if use_cuda else "gloo",
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )


def init_process_groups(
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    vpp: int | None = None,
    cp: int = 1,
    seed: int = 1234,
    timeout_minutes: int = 30,
    trace_dir: str | None = None,
) -> None:
    """Initialise torch.distributed and megatron-core's model-parallel groups for a layout.

    Data parallelism is what remains of the world size; megatron-core checks divisibility.
    timeout_minutes, trace_dir: see init_distributed.
    """
    from megatron.core import parallel_state

    init_distributed(timeout_minutes, trace_dir)
    cpu_compat.detach_dispatcher_probs()  # or a dropped MoE model keeps itself and its groups alive
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
        cpu_compat.forget_destroyed_groups()
        _destroy_subgroups()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    cpu_compat.initialize_rng(seed)


def _destroy_subgroups() -> None:
    """Destroy every process group but the default one. megatron-core's destroy_model_parallel
    only forgets its groups; a process that builds several layouts in turn (tests, benchmarks)
    would keep each one's dozens of groups, every gloo group with its own polling threads (a test
    session had accumulated 2,300 of them)."""
    from torch.distributed import distributed_c10d

    default = distributed_c10d._get_default_group()
    for group in list(distributed_c10d._world.pg_map):  # no public list of the groups
        if group is not default:
            dist.destroy_process_group(group)


def destroy_process_groups() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
        cpu_compat.forget_destroyed_groups()
    if dist.is_initialized():
        dist.destroy_process_group()
