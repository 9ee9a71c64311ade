"""launch/torchrun.sh: a parallel preset on two CPU processes (gloo), overrides passed through."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO, subprocess_env


def test_torchrun_script_two_processes_with_tensor_parallel_preset(tmp_path):
    run_dir = tmp_path / "run"
    env = subprocess_env(NPROC="2", PYTHON=sys.executable, WANDB_MODE="disabled")
    out = subprocess.run(
        [os.path.join(REPO, "launch", "torchrun.sh"), "parallel=tp2", "train.steps=3",
         "data.seq_length=64", "train.micro_batch_size=2", "train.global_batch_size=2",
         "train.eval_interval=0", "logging.log_interval=1", "logging.wandb=false",
         f"train.run_dir={run_dir}"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "layout: tp=2 pp=1 ep=1 cp=1 dp=1 sp (world 2)" in out.stdout
    assert out.stdout.count("deltatron | model tiny") == 1  # only rank 0 prints
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3]
