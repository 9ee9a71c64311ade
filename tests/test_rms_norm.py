"""The fused RMSNorm (deltatron.kernels.rms_norm) against its eager reference, and the model with
every local-path norm running it against the eager model.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by conftest).
Shapes cover a width that is not a power of two, row counts that do not fill the backward's last
program, bf16 activations with fp32 and bf16 weights; the references run in float64 where the
inputs are fp32, in the inputs' dtype where the rounding to it is part of the result.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, require_triton_kernels
from deltatron.kernels.rms_norm import ROWS_PER_PROGRAM, rms_norm_reference
from test_kda_triton import rel_err


@pytest.fixture(scope="module")
def fused():
    require_triton_kernels("the fused RMSNorm")
    from deltatron.kernels.rms_norm import _RMSNorm

    return _RMSNorm.apply


def fwd_bwd(fn, x, w, dy):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = fn(x, w, 1e-6)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("shape", [(3, 7, 24), (ROWS_PER_PROGRAM + 5, 96), (2, 200)])
def test_fp32_matches_the_reference_in_float64(fused, shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen) * 3
    w = torch.randn(shape[-1], generator=gen)
    dy = torch.randn(shape, generator=gen)
    got = fwd_bwd(fused, x.to(DEVICE), w.to(DEVICE), dy.to(DEVICE))
    ref = fwd_bwd(rms_norm_reference, x.double(), w.double(), dy.double())
    assert got[0].dtype == torch.float32
    for name, a, b in zip(("y", "dx", "dw"), got, ref):
        assert rel_err(a.cpu(), b) <= 2e-6, name


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_bf16_activations(fused, weight_dtype):
    """bf16 x: the normalised values round to bf16 before the weight, as eagerly; the output
    takes the promoted dtype of x and the weight, the gradients their inputs' dtypes."""
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(37, 64, generator=gen) * 2).bfloat16()
    w = (1 + 0.1 * torch.randn(64, generator=gen)).to(weight_dtype)
    dy = torch.randn(37, 64, generator=gen).bfloat16()
    got = fwd_bwd(fused, x.to(DEVICE), w.to(DEVICE), dy.to(DEVICE))
    ref = fwd_bwd(rms_norm_reference, x, w, dy)
    assert [t.dtype for t in got] == [torch.promote_types(torch.bfloat16, weight_dtype),
                                      torch.bfloat16, weight_dtype]
    for name, a, b in zip(("y", "dx", "dw"), got, ref):
        # two bf16 roundings (the normalised values, the output) of 2^-8 each, twice that under
        # the interpreter, which rounds toward zero
        assert rel_err(a.float().cpu(), b.float()) <= 2e-2, name


def test_model_with_fused_norms_matches_eager(fused, seeded, monkeypatch):
    """The tiny model's loss and every gradient with all its local-path norms (before each mixer
    and FFN, MLA's KV-latent norm, the final norm) through the fused kernel."""
    import deltatron.model.norm as norm_module
    from deltatron.model.config import ModelConfig
    from deltatron.model.model import build_model

    cfg = ModelConfig(transformer_impl="local")  # TE's norms, where it imports, are its own
    torch.manual_seed(0)
    model = build_model(cfg)
    # the default device: CUDA on a GPU machine, where norm_module.rms_norm would be fused too
    tokens = torch.randint(0, cfg.vocab_size, (2, 32)).to(next(model.parameters()).device)
    results = []
    for fn in (rms_norm_reference, fused):
        monkeypatch.setattr(norm_module, "rms_norm", fn)
        model.zero_grad(set_to_none=True)
        loss = model(tokens, None, None, labels=tokens).float().mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                        if p.grad is not None}))
    (loss_e, grads_e), (loss_f, grads_f) = results
    assert torch.allclose(loss_e, loss_f, rtol=1e-5)
    assert grads_e.keys() == grads_f.keys()
    norms = [n for n in grads_e if "norm" in n]
    assert norms, "no norm weights among the gradients"
    for name in grads_e:
        assert rel_err(grads_f[name], grads_e[name]) <= 1e-4, name
