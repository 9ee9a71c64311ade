"""GroupedGemmExperts: megatron-core's SequentialMLP parameters computed as grouped GEMMs.

The grouped module must give SequentialMLP's outputs and parameter gradients on the same weights
(also with experts that receive no token and with the per-group padding), build from the model's
spec by default, and keep SequentialMLP's checkpoint keys.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.experts import SequentialMLP

from deltatron.model.config import ModelConfig
from deltatron.model.grouped_experts import GroupedGemmExperts, padded_positions


def _experts(cfg: ModelConfig, cls, num_local: int):
    tc = cfg.to_transformer_config(use_cpu_initialization=True, transformer_impl="local")
    from deltatron.model.specs import moe_module_spec

    sub = moe_module_spec(False, cfg.num_experts, True).keywords["submodules"].experts.keywords["submodules"]
    return cls(num_local, tc, sub, pg_collection=ProcessGroupCollection.use_mpu_process_groups())


@pytest.mark.parametrize("counts", [[5, 0, 11, 3], [0, 0, 0, 17], [16, 16, 1, 2]])
def test_grouped_matches_sequential_outputs_and_gradients(seeded, counts):
    cfg = ModelConfig(num_experts=4, moe_ffn_hidden_size=24, hidden_size=32)
    seq = _experts(cfg, SequentialMLP, 4)
    grouped = _experts(cfg, GroupedGemmExperts, 4)
    grouped.load_state_dict(seq.state_dict())
    n = sum(counts)
    x = torch.randn(n, 32, dtype=torch.float64).float()
    probs = torch.rand(n)
    tpe = torch.tensor(counts)

    x1 = x.clone().requires_grad_()
    out_seq, _ = seq(x1, tpe, probs)
    out_seq.square().sum().backward()
    x2 = x.clone().requires_grad_()
    out_grp, bias = grouped(x2, tpe, probs)
    out_grp.square().sum().backward()

    assert bias is None
    torch.testing.assert_close(out_grp, out_seq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-5)
    for (name, p_seq), (_, p_grp) in zip(seq.named_parameters(), grouped.named_parameters()):
        torch.testing.assert_close(p_grp.grad, p_seq.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_padded_positions_align_every_group_without_overlap():
    counts = torch.tensor([5, 0, 17, 1])
    rows, offs, total = padded_positions(counts, int(counts.sum()), 16)
    assert offs.tolist() == [16, 16, 48, 64]
    assert total == 23 + 4 * 15 and total >= offs[-1]
    assert rows.tolist() == [0, 1, 2, 3, 4, *range(16, 33), 48]
    assert len(set(rows.tolist())) == len(rows)


def test_model_builds_grouped_experts_and_keeps_sequential_checkpoint_keys(seeded):
    from deltatron.model.model import build_model

    model = build_model(ModelConfig())
    experts = [m for m in model.modules() if isinstance(m, SequentialMLP)]
    assert experts and all(isinstance(m, GroupedGemmExperts) for m in experts)
    sharded = model.sharded_state_dict()
    # SequentialMLP's layout: local names per expert, one global tensor per layer sharded by expert
    assert sharded["decoder.layers.3.mlp.experts.local_experts.1.linear_fc1.weight"].key == (
        "decoder.layers.3.mlp.experts.experts.linear_fc1.weight"
    )
    fc2 = sharded["decoder.layers.3.mlp.experts.local_experts.1.linear_fc2.weight"]
    assert fc2.key == "decoder.layers.3.mlp.experts.experts.linear_fc2.weight"
    assert fc2.global_offset[0] == 1 and fc2.global_shape[0] == ModelConfig().num_experts


def test_sequential_experts_when_grouped_gemm_is_off(seeded):
    from deltatron.model.model import build_model

    model = build_model(ModelConfig(moe_grouped_gemm=False))
    experts = [m for m in model.modules() if isinstance(m, SequentialMLP)]
    assert experts and not any(isinstance(m, GroupedGemmExperts) for m in experts)


def test_backward_restacks_instead_of_keeping_the_stacked_weights():
    """Autograd keeps the expert parameters, not the stacked copy; gradients are unchanged."""
    import gc
    import weakref

    from deltatron.model.grouped_experts import restacked_in_backward

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 5, generator=g)) for _ in range(3)]
    x = torch.randn(3, 6, 5, generator=g)

    def loss(hooked: bool):
        xs = x.clone().requires_grad_()
        stacked = torch.stack(params)  # [E, 4, 5]
        with restacked_in_backward({stacked: params}) if hooked else contextlib.nullcontext():
            # the whole stack transposed, and a view at a non-zero offset
            y = torch.bmm(xs, stacked.transpose(-2, -1)).square().sum() + (xs[0] @ stacked[1].t()).sum()
        return y, xs, weakref.ref(stacked)

    ref_loss, ref_x, _ = loss(False)
    ref_loss.backward()
    ref_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    hooked_loss, hooked_x, stacked = loss(True)
    gc.collect()
    assert stacked() is None, "the stacked copy is still held by the graph"
    hooked_loss.backward()
    torch.testing.assert_close(hooked_x.grad, ref_x.grad)
    for p, want in zip(params, ref_grads):
        torch.testing.assert_close(p.grad, want)


def test_take_unique_rows_matches_index_select_and_never_accumulates():
    """Same values and gradients as index_select for distinct rows; the backward writes rows
    (index_copy) rather than adding them, so it records no index_add."""
    from torch.profiler import ProfilerActivity, profile

    from deltatron.model.grouped_experts import take_unique_rows

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    rows = torch.randperm(40, generator=gen)[:25]
    upstream = torch.randn(25, 6, generator=gen, dtype=torch.float64)
    ref_x = x.detach().clone().requires_grad_()
    ref_x.index_select(0, rows).backward(upstream)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = take_unique_rows(x, rows)
        out.backward(upstream)
    assert torch.equal(out, ref_x.index_select(0, rows))
    assert torch.equal(x.grad, ref_x.grad)
    assert not [e for e in prof.events() if e.name == "aten::index_add_"]
