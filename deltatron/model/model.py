"""The Kimi Linear language model: megatron-core's `HybridModel` with our stack spec.

`build_model` is the one entry point; it needs megatron-core's process groups initialised
(`deltatron.parallel.init_process_groups`), even for a single process.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from megatron.core import tensor_parallel
from megatron.core.inference.utils import InferenceMode
from megatron.core.models.hybrid.hybrid_block import HybridStack
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.spec_utils import build_module

from deltatron.model.chunked_loss import ChunkedLossOutputLayer, DeferredLogits, chunked_vocab_parallel_cross_entropy
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


class KimiLinearModel(HybridModel):
    """megatron-core's HybridModel with the output-layer loss by blocks of tokens when the config's
    cross_entropy_chunk_size (train.cross_entropy_chunk_size) is > 0 (deltatron/model/chunked_loss.py).

    The output layer is megatron-core's ColumnParallelLinear as ChunkedLossOutputLayer (same
    parameters); a training or evaluation forward with labels has it hand over its input and weight
    instead of logits, and compute_language_model_loss computes the same per-token loss from them
    without materialising [tokens, vocab]. Without labels (logits wanted) or with the size 0
    everything is megatron-core's path.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        chunk = getattr(self.config, "cross_entropy_chunk_size", 0)
        if chunk and (self.mtp_process or self.config.use_mup):
            raise ValueError("train.cross_entropy_chunk_size does not support multi-token prediction or MuP logit scaling")
        if getattr(self, "output_layer", None) is not None and type(self.output_layer) is tensor_parallel.ColumnParallelLinear:
            self.output_layer.__class__ = ChunkedLossOutputLayer  # adds behaviour only, no state

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, labels=None, *args, **kwargs):
        chunked = (
            getattr(self.config, "cross_entropy_chunk_size", 0) > 0 and labels is not None
            and self.post_process and not InferenceMode.is_active()
        )
        if not chunked:
            return super().forward(input_ids, position_ids, attention_mask, decoder_input, labels, *args, **kwargs)
        self.output_layer.defer_logits = True
        try:
            return super().forward(input_ids, position_ids, attention_mask, decoder_input, labels, *args, **kwargs)
        finally:
            self.output_layer.defer_logits = False

    def compute_language_model_loss(self, labels: torch.Tensor, logits) -> torch.Tensor:
        if isinstance(logits, DeferredLogits):
            return chunked_vocab_parallel_cross_entropy(
                logits.hidden, logits.weight, labels, self.config.cross_entropy_chunk_size, logits.tp_group
            )
        return super().compute_language_model_loss(labels, logits)


def build_model(
    cfg: ModelConfig,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    pg_collection: Optional[ProcessGroupCollection] = None,
    layer_pattern: Optional[str] = None,
    **transformer_config_overrides,
) -> KimiLinearModel:
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
    return KimiLinearModel(
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


def build_model_on_meta(cfg: ModelConfig, **kwargs) -> KimiLinearModel:
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
