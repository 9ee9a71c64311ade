"""Model configuration: the typed schema Hydra fills (`conf/model/*.yaml`) and its translation
into megatron-core's `MLATransformerConfig`.

A Kimi Linear "layer" is mixer (KDA or MLA) + FFN (dense SwiGLU or MoE). megatron-core's hybrid
stack builds each of those as its own residual sub-layer, so the layer list becomes a pattern
string with two symbols per layer: mixer ('G' = our KDA in the gated-delta-net slot, '+' = MLA)
then FFN ('-' = dense MLP, 'E' = MoE). Pre-norm sub-layers with a residual add each are exactly
the Kimi block Norm -> mixer -> add -> Norm -> FFN -> add.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn.functional as F

# megatron-core's hybrid pattern symbols (models/hybrid/hybrid_layer_allocation.Symbols).
KDA_SYMBOL = "G"
MLA_SYMBOL = "+"
DENSE_SYMBOL = "-"
MOE_SYMBOL = "E"


@dataclass
class ModelConfig:
    """Kimi Linear architecture. Defaults are the `tiny` preset's; presets live in conf/model/."""

    name: str = "tiny"
    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 4
    # 1-based indices of the MLA (full attention) layers; the others are KDA. None means the
    # Kimi rule: every 4th layer and the last one.
    mla_layers: Optional[list[int]] = None
    max_sequence_length: int = 4096

    # KDA
    kda_num_heads: int = 4
    kda_head_dim: int = 32
    kda_conv_kernel: int = 4
    kda_chunk_size: int = 64
    # "auto" picks the fastest available implementation of the KDA recurrence.
    kda_backend: str = "auto"

    # MLA (no query compression, NoPE: the 64-dim "rope" part is never rotated)
    mla_num_heads: int = 4
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # RMSNorm eps on the compressed KV latent (the reference keeps RMSNorm's default there)
    mla_kv_norm_eps: float = 1e-6

    # FFN: the first `first_k_dense` layers are dense SwiGLU of width `dense_ffn_hidden_size`,
    # the rest MoE with `num_experts` SwiGLU experts of width `moe_ffn_hidden_size`.
    first_k_dense: int = 1
    dense_ffn_hidden_size: int = 384
    num_experts: int = 8
    moe_ffn_hidden_size: int = 64
    moe_topk: int = 2
    num_shared_experts: int = 1
    routed_scaling_factor: float = 2.446
    router_bias_update_rate: float = 1e-3
    # megatron-core token dispatcher: "alltoall" (expert parallel) or "allgather"
    moe_token_dispatcher: str = "alltoall"
    moe_grouped_gemm: bool = True

    # Residual stream between sub-layers: "standard" (x + f(x)), "attnres" (full Attention
    # Residuals: each sub-layer's input is a softmax over depth of the embedding and every earlier
    # sub-layer output) or "block_attnres" (the same over `attnres_blocks` block sums).
    residual: str = "standard"
    # Block AttnRes: the 2*num_layers sub-layers are cut into this many contiguous blocks.
    attnres_blocks: int = 8

    norm_eps: float = 1e-5
    init_std: float = 0.02
    untie_embeddings: bool = True
    # "auto": Transformer Engine modules when transformer_engine imports, megatron-core local
    # modules otherwise; "transformer_engine" or "local" force one.
    transformer_impl: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived structure
    def mla_layer_indices(self) -> list[int]:
        """0-based indices of MLA layers."""
        if self.mla_layers is not None:
            return sorted(i - 1 for i in self.mla_layers)
        idx = {i for i in range(self.num_layers) if (i + 1) % 4 == 0}
        idx.add(self.num_layers - 1)
        return sorted(idx)

    def layer_pattern(self) -> str:
        """megatron-core hybrid layer pattern, two symbols per Kimi layer."""
        mla = set(self.mla_layer_indices())
        out = []
        for i in range(self.num_layers):
            out.append(MLA_SYMBOL if i in mla else KDA_SYMBOL)
            out.append(DENSE_SYMBOL if i < self.first_k_dense else MOE_SYMBOL)
        return "".join(out)

    def validate(self) -> None:
        errors = []
        if self.num_layers < 1:
            errors.append(f"num_layers={self.num_layers} must be >= 1")
        if self.mla_layers is not None:
            bad = [i for i in self.mla_layers if not 1 <= i <= self.num_layers]
            if bad:
                errors.append(
                    f"mla_layers={list(self.mla_layers)} has indices {bad} outside 1..{self.num_layers} "
                    "(the list is 1-based, like Kimi's linear_attn_config.full_attn_layers)"
                )
        if not 0 <= self.first_k_dense <= self.num_layers:
            errors.append(f"first_k_dense={self.first_k_dense} must be in 0..num_layers")
        if self.first_k_dense < self.num_layers:
            if self.num_experts < 1 or not 1 <= self.moe_topk <= self.num_experts:
                errors.append(
                    f"moe_topk={self.moe_topk} must be in 1..num_experts={self.num_experts}"
                )
        if self.kda_backend not in ("auto", "torch", "naive", "triton"):
            errors.append(f"kda_backend={self.kda_backend!r}: choose auto, torch, naive or triton")
        if self.residual not in ("standard", "attnres", "block_attnres"):
            errors.append(f"residual={self.residual!r}: choose standard, attnres or block_attnres")
        if self.residual == "block_attnres" and not 1 <= self.attnres_blocks <= 2 * self.num_layers:
            errors.append(
                f"attnres_blocks={self.attnres_blocks} must be in 1..{2 * self.num_layers} "
                f"(the model has {2 * self.num_layers} sub-layers: mixer and FFN of each layer)"
            )
        if self.transformer_impl not in ("auto", "transformer_engine", "local"):
            errors.append(
                f"transformer_impl={self.transformer_impl!r}: choose auto, transformer_engine or local"
            )
        if self.moe_token_dispatcher not in ("alltoall", "allgather"):
            errors.append(
                f"moe_token_dispatcher={self.moe_token_dispatcher!r}: choose alltoall or allgather"
            )
        for name in ("hidden_size", "kda_num_heads", "kda_head_dim", "mla_num_heads", "vocab_size"):
            if getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)} must be >= 1")
        if errors:
            raise ValueError("invalid model config: " + "; ".join(errors))

    # ------------------------------------------------------------------ megatron-core config
    def to_transformer_config(self, **parallel_and_precision) -> "KimiLinearTransformerConfig":
        """megatron-core config for this architecture. Keyword arguments carry the parallel layout
        and precision fields of `ModelParallelConfig` (tensor_model_parallel_size, bf16, ...)."""
        from deltatron.model.te import resolve_transformer_impl

        has_moe = self.first_k_dense < self.num_layers
        kw = dict(
            num_layers=2 * self.num_layers,  # sub-layers of the hybrid stack
            hidden_size=self.hidden_size,
            num_attention_heads=self.mla_num_heads,
            ffn_hidden_size=self.dense_ffn_hidden_size,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_eps,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method_std=self.init_std,
            bias_dropout_fusion=False,
            apply_rope_fusion=False,
            persist_layer_norm=False,
            # MLA, NoPE: "rope" with rotary_percent 0 has an empty frequency table, so the
            # 64-dim "rope" slots pass through unrotated and k_pe stays shared across heads.
            multi_latent_attention=True,
            q_lora_rank=self.q_lora_rank,
            kv_lora_rank=self.kv_lora_rank,
            qk_head_dim=self.qk_nope_head_dim,
            qk_pos_emb_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim,
            rope_type="rope",
            rotary_percent=0.0,
            qk_layernorm=False,
            # KDA geometry in megatron-core's linear-attention fields
            linear_conv_kernel_dim=self.kda_conv_kernel,
            linear_key_head_dim=self.kda_head_dim,
            linear_value_head_dim=self.kda_head_dim,
            linear_num_key_heads=self.kda_num_heads,
            linear_num_value_heads=self.kda_num_heads,
            kda_chunk_size=self.kda_chunk_size,
            kda_backend=self.kda_backend,
            residual=self.residual,
            attnres_blocks=self.attnres_blocks,
            transformer_impl=resolve_transformer_impl(self.transformer_impl),
        )
        if has_moe:
            kw.update(
                num_moe_experts=self.num_experts,
                moe_ffn_hidden_size=self.moe_ffn_hidden_size,
                moe_router_topk=self.moe_topk,
                moe_router_score_function="sigmoid",
                moe_router_dtype="fp32",
                moe_router_enable_expert_bias=True,
                moe_router_bias_update_rate=self.router_bias_update_rate,
                moe_router_topk_scaling_factor=self.routed_scaling_factor,
                moe_router_load_balancing_type="none",
                moe_aux_loss_coeff=0.0,
                moe_shared_expert_intermediate_size=self.num_shared_experts * self.moe_ffn_hidden_size
                if self.num_shared_experts
                else None,
                moe_token_dispatcher_type=self.moe_token_dispatcher,
                moe_grouped_gemm=self.moe_grouped_gemm and kw["transformer_impl"] == "transformer_engine",
            )
        kw.update(parallel_and_precision)
        return KimiLinearTransformerConfig(**kw)

    # ------------------------------------------------------------------ parameter arithmetic
    def parameter_counts(self) -> dict[str, int]:
        """Parameter counts from the architecture's arithmetic alone (no model is built).

        Returns total, activated per token (routed top-k + shared experts), and both without the
        embedding and output layer.
        """
        d = self.hidden_size
        hk = self.kda_num_heads * self.kda_head_dim
        kda = (
            3 * d * hk  # q, k, v projections
            + 3 * hk * self.kda_conv_kernel  # short convolutions
            + self.kda_num_heads  # A_log
            + hk  # dt_bias
            + d * self.kda_head_dim + self.kda_head_dim * hk  # f_a, f_b
            + d * self.kda_num_heads  # beta projection
            + d * self.kda_head_dim + self.kda_head_dim * hk  # g_a, g_b
            + self.kda_head_dim  # output norm (shared across heads)
            + hk * d  # output projection
        )
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        q = (
            d * self.mla_num_heads * qk
            if self.q_lora_rank is None
            else d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * self.mla_num_heads * qk
        )
        mla = (
            q
            + d * (self.kv_lora_rank + self.qk_rope_head_dim)
            + self.kv_lora_rank  # kv norm
            + self.kv_lora_rank * self.mla_num_heads * (self.qk_nope_head_dim + self.v_head_dim)
            + self.mla_num_heads * self.v_head_dim * d
        )
        dense = 3 * d * self.dense_ffn_hidden_size
        expert = 3 * d * self.moe_ffn_hidden_size
        router = self.num_experts * d
        norms = 2 * d
        total = active = 0
        mla_idx = set(self.mla_layer_indices())
        for i in range(self.num_layers):
            mixer = mla if i in mla_idx else kda
            if i < self.first_k_dense:
                ffn_total = ffn_active = dense
            else:
                ffn_total = router + (self.num_experts + self.num_shared_experts) * expert
                ffn_active = router + (self.moe_topk + self.num_shared_experts) * expert
            total += mixer + ffn_total + norms
            active += mixer + ffn_active + norms
        total += d  # final norm
        active += d
        if self.residual != "standard":
            # AttnRes: a pseudo-query and a key-norm weight per sub-layer and for the final aggregation
            depth = 2 * d * (2 * self.num_layers + 1)
            total += depth
            active += depth
        emb = self.vocab_size * d * (2 if self.untie_embeddings else 1)
        return {
            "total": total + emb,
            "active": active + emb,
            "total_no_embedding": total,
            "active_no_embedding": active,
        }


def _kimi_transformer_config_cls():
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    @dataclass
    class KimiLinearTransformerConfig(MLATransformerConfig):
        """megatron-core MLA config plus the KDA and AttnRes fields megatron-core does not have."""

        kda_chunk_size: int = 64
        kda_backend: str = "auto"
        # residual stream between sub-layers (ModelConfig.residual, attnres_blocks)
        residual: str = "standard"
        attnres_blocks: int = 8
        # output-layer loss by blocks of this many tokens, 0: megatron-core's logits + vocab-parallel
        # cross entropy (train.cross_entropy_chunk_size; deltatron/model/chunked_loss.py)
        cross_entropy_chunk_size: int = 0

    return KimiLinearTransformerConfig


KimiLinearTransformerConfig = _kimi_transformer_config_cls()


__all__ = ["ModelConfig", "KimiLinearTransformerConfig", "KDA_SYMBOL", "MLA_SYMBOL", "DENSE_SYMBOL", "MOE_SYMBOL"]
