"""deltatron-plan: parameter arithmetic against the built model, how memory terms scale with the
layout, rejection of layouts that do not fit, and every 48B preset in conf/parallel/."""

from __future__ import annotations

import glob
import os
import re
import shlex

import pytest
import yaml

from deltatron.model.config import ModelConfig
from deltatron.parallel.layout import ParallelConfig
from deltatron.parallel.planner import (
    GPUS, GiB, build_plan, embedding_params, main, params_by_kind, pipeline_ranks, plan_from_overrides,
    sublayer_kinds,
)

from conftest import REPO

A3B = ModelConfig(**yaml.safe_load(open(f"{REPO}/conf/model/kimi_linear_48b_a3b.yaml")))
PRESET_GLOB = f"{REPO}/conf/parallel/a3b48_*.yaml"


def _model(name: str) -> ModelConfig:
    return ModelConfig(**yaml.safe_load(open(f"{REPO}/conf/model/{name}.yaml")))


@pytest.mark.parametrize("name", ["tiny", "proxy"])
def test_parameter_arithmetic_matches_the_model_built_on_meta(process_groups, name):
    """Per sub-layer kind: total, routed-expert and TP-replicated parameters, as built."""
    from deltatron.model.model import build_model_on_meta

    cfg = _model(name)
    model = build_model_on_meta(cfg)
    kinds = sublayer_kinds(cfg)
    built: dict[str, dict[str, int]] = {}
    other = {}
    for pname, p in model.named_parameters():
        m = re.match(r"decoder\.layers\.(\d+)\.", pname)
        if not m:
            other[pname] = p.numel()
            continue
        kind = kinds[int(m[1])]
        entry = built.setdefault(kind, {"total": 0, "experts": 0, "replicated": 0, "layers": set()})
        entry["total"] += p.numel()
        entry["layers"].add(int(m[1]))
        if ".local_experts." in pname:
            entry["experts"] += p.numel()
        # kv_down is a column-parallel linear at TP1 only; under TP it is replicated (model/mla.py)
        elif not getattr(p, "tensor_model_parallel", False) or "linear_kv_down_proj" in pname:
            entry["replicated"] += p.numel()
    expected = params_by_kind(cfg)
    for kind, entry in built.items():
        n = len(entry["layers"])
        assert entry["total"] == n * expected[kind].total, kind
        assert entry["experts"] == n * expected[kind].experts, kind
        assert entry["replicated"] == n * expected[kind].replicated, kind
    assert other["embedding.word_embeddings.weight"] == embedding_params(cfg)
    assert other["output_layer.weight"] == cfg.vocab_size * cfg.hidden_size
    assert other["decoder.final_norm.weight"] == cfg.hidden_size
    assert sum(p.numel() for p in model.parameters()) == cfg.parameter_counts()["total"]


def test_pipeline_split_is_the_trainers():
    from deltatron.train.trainer import stage_pattern

    for pp, vpp, layers in [(2, None, None), (4, None, None), (2, 3, None), (3, None, [10, 10, 7])]:
        par = ParallelConfig(pp=pp, vpp=vpp, pipeline_layers=layers)
        stages = stage_pattern(A3B.layer_pattern(), pp * (vpp or 1), layers).split("|")
        ranks = pipeline_ranks(A3B, par)
        for s, pattern in enumerate(stages):
            assert len(ranks[s % pp][s // pp]) * 2 == len(pattern)


def _plan(par: ParallelConfig, world: int, gpu: str = "h100", **kw):
    args = dict(seq_length=4096, micro_batch_size=1, global_batch_size=2048)
    args.update(kw)
    return build_plan(A3B, par, world=world, gpu=GPUS[gpu], **args)


def test_memory_terms_scale_with_the_layout():
    base = _plan(ParallelConfig(tp=2, pp=2, ep=8, etp=1, sequence_parallel=True), 64)
    r0 = base.ranks[0]
    # DP x2 (world x2): optimizer state halves (dense over dp, experts over expert-dp); weights,
    # gradients and activations per GPU are unchanged
    wide = _plan(ParallelConfig(tp=2, pp=2, ep=8, etp=1, sequence_parallel=True), 128).ranks[0]
    assert wide.optimizer == pytest.approx(r0.optimizer / 2)
    assert (wide.weights, wide.gradients, wide.activations) == (r0.weights, r0.gradients, r0.activations)
    # EP x2: routed expert weights per GPU halve
    moe = params_by_kind(A3B)["moe"]
    stage0_moe_layers = sum(1 for i in r0.layers if i >= A3B.first_k_dense)
    ep16 = _plan(ParallelConfig(tp=2, pp=2, ep=16, etp=1, sequence_parallel=True), 64).ranks[0]
    assert r0.params - ep16.params == pytest.approx(stage0_moe_layers * moe.experts / 16)
    # TP x2: the TP-sharded parameters halve, replicated ones stay; activations shrink
    tp4 = _plan(ParallelConfig(tp=4, pp=2, ep=8, etp=1, sequence_parallel=True), 64).ranks[0]
    kinds = sublayer_kinds(A3B)
    sharded = sum(params_by_kind(A3B)[kinds[2 * i + j]].sharded for i in r0.layers for j in (0, 1))
    sharded += embedding_params(A3B)
    assert r0.params - tp4.params == pytest.approx(sharded / 2 - sharded / 4)
    assert tp4.activations < r0.activations
    # PP: 1F1B keeps pp micro-batches in flight on the first stage, 1 on the last
    pp4 = _plan(ParallelConfig(tp=2, pp=4, ep=8, etp=1, sequence_parallel=True), 64)
    assert [r.in_flight for r in pp4.ranks] == [4, 3, 2, 1]
    assert [r.in_flight for r in base.ranks] == [2, 1]
    # interleaving holds more: pp * (1 + (pp - 1) / (pp * vpp)) on the first rank
    vpp = _plan(ParallelConfig(tp=2, pp=4, vpp=2, ep=8, etp=1, sequence_parallel=True), 64).ranks[0]
    assert vpp.in_flight == pytest.approx(4 * (1 + 3 / 8))
    # sequence parallelism divides the residual-stream activations; full recompute keeps inputs only
    no_sp = _plan(ParallelConfig(tp=2, pp=2), 64).ranks[0]
    with_sp = _plan(ParallelConfig(tp=2, pp=2, sequence_parallel=True), 64).ranks[0]
    assert no_sp.activations > with_sp.activations
    with pytest.raises(ValueError, match="needs parallel.sequence_parallel=true"):
        _plan(ParallelConfig(tp=2, pp=2, ep=8, etp=1), 64)
    recompute = _plan(ParallelConfig(tp=2, pp=2, ep=8, etp=1, sequence_parallel=True), 64, recompute="full")
    assert recompute.ranks[0].activations < r0.activations / 10
    assert recompute.step_seconds > base.step_seconds
    # micro-batch x2: activations x2
    mb2 = _plan(ParallelConfig(tp=2, pp=2, ep=8, etp=1, sequence_parallel=True), 64, micro_batch_size=2)
    assert mb2.ranks[0].activations == pytest.approx(2 * r0.activations)


def test_muonclip_keeps_less_state_than_adamw_and_block_attnres_adds_its_cache():
    par = ParallelConfig(tp=2, pp=2, ep=8, etp=1, sequence_parallel=True)
    adam, muon = _plan(par, 64), _plan(par, 64, optimizer="muonclip")
    # Muon matrices: master + momentum (8 B) instead of master + 2 moments (12 B)
    assert 0.6 < muon.ranks[0].optimizer / adam.ranks[0].optimizer < 0.75
    import dataclasses

    blocks = dataclasses.replace(A3B, residual="block_attnres", attnres_blocks=9)
    plan = build_plan(blocks, par, world=64, gpu=GPUS["h100"], seq_length=4096, micro_batch_size=1, global_batch_size=2048)
    r = plan.ranks[0]
    tokens_per_rank = 4096 / 2  # sequence parallel over TP2
    assert r.attnres_cache == pytest.approx(10 * 2 * A3B.hidden_size * tokens_per_rank * r.in_flight)


def test_layout_over_the_limit_is_rejected_with_its_numbers(capsys):
    # 49B parameters with AdamW's 18 B/param of weights, gradients and state need ~860 GiB: 8 x 80 GB is too small
    rc = main(["--gpus", "8", "--gpu", "h100", "model=kimi_linear_48b_a3b", "parallel.tp=2",
               "parallel.sequence_parallel=true", "parallel.ep=8", "parallel.etp=1",
               "train.micro_batch_size=1", "train.global_batch_size=64", "data.seq_length=4096"])
    out = capsys.readouterr().out
    assert rc == 1
    m = re.search(r"DOES NOT FIT: pp0 needs ([\d.]+) GiB > 79.65 GiB \(optimizer state ([\d.]+)", out)
    assert m and float(m[1]) > 79.65 and float(m[2]) > 40, out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--gpus", "6", "parallel.tp=4"], "world size 6 is not divisible by tp*pp*cp"),
        (["--gpus", "8", "parallel.tpp=2"], "tpp"),
        (["--gpus", "8", "--gpu", "a100", "parallel.tp=2"], "choose one of h100, h200"),
        (["--gpus", "8", "model=tiny", "parallel.ep=3"], "experts (8) are not divisible by ep=3"),
    ],
)
def test_bad_input_names_the_problem(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def _preset_plans():
    """(preset, planner argv, the numbers its comment states) for every plan line of every preset."""
    out = []
    for path in sorted(glob.glob(PRESET_GLOB)):
        text = open(path).read()
        for m in re.finditer(r"^# plan: (.*)\n# planner: ([\d.]+) GiB of [\d.]+ GiB .*?est\. ([\d,]+) tokens/s", text, re.M):
            out.append((os.path.basename(path), shlex.split(m[1]), float(m[2]), int(m[3].replace(",", ""))))
    return out


def test_every_48b_preset_has_plans_for_its_gpu_counts():
    plans = _preset_plans()
    covered = {(int(argv[argv.index("--gpus") + 1]), argv[argv.index("--gpu") + 1]) for _, argv, _, _ in plans}
    assert covered == {(n, g) for n in (8, 16, 64, 256) for g in ("h100", "h200")} - {(8, "h100")}
    # every plan line names its own preset
    assert all(f"parallel={name[:-5]}" in argv for name, argv, _, _ in plans)


@pytest.mark.parametrize("preset, argv, gib, tokens", _preset_plans(), ids=lambda x: x if isinstance(x, str) else "")
def test_48b_preset_fits_with_the_numbers_its_comment_states(preset, argv, gib, tokens):
    gpus, gpu = int(argv[argv.index("--gpus") + 1]), argv[argv.index("--gpu") + 1]
    overrides = [a for a in argv if "=" in a]
    plan = plan_from_overrides(overrides, gpus=gpus, gpu=gpu)
    assert plan.fits
    assert max(plan.required) / GiB == pytest.approx(gib, abs=0.051)
    assert plan.tokens_per_second == pytest.approx(tokens, rel=0.01)


def test_48b_does_not_fit_eight_h100s_under_any_layout():
    best = []
    for tp in (1, 2, 4, 8):
        for pp in (1, 2, 4):
            for ep in (1, 2, 4, 8):
                for optimizer in ("adamw", "muonclip"):
                    par = ParallelConfig(tp=tp, pp=pp, ep=ep, etp=1, sequence_parallel=tp > 1)
                    try:
                        plan = _plan(par, 8, optimizer=optimizer, global_batch_size=64)
                    except ValueError:
                        continue
                    best.append(max(plan.required))
    assert min(best) > GPUS["h100"].memory_bytes


# Builds the model of every pipeline/tensor/expert-parallel rank of one data-parallel replica on
# the meta device, with a simulated world: torch's "fake" process-group backend lets one process
# be any rank of any world size, so megatron-core's parallel_state and the model see the real
# layout. Prints, per rank, its parameters and the shards it holds of one replica.
META_SMOKE = r'''
import json, sys
import torch, torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

_new_group = dist.new_group
def new_group(*args, **kwargs):  # megatron-core asks for some gloo groups; the fake backend serves all
    kwargs.pop("backend", None); kwargs.pop("pg_options", None)
    return _new_group(*args, **kwargs)
dist.new_group = new_group

from megatron.core import parallel_state as ps
from deltatron.parallel import cpu_compat
from deltatron.model.model import build_model_on_meta
from deltatron.train.trainer import stage_pattern
sys.path.insert(0, "tests")
from test_planner import _preset_plans
from deltatron.parallel.planner import compose_run_config

out, seen = [], set()
for preset, argv, _, _ in _preset_plans():
    if preset in seen:  # the same layout at another world size: the same ranks' models
        continue
    seen.add(preset)
    world = int(argv[argv.index("--gpus") + 1])
    run = compose_run_config([a for a in argv if "=" in a])
    cfg, par = run.model, run.parallel
    etp = par.etp or par.tp
    vpp = par.vpp or 1
    pattern = stage_pattern(cfg.layer_pattern(), par.pp * vpp, par.pipeline_layers)
    per_stage = world // par.pp
    total, ranks = 0, []
    for stage in range(par.pp):
        for pos in range(max(par.tp * par.cp, par.ep * etp)):
            rank = stage * per_stage + pos
            dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
            cpu_compat.enable()
            ps.initialize_model_parallel(
                tensor_model_parallel_size=par.tp, pipeline_model_parallel_size=par.pp,
                virtual_pipeline_model_parallel_size=par.vpp, context_parallel_size=par.cp,
                expert_model_parallel_size=par.ep, expert_tensor_parallel_size=par.etp,
            )
            assert ps.get_pipeline_model_parallel_rank() == stage
            local = 0
            for vp in range(vpp):
                v = vp if par.vpp else None
                model = build_model_on_meta(
                    cfg, pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=v),
                    post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=v), vp_stage=v,
                    layer_pattern=pattern, tensor_model_parallel_size=par.tp,
                    pipeline_model_parallel_size=par.pp, virtual_pipeline_model_parallel_size=par.vpp,
                    expert_model_parallel_size=par.ep, expert_tensor_parallel_size=par.etp,
                    context_parallel_size=par.cp, sequence_parallel=par.sequence_parallel,
                    bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16,
                )
                for name, p in model.named_parameters():
                    local += p.numel()
                    if ".local_experts." in name:  # one copy per expert-data-parallel group
                        total += p.numel() if ps.get_expert_data_parallel_rank() == 0 else 0
                    elif ps.get_data_parallel_rank(with_context_parallel=True) == 0:
                        tp_shard = getattr(p, "tensor_model_parallel", False)
                        total += p.numel() if tp_shard or ps.get_tensor_model_parallel_rank() == 0 else 0
            ranks.append({"rank": rank, "stage": stage, "params": local})
            ps.destroy_model_parallel()
            dist.destroy_process_group()
    out.append({"preset": preset, "argv": argv, "total": total, "ranks": ranks})
print("META_SMOKE " + json.dumps(out))
'''


def test_48b_presets_built_on_meta_per_rank_match_the_plan_and_sum_to_the_model():
    """The 48B-A3B model built as each preset's ranks would build it (one data-parallel replica,
    world size simulated): every rank holds the parameters the planner counts for its pipeline
    rank, and the shards add up to the whole model."""
    import json
    import subprocess
    import sys

    from conftest import subprocess_env

    proc = subprocess.run([sys.executable, "-c", META_SMOKE], capture_output=True, text=True, cwd=REPO,
                          env=subprocess_env(), timeout=600)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("META_SMOKE ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-4000:]
    results = json.loads(line[len("META_SMOKE "):])
    assert len(results) == len({preset for preset, _, _, _ in _preset_plans()})
    total = A3B.parameter_counts()["total"]
    for res in results:
        argv = res["argv"]
        gpus, gpu = int(argv[argv.index("--gpus") + 1]), argv[argv.index("--gpu") + 1]
        plan = plan_from_overrides([a for a in argv if "=" in a], gpus=gpus, gpu=gpu)
        assert res["total"] == total, res["preset"]
        for r in res["ranks"]:
            assert r["params"] == plan.ranks[r["stage"]].params, (res["preset"], r)


def test_activation_items_match_the_tensors_autograd_saves_on_cpu(seeded, monkeypatch):
    """Bytes per token each sub-layer keeps for the backward, counted with saved-tensor hooks on
    the tiny model (fp32, CPU): the dense MLP exactly; the MoE layer within 10% (routing decides
    the expert-side counts; no imbalance factor here); KDA within 2% on the path a GPU runs: its
    fused short-convolution and gating kernels and the Triton recurrence, run here by the Triton
    interpreter (on CPU the layer would otherwise take the eager references, which keep more);
    likewise the MLPs' fused SwiGLU and the norms' fused RMSNorm."""
    import torch

    from deltatron.model.model import build_model
    from deltatron.model.grouped_experts import ALIGN_TOKENS
    from deltatron.parallel.planner import _kda_items, _mlp_items, _moe_items
    from test_kda_fused_layer import fused_kernels

    fused_kernels(monkeypatch)
    from deltatron.kernels.swiglu import _SwiGLU
    from deltatron.model import grouped_experts, mlp

    monkeypatch.setattr(mlp, "swiglu", lambda x: _SwiGLU.apply(x, None))
    from deltatron.kernels.rms_norm import _RMSNorm
    from deltatron.model import norm

    monkeypatch.setattr(norm, "rms_norm", _RMSNorm.apply)
    monkeypatch.setattr(grouped_experts, "swiglu", _SwiGLU.apply)
    cfg = _model("tiny")
    model = build_model(cfg)
    param_storage = {p.untyped_storage().data_ptr() for p in model.parameters()}
    # keep every saved tensor alive until the end: a storage freed early (a discarded branch of
    # the graph) could otherwise be reused at the same address and be missed as a duplicate
    current, saved, keep = ["outside"], {}, []
    for i, layer in enumerate(model.decoder.layers):
        layer.register_forward_pre_hook(lambda mod, args, i=i: current.__setitem__(0, i))
        layer.register_forward_hook(lambda mod, args, out: current.__setitem__(0, "outside"))

    def pack(t):
        keep.append(t)
        s = t.untyped_storage()
        if s.data_ptr() not in param_storage and s.data_ptr() not in saved:
            saved[s.data_ptr()] = (current[0], s.nbytes())
        return t

    tokens = torch.randint(0, cfg.vocab_size, (1, 128))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, None, None, labels=tokens)
    per_layer: dict = {}
    for layer, nbytes in saved.values():
        if layer != "outside":
            per_layer[layer] = per_layer.get(layer, 0) + nbytes / 128
    kinds = sublayer_kinds(cfg)
    a = 4
    assert {kinds[i] for i in per_layer} >= {"kda", "mlp", "moe"}
    for i, measured in per_layer.items():
        kind = kinds[i]
        if kind == "mlp":
            it = _mlp_items(cfg, a)
            assert measured == pytest.approx(it.replicated + it.sharded, abs=8)
        elif kind == "moe":
            it = _moe_items(cfg, a)
            # the grouped experts allocate N + E*(ALIGN_TOKENS-1) rows for N routed copies; a
            # padding row holds what an expert row holds (fc1's input, fc1's output, fc2's
            # input, the prob), not the dispatched copy and its indices
            pad_rows = cfg.num_experts * (ALIGN_TOKENS - 1) / 128
            pad_row = a * cfg.hidden_size + 3 * a * cfg.moe_ffn_hidden_size + 4
            expected = it.replicated + it.sharded + cfg.moe_topk * it.routed + pad_rows * pad_row
            assert measured == pytest.approx(expected, rel=0.1)
        elif kind == "kda":
            it = _kda_items(cfg, a, documents=False)
            assert measured == pytest.approx(it.replicated + it.sharded + it.full, rel=0.02)


@pytest.mark.parametrize("optim", ["adamw", "muonclip"])
def test_static_memory_matches_the_tensors_the_trainer_allocates(process_groups, tmp_path, optim):
    """Weights, gradient buffers and optimizer state of the tiny model after one step on CPU
    (fp32, one process) add up to the planner's weights + gradients + optimizer terms."""
    import torch

    from conftest import train_in_process

    held = {}
    train_in_process(
        ["model=tiny", f"optim={optim}", "train.precision=fp32", "data.mock=true", "data.seq_length=64",
         "train.micro_batch_size=2", "train.global_batch_size=2", "train.steps=1", "train.eval_interval=0",
         "train.save_interval=0", "logging.wandb=false"],
        str(tmp_path), patch=lambda trainer: held.update(trainer=trainer),
    )
    trainer = held["trainer"]
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    params = [p for m in trainer.model for p in m.parameters()]
    weights = sum(nbytes(p) for p in params)
    buffers = [b for m in trainer.model for b in m.buffers + m.expert_parallel_buffers]
    grads = sum(nbytes(b.grad_data) for b in buffers)
    # MuonClip's owner-aligned buckets are padded (64-aligned tensors, shards of whole tensors);
    # the planner counts the tensors only
    grads -= sum((b.numel - b.numel_unpadded) * b.grad_data.element_size() for b in buffers)
    opt = trainer.optimizer
    state = 0
    if optim == "adamw":  # megatron-core's optimizer, or a chain of them (dense, experts)
        for inner in getattr(opt, "chained_optimizers", [opt]):
            for s in inner.optimizer.state.values():
                state += sum(nbytes(v) for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    else:
        for e in opt.entries:
            for v in e.state.values():
                state += sum(nbytes(t) for t in (v.values() if isinstance(v, dict) else [v]))
            state += nbytes(e.master) if e.separate_master else 0
    plan = build_plan(_model("tiny"), ParallelConfig(), world=1, gpu=GPUS["h100"], seq_length=64,
                      micro_batch_size=2, global_batch_size=2, optimizer=optim, precision="fp32")
    r = plan.ranks[0]
    assert (weights, grads) == (r.weights, r.gradients)
    largest = max(p.largest for p in params_by_kind(_model("tiny")).values())
    # MuonClip: the planner adds one largest tensor's state for the greedy placement over DP
    greedy = 8.0 * largest if optim == "muonclip" else 0.0
    assert state == pytest.approx(r.optimizer - greedy)
