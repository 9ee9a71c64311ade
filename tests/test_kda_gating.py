"""KDA's fused decay gate and gated output norm against their eager references.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by conftest).
Shapes cover row tiles that do not divide T, several heads and batch rows, per-token inputs read
in place through the transposed view of an [S, B, C] projection, and large positive and negative
gate inputs (softplus's two regimes). The references run in float64 on the same inputs.
"""

from __future__ import annotations

import pytest
import torch

from deltatron.kernels.kda_gating import gated_rms_norm_reference, kda_decay_gate_reference
from conftest import DEVICE, require_triton_kernels
from test_kda_triton import rel_err  # max abs error over max abs reference, shapes checked


@pytest.fixture(scope="module")
def kernels():
    require_triton_kernels("the fused KDA gates")
    from deltatron.kernels import kda_gating

    return kda_gating


def transposed_leaf(x_btc: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(leaf [T, B, C], its [B, T, C] view): how the layer hands over a projection's output."""
    leaf = x_btc.transpose(0, 1).detach().to(DEVICE, dtype).clone().requires_grad_()
    return leaf, leaf.transpose(0, 1)


def leaf(x: torch.Tensor, dtype) -> torch.Tensor:
    return x.detach().to(DEVICE, dtype).clone().requires_grad_()


def decay_gate(fn, f0, a0, b0, grad, dtype, param_dtype):
    f_leaf, f = transposed_leaf(f0, dtype)
    a, b = leaf(a0, param_dtype), leaf(b0, param_dtype)
    g = fn(f, a, b)
    g.backward(grad.to(DEVICE, g.dtype))
    return g, f_leaf.grad, a.grad, b.grad


@pytest.mark.parametrize("B,T,H,K", [(2, 45, 3, 16), (1, 70, 2, 64)])
def test_decay_gate_matches_eager(kernels, B, T, H, K):
    gen = torch.Generator().manual_seed(T)
    f = torch.randn(B, T, H * K, generator=gen) * 8  # reaches softplus's linear and tiny ends
    a_log = torch.empty(H).uniform_(1, 16, generator=gen).log()
    dt_bias = torch.randn(H * K, generator=gen)
    grad = torch.randn(B, T, H, K, generator=gen)
    ours = decay_gate(kernels._DecayGate.apply, f, a_log, dt_bias, grad, torch.float32, torch.float32)
    ref = decay_gate(kda_decay_gate_reference, f, a_log, dt_bias, grad, torch.float64, torch.float64)
    assert ours[0].dtype == torch.float32
    for name, a, b in zip(("g", "grad f", "grad A_log", "grad dt_bias"), ours, ref):
        assert rel_err(a.detach(), b.detach()) < 2e-6, f"{name}: {rel_err(a.detach(), b.detach()):.2e}"


def gated_norm(fn, o0, z0, w0, grad, dtype):
    o = leaf(o0, dtype)
    z_leaf, z = transposed_leaf(z0, dtype)
    w = leaf(w0, torch.float32 if dtype != torch.float64 else dtype)
    out = fn(o, z, w, 1e-5)
    out.backward(grad.to(DEVICE, out.dtype))
    return out, o.grad, z_leaf.grad, w.grad


@pytest.mark.parametrize("B,T,H,V", [(2, 45, 3, 16), (1, 70, 2, 64)])
def test_gated_rms_norm_matches_eager(kernels, B, T, H, V):
    gen = torch.Generator().manual_seed(T + 1)
    o = torch.randn(B, T, H, V, generator=gen) * 3
    z = torch.randn(B, T, H * V, generator=gen) * 2
    w = 1 + 0.3 * torch.randn(V, generator=gen)
    grad = torch.randn(T, B, H * V, generator=gen)
    ours = gated_norm(kernels._GatedRMSNorm.apply, o, z, w, grad, torch.float32)
    ref = gated_norm(gated_rms_norm_reference, o, z, w, grad, torch.float64)
    assert ours[0].shape == (T, B, H * V) and ours[0].is_contiguous()
    for name, a, b in zip(("out", "grad o", "grad gate", "grad weight"), ours, ref):
        assert rel_err(a.detach(), b.detach()) < 2e-6, f"{name}: {rel_err(a.detach(), b.detach()):.2e}"


def test_gated_rms_norm_bf16_against_fp64(kernels):
    gen = torch.Generator().manual_seed(3)
    B, T, H, V = 2, 64, 2, 128
    o = torch.randn(B, T, H, V, generator=gen)
    z = torch.randn(B, T, H * V, generator=gen)
    w = 1 + 0.3 * torch.randn(V, generator=gen)
    grad = torch.randn(T, B, H * V, generator=gen)
    ours = gated_norm(kernels._GatedRMSNorm.apply, o, z, w, grad, torch.bfloat16)
    ref = gated_norm(gated_rms_norm_reference, o, z, w, grad, torch.float64)
    assert ours[0].dtype == torch.bfloat16
    for name, a, b in zip(("out", "grad o", "grad gate", "grad weight"), ours, ref):
        assert rel_err(a.detach(), b.detach()) < 2e-2, f"{name}: {rel_err(a.detach(), b.detach()):.2e}"
