"""Shared fixtures: one megatron-core process group (a gloo world of one) for the test session."""

from __future__ import annotations

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Set in this process by init_process_groups (a world of one on a free port); a child process
# that inherited them would try to listen on the port this process already holds.
_RENDEZVOUS_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def subprocess_env(**extra: str) -> dict:
    """The environment for a trainer started as a subprocess: ours without our rendezvous."""
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS_VARS}
    env["PYTHONPATH"] = REPO
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def process_groups():
    """megatron-core parallel state for a single CPU process (tp=pp=ep=1)."""
    from deltatron.parallel.setup import init_process_groups

    init_process_groups(seed=1234)
    yield


@pytest.fixture
def seeded(process_groups):
    from deltatron.parallel.cpu_compat import initialize_rng

    initialize_rng(1234)
    yield
