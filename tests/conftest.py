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
# megatron-core wraps its fused kernels (router scores, SwiGLU, bias-dropout-add) in torch.compile
# (megatron.core.jit.jit_fuser). On CPU that fuses nothing the tests check and costs 10-40 s of
# Inductor compilation in every fresh process (each subprocess and spawned rank of the suite);
# eager mode computes the same functions. Inherited by subprocesses. Set to 0 to test with it.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

# Triton kernels decide whether they run interpreted when their module is first imported, which
# may be in any test; without CUDA the whole session interprets them (tests/test_kda_triton.py).
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Where the Triton kernel tests put their tensors: CPU under the interpreter, else the GPU.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cpu" if INTERPRET else "cuda"


def require_triton_kernels(what: str) -> None:
    """Skip the calling test unless Triton kernels can run here: the triton package, and a GPU or
    the interpreter. what: the kernels, for the skip reason."""
    pytest.importorskip("triton", reason=f"{what} needs the triton package")
    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("compiled Triton kernels need a GPU (the interpreter runs with TRITON_INTERPRET=1)")


def _interpreter_scalar_index_fix() -> None:
    """Let the interpreter use a loaded scalar as a loop bound (`range(num_chunks)`).

    Triton 3.6's interpreter holds scalars as numpy arrays of shape (1,) and converts them with
    int(array), which numpy >= 2.5 refuses; compiled kernels are unaffected. Patched only where
    that conversion fails.
    """
    import numpy as np

    try:
        from triton.runtime import interpreter
    except ImportError:  # no triton: the Triton tests skip themselves
        return

    try:
        int(np.zeros(1, dtype=np.int32))
        return
    except TypeError:
        pass
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "scalar_index_fix", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.scalar_index_fix = True
    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    _interpreter_scalar_index_fix()

# Set in this process by init_process_groups (a world of one on a free port); a child process
# that inherited them would try to listen on the port this process already holds.
_RENDEZVOUS_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def subprocess_env(**extra: str) -> dict:
    """The environment for a trainer started as a subprocess: ours without our rendezvous."""
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
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


def train_in_process(overrides: list[str], run_dir: str, patch=None) -> dict:
    """Compose conf/ with these overrides (as the CLI would), train in this process and return
    the history. patch(trainer) may change the trainer before it fits (fault injection)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from deltatron.train.__main__ import conf_dir, to_run_config
    from deltatron.train.config import register_configs
    from deltatron.train.trainer import Trainer

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        cfg = compose(config_name="config", overrides=overrides + [f"train.run_dir={run_dir}"])
    run, resolved = to_run_config(cfg)
    trainer = Trainer(run, resolved)
    if patch is not None:
        patch(trainer)
    return trainer.fit()


def losses_by_step(run_dir) -> dict[int, float]:
    """The last logged training loss of each step in a run's metrics.jsonl (a resumed run logs
    its steps again)."""
    import json

    out = {}
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        record = json.loads(line)
        if "train/loss" in record:
            out[record["step"]] = record["train/loss"]
    return out
