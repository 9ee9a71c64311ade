"""deltatron.train.optim.align_state_index: megatron-core's distributed optimizer finds each
parameter's optimizer state (which checkpoints read and write) through the right index when a
param group mixes bf16 and fp32 parameters, as ours do.

megatron-core refuses to build a DistributedOptimizer on CPU tensors, so the optimizer here is
assembled from the pieces its constructor would make (grad-buffer ranges, dtype groups, the inner
optimizer's param groups in megatron-core's order), and megatron-core's own index builder and
state accessor run on them. The GPU path end to end is tests/test_resume_gpu.py.
"""

from __future__ import annotations

import types

import pytest
import torch
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer, Range

from deltatron.train.optim import (
    align_state_index, load_adam_steps_per_parameter, prepare_for_loading, use_fused_adamw,
)


def _distributed_optimizer(inner_class=torch.optim.SGD):
    """Two param groups: group 0 holds bf16 `a` (6), bf16 `b` (4) and fp32 `c` (3, like KDA's
    A_log); group 1 holds bf16 `d` (5). One DP rank, so each shard is the whole parameter."""
    a, b, d = (torch.nn.Parameter(torch.zeros(n, dtype=torch.bfloat16)) for n in (6, 4, 5))
    c = torch.nn.Parameter(torch.zeros(3))

    def ranges(params):
        out, start = {}, 0
        for p in params:
            n = p.numel()
            out[p] = {"gbuf_world": Range(start, start + n), "gbuf_world_in_bucket": Range(start, start + n),
                      "gbuf_local": Range(start, start + n), "param": Range(0, n)}
            start += n
        return out

    # DDP keeps one grad buffer per parameter dtype: the bf16 buffer first, then the fp32 one.
    gbuf_ranges = [{torch.bfloat16: [{"param_map": ranges([a, b, d])}]},
                   {torch.float32: [{"param_map": ranges([c])}]}]
    opt = object.__new__(DistributedOptimizer)
    opt.config = types.SimpleNamespace(use_precision_aware_optimizer_no_fp8_or_ds_fp8=False, fp16=False)
    opt.ddp_config = types.SimpleNamespace(use_megatron_fsdp=False)
    opt.gbuf_ranges = gbuf_ranges
    opt.model_param_gbuf_map = {a: (0, torch.bfloat16, 0), b: (0, torch.bfloat16, 0),
                                d: (0, torch.bfloat16, 0), c: (1, torch.float32, 0)}
    opt.model_param_group_index_map, _ = DistributedOptimizer._build_optimizer_group_ranges(
        [{"params": [a, b, c]}, {"params": [d]}], gbuf_ranges)
    opt.model_float16_groups = [[a, b], [d]]
    opt.model_fp32_groups = [[c], []]
    # The inner optimizer's groups as megatron-core fills them: fp32 shards, then the fp32 main
    # copies of the bf16 shards. Each main parameter's state is tagged with its model parameter.
    tags = {a: 1.0, b: 2.0, c: 3.0, d: 4.0}
    main = {p: torch.zeros(p.numel()) for p in tags}
    inner = inner_class([{"params": [main[c], main[a], main[b]]}, {"params": [main[d]]}], lr=0.1)
    if inner_class is torch.optim.SGD:
        for p, tag in tags.items():
            inner.state[main[p]] = {"exp_avg": torch.full((p.numel(),), tag)}
    opt.optimizer = inner
    opt.grad_scaler = None
    return opt, tags


def test_megatron_core_index_misses_the_state_of_mixed_dtype_groups():
    """The defect the fix is for: without it, a bf16 parameter reads another parameter's state.
    If megatron-core fixes its index, this fails and align_state_index can be deleted."""
    opt, tags = _distributed_optimizer()
    wrong = [p for p, tag in tags.items()
             if not torch.equal(opt._get_main_param_and_optimizer_states(p)["exp_avg"],
                                torch.full((p.numel(),), tag))]
    assert wrong, "megatron-core's index is right now: delete align_state_index"


def test_aligned_index_gives_every_parameter_its_own_state():
    opt, tags = _distributed_optimizer()
    align_state_index(opt)
    for p, tag in tags.items():
        state = opt._get_main_param_and_optimizer_states(p)
        assert state["param"].numel() == p.numel()
        assert torch.equal(state["exp_avg"], torch.full((p.numel(),), tag))


def test_align_refuses_a_layout_it_does_not_know():
    opt, _ = _distributed_optimizer()
    groups = opt.optimizer.param_groups
    groups[0]["params"] = groups[0]["params"][::-1]  # not megatron-core's fp32-first order
    with pytest.raises(RuntimeError, match="param-group layout changed"):
        align_state_index(opt)


def test_fresh_optimizer_gets_state_to_build_its_load_template():
    """A resume builds the load template from a fresh optimizer; without Apex or TE megatron-core
    reads torch Adam's per-parameter "step", which exists only after a step."""
    opt, _ = _distributed_optimizer(torch.optim.AdamW)
    with pytest.raises(AssertionError):  # if this stops failing, prepare_for_loading can go
        opt.state_dict()
    prepare_for_loading(opt)
    state = opt.state_dict()
    assert [g["step"] for g in state["optimizer"]["param_groups"]] == [1.0, 1.0]
    assert all(set(s) >= {"exp_avg", "exp_avg_sq", "step"} for s in opt.optimizer.state.values())
    assert len(opt.optimizer.state) == 4
    prepare_for_loading(opt)  # a no-op once there is state: no second step
    assert opt.state_dict()["optimizer"]["param_groups"][0]["step"] == 1.0


def _resumable_adam(fixed: bool, fused: bool = False):
    """A fresh AdamW distributed optimizer after a resume's preparation, and a state dict saved
    after one step (the template the resume loads). fused: torch's fused AdamW (use_fused_adamw)."""
    opt, tags = _distributed_optimizer(torch.optim.AdamW)
    if fused:
        use_fused_adamw(opt)
    align_state_index(opt)
    if fixed:
        load_adam_steps_per_parameter(opt)
    prepare_for_loading(opt)
    return opt, tags, opt.state_dict()


def test_megatron_core_shares_one_adam_step_and_wants_it_per_parameter():
    """The two load defects: one step tensor for all parameters (Adam increments it once per
    parameter) and a per-parameter copy that asks the checkpoint for "step". If either stops
    failing, that half of load_adam_steps_per_parameter can go."""
    opt, tags, saved = _resumable_adam(fixed=False)
    opt.load_state_dict(saved)
    assert len({id(s["step"]) for s in opt.optimizer.state.values()}) == 1
    opt._init_optimizer_states_with_dummy_values()  # one more step for every parameter
    assert {float(s["step"]) for s in opt.optimizer.state.values()} == {1.0 + len(tags)}
    a = next(iter(tags))
    with pytest.raises(KeyError, match="step"):
        opt._set_main_param_and_optimizer_states(a, {k: torch.ones(6) for k in ("param", "exp_avg", "exp_avg_sq")})


@pytest.mark.parametrize("fused", [False, True])
def test_loaded_adam_steps_are_per_parameter(fused):
    opt, tags, saved = _resumable_adam(fixed=True, fused=fused)
    assert all(group["fused"] is (True if fused else None) for group in opt.optimizer.param_groups)
    opt.load_state_dict(saved)
    assert len({id(s["step"]) for s in opt.optimizer.state.values()}) == len(tags)
    if fused:  # the fused kernel's steps: fp32 on the parameter's device
        assert all(s["step"].dtype == torch.float32 and s["step"].device == p.device
                   for p, s in opt.optimizer.state.items())
    opt._init_optimizer_states_with_dummy_values()
    assert [float(s["step"]) for s in opt.optimizer.state.values()] == [2.0] * len(tags)
    for p, tag in tags.items():  # the checkpoint's tensors land on their parameter, step untouched
        values = {k: torch.full((p.numel(),), tag) for k in ("param", "exp_avg", "exp_avg_sq")}
        opt._set_main_param_and_optimizer_states(p, values)
        state = opt._get_main_param_and_optimizer_states(p)
        assert all(torch.equal(state[k], values[k]) for k in values)
        assert float(opt.optimizer.state[state["param"]]["step"]) == 2.0


def test_grad_norm_replacement_equals_the_norm_and_is_installed(process_groups):
    """build_optimizer's replacement of megatron-core's host-synchronising L2-norm fallback: the
    global norm of mixed-dtype gradients (fp32 and bf16 lists, one empty) as a [1] fp32 tensor on
    their device, equal to the norm in float64; megatron-core's get_grad_norm_fp32 uses it once
    installed (no Apex or Transformer Engine here)."""
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads

    from deltatron.train.optim import install_device_multi_tensor_ops, multi_tensor_l2_norm_on_device

    device = "cuda" if torch.cuda.is_available() else "cpu"  # the process groups' device
    gen = torch.Generator().manual_seed(0)
    fp32 = [torch.randn(5, 7, generator=gen).to(device), (torch.randn(3, generator=gen) * 100).to(device)]
    bf16 = [torch.randn(64, generator=gen).bfloat16().to(device)]
    norm, per_tensor = multi_tensor_l2_norm_on_device(2048, None, [fp32, bf16, []], False)
    want = torch.cat([t.double().flatten() for t in fp32 + bf16]).norm()
    assert per_tensor is None and norm.shape == (1,) and norm.dtype == torch.float32
    assert norm.device == fp32[0].device
    assert torch.allclose(norm.double(), want.reshape(1), rtol=1e-6)

    assert clip_grads.l2_norm_impl in (mcore_utils.local_multi_tensor_l2_norm, multi_tensor_l2_norm_on_device)
    install_device_multi_tensor_ops()
    assert clip_grads.l2_norm_impl is multi_tensor_l2_norm_on_device
    total = clip_grads.get_grad_norm_fp32(fp32)
    assert abs(float(total) - torch.cat([t.double().flatten() for t in fp32]).norm().item()) < 1e-3


def test_multi_tensor_scale_on_device_matches_megatron_cores_fallback():
    """The foreach replacement of megatron-core's local_multi_tensor_scale gives its results for
    its three uses: gradients scaled in place (clipping), fp32 masters copied into bf16
    parameters (scale 1), a scaled copy; and megatron-core's clipping and mixed-precision
    optimizer modules use it once installed."""
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads, optimizer as mcore_optimizer

    from deltatron.train.optim import install_device_multi_tensor_ops, multi_tensor_scale_on_device

    gen = torch.Generator().manual_seed(0)
    src = [torch.randn(5, 7, generator=gen), torch.randn(3, generator=gen) * 100]

    def both(make_dst, scale, in_place=False):
        ours, theirs = [s.clone() for s in src], [s.clone() for s in src]
        dst_ours = ours if in_place else [make_dst(s) for s in src]
        dst_theirs = theirs if in_place else [make_dst(s) for s in src]
        multi_tensor_scale_on_device(2048, None, [ours, dst_ours], scale)
        mcore_utils.local_multi_tensor_scale(2048, None, [theirs, dst_theirs], scale)
        return dst_ours, dst_theirs

    cases = [(None, 0.37, True), (lambda s: torch.empty_like(s, dtype=torch.bfloat16), 1.0, False),
             (torch.empty_like, 0.5, False)]
    for make_dst, scale, in_place in cases:
        for a, b in zip(*both(make_dst, scale, in_place)):
            assert a.dtype == b.dtype and torch.equal(a, b), (scale, in_place)

    install_device_multi_tensor_ops()
    assert clip_grads.multi_tensor_scale_impl is multi_tensor_scale_on_device
    assert mcore_optimizer.multi_tensor_scale_impl is multi_tensor_scale_on_device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation exists only with a GPU")
def test_grad_norm_does_not_synchronise_per_parameter():
    """On the GPU the replacement's norm of 200 gradients triggers no synchronising CUDA call
    (megatron-core's fallback made 200)."""
    import warnings

    from deltatron.train.optim import multi_tensor_l2_norm_on_device

    grads = [torch.randn(16, device="cuda") for _ in range(200)]
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            multi_tensor_l2_norm_on_device(2048, None, [grads], False)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    # (set_sync_debug_mode itself warns that it is a prototype: not a synchronisation)
    syncs = [w for w in caught if "called a synchronizing CUDA operation" in str(w.message)]
    assert not syncs, [str(w.message) for w in syncs[:3]]
