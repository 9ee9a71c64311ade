"""End-to-end training of the tiny model on the bundled corpus.

The golden curve (tests/golden/tiny_loss.json) pins the first 30 training losses of a fixed
configuration. A change that means to alter them (model, data order, optimizer) regenerates it:

    DELTATRON_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_train.py -k golden

Tolerance: 1e-3 relative per step, room for CPU math libraries that sum in another order, far
below what any change to the model or data produces (the loss moves by ~0.05 per step here).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env, train_in_process

GOLDEN = os.path.join(REPO, "tests", "golden", "tiny_loss.json")
GOLDEN_OVERRIDES = [
    "model=tiny", "train.steps=30", "data.seq_length=128", "train.micro_batch_size=4",
    "train.global_batch_size=4", "train.eval_interval=0", "logging.wandb=false",
    "logging.log_interval=10", "optim.warmup_steps=5", "train.seed=1234", "data.seed=1234",
]


def test_golden_loss_curve(tmp_path, process_groups, monkeypatch):
    monkeypatch.chdir(REPO)  # the data config's paths are relative to the repo
    history = train_in_process(GOLDEN_OVERRIDES, str(tmp_path / "run"))
    losses = history["loss"]
    if os.environ.get("DELTATRON_UPDATE_GOLDEN"):
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as f:
            json.dump({"overrides": GOLDEN_OVERRIDES, "loss": losses}, f, indent=1)
    golden = json.load(open(GOLDEN))
    assert golden["overrides"] == GOLDEN_OVERRIDES
    assert losses == pytest.approx(golden["loss"], rel=1e-3)


def test_cli_training_loss_falls_and_writes_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    env = subprocess_env(WANDB_SILENT="true")
    out = subprocess.run(
        [sys.executable, "-m", "deltatron.train", "train.steps=60", "data.seq_length=128",
         "train.micro_batch_size=4", "train.global_batch_size=4", "train.eval_interval=30",
         "logging.log_interval=20", f"train.run_dir={run_dir}"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout
    assert "deltatron | model tiny" in log and "layout: tp=1 pp=1" in log
    # the module path is on record: TE's where it imports (never on CPU machines)
    from deltatron.model.te import te_available

    path = "Transformer Engine" if te_available() else "megatron-core local"
    assert f"on {path} modules (model.transformer_impl=auto)" in log
    assert "step 60/60" in log and "tokens/s" in log and "ETA" in log
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    vals = [r["train/val_loss"] for r in records if "train/val_loss" in r]
    assert losses[-1] < losses[0] - 1.0, losses
    assert len(vals) == 2 and vals[1] < vals[0]
    assert os.path.exists(run_dir / "config.yaml")
    offline = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert offline, "no wandb offline run was written"
