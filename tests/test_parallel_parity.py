"""Every parallel layout we claim reproduces a single-process run of the same model and batch.

For each layout: the loss after each of 3 optimizer steps and the final parameters match the
single-process run. Tolerances: losses to 1e-5 relative; parameters to 2e-5 absolute (Adam steps
of lr 1e-3, so this is 2% of one step's size; reduction order is the only difference).

megatron-core refuses MoE with tensor parallelism but without sequence parallelism in training,
so plain TP2 (no SP) is checked on the dense variant of the model (every FFN dense); all other
layouts use the MoE model.
"""

from __future__ import annotations

import re

import pytest

import parity
from distributed import run_distributed

LOSS_RTOL = 1e-5
PARAM_ATOL = 2e-5

TWO_PROCESS = {
    "pp2": dict(pp=2),
    "ep2": dict(ep=2),
    "dp2": dict(),
    "tp2_sp": dict(tp=2, sequence_parallel=True),
    "pp2_vpp2": dict(pp=2, vpp=2),
}
FOUR_PROCESS = {
    "tp2_pp2": dict(tp=2, pp=2, sequence_parallel=True),
    # expert tensor parallelism 1 (the usual MoE layout): gloo cannot all-gather the uneven
    # per-rank token counts that expert-TP 2 exchanges
    "tp2_ep2": dict(tp=2, ep=2, etp=1, sequence_parallel=True),
    "pp2_dp2": dict(pp=2),
    "ep2_dp2": dict(ep=2),
}
DENSE = {"first_k_dense": parity.MODEL["num_layers"]}


def _reference(tmp_path, model_overrides=None):
    """Single process: save the initial weights, train, save the final weights."""
    init = str(tmp_path / "init")
    from deltatron.train.checkpoint import save_model
    from deltatron.train.trainer import Trainer
    import dataclasses

    cfg = parity.run_config({}, str(tmp_path / "run-ref"), model_overrides)
    trainer = Trainer(cfg, dataclasses.asdict(cfg), data=parity.FixedBatches(0, 1))
    save_model(trainer.model, init)
    losses = parity.train_layout({}, init, str(tmp_path / "ref"), str(tmp_path / "run-ref2"), model_overrides)
    return init, losses


def _params(ckpt: str, model_overrides=None) -> dict:
    from deltatron.model.config import ModelConfig
    from deltatron.model.model import build_model
    from deltatron.parallel.setup import init_process_groups
    from deltatron.train.checkpoint import load_model

    init_process_groups()
    model = build_model(ModelConfig(**{**parity.MODEL, **(model_overrides or {})}))
    load_model([model], ckpt)
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    return state


def _check(name, ref_losses, losses, ref_params, params):
    assert losses == pytest.approx(ref_losses, rel=LOSS_RTOL), f"{name}: losses {losses} vs {ref_losses}"
    assert ref_losses[0] != ref_losses[-1]  # the steps did change the model
    errors = {
        key: (params[key] - ref).abs().max().item()
        for key, ref in ref_params.items()
        if ref.dtype.is_floating_point
    }
    bad = {k: e for k, e in errors.items() if e > PARAM_ATOL}
    assert not bad, f"{name}: parameters differ: {bad}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, process_groups):
    tmp = tmp_path_factory.mktemp("parity")
    init, losses = _reference(tmp)
    return tmp, init, losses, _params(str(tmp / "ref"))


@pytest.fixture(scope="module")
def two_process_results(reference):
    tmp, init, _, _ = reference
    return run_distributed(parity.layouts_job, 2, TWO_PROCESS, init, str(tmp))[0]


@pytest.fixture(scope="module")
def four_process_results(reference):
    tmp, init, _, _ = reference
    return run_distributed(parity.layouts_job, 4, FOUR_PROCESS, init, str(tmp))[0]


@pytest.mark.parametrize("name", sorted(TWO_PROCESS))
def test_two_process_layout_matches_single_process(name, reference, two_process_results):
    tmp, _, ref_losses, ref_params = reference
    _check(name, ref_losses, two_process_results[name], ref_params, _params(str(tmp / name)))


@pytest.mark.parametrize("name", sorted(FOUR_PROCESS))
def test_four_process_layout_matches_single_process(name, reference, four_process_results):
    tmp, _, ref_losses, ref_params = reference
    _check(name, ref_losses, four_process_results[name], ref_params, _params(str(tmp / name)))


def test_tensor_parallel_without_sequence_parallel_on_dense_model(tmp_path, process_groups):
    init, ref_losses = _reference(tmp_path, DENSE)
    ref_params = _params(str(tmp_path / "ref"), DENSE)
    losses = run_distributed(parity.layouts_job, 2, {"tp2": dict(tp=2)}, init, str(tmp_path), DENSE)[0]
    _check("tp2", ref_losses, losses["tp2"], ref_params, _params(str(tmp_path / "tp2"), DENSE))


@pytest.mark.parametrize(
    "layout, world, message",
    [
        (dict(tp=3), 2, "not divisible by tp*pp*cp"),
        (dict(tp=2), 2, "KDA heads (3) are not divisible by tp=2"),
        (dict(ep=3), 3, "experts (4) are not divisible by ep=3"),
        (dict(pp=2, pipeline_layers=[3, 2]), 2, "pipeline_layers=[3, 2]"),
        (dict(sequence_parallel=True), 1, "sequence_parallel=true needs parallel.tp > 1"),
    ],
)
def test_impossible_layouts_fail_with_their_reason(layout, world, message):
    from deltatron.model.config import ModelConfig
    from deltatron.parallel.layout import ParallelConfig

    model = ModelConfig(**{**parity.MODEL, "kda_num_heads": 3 if "KDA" in message else 2})
    with pytest.raises(ValueError, match=re.escape(message)):
        ParallelConfig(**layout).validate(world, model)
