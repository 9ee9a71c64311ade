"""The documented metric namespace (README, "Observability"): pure data, so the dashboard command
and the report need neither torch nor megatron-core to know the names."""

from __future__ import annotations

# namespace -> (what it holds, metric names or patterns; {N} a Kimi layer number 1..num_layers,
# {l} a sub-layer (two per Kimi layer), {j} a depth source, {g} a parameter group, {d} a blend
# dataset). The README's table lists the same.
METRIC_NAMESPACES: dict[str, tuple[str, list[str]]] = {
    "train": (
        "optimization progress",
        ["train/loss", "train/val_loss", "train/lr", "train/grad_norm", "train/tokens", "train/skipped_steps"],
    ),
    "perf": (
        "throughput and where the step time goes",
        ["perf/tokens_per_sec", "perf/tflops_per_device", "perf/mfu", "perf/step_time_s",
         "perf/forward_backward_s", "perf/optimizer_s", "perf/data_wait_s",
         "perf/straggler_ratio", "perf/slowest_rank"],
    ),
    "moe": (
        "per MoE layer routing health",
        ["moe/layer{N}/load", "moe/layer{N}/max_load", "moe/layer{N}/min_load",
         "moe/layer{N}/bias_range", "moe/layer{N}/topk_changed", "moe/max_load"],
    ),
    "kda": ("per KDA layer gate statistics", ["kda/layer{N}/decay", "kda/layer{N}/beta"]),
    "optim": (
        "gradient norms per parameter group and MuonClip's QK-clip",
        ["optim/grad_norm/{g}", "optim/qk_max_logit/layer{N}", "optim/qk_clipped_heads/layer{N}"],
    ),
    "attnres": (
        "AttnRes depth-attention weights",
        ["attnres/weight/sub{l}/src{j}", "attnres/pipeline_bytes_per_microbatch"],
    ),
    # every model, AttnRes or not (deltatron.model.attnres.collect_depth_metrics names it)
    "residual": ("sub-layer output RMS", ["residual/output_rms/sub{l}"]),
    "data": ("the data mix", ["data/loss/{d}", "data/tokens/{d}"]),
    "system": (
        "memory per rank",
        ["system/peak_memory_gb", "system/reserved_memory_gb", "system/max_peak_memory_gb",
         "system/max_reserved_memory_gb", "system/max_memory_rank"],
    ),
}
