"""The dense MLP: megatron-core's MLP (its linears, TE or local, checkpoint layout and recompute
unchanged) with the gated SiLU between them fused (deltatron.kernels.swiglu).

megatron-core computes the activation eagerly unless Transformer Engine's activation module or its
torch.compile'd bias_swiglu is configured; the eager form is four full-size passes over strided
views forward and more backward. The fused kernel is taken whenever the configuration is the plain
SwiGLU it computes; anything else (biases, clamps, offsets, per-token scales, TE's activation
module) runs megatron-core's forward as it is. The MoE layers' shared expert is megatron-core's
SharedExpertMLP on top of the same forward (`build_shared_experts`).
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.shared_experts import FusedSharedExpertMLP, SharedExpertMLP

from deltatron.kernels.swiglu import swiglu


def plain_swiglu(config) -> bool:
    """Whether megatron-core's config asks for the activation deltatron.kernels.swiglu computes:
    gated SiLU without bias, clamp or linear offset."""
    return (
        config.gated_linear_unit
        and config.activation_func is F.silu
        and not config.add_bias_linear
        and getattr(config, "activation_func_clamp_value", None) is None
        and getattr(config, "glu_linear_offset", 0.0) == 0.0
    )


class SwiGLUMLP(MLP):
    """megatron-core's MLP whose SwiGLU runs deltatron.kernels.swiglu.

    forward(hidden_states [S, B, h]) -> (output [S, B, h], None), as MLP.forward."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # megatron-core's own activation paths (TE's module, its bias_swiglu fusion) stay its own
        cfg = self.config
        self.fused_swiglu = (
            plain_swiglu(cfg) and not cfg.use_te_activation_func and not cfg.bias_activation_fusion
        )

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if not self.fused_swiglu or per_token_scale is not None:
            return super().forward(hidden_states, per_token_scale, **kwargs)
        intermediate, _ = self.linear_fc1(hidden_states)
        return self.linear_fc2(swiglu(intermediate))


class SwiGLUSharedExpertMLP(SharedExpertMLP, SwiGLUMLP):
    """megatron-core's SharedExpertMLP (its gate, overlap and checkpoint layout) whose
    MLP.forward is SwiGLUMLP's: SharedExpertMLP.forward calls super().forward, which the method
    order resolves to SwiGLUMLP.forward."""


def build_shared_experts(*, config, pg_collection, gate: bool, submodules, name=None):
    """megatron-core's shared-expert builder (moe_module_specs._build_shared_experts) with
    SwiGLUSharedExpertMLP in place of SharedExpertMLP; its grouped-GEMM variant as it is."""
    cls = (
        FusedSharedExpertMLP
        if getattr(config, "use_grouped_gemm_for_shared_expert", False)
        else SwiGLUSharedExpertMLP
    )
    return cls(config=config, submodules=submodules, gate=gate, pg_collection=pg_collection,
               name=name)
