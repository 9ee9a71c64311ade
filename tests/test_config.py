"""Hydra configuration: presets compose, overrides reach the typed config, bad input fails clearly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from deltatron.train.__main__ import conf_dir, to_run_config
from deltatron.train.config import RunConfig, register_configs

from conftest import REPO


def _compose(overrides):
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        return compose(config_name="config", overrides=overrides)


def test_overrides_reach_the_typed_config():
    cfg = _compose(
        ["model=proxy", "train.steps=7", "optim.lr=0.01", "optim.schedule=wsd",
         "parallel.tp=2", "data.document_boundaries=false", "logging.wandb_mode=disabled"]
    )
    run, resolved = to_run_config(cfg)
    assert isinstance(run, RunConfig)
    assert run.model.name == "proxy" and run.model.num_experts == 32
    assert run.train.steps == 7 and run.optim.lr == 0.01 and run.optim.schedule == "wsd"
    assert run.parallel.tp == 2 and run.data.document_boundaries is False
    assert resolved["train"]["steps"] == 7


@pytest.mark.parametrize("preset", ["tiny", "proxy", "kimi_linear_48b_a3b"])
def test_every_model_preset_is_valid(preset):
    run, _ = to_run_config(_compose([f"model={preset}"]))
    assert run.model.name == preset
    assert run.model.layer_pattern().endswith("+E")  # the last layer is MLA


def _cli(*overrides):
    env = dict(os.environ, PYTHONPATH=REPO, WANDB_MODE="disabled")
    return subprocess.run(
        [sys.executable, "-m", "deltatron.train", *overrides],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )


def test_dry_run_prints_resolved_config_and_model_size():
    out = _cli("train.dry_run=true", "train.steps=42")
    assert out.returncode == 0, out.stderr
    assert "steps: 42" in out.stdout
    assert "2,171,532 parameters" in out.stdout
    assert "no training was done" in out.stdout


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stpes=5", "Key 'stpes' not in 'TrainConfig'"),
        ("train.steps=many", "Value 'many' of type 'str' could not be converted to Integer"),
        ("optim.schedule=linear", "optim.schedule='linear': choose cosine, wsd or constant"),
        ("model.mla_layers=[9]", "mla_layers=[9] has indices [9] outside 1..4"),
        ("model=nosuch", "Could not find 'model/nosuch'"),
    ],
)
def test_bad_overrides_fail_with_the_key_named(override, message):
    out = _cli("train.dry_run=true", override)
    assert out.returncode != 0
    assert message in out.stdout + out.stderr
