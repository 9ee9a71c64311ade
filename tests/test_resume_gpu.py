"""Resume on a GPU (bf16, the proxy model cut to 4 layers, megatron-core's distributed optimizer):
a run resumed from a mid-run checkpoint, written synchronously or in the background, follows the
uninterrupted run as closely as two uninterrupted runs follow each other.

Not bit-exact on GPUs: the MoE's token scatter (index_add), the embedding backward and flash
attention's backward accumulate with atomics, so two identical runs already differ after their
first update, and the difference grows step by step. The tolerance is therefore measured in the
same test: the two uninterrupted runs (one saving synchronously, one in the background) give the
run-to-run deviation, and each resumed run may deviate from its reference by at most
NOISE_FACTOR times that plus NOISE_FLOOR. The first step after the resume runs on the restored
weights and data only, so it is held to FIRST_STEP_RTOL. A wrong optimizer state (e.g. Adam's
step counter, tests/test_distributed_optimizer.py) shows from the second step on. Needs CUDA.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REPO, losses_by_step, subprocess_env

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STEPS, SAVE_AT = 8, 4
FIRST_STEP_RTOL = 1e-4
NOISE_FACTOR, NOISE_FLOOR = 3.0, 1e-4
OVERRIDES = [
    "model=proxy", "model.num_layers=4", "data.seq_length=2048", "train.micro_batch_size=1",
    "train.global_batch_size=4", f"train.steps={STEPS}", f"train.save_interval={SAVE_AT}",
    "train.eval_interval=0", "logging.wandb=false", "logging.log_interval=1", "optim.lr=5e-4",
    "optim.warmup_steps=2",
]


def _train(run_dir, *extra) -> dict[int, float]:
    out = subprocess.run(
        [sys.executable, "-m", "deltatron.train", *OVERRIDES, f"train.run_dir={run_dir}", *extra],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return losses_by_step(run_dir)


def _deviation(a: dict[int, float], b: dict[int, float], steps) -> float:
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in steps)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Two uninterrupted runs, saving at SAVE_AT synchronously and in the background."""
    tmp = tmp_path_factory.mktemp("resume_gpu")
    runs = {mode: _train(tmp / mode, f"train.async_save={str(mode == 'async').lower()}") for mode in ("sync", "async")}
    return tmp, runs


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_resume_on_gpu_follows_the_uninterrupted_losses(uninterrupted, mode):
    tmp, runs = uninterrupted
    reference = runs[mode]
    resumed = _train(tmp / f"resumed-{mode}", f"train.resume={tmp / mode / 'checkpoints' / f'step_{SAVE_AT:07d}'}")
    after = list(range(SAVE_AT + 1, STEPS + 1))
    assert sorted(resumed) == after
    noise = _deviation(runs["async"], runs["sync"], after)
    deviation = _deviation(resumed, reference, after)
    first = _deviation(resumed, reference, after[:1])
    print(f"{mode}: resumed losses {[resumed[s] for s in after]}, uninterrupted {[reference[s] for s in after]}; "
          f"max relative deviation {deviation:.2e} (first step {first:.2e}); two uninterrupted runs {noise:.2e}")
    assert first <= FIRST_STEP_RTOL
    assert deviation <= NOISE_FACTOR * noise + NOISE_FLOOR
