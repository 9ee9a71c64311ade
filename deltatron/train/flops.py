"""Model FLOPs for throughput and MFU, and the peak-FLOPs table they are divided by.

Training FLOPs per token = 3 x forward FLOPs (backward is twice the forward), where forward is:
- 2 x every matrix parameter a token passes through: the activated parameters without the
  embedding lookup (KDA and MLA projections, the dense FFN or the router, top-k routed and shared
  experts) plus the output layer;
- MLA attention scores and values, causal: 2 x heads x (d_qk + d_v) x T / 2 per token, with
  d_qk = nope + rope dims;
- KDA's chunkwise recurrence per head (Kimi Linear eq. 13/14): 6 d^2 + 3 C d + C^2 per token,
  with d the head dim and C the chunk size.
Norms, activations and the softmax are left out, as Megatron-LM does.
"""

from __future__ import annotations

from deltatron.model.config import ModelConfig

# bf16 dense peak TFLOP/s per device, from the vendors' spec sheets (no sparsity).
PEAK_TFLOPS_BF16 = {
    "H100": 989.0,  # H100 SXM
    "H200": 989.0,
    "A100": 312.0,
    "B200": 2250.0,
}


def mla_attention_flops(cfg: ModelConfig, seq_length: int) -> float:
    """Forward FLOPs per token of one MLA layer's scores and values (causal)."""
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    return 2.0 * cfg.mla_num_heads * (qk + cfg.v_head_dim) * seq_length / 2


def kda_recurrence_flops(cfg: ModelConfig) -> float:
    """Forward FLOPs per token of one KDA layer's chunkwise recurrence (Kimi Linear eq. 13/14)."""
    d, c = cfg.kda_head_dim, cfg.kda_chunk_size
    return cfg.kda_num_heads * (6 * d * d + 3 * c * d + c * c)


def training_flops_breakdown(cfg: ModelConfig, seq_length: int) -> dict[str, float]:
    """Training FLOPs per token by the kind of kernel that executes them (they run at different
    rates, see deltatron.parallel.planner): "dense" matmuls (KDA/MLA projections, dense FFN,
    router, shared experts, output layer), "experts" (the top-k routed experts' GEMMs),
    "attention" (MLA scores and values) and "kda" (the chunkwise recurrence). Sums to
    `training_flops_per_token`."""
    counts = cfg.parameter_counts()
    emb = cfg.vocab_size * cfg.hidden_size
    num_moe = cfg.num_layers - cfg.first_k_dense if cfg.first_k_dense < cfg.num_layers else 0
    routed = num_moe * cfg.moe_topk * 3 * cfg.hidden_size * cfg.moe_ffn_hidden_size
    # activated matrix parameters: the embedding is a lookup, the output layer a matmul; norm
    # weights, conv taps, A_log and dt_bias are negligible and counted as if matmuls.
    matmul_params = counts["active_no_embedding"] + emb
    num_mla = len(cfg.mla_layer_indices())
    num_kda = cfg.num_layers - num_mla
    return {
        "dense": 3.0 * 2.0 * (matmul_params - routed),
        "experts": 3.0 * 2.0 * routed,
        "attention": 3.0 * num_mla * mla_attention_flops(cfg, seq_length),
        "kda": 3.0 * num_kda * kda_recurrence_flops(cfg),
    }


def training_flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    return sum(training_flops_breakdown(cfg, seq_length).values())


def peak_tflops(device_name: str, override: float | None = None) -> tuple[float | None, str]:
    """(peak bf16 TFLOP/s per device, where the number came from); None when unknown."""
    if override:
        return override, "logging.peak_tflops"
    for key, value in PEAK_TFLOPS_BF16.items():
        if key in device_name:
            return value, f"spec-sheet bf16 dense peak for {key}"
    return None, f"no peak known for {device_name!r} (set logging.peak_tflops to report MFU)"
