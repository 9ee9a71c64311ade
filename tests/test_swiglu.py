"""The fused SwiGLU (deltatron.kernels.swiglu) against its eager reference, and the dense MLP that
runs it against megatron-core's MLP.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by conftest).
Shapes cover a width that is not a multiple of the kernel's column tile (two tiles, the second
ragged), leading dims of any rank, bf16 inputs and the per-row scale of the MoE experts. The
references run in float64 on the same inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltatron.kernels.swiglu import BLOCK_F, swiglu_reference
from conftest import DEVICE, INTERPRET, require_triton_kernels
from test_kda_triton import rel_err  # max abs error over max abs reference, shapes checked


@pytest.fixture(scope="module")
def fused():
    require_triton_kernels("the fused SwiGLU")
    from deltatron.kernels.swiglu import _SwiGLU

    return _SwiGLU.apply


def fwd_bwd(fn, x, scale, dy):
    """(y, dx, dscale) of fn at leaves made from x and scale."""
    xs = x.clone().requires_grad_()
    ss = scale.clone().requires_grad_() if scale is not None else None
    y = fn(xs, ss)
    y.backward(dy.to(y.dtype))
    return y.detach(), xs.grad, (ss.grad if ss is not None else None)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_scale", [False, True], ids=["plain", "scaled"])
def test_fused_swiglu_matches_reference(fused, dtype, tol, with_scale):
    gen = torch.Generator().manual_seed(0)
    F_ = BLOCK_F + 76  # two column tiles, the second ragged
    x = (torch.randn(3, 5, 2 * F_, generator=gen) * 3).to(DEVICE, dtype)  # both silu regimes
    scale = torch.rand(3, 5, generator=gen).to(DEVICE) if with_scale else None
    dy = torch.randn(3, 5, F_, generator=gen).to(DEVICE)
    y, dx, ds = fwd_bwd(fused, x, scale, dy)
    ref = fwd_bwd(swiglu_reference, x.double(), scale.double() if with_scale else None, dy.double())
    assert y.dtype == dtype and dx.dtype == dtype and y.shape == (3, 5, F_)
    assert rel_err(y.float().cpu(), ref[0].cpu()) <= tol
    assert rel_err(dx.float().cpu(), ref[1].cpu()) <= tol
    if with_scale:
        assert ds.dtype == torch.float32 and rel_err(ds.cpu(), ref[2].cpu()) <= max(tol, 1e-5)


def test_reference_is_megatron_cores_glu():
    """The eager path computes what megatron-core's MLP computes (same ops, same order)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 2 * 24, generator=gen).bfloat16()
    gate, up = torch.chunk(x, 2, dim=-1)
    assert torch.equal(swiglu_reference(x), F.silu(gate) * (up + 0.0))
    p = torch.rand(4, 2, generator=gen)
    assert torch.equal(swiglu_reference(x, p), (F.silu(gate) * up * p.unsqueeze(-1)).to(x.dtype))


@pytest.mark.parametrize("kind", ["dense", "shared expert"])
def test_mlps_are_megatron_cores_with_the_fused_activation(seeded, monkeypatch, kind):
    """The model's dense MLP and its MoE layers' shared expert give megatron-core's MLP.forward
    result on the same module: exactly on the eager path (the one CPU tensors take), and within
    fp32 rounding (values and every gradient) through the fused kernel run by the interpreter."""
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.shared_experts import SharedExpertMLP

    from deltatron.model import mlp as mlp_module
    from deltatron.model.config import ModelConfig
    from deltatron.model.model import build_model
    from test_model import SMALL

    model = build_model(ModelConfig(**SMALL))
    shared = kind == "shared expert"
    mlps = [m for m in model.modules() if isinstance(m, mlp_module.SwiGLUMLP)
            and isinstance(m, SharedExpertMLP) == shared]
    assert mlps and all(m.fused_swiglu for m in mlps)
    m = mlps[0]
    assert not shared or not m.use_shared_expert_gate  # else megatron-core's gate would follow
    x = torch.randn(6, 2, m.config.hidden_size, generator=torch.Generator().manual_seed(2))
    x = x.to(next(m.parameters()).device)  # the default device (CUDA on a GPU machine)

    def run(forward):
        m.zero_grad(set_to_none=True)
        xs = x.clone().requires_grad_()
        out = forward(m, xs)
        out = out[0] if isinstance(out, tuple) else out  # MLP: (output, bias None)
        (out.square().sum()).backward()
        return [out.detach(), xs.grad] + [p.grad for p in m.parameters()]

    ref = run(MLP.forward)
    model_forward = type(m).forward  # SharedExpertMLP.forward reaches SwiGLUMLP.forward
    monkeypatch.setattr(mlp_module, "swiglu", swiglu_reference)
    assert all(torch.equal(a, b) for a, b in zip(run(model_forward), ref))
    if INTERPRET:  # (compiled, test_fused_swiglu_matches_reference checks the kernel on the GPU)
        from deltatron.kernels.swiglu import _SwiGLU

        calls = []
        monkeypatch.setattr(mlp_module, "swiglu", lambda h: calls.append(1) or _SwiGLU.apply(h, None))
        for a, b in zip(run(model_forward), ref):
            assert rel_err(a, b) <= 1e-5
        assert calls == [1]
