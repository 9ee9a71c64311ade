"""The KDA mixer hands the recurrence q, k and v of one dtype.

Under bf16 training the fp32 L2 normalisation must not leave q and k in fp32: the Triton kernel
chooses its intermediates' dtype and tl.dot precision from the input dtypes, and mixed inputs cost
fp32 intermediates and 3xTF32 products.
"""

from __future__ import annotations

import torch

import deltatron.model.kda as kda_module
from deltatron.kernels.kda.triton_common import dot_precision, operand_dtype
from deltatron.model.config import ModelConfig
from deltatron.model.model import build_model


def test_bf16_kda_passes_one_dtype_to_the_recurrence(seeded, monkeypatch):
    model = build_model(ModelConfig())
    kda = next(m for m in model.modules() if isinstance(m, kda_module.KimiDeltaAttention))
    kda.to(torch.bfloat16)
    for p in (kda.A_log, kda.dt_bias, kda.o_norm_weight):  # as keep_fp32_parameters leaves them
        p.data = p.data.float()
    seen = {}

    def record(q, k, v, g, beta, **kwargs):
        seen.update(q=q.dtype, k=k.dtype, v=v.dtype)
        return torch.zeros_like(v), None

    monkeypatch.setattr(kda_module, "kda_op", record)
    x = torch.randn(16, 2, ModelConfig().hidden_size, dtype=torch.bfloat16)  # [S, B, D]
    out, _ = kda(x)
    assert seen == {"q": torch.bfloat16, "k": torch.bfloat16, "v": torch.bfloat16}
    assert dot_precision(seen["q"], seen["k"], seen["v"]) == "tf32"
    assert operand_dtype(seen["q"], seen["k"], seen["v"]) == torch.bfloat16
    assert out.dtype == torch.bfloat16
