"""Mapping between Hugging Face Kimi Linear (transformers' `KimiLinearForCausalLM`) and deltatron.

Names: transformers' naming (../shared/reference/transformers-kimi-linear.md). Our model is
megatron-core's hybrid stack, where HF layer i becomes sub-layer 2i (mixer: KDA or MLA) and 2i+1
(FFN: dense MLP or MoE). These functions work on full (unsharded) state dicts of a single-process
model built with megatron-core's local modules; sharded conversion builds on them.
"""

from __future__ import annotations

from typing import Any

import torch

from deltatron.model.config import ModelConfig


def to_hf_config(cfg: ModelConfig, **extra: Any):
    """transformers `KimiLinearConfig` describing the same architecture.

    extra: further KimiLinearConfig fields (token ids, attn_implementation, ...); the published
    model's special token ids do not exist in small vocabularies, so they default to None.
    """
    from transformers import KimiLinearConfig

    for token in ("pad_token_id", "bos_token_id", "eos_token_id"):
        extra.setdefault(token, None)

    mla = [i + 1 for i in cfg.mla_layer_indices()]
    kda = [i + 1 for i in range(cfg.num_layers) if i + 1 not in mla]
    return KimiLinearConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.dense_ffn_hidden_size,
        moe_intermediate_size=cfg.moe_ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.mla_num_heads,
        num_key_value_heads=cfg.mla_num_heads,
        q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.moe_topk,
        n_shared_experts=cfg.num_shared_experts,
        routed_scaling_factor=cfg.routed_scaling_factor,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=not cfg.untie_embeddings,
        first_k_dense_replace=cfg.first_k_dense,
        linear_attn_config={
            "head_dim": cfg.kda_head_dim,
            "num_heads": cfg.kda_num_heads,
            "short_conv_kernel_size": cfg.kda_conv_kernel,
            "full_attn_layers": mla,
            "kda_layers": kda,
        },
        **extra,
    )


def hf_to_deltatron(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Convert a transformers Kimi Linear state dict to deltatron's (local-module) names."""
    sd = dict(hf_sd)
    out: dict[str, torch.Tensor] = {}

    def take(name):
        if name not in sd:
            raise KeyError(f"Hugging Face checkpoint lacks {name}")
        return sd.pop(name)

    out["embedding.word_embeddings.weight"] = take("model.embed_tokens.weight")
    out["decoder.final_norm.weight"] = take("model.norm.weight")
    if cfg.untie_embeddings:
        out["output_layer.weight"] = take("lm_head.weight")
    else:
        sd.pop("lm_head.weight", None)
    mla = set(cfg.mla_layer_indices())
    hk = cfg.kda_num_heads * cfg.kda_head_dim
    for i in range(cfg.num_layers):
        src, mix, ffn = f"model.layers.{i}.", f"decoder.layers.{2 * i}.", f"decoder.layers.{2 * i + 1}."
        out[mix + "input_layernorm.weight"] = take(src + "input_layernorm.weight")
        out[ffn + "pre_mlp_layernorm.weight"] = take(src + "post_attention_layernorm.weight")
        a, s = src + "self_attn.", mix + "self_attention."
        if i in mla:
            for hf_name, ours in (
                ("q_proj", "linear_q_proj"), ("kv_a_proj_with_mqa", "linear_kv_down_proj"),
                ("kv_a_layernorm", "kv_layernorm"), ("kv_b_proj", "linear_kv_up_proj"),
                ("o_proj", "linear_proj"),
            ):
                out[f"{s}{ours}.weight"] = take(f"{a}{hf_name}.weight")
        else:
            for hf_name, ours in (
                ("q_proj", "linear_q"), ("k_proj", "linear_k"), ("v_proj", "linear_v"),
                ("b_proj", "linear_beta"), ("forget_gate.f_a_proj", "linear_f_a"),
                ("forget_gate.f_b_proj", "linear_f_b"), ("g_a_proj", "linear_g_a"),
                ("g_b_proj", "linear_g_b"), ("o_proj", "linear_proj"),
            ):
                out[f"{s}{ours}.weight"] = take(f"{a}{hf_name}.weight")
            conv = take(a + "conv1d.weight").squeeze(1)  # [3*H*dk, W]: q, k, v channels
            out[s + "q_conv"], out[s + "k_conv"], out[s + "v_conv"] = conv.split([hk, hk, hk], 0)
            out[s + "A_log"] = take(a + "forget_gate.A_log").reshape(-1)
            out[s + "dt_bias"] = take(a + "forget_gate.dt_bias")
            out[s + "o_norm_weight"] = take(a + "o_norm.weight")
        m, f = src + "mlp.", ffn + "mlp."
        if i < cfg.first_k_dense:
            out[f + "linear_fc1.weight"] = torch.cat([take(m + "gate_proj.weight"), take(m + "up_proj.weight")])
            out[f + "linear_fc2.weight"] = take(m + "down_proj.weight")
        else:
            out[f + "router.weight"] = take(m + "gate.weight")
            out[f + "router.expert_bias"] = take(m + "gate.e_score_correction_bias")
            gate_up, down = take(m + "experts.gate_up_proj"), take(m + "experts.down_proj")
            for e in range(cfg.num_experts):
                out[f"{f}experts.local_experts.{e}.linear_fc1.weight"] = gate_up[e]
                out[f"{f}experts.local_experts.{e}.linear_fc2.weight"] = down[e]
            if cfg.num_shared_experts:
                out[f + "shared_experts.linear_fc1.weight"] = torch.cat(
                    [take(m + "shared_experts.gate_proj.weight"), take(m + "shared_experts.up_proj.weight")]
                )
                out[f + "shared_experts.linear_fc2.weight"] = take(m + "shared_experts.down_proj.weight")
    if sd:
        raise KeyError(f"Hugging Face checkpoint has tensors deltatron does not use: {sorted(sd)[:10]}")
    return out


def load_hf_into(model: torch.nn.Module, hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Load a transformers state dict into a single-process deltatron model, checking every name."""
    ours = hf_to_deltatron(hf_sd, cfg)
    target = model.state_dict()
    missing = [k for k in target if k not in ours and not k.endswith("_extra_state")
               and not k.endswith("local_tokens_per_expert")]
    if missing:
        raise KeyError(f"conversion does not produce {missing[:10]}")
    for name, tensor in ours.items():
        if name not in target:
            raise KeyError(f"deltatron model has no tensor {name}")
        if target[name].shape != tensor.shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not fit {tuple(target[name].shape)}")
    model.load_state_dict(ours, strict=False)
