"""The Kimi Linear language model: megatron-core's `HybridModel` with our stack spec.

`build_model` is the one entry point; it needs megatron-core's process groups initialised
(`deltatron.parallel.init_process_groups`), even for a single process.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from megatron.core.models.hybrid.hybrid_block import HybridStack
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.spec_utils import build_module

from deltatron.model.config import ModelConfig


class KimiLinearStack(HybridStack):
    """megatron-core's hybrid stack with a configurable final norm.

    HybridStack hard-codes Transformer Engine's norm as its final norm; we build it from the spec
    so the local path works without TE.
    """

    def __init__(self, config, submodules, *, final_norm, post_process: bool = True, **kwargs):
        super().__init__(config, submodules, post_layer_norm=False, post_process=post_process, **kwargs)
        self.post_layer_norm = True
        if post_process:
            self.final_norm = build_module(
                final_norm, config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
            )


def build_model(
    cfg: ModelConfig,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    pg_collection: Optional[ProcessGroupCollection] = None,
    layer_pattern: Optional[str] = None,
    **transformer_config_overrides,
) -> HybridModel:
    """Build the model (or this rank's pipeline stage of it).

    transformer_config_overrides: fields of megatron-core's TransformerConfig for the parallel
    layout and precision (tensor_model_parallel_size, bf16, params_dtype, sequence_parallel, ...).
    layer_pattern: the hybrid pattern, with '|' stage boundaries under pipeline parallelism;
    defaults to `cfg.layer_pattern()`.
    """
    from deltatron.model.specs import kimi_linear_stack_spec

    if pg_collection is None:
        pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    overrides = dict(transformer_config_overrides)
    overrides.setdefault("use_cpu_initialization", not torch.cuda.is_available())
    tc = cfg.to_transformer_config(**overrides)
    pattern = layer_pattern or cfg.layer_pattern()
    spec = kimi_linear_stack_spec(
        tc.transformer_impl, num_experts=cfg.num_experts, grouped_gemm=cfg.moe_grouped_gemm,
        kv_norm_eps=cfg.mla_kv_norm_eps, residual=cfg.residual,
        # one symbol per sub-layer, '|' between pipeline stages
        stage_sublayers=tuple(len(seg) for seg in pattern.split("|")),
    )
    return HybridModel(
        config=tc,
        hybrid_stack_spec=spec,
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_sequence_length,
        hybrid_layer_pattern=pattern,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not cfg.untie_embeddings,
        position_embedding_type="none",
        pg_collection=pg_collection,
        vp_stage=vp_stage,
    )


@contextlib.contextmanager
def _meta_device():
    # megatron-core allocates parameters with device=torch.cuda.current_device(), which overrides
    # a torch.device("meta") context; pointing it at "meta" keeps every allocation abstract.
    saved = torch.cuda.current_device
    torch.cuda.current_device = lambda: "meta"
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.cuda.current_device = saved


def build_model_on_meta(cfg: ModelConfig, **kwargs) -> HybridModel:
    """Build the model with meta tensors only: shapes and counts without memory or init."""
    with _meta_device():
        return build_model(
            cfg, use_cpu_initialization=False, perform_initialization=False, **kwargs
        )


def packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int) -> PackedSeqParams:
    """THD packing metadata for documents packed into one row ([1, T] tokens).

    cu_seqlens: int32 [N+1] document start offsets, last entry T.
    """
    cu = cu_seqlens.to(torch.int32)
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen,
    )
