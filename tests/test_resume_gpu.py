"""Resume on a GPU (bf16, the proxy model cut to 4 layers): the losses after a resume from a
mid-run checkpoint match the uninterrupted run's within RESUME_RTOL.

Not bit-exact on GPUs: the MoE's token scatter (index_add) and the cuBLAS/Triton reductions that
use atomics are not deterministic run to run. The measured deviation is printed. Needs CUDA.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REPO, losses_by_step, subprocess_env

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

RESUME_RTOL = 2e-3
STEPS, SAVE_AT = 8, 4
OVERRIDES = [
    "model=proxy", "model.num_layers=4", "data.seq_length=2048", "train.micro_batch_size=1",
    "train.global_batch_size=4", f"train.steps={STEPS}", f"train.save_interval={SAVE_AT}",
    "train.eval_interval=0", "logging.wandb=false", "logging.log_interval=1", "optim.lr=1e-3",
]


def _train(run_dir, *extra) -> dict[int, float]:
    out = subprocess.run(
        [sys.executable, "-m", "deltatron.train", *OVERRIDES, f"train.run_dir={run_dir}", *extra],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return losses_by_step(run_dir)


@pytest.mark.parametrize("async_save", [False, True])
def test_resume_on_gpu_follows_the_uninterrupted_losses(tmp_path, async_save):
    reference = _train(tmp_path / "full", f"train.async_save={str(async_save).lower()}")
    checkpoint = tmp_path / "full" / "checkpoints" / f"step_{SAVE_AT:07d}"
    resumed = _train(tmp_path / "resumed", f"train.resume={checkpoint}")
    assert sorted(resumed) == list(range(SAVE_AT + 1, STEPS + 1))
    deviation = max(abs(resumed[s] - reference[s]) / abs(reference[s]) for s in resumed)
    print(f"async_save={async_save}: resumed losses {[resumed[s] for s in sorted(resumed)]}, "
          f"uninterrupted {[reference[s] for s in sorted(resumed)]}, max relative deviation {deviation:.2e}")
    assert deviation <= RESUME_RTOL
