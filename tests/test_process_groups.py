"""deltatron.parallel.setup: building one layout after another in a process keeps one set of
process groups, not one per layout (each gloo group holds polling threads), and a dropped
Trainer's groups are freed with it."""

from __future__ import annotations

import gc
import os
import threading
import weakref


def test_reinitialising_a_layout_releases_the_previous_groups(process_groups):
    from megatron.core import parallel_state
    from torch.distributed import distributed_c10d

    from deltatron.parallel.setup import init_process_groups

    init_process_groups(seed=1)
    groups, threads = len(distributed_c10d._world.pg_map), threading.active_count()
    for _ in range(3):
        init_process_groups(seed=1)
    assert len(distributed_c10d._world.pg_map) == groups
    assert parallel_state.get_tensor_model_parallel_group() in distributed_c10d._world.pg_map
    assert threading.active_count() <= threads


def _gloo_threads() -> int:
    """gloo's polling threads in this process (native threads: threading does not list them)."""
    tasks = os.listdir("/proc/self/task")
    count = 0
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                count += f.read().strip() == "pt_gloo_runloop"
        except FileNotFoundError:  # the thread ended meanwhile
            pass
    return count


def test_a_dropped_moe_trainer_frees_its_model_and_process_groups(process_groups, tmp_path):
    """megatron-core's token dispatchers kept the last forward's routing probabilities with their
    autograd graph, whose gradient-accumulator hooks hold the DDP wrapper: a trained MoE model
    was never freed, nor its process groups (~40 gloo threads per Trainer)."""
    from parity import make_trainer, run_config, train_steps

    from deltatron.parallel.setup import init_process_groups

    init_process_groups(seed=1)
    threads = _gloo_threads()
    for dispatcher in ("alltoall", "allgather"):
        trainer = make_trainer(run_config({}, str(tmp_path / dispatcher), {"moe_token_dispatcher": dispatcher}))
        train_steps(trainer, 1)
        model = weakref.ref(trainer.model[0])
        del trainer
        gc.collect()
        freed = model() is None
        assert freed, f"the {dispatcher} dispatcher's model outlived its Trainer"
    init_process_groups(seed=1)  # destroys the last trainer's groups
    gc.collect()
    assert _gloo_threads() <= threads
