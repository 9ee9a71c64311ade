"""Attention Residuals: the two-phase block computation, the model's AttnRes stack against the
straightforward formula, and (below) pipeline layouts against one process."""

from __future__ import annotations


import pytest
import torch

from deltatron.model.attnres import (
    BlockLayout,
    attend_completed,
    collect_depth_metrics,
    depth_attention_reference,
    run_block_group,
    start_depth_metrics,
)
from deltatron.model.config import ModelConfig
from deltatron.model.model import build_model
from deltatron.model.norm import RMSNorm

SMALL = dict(
    vocab_size=512, hidden_size=64, num_layers=4, kda_num_heads=2, kda_head_dim=16,
    mla_num_heads=2, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    dense_ffn_hidden_size=128, num_experts=4, moe_ffn_hidden_size=32, moe_topk=2,
)
L = 2 * SMALL["num_layers"]  # sub-layers


def _norm(d, eps=1e-5):
    cfg = type("C", (), dict(use_cpu_initialization=True, params_dtype=torch.float32, sequence_parallel=False))
    return RMSNorm(cfg, d, eps)


def _randomize_depth_params(model, seed=0):
    """Non-zero pseudo-queries and key-norm weights, so the tests see a non-uniform softmax."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "depth_quer" in name:
                if name.endswith("pseudo_query"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
                else:
                    p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------------------ layout
def test_block_layout_uneven_blocks_and_counts():
    lay = BlockLayout(8, 3)  # 3 + 3 + 2 sub-layers
    assert lay.block_ends == (3, 6, 8)
    assert [lay.block_of(l) for l in range(8)] == [1, 1, 1, 2, 2, 2, 3, 3]
    assert [lay.completed_after(e) for e in range(9)] == [1, 1, 1, 2, 2, 2, 3, 3, 4]
    assert [lay.open_after(e) for e in range(9)] == [False, True, True, False, True, True, False, True, False]
    with pytest.raises(ValueError, match="attnres_blocks=9 must be in 1..8"):
        BlockLayout(8, 9)
    with pytest.raises(ValueError, match="attnres_blocks=0 must be in 1..8"):
        ModelConfig(**SMALL, residual="block_attnres", attnres_blocks=0)


# -------------------------------------------------------------------------- the math
def test_two_phase_equals_per_layer_computation_outputs_and_gradients():
    """Phase 1 over the completed blocks for the whole group + online-softmax merge of the partial
    sum equals attending over [completed..., partial] separately for every sub-layer."""
    torch.manual_seed(0)
    S, B, D, k = 5, 3, 16, 4
    scales = [1.0, 3.0, 0.2]  # blocks of very different magnitudes
    blocks = [(torch.randn(S, B, D) * s).requires_grad_() for s in scales]
    partial0 = torch.randn(S, B, D).requires_grad_()
    queries = [torch.randn(D).requires_grad_() for _ in range(k)]
    norms = [_norm(D) for _ in range(k)]
    with torch.no_grad():
        for n in norms:
            n.weight.copy_(1 + 0.5 * torch.randn(D))
    weights = [torch.randn(D, D) / D**0.5 for _ in range(k)]

    def layer(i, h):
        return torch.tanh(h @ weights[i])

    def reference():
        partial, outs = partial0, []
        for i in range(k):
            h = depth_attention_reference(blocks + [partial], queries[i], norms[i])
            f = layer(i, h)
            outs.append(h)
            partial = partial + f
        return partial, outs

    def two_phase():
        q = torch.stack([w.float() * n.weight for w, n in zip(queries, norms)])
        outs = []

        def run(i, h):
            outs.append(h)
            return layer(i, h)

        return run_block_group(blocks, partial0, q, norms[0].eps, run), outs

    leaves = blocks + [partial0] + queries + [n.weight for n in norms]
    results = {}
    for name, fn in (("ref", reference), ("two_phase", two_phase)):
        partial, outs = fn()
        loss = (partial * torch.linspace(-1, 1, D)).sum() + sum((h**2).mean() for h in outs)
        grads = torch.autograd.grad(loss, leaves)
        results[name] = (partial.detach(), [h.detach() for h in outs], grads)
    (p_ref, h_ref, g_ref), (p_two, h_two, g_two) = results["ref"], results["two_phase"]
    torch.testing.assert_close(p_two, p_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(h_two, h_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_two, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_phase_functions_match_autograd_gradients():
    """The two phases' hand-written backward passes (they save no fp32 copies) against torch's
    numerical gradients, in float64."""
    from deltatron.model.attnres import merge_partial

    g = torch.Generator().manual_seed(0)
    S, B, D, k = 3, 2, 6, 2
    sources = [(torch.randn(S, B, D, generator=g, dtype=torch.float64) * s).requires_grad_() for s in (1, 4, 0.3)]
    q = torch.randn(k, D, generator=g, dtype=torch.float64).requires_grad_()

    def phase1(q, *src):
        outs, lses, _ = attend_completed(src, q, 1e-5)
        return (*outs, *lses)

    assert torch.autograd.gradcheck(phase1, (q, *sources))
    out = torch.randn(S, B, D, generator=g, dtype=torch.float64).requires_grad_()
    lse = torch.randn(S, B, generator=g, dtype=torch.float64).requires_grad_()
    partial = (3 * torch.randn(S, B, D, generator=g, dtype=torch.float64)).requires_grad_()
    q1 = q[0].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: merge_partial(*a, 1e-5)[0], (out, lse, partial, q1))


def test_zero_queries_give_the_uniform_average():
    torch.manual_seed(0)
    blocks = [torch.randn(4, 2, 8) * (i + 1) for i in range(3)]
    outs, _, w = attend_completed(blocks, torch.zeros(2, 8), 1e-5)
    for out in outs:
        torch.testing.assert_close(out, torch.stack(blocks).mean(0))
    torch.testing.assert_close(w, torch.full_like(w, 1 / 3))


# --------------------------------------------------------------------------- the model
def _reference_forward(model, tokens, layout):
    """The paper's Block AttnRes written out per sub-layer over the model's own modules: every
    sub-layer's input from `depth_attention_reference` over [completed..., partial]."""
    emb = model.embedding(input_ids=tokens, position_ids=None)
    stack = model.decoder
    completed, partial = [emb], None
    for i, layer in enumerate(stack.layers):
        dq = stack.depth_queries[str(i)]
        h = depth_attention_reference(completed + ([partial] if partial is not None else []), dq.pseudo_query, dq.key_norm)
        f = layer(hidden_states=h, attention_mask=None)
        f = f[0] if isinstance(f, tuple) else f
        partial = f if partial is None else partial + f
        if layout.ends_block(i):
            completed, partial = completed + [partial], None
    dq = stack.final_depth_query
    h = stack.final_norm(depth_attention_reference(completed, dq.pseudo_query, dq.key_norm))
    logits, _ = model.output_layer(h)
    return logits.transpose(0, 1)


@pytest.mark.parametrize("residual, blocks", [("block_attnres", L), ("attnres", 1), ("block_attnres", 3)])
def test_model_matches_straightforward_formula(residual, blocks, seeded):
    """Block AttnRes with N = L is full AttnRes (inputs from every earlier sub-layer output), and
    uneven blocks follow the block formula; logits and every parameter's gradient agree."""
    cfg = ModelConfig(**SMALL, residual=residual, attnres_blocks=blocks)
    model = build_model(cfg)
    _randomize_depth_params(model)
    layout = model.decoder.layout
    assert layout.num_blocks == (L if residual == "attnres" else blocks)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    got = model(tokens, None, None)
    ref = _reference_forward(model, tokens, layout)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    params = [p for p in model.parameters()]
    g_got = torch.autograd.grad(got.square().mean(), params, allow_unused=True)
    g_ref = torch.autograd.grad(ref.square().mean(), params, allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), g_got, g_ref):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_sublayers_return_their_output_without_the_residual(seeded):
    """The same weights: an AttnRes sub-layer returns layer_standard(h) - h = f(norm(h))."""
    std = build_model(ModelConfig(**SMALL))
    att = build_model(ModelConfig(**SMALL, residual="block_attnres", attnres_blocks=4))
    att.load_state_dict(std.state_dict(), strict=False)
    h = torch.randn(16, 2, SMALL["hidden_size"])
    for a, s in zip(att.decoder.layers, std.decoder.layers):
        out_a = a(hidden_states=h, attention_mask=None)
        out_s = s(hidden_states=h, attention_mask=None)
        out_a = out_a[0] if isinstance(out_a, tuple) else out_a
        out_s = out_s[0] if isinstance(out_s, tuple) else out_s
        torch.testing.assert_close(out_a, out_s - h, rtol=1e-5, atol=1e-5)


def test_zero_initialised_model_averages_uniformly(seeded):
    """At init every sub-layer's input is the plain mean of the sources it sees."""
    model = build_model(ModelConfig(**SMALL, residual="block_attnres", attnres_blocks=3))
    assert all(float(p.detach().abs().sum()) == 0 for n, p in model.named_parameters() if n.endswith("pseudo_query"))
    inputs, outputs = [], []
    for layer in model.decoder.layers:
        layer.register_forward_pre_hook(lambda m, a, kw: inputs.append(kw["hidden_states"].detach()), with_kwargs=True)
        layer.register_forward_hook(lambda m, a, kw, out: outputs.append((out[0] if isinstance(out, tuple) else out).detach()), with_kwargs=True)
    tokens = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        emb = model.embedding(input_ids=tokens, position_ids=None)
        model(tokens, None, None)
    layout = model.decoder.layout
    completed, partial = [emb], None
    for l in range(L):
        sources = completed + ([partial] if partial is not None else [])
        torch.testing.assert_close(inputs[l], torch.stack(sources).mean(0), rtol=1e-5, atol=1e-6)
        partial = outputs[l] if partial is None else partial + outputs[l]
        if layout.ends_block(l):
            completed, partial = completed + [partial], None


def test_full_recompute_gives_the_same_gradients(seeded):
    from deltatron.parallel.cpu_compat import initialize_rng

    grads = []
    for recompute in (None, "full"):
        initialize_rng(7)
        extra = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) if recompute else {}
        model = build_model(ModelConfig(**SMALL, residual="block_attnres", attnres_blocks=3), **extra)
        _randomize_depth_params(model)
        tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
        model(tokens, None, None, labels=tokens).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


def test_depth_parameters_go_to_adamw_without_weight_decay(seeded):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from deltatron.train.config import OptimConfig
    from deltatron.train.muon_params import FusedLayout, classify
    from deltatron.train.optim import build_optimizer

    model = build_model(ModelConfig(**SMALL, residual="block_attnres", attnres_blocks=3))
    layout = FusedLayout.from_config(model.config)
    depth = {n: p for n, p in model.named_parameters() if "depth_quer" in n}
    assert len(depth) == 2 * (L + 1)  # a query and a key norm per sub-layer, plus the final ones
    for name, p in depth.items():
        spec = classify(name, p, layout)
        assert spec.optimizer == "adamw" and not spec.weight_decay, name
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    opt = build_optimizer([ddp], OptimConfig(weight_decay=0.1), bf16=False, distributed=False)
    decay_of = {id(p): g["weight_decay"] * g["wd_mult"] for g in opt.param_groups for p in g["params"]}
    assert all(decay_of[id(p)] == 0.0 for p in depth.values())


def test_parameter_counts_include_depth_parameters_and_hf_export_refuses(seeded):
    cfg = ModelConfig(**SMALL, residual="block_attnres", attnres_blocks=3)
    assert sum(p.numel() for p in build_model(cfg).parameters()) == cfg.parameter_counts()["total"]
    from deltatron.model.hf import to_hf_config

    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="no Hugging Face equivalent"):
        to_hf_config(cfg)


def test_depth_metrics_are_softmax_means_and_output_rms(seeded):
    model = build_model(ModelConfig(**SMALL, residual="block_attnres", attnres_blocks=3))
    start_depth_metrics([model])
    tokens = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        model(tokens, None, None)
    m = collect_depth_metrics([model])
    assert model.decoder.metrics is None  # recording stopped
    # zero queries: uniform over the sources each sub-layer sees
    assert m["attnres/weight/sub00/src0"] == pytest.approx(1.0)
    assert m["attnres/weight/sub01/src0"] == pytest.approx(0.5)  # embedding + partial block 1
    assert m["attnres/weight/sub01/src1"] == pytest.approx(0.5)
    assert m["attnres/weight/sub03/src1"] == pytest.approx(0.5)  # first of block 2: emb, b1
    assert m["attnres/weight/sub04/src2"] == pytest.approx(1 / 3)
    assert [m[f"attnres/weight/subfinal/src{j}"] for j in range(4)] == pytest.approx([0.25] * 4)
    assert all(m[f"residual/output_rms/sub{l:02d}"] > 0 for l in range(L))
    # standard residuals: output RMS only, f = layer(h) - h, from forward hooks removed afterwards
    std = build_model(ModelConfig(**SMALL))
    assert collect_depth_metrics([std]) == {}  # nothing recording
    start_depth_metrics([std])
    with torch.no_grad():
        std(tokens, None, None)
    m = collect_depth_metrics([std])
    assert sorted(m) == [f"residual/output_rms/sub{l:02d}" for l in range(L)] and min(m.values()) > 0
    assert all(not layer._forward_hooks for layer in std.decoder.layers)


def test_attnres_cli_config_and_tiny_training_run(tmp_path, process_groups, monkeypatch):
    """model.residual=block_attnres model.attnres_blocks=4 from the command line: trains, the loss
    falls, and the depth metrics are logged at log steps."""
    import json

    from conftest import REPO, train_in_process

    monkeypatch.chdir(REPO)
    history = train_in_process(
        ["model=tiny", "model.residual=block_attnres", "model.attnres_blocks=4", "train.steps=6",
         "data.seq_length=64", "train.micro_batch_size=2", "train.global_batch_size=2",
         "train.eval_interval=0", "logging.wandb=false", "logging.log_interval=3", "optim.warmup_steps=1"],
        str(tmp_path / "run"),
    )
    assert history["loss"][-1] < history["loss"][0]
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    logged = [r for r in records if "attnres/weight/subfinal/src0" in r]
    assert [r["step"] for r in logged] == [1, 3, 6]
    assert "residual/output_rms/sub07" in logged[-1]


# ------------------------------------------------------------------------------ pipelines
# Parity model with 3 uneven blocks over its 8 sub-layers (3 + 3 + 2), so blocks straddle stage
# boundaries and partial sums travel between stages.
PIPE = {"residual": "block_attnres", "attnres_blocks": 3}
TWO = {"pp2": dict(pp=2), "pp2_vpp2": dict(pp=2, vpp=2), "dp2_ep2": dict(ep=2)}
FOUR = {"tp2_pp2": dict(tp=2, pp=2, sequence_parallel=True)}
TWO_MICROBATCHES = {"pp2_vpp2_2mb": dict(pp=2, vpp=2)}


def test_stage_plans_send_only_blocks_the_next_rank_lacks():
    from deltatron.parallel.attnres_pipeline import StagePlan

    lay = BlockLayout(8, 3)
    # pp2 x vpp2: stages of 2 sub-layers; stage t runs on rank t % 2
    plans = [StagePlan.for_stage(lay, (2, 2, 2, 2), 2, 2 * t, 2) for t in range(4)]
    assert [(p.sent, p.sends_partial) for p in plans[:3]] == [((0, 1), True), ((1, 2), True), ((2, 3), False)]
    assert [p.cached for p in plans] == [0, 0, 1, 2]  # rank 0 keeps b0, rank 1 keeps b0, b1
    assert [p.keeps for p in plans] == [(0, 1), (0, 2), (0, 0), (0, 0)]
    assert [p.sent_count for p in plans[:3]] == [2, 2, 1]  # without the cache: 2, 3, 3
    # no virtual stages: every hop carries the whole history
    plans = [StagePlan.for_stage(lay, (4, 4), 2, 4 * t, 4) for t in range(2)]
    assert (plans[0].sent, plans[0].sends_partial, plans[1].received, plans[1].receives_partial) == ((0, 2), True, (0, 2), True)


def _pipeline_job(rank, world_size, layouts, init, out_dir, overrides, two_microbatch_layouts=None):
    import parity

    from deltatron.parallel.attnres_pipeline import rank_cache

    out = {}
    runs = [(name, layout, parity.GLOBAL_BATCH) for name, layout in layouts.items()]
    # as many micro-batches as pipeline ranks: every micro-batch of the interleaved schedule is in
    # its warm-up, where the two ranks' p2p calls do not pair up one to one
    runs += [(name, layout, 2 * parity.MICRO_BATCH) for name, layout in (two_microbatch_layouts or {}).items()]
    for name, layout, global_batch in runs:
        saved, parity.GLOBAL_BATCH = parity.GLOBAL_BATCH, global_batch
        try:
            losses = parity.train_layout(layout, init, f"{out_dir}/{name}", f"{out_dir}/run-{name}", overrides)
        finally:
            parity.GLOBAL_BATCH = saved
        cache = rank_cache()  # the last step's counts
        out[name] = dict(losses=losses, bytes=dict(cache.bytes_sent), wire=cache.wire_bytes,
                         left=sum(len(d) for d in cache.entries.values()))
    return out


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory, process_groups):
    from distributed import run_distributed
    from test_parallel_parity import _params, _reference

    tmp = tmp_path_factory.mktemp("attnres_pp")
    init, ref_losses = _reference(tmp, PIPE)
    results = {}
    for layouts, world, few in ((TWO, 2, TWO_MICROBATCHES), (FOUR, 4, None)):
        for rank_result in run_distributed(_pipeline_job, world, layouts, init, str(tmp), PIPE, few):
            for name, r in rank_result.items():
                results.setdefault(name, []).append(r)
    return tmp, ref_losses, _params(str(tmp / "ref"), PIPE), results


@pytest.mark.parametrize("name", [*TWO, *FOUR])
def test_parallel_layouts_match_single_process(name, pipeline_runs):
    """Block AttnRes under PP2, PP2 x VPP2, DP2 x EP2 and TP2 x PP2 (sequence parallel) against one
    process (CP layouts: tests/test_context_parallel.py)."""
    from test_parallel_parity import _check, _params

    tmp, ref_losses, ref_params, results = pipeline_runs
    losses = results[name][-1]["losses"]  # the last pipeline stage reports the loss on every rank
    _check(name, ref_losses, losses, ref_params, _params(str(tmp / name), PIPE))
    assert all(r["left"] == 0 for r in results[name]), "block cache not freed after backward"


def test_interleaved_pipeline_with_two_micro_batches_trains(pipeline_runs):
    """Regression: pipeline size = micro-batches (all in the warm-up) once deadlocked."""
    *_, results = pipeline_runs
    runs = results["pp2_vpp2_2mb"]
    losses = runs[-1]["losses"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert all(r["left"] == 0 for r in runs)
    assert sorted(mb for r in runs for mb in r["bytes"]) == [0, 0, 1, 1]


# tensors of [S, B, D] handed on per micro-batch: pp2 sends emb, b1 and block 2's partial sum;
# pp2 x vpp2 sends 2 + 2 + 1 (emb + partial; b1 + partial; b2), not 2 + 3 + 3 without the cache
HANDED_ON = {"pp2": 3, "pp2_vpp2": 5, "tp2_pp2": 3}


@pytest.mark.parametrize("name", sorted(HANDED_ON))
def test_bytes_per_micro_batch_are_the_incremental_blocks(name, pipeline_runs):
    import parity

    *_, results = pipeline_runs
    tp = 2 if name.startswith("tp2") else 1
    # documents packed into one row: [mbs*SEQ / tp (sequence parallel), 1, hidden] fp32
    tensor_bytes = parity.MICRO_BATCH * parity.SEQ // tp * parity.MODEL["hidden_size"] * 4
    micro_batches = parity.GLOBAL_BATCH // parity.MICRO_BATCH
    per_mb = {}
    for r in results[name]:
        for mb, b in r["bytes"].items():
            per_mb[mb] = per_mb.get(mb, 0) + b
    ranks_per_pp_rank = tp  # every TP rank of a stage sends its own shard
    assert per_mb == {mb: HANDED_ON[name] * tensor_bytes * ranks_per_pp_rank for mb in range(micro_batches)}
    assert sum(r["wire"] for r in results[name]) == micro_batches * HANDED_ON[name] * tensor_bytes * ranks_per_pp_rank
