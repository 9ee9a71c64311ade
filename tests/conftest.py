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
