"""Mapping between Hugging Face Kimi Linear (transformers' `KimiLinearForCausalLM`) and deltatron.

Names: transformers' naming (../shared/reference/transformers-kimi-linear.md). Our model is
megatron-core's hybrid stack, where HF layer i becomes sub-layer 2i (mixer: KDA or MLA) and 2i+1
(FFN: dense MLP or MoE). These functions work on full (unsharded) state dicts of a single-process
model built with megatron-core's local modules; sharded conversion builds on them.

Two Hugging Face namings exist. transformers' runtime modules use the "runtime" naming above
(stacked experts, one fused conv1d, the forget gate as a sub-module); the published checkpoints
(and transformers' own `save_pretrained`, which converts back on save) use the "published" naming:
`block_sparse_moe.` for MoE layers, per-expert `experts.E.w1/w2/w3`, separate `{q,k,v}_conv1d`, and
`f_a_proj`, `f_b_proj`, `A_log`, `dt_bias` directly under `self_attn`. transformers loads both.
`hf_to_deltatron` / `deltatron_to_hf` speak the runtime naming; `to_published` / `from_published`
convert between the two.
"""

from __future__ import annotations

from typing import Any

import re

import torch

from deltatron.model.config import ModelConfig

# deltatron state-dict entries that are no weights (Transformer Engine / megatron bookkeeping)
NON_WEIGHT_SUFFIXES = ("_extra_state", "local_tokens_per_expert")


# (transformers' module under self_attn, ours under self_attention) of each mixer's weights that
# are renamed one to one; both directions of the mapping use these tables
MLA_LINEARS = (
    ("q_proj", "linear_q_proj"), ("kv_a_proj_with_mqa", "linear_kv_down_proj"),
    ("kv_a_layernorm", "kv_layernorm"), ("kv_b_proj", "linear_kv_up_proj"), ("o_proj", "linear_proj"),
)
KDA_LINEARS = (
    ("q_proj", "linear_q"), ("k_proj", "linear_k"), ("v_proj", "linear_v"), ("b_proj", "linear_beta"),
    ("forget_gate.f_a_proj", "linear_f_a"), ("forget_gate.f_b_proj", "linear_f_b"),
    ("g_a_proj", "linear_g_a"), ("g_b_proj", "linear_g_b"), ("o_proj", "linear_proj"),
)


def to_hf_config(cfg: ModelConfig, **extra: Any):
    """transformers `KimiLinearConfig` describing the same architecture.

    extra: further KimiLinearConfig fields (token ids, attn_implementation, ...); the published
    model's special token ids do not exist in small vocabularies, so they default to None.
    """
    from transformers import KimiLinearConfig

    if cfg.residual != "standard":
        raise ValueError(
            f"model.residual={cfg.residual}: transformers' Kimi Linear has standard residuals only, so "
            "an Attention Residuals model has no Hugging Face equivalent to export to or import from"
        )
    for token in ("pad_token_id", "bos_token_id", "eos_token_id"):
        extra.setdefault(token, None)
    extra.setdefault("max_position_embeddings", cfg.max_sequence_length)

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
    elif "lm_head.weight" in sd:
        lm_head = sd.pop("lm_head.weight")
        if not torch.equal(lm_head, out["embedding.word_embeddings.weight"]):
            raise ValueError(
                "lm_head.weight differs from model.embed_tokens.weight, but the config ties them "
                "(tie_word_embeddings); import it untied (tie_word_embeddings: false)"
            )
    mla = set(cfg.mla_layer_indices())
    hk = cfg.kda_num_heads * cfg.kda_head_dim
    for i in range(cfg.num_layers):
        src, mix, ffn = f"model.layers.{i}.", f"decoder.layers.{2 * i}.", f"decoder.layers.{2 * i + 1}."
        out[mix + "input_layernorm.weight"] = take(src + "input_layernorm.weight")
        out[ffn + "pre_mlp_layernorm.weight"] = take(src + "post_attention_layernorm.weight")
        a, s = src + "self_attn.", mix + "self_attention."
        if i in mla:
            for hf_name, ours in MLA_LINEARS:
                out[f"{s}{ours}.weight"] = take(f"{a}{hf_name}.weight")
        else:
            for hf_name, ours in KDA_LINEARS:
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


def deltatron_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Convert a deltatron (local-module, full) state dict to transformers' runtime naming: the
    exact inverse of `hf_to_deltatron`. Entries that are no weights (NON_WEIGHT_SUFFIXES) are
    skipped; any other tensor the mapping does not know is an error."""
    src = {k: v for k, v in sd.items() if not k.endswith(NON_WEIGHT_SUFFIXES)}
    out: dict[str, torch.Tensor] = {}

    def take(name):
        if name not in src:
            raise KeyError(f"deltatron state dict lacks {name}")
        return src.pop(name)

    out["model.embed_tokens.weight"] = take("embedding.word_embeddings.weight")
    out["model.norm.weight"] = take("decoder.final_norm.weight")
    # transformers' Kimi Linear never ties lm_head to the embeddings, so a tied model writes both
    out["lm_head.weight"] = take("output_layer.weight") if cfg.untie_embeddings else out["model.embed_tokens.weight"]
    mla = set(cfg.mla_layer_indices())
    hk = cfg.kda_num_heads * cfg.kda_head_dim
    for i in range(cfg.num_layers):
        dst, mix, ffn = f"model.layers.{i}.", f"decoder.layers.{2 * i}.", f"decoder.layers.{2 * i + 1}."
        out[dst + "input_layernorm.weight"] = take(mix + "input_layernorm.weight")
        out[dst + "post_attention_layernorm.weight"] = take(ffn + "pre_mlp_layernorm.weight")
        a, s = dst + "self_attn.", mix + "self_attention."
        if i in mla:
            for hf_name, ours in MLA_LINEARS:
                out[f"{a}{hf_name}.weight"] = take(f"{s}{ours}.weight")
        else:
            for hf_name, ours in KDA_LINEARS:
                out[f"{a}{hf_name}.weight"] = take(f"{s}{ours}.weight")
            conv = torch.cat([take(s + "q_conv"), take(s + "k_conv"), take(s + "v_conv")])
            if conv.shape[0] != 3 * hk:
                raise ValueError(f"{s}q/k/v_conv: {conv.shape[0]} channels, expected 3 x {hk}")
            out[a + "conv1d.weight"] = conv.unsqueeze(1)
            out[a + "forget_gate.A_log"] = take(s + "A_log").reshape(1, 1, -1, 1)
            out[a + "forget_gate.dt_bias"] = take(s + "dt_bias")
            out[a + "o_norm.weight"] = take(s + "o_norm_weight")
        m, f = dst + "mlp.", ffn + "mlp."
        if i < cfg.first_k_dense:
            gate, up = take(f + "linear_fc1.weight").chunk(2)
            out[m + "gate_proj.weight"], out[m + "up_proj.weight"] = gate, up
            out[m + "down_proj.weight"] = take(f + "linear_fc2.weight")
        else:
            out[m + "gate.weight"] = take(f + "router.weight")
            out[m + "gate.e_score_correction_bias"] = take(f + "router.expert_bias")
            experts = range(cfg.num_experts)
            out[m + "experts.gate_up_proj"] = torch.stack(
                [take(f"{f}experts.local_experts.{e}.linear_fc1.weight") for e in experts]
            )
            out[m + "experts.down_proj"] = torch.stack(
                [take(f"{f}experts.local_experts.{e}.linear_fc2.weight") for e in experts]
            )
            if cfg.num_shared_experts:
                gate, up = take(f + "shared_experts.linear_fc1.weight").chunk(2)
                out[m + "shared_experts.gate_proj.weight"], out[m + "shared_experts.up_proj.weight"] = gate, up
                out[m + "shared_experts.down_proj.weight"] = take(f + "shared_experts.linear_fc2.weight")
    if src:
        raise KeyError(f"deltatron state dict has tensors the Hugging Face mapping does not know: {sorted(src)[:10]}")
    return out


# published name pieces -> runtime ones (the renamings of transformers' conversion_mapping)
_PUBLISHED_SELF_ATTN = {"f_a_proj.weight": "forget_gate.f_a_proj.weight",
                        "f_b_proj.weight": "forget_gate.f_b_proj.weight",
                        "A_log": "forget_gate.A_log", "dt_bias": "forget_gate.dt_bias"}
_LAYER = re.compile(r"^(model\.layers\.\d+\.)(.*)$")


def to_published(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Runtime naming -> the published checkpoints' naming (what transformers' save_pretrained
    writes). Dense layers keep `mlp.` as in the published checkpoints."""
    out: dict[str, torch.Tensor] = {}
    runtime_of = {v: k for k, v in _PUBLISHED_SELF_ATTN.items()}
    for name, t in hf_sd.items():
        match = _LAYER.match(name)
        if not match:
            out[name] = t
            continue
        prefix, rest = match.groups()
        i = int(prefix.split(".")[2])
        if rest.startswith("self_attn."):
            piece = rest[len("self_attn."):]
            if piece == "conv1d.weight":
                for part, chunk in zip("qkv", t.chunk(3)):
                    out[f"{prefix}self_attn.{part}_conv1d.weight"] = chunk
            else:
                out[prefix + "self_attn." + runtime_of.get(piece, piece)] = t
        elif rest.startswith("mlp.") and i >= cfg.first_k_dense:
            piece = rest[len("mlp."):]
            moe = prefix + "block_sparse_moe."
            if piece == "experts.gate_up_proj":
                for e, w in enumerate(t):
                    w1, w3 = w.chunk(2)
                    out[f"{moe}experts.{e}.w1.weight"], out[f"{moe}experts.{e}.w3.weight"] = w1, w3
            elif piece == "experts.down_proj":
                for e, w in enumerate(t):
                    out[f"{moe}experts.{e}.w2.weight"] = w
            else:
                out[moe + piece] = t
        else:
            out[name] = t
    return out


_EXPERT = re.compile(r"^experts\.(\d+)\.(w[123])\.weight$")


def from_published(hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Published (or mixed) naming -> runtime naming; runtime names pass through unchanged.
    Per-expert weights are stacked in expert order; a gap in the expert numbers is left for the
    name check to report (the stacked tensor then has too few experts)."""
    out: dict[str, torch.Tensor] = {}
    convs: dict[str, dict[str, torch.Tensor]] = {}
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for name, t in hf_sd.items():
        match = _LAYER.match(name)
        if not match:
            out[name] = t
            continue
        prefix, rest = match.groups()
        if rest.startswith("block_sparse_moe."):
            rest = "mlp." + rest[len("block_sparse_moe."):]
        if rest.startswith("self_attn."):
            piece = rest[len("self_attn."):]
            if piece in ("q_conv1d.weight", "k_conv1d.weight", "v_conv1d.weight"):
                convs.setdefault(prefix, {})[piece[0]] = t
                continue
            rest = "self_attn." + _PUBLISHED_SELF_ATTN.get(piece, piece)
        elif rest.startswith("mlp."):
            expert = _EXPERT.match(rest[len("mlp."):])
            if expert:
                experts.setdefault(prefix, {}).setdefault(expert.group(2), {})[int(expert.group(1))] = t
                continue
        out[prefix + rest] = t
    for prefix, parts in convs.items():
        if set(parts) != set("qkv"):  # incomplete: keep the published names for the report
            for part, t in parts.items():
                out[f"{prefix}self_attn.{part}_conv1d.weight"] = t
            continue
        out[prefix + "self_attn.conv1d.weight"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    for prefix, by_kind in experts.items():
        ids = sorted(set().union(*(d.keys() for d in by_kind.values())))
        complete = set(by_kind) == {"w1", "w2", "w3"} and all(
            sorted(d) == list(range(len(ids))) for d in by_kind.values()
        )
        if not complete:  # keep the published names so the check names what is missing
            for kind, d in by_kind.items():
                for e, t in d.items():
                    out[f"{prefix}block_sparse_moe.experts.{e}.{kind}.weight"] = t
            continue
        w1, w2, w3 = (by_kind[k] for k in ("w1", "w2", "w3"))
        out[prefix + "mlp.experts.gate_up_proj"] = torch.stack([torch.cat([w1[e], w3[e]]) for e in ids])
        out[prefix + "mlp.experts.down_proj"] = torch.stack([w2[e] for e in ids])
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


# ---------------------------------------------------------------------------- config.json -> ours
# (our field, config.json keys that may hold it: runtime name first, then the published alias)
_CONFIG_FIELDS = (
    ("vocab_size", ("vocab_size",)),
    ("hidden_size", ("hidden_size",)),
    ("num_layers", ("num_hidden_layers",)),
    ("dense_ffn_hidden_size", ("intermediate_size",)),
    ("moe_ffn_hidden_size", ("moe_intermediate_size",)),
    ("mla_num_heads", ("num_attention_heads",)),
    ("q_lora_rank", ("q_lora_rank",)),
    ("kv_lora_rank", ("kv_lora_rank",)),
    ("qk_nope_head_dim", ("qk_nope_head_dim",)),
    ("qk_rope_head_dim", ("qk_rope_head_dim",)),
    ("v_head_dim", ("v_head_dim",)),
    ("num_experts", ("num_local_experts", "num_experts")),
    ("moe_topk", ("num_experts_per_tok", "num_experts_per_token")),
    ("num_shared_experts", ("n_shared_experts", "num_shared_experts")),
    ("routed_scaling_factor", ("routed_scaling_factor",)),
    ("norm_eps", ("rms_norm_eps",)),
    ("max_sequence_length", ("max_position_embeddings", "model_max_length")),
)
# config.json keys whose value must be this for our model to compute the same function
_REQUIRED_VALUES = (
    (("hidden_act",), "silu"),
    (("attention_bias",), False),
    (("q_lora_rank",), None),
    (("norm_topk_prob", "moe_renormalize"), True),
    (("n_group", "num_expert_group"), 1),
    (("topk_group",), 1),
    (("mla_use_nope",), True),
    (("moe_router_activation_func",), "sigmoid"),
    (("moe_layer_freq",), 1),
    (("use_qk_norm",), False),
)


def _get(d: dict, keys: tuple, default=None):
    for k in keys:
        if k in d:
            return d[k]
    return default


def from_hf_config(hf: dict, name: str = "hf") -> ModelConfig:
    """ModelConfig of a Kimi Linear config.json (transformers' naming or the published one).

    Fails listing every field whose value deltatron cannot represent."""
    problems = []
    if hf.get("model_type") not in (None, "kimi_linear"):
        problems.append(f"model_type={hf.get('model_type')!r} (expected 'kimi_linear')")
    for keys, want in _REQUIRED_VALUES:
        got = _get(hf, keys, want)
        if got != want:
            problems.append(f"{keys[0]}={got!r} (deltatron supports only {want!r})")
    if _get(hf, ("num_key_value_heads",), None) not in (None, hf.get("num_attention_heads")):
        problems.append(
            f"num_key_value_heads={hf['num_key_value_heads']} != num_attention_heads="
            f"{hf.get('num_attention_heads')} (MLA has as many KV heads as query heads)"
        )
    fields = {}
    for ours, keys in _CONFIG_FIELDS:
        value = _get(hf, keys)
        if value is None and ours != "q_lora_rank":
            if ours == "max_sequence_length":
                continue
            problems.append(f"{keys[0]} is missing")
            continue
        fields[ours] = value
    lin = hf.get("linear_attn_config") or {}
    fields["kda_head_dim"] = lin.get("head_dim", hf.get("linear_head_dim"))
    fields["kda_num_heads"] = lin.get("num_heads", hf.get("linear_num_heads"))
    fields["kda_conv_kernel"] = lin.get("short_conv_kernel_size", hf.get("linear_conv_kernel_dim"))
    for ours, key in (("kda_head_dim", "head_dim"), ("kda_num_heads", "num_heads"),
                      ("kda_conv_kernel", "short_conv_kernel_size")):
        if fields[ours] is None:
            problems.append(f"linear_attn_config.{key} is missing")
    n = fields.get("num_layers") or 0
    if "full_attn_layers" in lin:
        mla = sorted(lin["full_attn_layers"])
        if sorted(set(mla) | set(lin.get("kda_layers", []))) != list(range(1, n + 1)) or set(mla) & set(lin.get("kda_layers", [])):
            problems.append("linear_attn_config: full_attn_layers and kda_layers must partition 1..num_hidden_layers")
    elif hf.get("layer_types"):
        mla = [i + 1 for i, t in enumerate(hf["layer_types"]) if t == "full_attention"]
        other = {t for t in hf["layer_types"] if t not in ("full_attention", "linear_attention")}
        if other:
            problems.append(f"layer_types has unsupported entries {sorted(other)}")
    else:
        problems.append("linear_attn_config.full_attn_layers (or layer_types) is missing")
        mla = []
    if hf.get("mlp_layer_types"):
        kinds = hf["mlp_layer_types"]
        first_k = kinds.index("sparse") if "sparse" in kinds else len(kinds)
        if kinds != ["dense"] * first_k + ["sparse"] * (len(kinds) - first_k):
            problems.append(f"mlp_layer_types={kinds}: deltatron needs dense layers first, then sparse ones")
    else:
        first_k = hf.get("first_k_dense_replace", 1)
    tie = hf.get("tie_word_embeddings", False)
    if problems:
        raise ValueError(
            "config.json describes a model deltatron cannot represent; unsupported or missing fields: "
            + "; ".join(problems)
        )
    return ModelConfig(name=name, mla_layers=mla, first_k_dense=first_k, untie_embeddings=not tie, **fields)
