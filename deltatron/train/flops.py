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


def training_flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    counts = cfg.parameter_counts()
    emb = cfg.vocab_size * cfg.hidden_size
    # activated matrix parameters: the embedding is a lookup, the output layer a matmul; norm
    # weights, conv taps, A_log and dt_bias are negligible and counted as if matmuls.
    matmul_params = counts["active_no_embedding"] + emb
    forward = 2.0 * matmul_params
    num_mla = len(cfg.mla_layer_indices())
    num_kda = cfg.num_layers - num_mla
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    forward += num_mla * 2.0 * cfg.mla_num_heads * (qk + cfg.v_head_dim) * seq_length / 2
    d, c = cfg.kda_head_dim, cfg.kda_chunk_size
    forward += num_kda * cfg.kda_num_heads * (6 * d * d + 3 * c * d + c * c)
    return 3.0 * forward


def peak_tflops(device_name: str, override: float | None = None) -> tuple[float | None, str]:
    """(peak bf16 TFLOP/s per device, where the number came from); None when unknown."""
    if override:
        return override, "logging.peak_tflops"
    for key, value in PEAK_TFLOPS_BF16.items():
        if key in device_name:
            return value, f"spec-sheet bf16 dense peak for {key}"
    return None, f"no peak known for {device_name!r} (set logging.peak_tflops to report MFU)"
