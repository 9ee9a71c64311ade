"""KDA's fused short convolution (conv + SiLU + per-head L2 norm) against the eager composition.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by conftest),
on shapes that cover: row tiles that do not divide T, channel counts that are not a multiple of the
channel tile, several batch rows, x read in place through a transposed [S, B, C] view, document
resets (a one-token document and a document starting inside a row tile), and normalised heads.
The eager reference runs in float64 on the same inputs; the eager convolution itself is checked
against torch's conv1d and against separate documents.
"""

from __future__ import annotations

import pytest
import torch

from deltatron.kernels.short_conv import causal_short_conv, short_conv_silu_reference
from deltatron.model.kda import positions_in_documents
from conftest import DEVICE, require_triton_kernels
from test_kda_triton import rel_err  # max abs error over max abs reference, shapes checked


def test_short_conv_resets_at_document_boundaries():
    torch.manual_seed(0)
    x = torch.randn(1, 20, 6)
    w = torch.randn(6, 4)
    cu = torch.tensor([0, 7, 8, 20])
    packed = causal_short_conv(x, w, positions_in_documents(cu, 20))
    separate = torch.cat([causal_short_conv(x[:, a:b], w) for a, b in [(0, 7), (7, 8), (8, 20)]], 1)
    torch.testing.assert_close(packed, separate)
    # and the plain form is torch's causal depthwise conv1d
    ref = torch.nn.functional.conv1d(x.transpose(1, 2), w[:, None], padding=3, groups=6)[..., :20]
    torch.testing.assert_close(causal_short_conv(x, w), ref.transpose(1, 2))


def _fused(*args):
    require_triton_kernels("the fused short convolution")
    from deltatron.kernels.short_conv import ShortConvSiLU

    return ShortConvSiLU.apply(*args)


def _run(fn, x0, w0, doc_pos, norm_group, dtype, grad_out):
    """fn's output and the gradients of x and weight for upstream grad_out. x goes in as the
    transposed view of an [S, B, C] tensor, as the layer hands it over."""
    x_sbc = x0.transpose(0, 1).detach().to(DEVICE, dtype).clone().requires_grad_()
    w = w0.detach().to(DEVICE, dtype).clone().requires_grad_()
    x = x_sbc.transpose(0, 1)
    pos = doc_pos.to(DEVICE) if doc_pos is not None else None
    out = fn(x, w, pos, norm_group, 1e-6)
    out.backward(grad_out.to(DEVICE, out.dtype))
    return out.double().cpu(), x_sbc.grad.transpose(0, 1).double().cpu(), w.grad.double().cpu()


CASES = [
    # B, T, C, norm_group, document offsets (None: one document per row)
    (2, 45, 40, 0, None),          # ragged row and channel tiles, no documents
    (1, 70, 64, 32, [0, 1, 30, 70]),  # a one-token document, a reset inside a row tile, 2 heads
    (3, 33, 48, 16, None),         # three heads of 16
    (1, 3, 20, 0, [0, 2, 3]),      # fewer tokens than taps
]


@pytest.mark.parametrize("B,T,C,norm_group,offsets", CASES)
def test_fused_short_conv_matches_eager(B, T, C, norm_group, offsets):
    gen = torch.Generator().manual_seed(T * C)
    x = torch.randn(B, T, C, generator=gen)
    w = torch.randn(C, 4, generator=gen) * 0.5
    grad_out = torch.randn(B, T, C, generator=gen)
    doc_pos = positions_in_documents(torch.tensor(offsets), T) if offsets else None
    ours = _run(_fused, x, w, doc_pos, norm_group, torch.float32, grad_out)
    ref = _run(short_conv_silu_reference, x, w, doc_pos, norm_group, torch.float64, grad_out)
    for name, a, b in zip(("out", "grad x", "grad weight"), ours, ref):
        err = rel_err(a, b)
        assert err < 2e-6, f"{name}: relative error {err:.2e}"


def test_fused_short_conv_bf16_against_fp32():
    """bf16 inputs: the kernels compute in fp32 and round once, so they stay within bf16's rounding
    of the fp32 result (the eager bf16 form rounds after every operation)."""
    gen = torch.Generator().manual_seed(1)
    T, C = 64, 128
    x = torch.randn(2, T, C, generator=gen)
    w = torch.randn(C, 4, generator=gen) * 0.5
    grad_out = torch.randn(2, T, C, generator=gen)
    ours = _run(_fused, x, w, None, 128, torch.bfloat16, grad_out)
    ref = _run(short_conv_silu_reference, x, w, None, 128, torch.float64, grad_out)
    for name, a, b in zip(("out", "grad x", "grad weight"), ours, ref):
        err = rel_err(a, b)
        assert err < 2e-2, f"{name}: relative error {err:.2e}"
