"""deltatron.parallel.setup: building one layout after another in a process keeps one set of
process groups, not one per layout (each gloo group holds polling threads)."""

from __future__ import annotations

import threading


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
