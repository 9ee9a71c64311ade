"""Layer specs of the Kimi Linear hybrid stack, for Transformer Engine or megatron-core local modules.

Each backend is one `_Backend` record of classes; `kimi_linear_stack_spec` assembles the same
structure from either, so the TE and local paths differ only in which classes they name.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import torch

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.models.hybrid.hybrid_block import HybridStackSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.multi_latent_attention import MLASelfAttentionSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    MoETransformerLayer,
    TransformerLayer,
    TransformerLayerSubmodules,
)

from deltatron.model.grouped_experts import GroupedGemmExperts
from deltatron.model.kda import KDASubmodules, KimiDeltaAttention
from deltatron.model.mla import KimiMLASelfAttention, SDPACoreAttention
from deltatron.model.mlp import SwiGLUMLP, build_shared_experts
from deltatron.model.norm import RMSNorm


@dataclass(frozen=True)
class _Backend:
    norm: type
    column: type  # column-parallel linear
    row: type  # row-parallel linear
    duplicated: type  # small down-projection replicated over TP (MLA's kv down-projection)
    core_attention: type
    mlp_fc1: type  # the dense MLP's first linear (TE fuses the pre-MLP norm into it)
    pre_mlp_norm: type
    use_te: bool


def _local_backend() -> _Backend:
    return _Backend(
        norm=RMSNorm,
        column=ColumnParallelLinear,
        row=RowParallelLinear,
        duplicated=ColumnParallelLinear,
        core_attention=SDPACoreAttention,
        mlp_fc1=ColumnParallelLinear,
        pre_mlp_norm=RMSNorm,
        use_te=False,
    )


def _te_backend() -> _Backend:
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TELinear,
        TENorm,
        TERowParallelLinear,
    )

    return _Backend(
        norm=TENorm,
        column=TEColumnParallelLinear,
        row=TERowParallelLinear,
        duplicated=TELinear,
        core_attention=TEDotProductAttention,
        mlp_fc1=TELayerNormColumnParallelLinear,
        pre_mlp_norm=IdentityOp,
        use_te=True,
    )


def _fixed_eps_norm(norm: type, eps: float):
    """A norm builder that ignores the eps its caller passes.

    MLA builds its KV-latent norm with the model's eps (1e-5), but Kimi Linear's reference uses
    1e-6 there (transformers' `kv_a_layernorm` keeps RMSNorm's default).
    """

    def build(config, hidden_size, eps=None, **kwargs):
        return norm(config=config, hidden_size=hidden_size, eps=eps_fixed, **kwargs)

    eps_fixed = eps
    return build


def get_bias_dropout(training: bool, fused: bool):
    """A bias-dropout without the residual add, in the place of megatron-core's
    `get_bias_dropout_add`: AttnRes sub-layers return f(norm(h)) and the stack forms the next input.
    fused: ignored (there is no add to fuse)."""

    def bias_dropout(x_with_bias, residual, prob):
        x, bias = x_with_bias
        if bias is not None:
            x = x + bias
        return torch.nn.functional.dropout(x, p=prob, training=training)

    return bias_dropout


def moe_module_spec(use_te: bool, num_experts: int, grouped_gemm: bool):
    """megatron-core's MoE layer builder. With TE, its own experts (TEGroupedMLP when
    grouped_gemm); with local modules, our `GroupedGemmExperts` (the same parameters as
    megatron-core's local SequentialMLP, computed with torch._grouped_mm) when grouped_gemm,
    else SequentialMLP. The shared expert is megatron-core's with the fused SwiGLU
    (deltatron.model.mlp.build_shared_experts)."""
    builder = get_moe_module_spec(use_te=use_te, num_experts=max(num_experts, 1), moe_grouped_gemm=grouped_gemm)
    submodules = builder.keywords["submodules"]
    shared = submodules.shared_experts  # partial(_build_shared_experts, submodules=...)
    submodules = replace(submodules, shared_experts=partial(build_shared_experts, **shared.keywords))
    if not use_te and grouped_gemm:
        sequential = submodules.experts  # partial(SequentialMLP, submodules=...)
        experts = partial(GroupedGemmExperts, *sequential.args, **sequential.keywords)
        submodules = replace(submodules, experts=experts)
    return partial(builder.func, submodules=submodules)


def kimi_linear_stack_spec(
    transformer_impl: str, num_experts: int, grouped_gemm: bool, kv_norm_eps: float,
    residual: str = "standard", stage_sublayers: tuple[int, ...] | None = None,
) -> ModuleSpec:
    """Spec of the whole decoder stack. transformer_impl: "transformer_engine" or "local".

    residual: "standard" (megatron-core's hybrid stack, residual add in every sub-layer) or
    "attnres"/"block_attnres" (deltatron.model.attnres.AttnResStack over sub-layers without the
    add). stage_sublayers: sub-layers of each pipeline stage (AttnRes under pipeline parallelism).
    """
    from deltatron.model.model import KimiLinearStack

    b = _te_backend() if transformer_impl == "transformer_engine" else _local_backend()
    bda = get_bias_dropout_add if residual == "standard" else get_bias_dropout

    kda_layer = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=b.norm,
            self_attention=ModuleSpec(
                module=KimiDeltaAttention,
                submodules=KDASubmodules(
                    linear_q=b.column,
                    linear_k=b.column,
                    linear_v=b.column,
                    linear_beta=b.column,
                    # the low-rank down-projections gather their (tiny) output: local class
                    linear_f_a=ColumnParallelLinear,
                    linear_f_b=b.column,
                    linear_g_a=ColumnParallelLinear,
                    linear_g_b=b.column,
                    linear_proj=b.row,
                ),
            ),
            self_attn_bda=bda,
        ),
    )
    mla_layer = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=b.norm,
            self_attention=ModuleSpec(
                module=KimiMLASelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=MLASelfAttentionSubmodules(
                    linear_q_proj=b.column,
                    linear_kv_down_proj=b.duplicated,
                    linear_kv_up_proj=b.column,
                    core_attention=b.core_attention,
                    linear_proj=b.row,
                    q_layernorm=IdentityOp,
                    kv_layernorm=_fixed_eps_norm(b.norm, kv_norm_eps),
                ),
            ),
            self_attn_bda=bda,
        ),
    )
    mlp_layer = ModuleSpec(
        module=MLPLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=b.pre_mlp_norm,
            mlp=partial(
                SwiGLUMLP.as_mlp_submodule,
                submodules=MLPSubmodules(linear_fc1=b.mlp_fc1, linear_fc2=b.row),
            ),
            mlp_bda=bda,
            # Transformer Engine fuses the pre-MLP norm into linear_fc1 and saves it as
            # linear_fc1.layer_norm_weight; the local modules save theirs under the same key, so
            # one checkpoint loads with and without TE (megatron-core's GPT local spec does the same)
            sharded_state_dict_keys_map={} if b.use_te else {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"},
        ),
    )
    moe_layer = ModuleSpec(
        module=MoETransformerLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=b.norm,
            mlp=moe_module_spec(b.use_te, num_experts, grouped_gemm),
            mlp_bda=bda,
        ),
    )
    if residual == "standard":
        stack, params = KimiLinearStack, {"final_norm": b.norm}
    else:
        from deltatron.model.attnres import AttnResStack

        stack, params = AttnResStack, {"final_norm": b.norm, "stage_sublayers": stage_sublayers}
    return ModuleSpec(
        module=stack,
        params=params,
        submodules=HybridStackSubmodules(
            gdn_layer=kda_layer, mla_layer=mla_layer, mlp_layer=mlp_layer, moe_layer=moe_layer
        ),
    )
