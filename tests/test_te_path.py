"""The Transformer Engine path against megatron-core's local modules: one model's weights, loaded
into both, give the same loss and gradients.

`model.transformer_impl` picks TE's modules (fused norm + column-parallel input projections,
row-parallel outputs, TE attention) when transformer-engine imports, the local ones otherwise; the
KDA recurrence and the rest of deltatron's layers sit between them either way. Needs a CUDA GPU
with Transformer Engine (../shared/tools/te-for-device assembles TE 2.11 on the GPU machine):
skipped elsewhere, CI included.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deltatron.model.te import te_available

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and te_available()),
    reason="needs a CUDA GPU with Transformer Engine (../shared/tools/te-for-device)",
)

# The one parameter that moves: the local model keeps the dense MLP's pre-norm as its own module,
# TE fuses it into the first linear (the checkpoints already share TE's key, model/specs.py). MoE
# layers keep their pre-norm module under both.
_TE_NAMES = {"pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


def te_name(name: str, te_names) -> str:
    """The TE model's name for the local model's parameter `name` (te_names: all of the TE
    model's)."""
    for local, te in _TE_NAMES.items():
        if name.endswith(local) and name[: -len(local)] + te in te_names:
            return name[: -len(local)] + te
    return name


def test_te_model_matches_the_local_model(seeded):
    from deltatron.model.config import ModelConfig
    from deltatron.model.model import build_model
    from test_kda_triton import rel_err

    # SequentialMLP experts under both (moe_grouped_gemm=False): the same expert parameter names.
    # Every token to every expert (moe_topk = num_experts): with top-2 of 8, TF32 rounding alone
    # flipped routing choices and moved one expert's gradient by 55% (H200), drowning the floor.
    cfg = ModelConfig(moe_grouped_gemm=False)
    cfg = dataclasses.replace(cfg, moe_topk=cfg.num_experts)
    local = build_model(dataclasses.replace(cfg, transformer_impl="local")).cuda()
    te = build_model(dataclasses.replace(cfg, transformer_impl="transformer_engine")).cuda()
    local_params, te_params = dict(local.named_parameters()), dict(te.named_parameters())
    to_te = {name: te_name(name, te_params) for name in local_params}
    assert set(to_te.values()) == set(te_params)
    assert any(a != b for a, b in to_te.items()), "no fused pre-MLP norm in the TE model"
    with torch.no_grad():
        for name, p in local_params.items():
            te_params[to_te[name]].copy_(p)
    tokens = torch.randint(0, cfg.vocab_size, (2, 64), device="cuda")

    def loss_and_grads(model, tf32: bool):
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            model.zero_grad(set_to_none=True)
            loss = model(tokens, None, None, labels=tokens).float().mean()
            loss.backward()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_local, grads_local = loss_and_grads(local, tf32=False)
    # TE runs fp32 GEMMs in TF32 (cublasLt's FAST_TF32 compute type, not switchable), so its
    # distance from the fp32 local model is measured against the local model's own distance
    # when torch takes TF32 too: a wrong weight, norm or layout would stand far above that floor.
    loss_floor, grads_floor = loss_and_grads(local, tf32=True)
    loss_te, grads_te = loss_and_grads(te, tf32=False)
    floor = max(rel_err(grads_floor[n], g) for n, g in grads_local.items())
    errors = {n: rel_err(grads_te[to_te[n]], g) for n, g in grads_local.items()}
    worst = max(errors, key=errors.get)
    report = f"TF32 floor {floor:.1e}; worst {worst}: {errors[worst]:.1e}"
    print(report)
    assert 0 < floor < 0.05, report
    assert torch.allclose(loss_te, loss_local, rtol=1e-3)
    assert torch.allclose(loss_floor, loss_local, rtol=1e-3)
    assert errors[worst] <= 4 * floor, report
