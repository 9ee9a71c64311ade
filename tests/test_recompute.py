"""Activation recomputation (train.recompute_*): the choices and their checks, identical loss and
gradients with and without it (standard stack, block AttnRes, the trainer, pipeline and context
parallel),
and that it keeps fewer activations for the backward."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import parity

from deltatron.model.config import ModelConfig
from deltatron.model.model import build_model, packed_seq_params
from deltatron.train.config import TrainConfig

# KDA and MLA mixers, a dense first FFN, MoE with a shared expert (as tests/test_model.py)
SMALL = dict(
    vocab_size=512, hidden_size=64, num_layers=4, kda_num_heads=2, kda_head_dim=16,
    mla_num_heads=2, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    dense_ffn_hidden_size=128, num_experts=4, moe_ffn_hidden_size=32, moe_topk=2,
)
ATTNRES = dict(residual="block_attnres", attnres_blocks=3)
SEQ = 48
CU = torch.tensor([0, 17, SEQ], dtype=torch.int32)  # two packed documents, as the trainer passes them


def _recompute(**train) -> dict:
    """The TransformerConfig fields a TrainConfig with these recompute fields gives SMALL."""
    return TrainConfig(**train).recompute_config(ModelConfig(**SMALL))


def _loss_and_grads(model_kw: dict, recompute: dict):
    from deltatron.parallel.cpu_compat import initialize_rng

    initialize_rng(7)
    cfg = ModelConfig(**SMALL, **model_kw)
    model = build_model(cfg, **TrainConfig(**recompute).recompute_config(cfg))
    with torch.no_grad():  # AttnRes: non-zero pseudo-queries, so depth attention is not a plain mean
        g = torch.Generator().manual_seed(3)
        for name, p in model.named_parameters():
            if name.endswith("pseudo_query"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    tokens = torch.randint(0, SMALL["vocab_size"], (1, SEQ), generator=torch.Generator().manual_seed(1))
    loss = model(tokens, None, None, labels=tokens, packed_seq_params=packed_seq_params(CU, 31)).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


FULL = {
    "uniform1": dict(recompute_granularity="full"),
    "uniform3": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=3),
    "block5": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=5),
}
SELECTIVE = {
    m: dict(recompute_granularity="selective", recompute_modules=[m])
    for m in ("core_attn", "mla_up_proj", "mlp", "moe", "shared_experts")
}


@pytest.fixture(scope="module")
def reference(process_groups):
    return {"standard": _loss_and_grads({}, {}), "block_attnres": _loss_and_grads(ATTNRES, {})}


def _assert_same(reference, result):
    (loss0, grads0), (loss1, grads1) = reference, result
    assert grads0.keys() == grads1.keys() and len(grads0) > 20
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-6, atol=1e-9, msg=name)


@pytest.mark.parametrize("name", [*FULL, *SELECTIVE])
def test_standard_stack_recompute_gives_the_same_loss_and_gradients(name, reference):
    _assert_same(reference["standard"], _loss_and_grads({}, {**FULL, **SELECTIVE}[name]))


@pytest.mark.parametrize("name", ["uniform1", "block5", "moe"])
def test_block_attnres_recompute_gives_the_same_loss_and_gradients(name, reference):
    _assert_same(reference["block_attnres"], _loss_and_grads(ATTNRES, {**FULL, **SELECTIVE}[name]))


# ------------------------------------------------------------------ it keeps fewer activations
def _saved_bytes(model_kw: dict, recompute: dict) -> int:
    """Bytes of the tensors the forward keeps for the backward (parameters excluded), counted
    through saved_tensors_hooks once the forward is done (storages megatron-core frees after
    saving, as CheckpointWithoutOutput does, count what they hold then)."""
    from deltatron.parallel.cpu_compat import initialize_rng

    initialize_rng(7)
    cfg = ModelConfig(**SMALL, **model_kw)
    model = build_model(cfg, **TrainConfig(**recompute).recompute_config(cfg))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s
        return t

    tokens = torch.randint(0, SMALL["vocab_size"], (1, 4 * SEQ), generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0, 4 * SEQ], dtype=torch.int32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens, None, None, labels=tokens, packed_seq_params=packed_seq_params(cu, 4 * SEQ)).mean()
    kept = sum(s.nbytes() for s in storages.values())
    loss.backward()  # the recomputation runs and completes
    return kept


@pytest.mark.parametrize("model_kw", [{}, ATTNRES], ids=["standard", "block_attnres"])
def test_recompute_keeps_fewer_activations(model_kw, process_groups):
    none = _saved_bytes(model_kw, {})
    full = _saved_bytes(model_kw, FULL["uniform1"])
    block = _saved_bytes(model_kw, FULL["block5"])
    moe = _saved_bytes(model_kw, SELECTIVE["moe"])
    # full: sub-layer inputs (plus the output layer's and loss's own); block: 5 of 8 sub-layers
    assert full < none / 4, (full, none)
    assert full < block < none, (full, block, none)
    assert moe < none, (moe, none)


# ------------------------------------------------------------------ the choices and their checks
def test_recompute_config_translates_to_megatron_core_fields():
    assert _recompute() == {}
    assert _recompute(recompute_granularity="full") == dict(
        recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
    )
    assert _recompute(recompute_granularity="full", recompute_method="block", recompute_num_layers=3) == dict(
        recompute_granularity="full", recompute_method="block", recompute_num_layers=3
    )
    assert _recompute(recompute_granularity="selective") == dict(
        recompute_granularity="selective", recompute_modules=["core_attn"]
    )
    assert TrainConfig(recompute_granularity="full").describe_recompute() == "full (uniform, 1 sub-layer per unit)"


@pytest.mark.parametrize("fields, message", [
    (dict(recompute_granularity="partial"), "recompute_granularity='partial': choose none, full or selective"),
    (dict(recompute_granularity="full", recompute_method="zigzag"), "recompute_method='zigzag': choose uniform or block"),
    (dict(recompute_granularity="full", recompute_num_layers=0), "recompute_num_layers=0 must be >= 1"),
    (dict(recompute_granularity="full", recompute_method="block"), "method=block needs train.recompute_num_layers"),
    (dict(recompute_method="uniform"), "apply to train.recompute_granularity=full only"),
    (dict(recompute_granularity="selective", recompute_num_layers=2), "apply to train.recompute_granularity=full only"),
    (dict(recompute_granularity="full", recompute_modules=["moe"]), "recompute_modules applies to train.recompute_granularity=selective"),
    (dict(recompute_granularity="selective", recompute_modules=["attn"]), "unknown module 'attn'"),
    (dict(recompute_granularity="selective", recompute_modules=["gdn_norm_out"]), "KDA layer has no such hook"),
    (dict(recompute_granularity="selective", recompute_modules=[]), "recomputes nothing"),
])
def test_invalid_recompute_fields_name_the_problem(fields, message):
    with pytest.raises(ValueError, match="invalid train config: .*" + _re(message)):
        TrainConfig(**fields)


def _re(text: str) -> str:
    import re

    return re.escape(text)


def test_recompute_choices_the_model_cannot_take_name_the_fix():
    with pytest.raises(ValueError, match="exceeds the model's 8 sub-layers"):
        _recompute(recompute_granularity="full", recompute_num_layers=9)
    with pytest.raises(ValueError, match="one sub-layer per unit"):
        TrainConfig(recompute_granularity="full", recompute_num_layers=2).recompute_config(ModelConfig(**SMALL, **ATTNRES))
    # AttnRes takes block units of any count
    TrainConfig(recompute_granularity="full", recompute_method="block", recompute_num_layers=2).recompute_config(
        ModelConfig(**SMALL, **ATTNRES)
    )
    local = ModelConfig(**SMALL, transformer_impl="local")
    with pytest.raises(ValueError, match="'moe_act' .* use 'moe' instead"):
        TrainConfig(recompute_granularity="selective", recompute_modules=["moe_act"]).recompute_config(local)
    with pytest.raises(ValueError, match="need MoE layers"):
        TrainConfig(recompute_granularity="selective", recompute_modules=["moe"]).recompute_config(
            ModelConfig(**{**SMALL, "first_k_dense": SMALL["num_layers"]})
        )
    from deltatron.model.te import te_available

    if not te_available():
        with pytest.raises(ValueError, match="'layernorm' needs Transformer Engine"):
            TrainConfig(recompute_granularity="selective", recompute_modules=["layernorm"]).recompute_config(local)


def test_hydra_overrides_select_recompute(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from deltatron.train.__main__ import conf_dir, to_run_config
    from deltatron.train.config import register_configs

    register_configs()

    def run(*overrides):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=conf_dir(), version_base=None):
            return to_run_config(compose(config_name="config", overrides=list(overrides)))[0]

    assert run().train.recompute_granularity == "none"
    train = run("train.recompute_granularity=full", "train.recompute_method=block", "train.recompute_num_layers=4").train
    assert train.recompute_config(run().model)["recompute_num_layers"] == 4
    assert run("train.recompute_granularity=selective", "train.recompute_modules=[moe,mlp]").train.recompute_modules == ["moe", "mlp"]
    with pytest.raises(SystemExit, match="recompute_granularity='yes'"):
        run("train.recompute_granularity=yes")


# ------------------------------------------------------------------ the trainer
def _train(run_dir: str, layout: dict, recompute: str, model_overrides: dict | None = None, steps: int = 2,
           optim_overrides: dict | None = None):
    """Losses, parameters and router expert biases after `steps` steps of the parity model
    (tests/parity.py; under context parallelism tests/cp_parity.py's long packed rows)."""
    import cp_parity

    if layout.get("cp", 1) > 1:
        cfg, batches = cp_parity.run_config(layout, run_dir), cp_parity.LongBatches
    else:
        cfg, batches = parity.run_config(layout, run_dir, model_overrides, optim_overrides), parity.FixedBatches
    cfg.train = dataclasses.replace(cfg.train, recompute_granularity=recompute)
    trainer = parity.make_trainer(cfg, batches)
    assert (trainer.model[0].config.recompute_granularity == "full") == (recompute == "full")
    return parity.train_steps(trainer, steps), parity.float_state(trainer)


# MuonClip with a QK-clip threshold the parity model's logits cross: the recomputed forward
# records each MLA head's max logit again (a max: unchanged), and the clip acts on it
MUONCLIP = dict(name="muonclip", qk_clip_tau=0.05, muon_ns_dtype="float32")  # as tests/test_muonclip.py


@pytest.mark.parametrize("optim", [None, MUONCLIP], ids=["adamw", "muonclip"])
def test_trainer_with_full_recompute_trains_the_same(optim, tmp_path, process_groups):
    """Whole steps through the trainer (DDP, optimizer, MoE expert-bias update, QK-clip): the same
    losses, parameters and expert biases (the router counts its tokens once, in the recomputed
    pass)."""
    loss, state = parity.compare_runs(_train(str(tmp_path / "none"), {}, "none", optim_overrides=optim),
                           _train(str(tmp_path / "full"), {}, "full", optim_overrides=optim))
    assert loss < 1e-6 and state < 1e-6, (loss, state)


TWO_PROCESS = {
    "pp2": (dict(pp=2), None),
    "pp2_block_attnres": (dict(pp=2), ATTNRES),
    # KDA's state hand-off and MLA's K|V all-gather run again in the recomputed forward
    "cp2": (dict(cp=2), None),
}


def test_pipeline_and_context_parallel_with_full_recompute_train_the_same(tmp_path, process_groups):
    from distributed import run_distributed

    results = run_distributed(parity.on_off_job, 2, _train, TWO_PROCESS, ("none", "full"), str(tmp_path))
    for rank_result in results:
        assert rank_result.keys() == TWO_PROCESS.keys()
        for name, (loss, state) in rank_result.items():
            assert loss < 1e-6 and state < 1e-6, (name, loss, state)


# ------------------------------------------------------------------ the planner
def test_planner_plans_the_runs_recompute():
    from deltatron.parallel.planner import plan_from_overrides, recomputed_sublayers

    assert recomputed_sublayers(5, "full") == [[0], [1], [2], [3], [4]]
    assert recomputed_sublayers(5, "full", "uniform", 2) == [[0, 1], [2, 3], [4]]
    assert recomputed_sublayers(5, "full", "block", 2) == [[0], [1]]
    assert recomputed_sublayers(5, "selective") == recomputed_sublayers(5, "none") == []

    base = ["model=proxy", "data.seq_length=16384", "train.micro_batch_size=1", "train.global_batch_size=1"]

    def plan(*extra, recompute=None):
        return plan_from_overrides(base + list(extra), gpus=1, gpu="h200", recompute=recompute)

    none, full = plan(), plan("train.recompute_granularity=full")
    assert full.recompute == "full (uniform, 1 sub-layer per unit)" and none.recompute == "none"
    # --recompute X is the override train.recompute_granularity=X
    assert plan(recompute="full").ranks[0].activations == full.ranks[0].activations
    assert plan("train.recompute_granularity=full", recompute="none").ranks[0].activations == none.ranks[0].activations
    assert full.ranks[0].activations < none.ranks[0].activations / 20
    assert full.step_seconds > none.step_seconds
    # units of 4 sub-layers keep a quarter of the inputs and recompute 4 sub-layers at a time
    four = plan("train.recompute_granularity=full", "train.recompute_num_layers=4")
    assert four.ranks[0].activations < full.ranks[0].activations
    assert four.step_seconds == pytest.approx(full.step_seconds)
    # block: the first 10 sub-layers recomputed, the rest keep everything
    block = plan("train.recompute_granularity=full", "train.recompute_method=block", "train.recompute_num_layers=10")
    assert full.ranks[0].activations < block.ranks[0].activations < none.ranks[0].activations
    assert none.step_seconds < block.step_seconds < full.step_seconds
    assert block.recompute == "full (block, the first 10 sub-layers of each pipeline stage)"
    # the trainer's checks apply
    with pytest.raises(ValueError, match="exceeds the model's"):
        plan("train.recompute_granularity=full", "train.recompute_num_layers=999")
