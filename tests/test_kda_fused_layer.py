"""The KDA layer wired to its fused kernels gives the model the same logits and gradients as the
eager path it takes on CPU.

On a GPU, KimiDeltaAttention runs the fused short-convolution and gating kernels and the Triton
recurrence; on CPU it runs their eager references. The kernels are checked one by one against
those references (tests/test_short_conv.py, tests/test_kda_gating.py, tests/test_kda_triton.py);
this checks the wiring: weights, head groups, layouts and document positions as the layer hands
them over, the output laid out for the projection. The kernels run under the Triton interpreter
(TRITON_INTERPRET=1, set by conftest) on the small model of tests/test_model.py, with packed
documents and with a batch of two rows.
"""

from __future__ import annotations

import pytest
import torch

from deltatron.model.config import ModelConfig
from deltatron.model.model import build_model
from test_model import SMALL, logits_and_grads, small_batch


def require_interpreter() -> None:
    """These tests run the Triton kernels on CPU tensors: on a GPU machine (no TRITON_INTERPRET)
    the layer takes the kernels by itself, and tests/test_kda_triton.py and the kernel tests
    check them there."""
    triton_common = pytest.importorskip("deltatron.kernels.kda.triton_common", reason="needs triton")
    if not triton_common.INTERPRETED.value:
        pytest.skip("runs the Triton kernels on CPU tensors: needs TRITON_INTERPRET=1 (conftest sets it)")


def fused_kernels(monkeypatch):
    """Route the layer through the kernels' autograd functions, as it does for CUDA tensors."""
    require_interpreter()
    from deltatron.kernels.kda_gating import _DecayGate, _GatedRMSNorm
    from deltatron.kernels.short_conv import L2_EPS, ShortConvSiLU
    from deltatron.model import kda as kda_module

    calls = {"conv": 0, "gate": 0, "norm": 0}

    def conv(x, w, pos, n):
        calls["conv"] += 1
        return ShortConvSiLU.apply(x, w, pos, n, L2_EPS)

    def gate(*args):
        calls["gate"] += 1
        return _DecayGate.apply(*args)

    def norm(*args):
        calls["norm"] += 1
        return _GatedRMSNorm.apply(*args)

    monkeypatch.setattr(kda_module, "short_conv_silu", conv)
    monkeypatch.setattr(kda_module, "kda_decay_gate", gate)
    monkeypatch.setattr(kda_module, "gated_rms_norm", norm)
    monkeypatch.setattr(kda_module.KimiDeltaAttention, "_kernel_backend", lambda self: "triton")
    return calls


@pytest.mark.parametrize("packed", [True, False], ids=["documents", "batch"])
def test_fused_kda_layer_matches_the_eager_path(seeded, monkeypatch, packed):
    require_interpreter()  # before the eager reference, which runs on CPU tensors
    cfg = ModelConfig(**SMALL)
    model = build_model(cfg)
    n_kda = sum(type(l.self_attention).__name__ == "KimiDeltaAttention" for l in model.decoder.layers)
    # packed: a one-token document and a reset inside a convolution window
    tokens, kw = small_batch(cfg, packed, cu=[0, 17, 18, 48], seed=5)
    ref_logits, ref_grads = logits_and_grads(model, tokens, kw)
    calls = fused_kernels(monkeypatch)
    logits, grads = logits_and_grads(model, tokens, kw)
    assert n_kda > 0 and calls == {"conv": 3 * n_kda, "gate": n_kda, "norm": n_kda}
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        scale = ref_grads[name].abs().max().clamp_min(1e-6)
        assert (g - ref_grads[name]).abs().max() / scale < 1e-4, name
