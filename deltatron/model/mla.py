"""Kimi Linear's MLA (NoPE) on megatron-core, with a local core attention that reports max logits.

megatron-core's `MLASelfAttention` does the projections; two things are ours:

* `KimiMLASelfAttention` resolves the norms the Kimi way: no query compression and no query norm,
  an RMSNorm on the compressed KV. megatron-core's resolver insists on a fused q norm whenever
  `qk_layernorm` is set and rejects the KV norm otherwise.
* `SDPACoreAttention` replaces megatron-core's local `DotProductAttention`, which rejects MLA's
  `k_channels`/`v_channels` in 0.19.2. It runs torch SDPA (flash/efficient kernels on GPU),
  handles packed documents (THD layout, `cu_seqlens`) and, when asked, records the per-head
  maximum attention logit that MuonClip's QK-clip needs, in megatron-core's attribute
  `current_max_attn_logits` so `MLASelfAttention.clip_qk` works with it unchanged.

NoPE without the rotation: megatron-core's MLA calls `apply_rotary_pos_emb` on the 64-dim "rope"
query/key parts every forward, even with our rotary_percent 0, whose frequency table is empty
(zero width). That call is then the identity (rot_dim = 0: no channel is rotated, mscale and the
MLA interleaving act on no channel, the rest passes through unchanged), but on our packed (THD)
batches megatron-core's THD path reads `cu_seqlens` back to the host twice (`.tolist()`,
`.item()`) and splits and re-concatenates the tensors per document: 4 device->host syncs per MLA
layer per micro-batch for nothing. `_skip_empty_rotation` wraps `apply_rotary_pos_emb` in
megatron-core's multi_latent_attention module (the name MLA calls) to return its input unchanged
when the frequency table has zero width, and calls megatron-core's function unchanged otherwise.
A wrapper of that module-level name, because nothing narrower works without forking: the rotary
table is computed and applied inside the ~300-line `get_query_key_value_tensors` (its nested
`qkv_up_proj_and_rope_apply`), which cannot take "no rotary embedding" (it slices the table and
passes it on), so there is no method of `KimiMLASelfAttention` to override short of copying it.
The wrapper acts for every MLA in the process, but only where the call is the identity anyway
(MLA calls that name only unfused, apply_rope_fusion off; tests/test_model.py checks the identity
and the equality of logits and gradients with megatron-core's path, packed and unpacked).
The rotary module's own forward stays: an `lru_cache` hit per layer, and on a miss (a new
max_seqlen) a few tiny kernels building an empty table, no host sync.

Context parallelism (`_forward_context_parallel`): each CP rank holds a contiguous slice of the
packed row (the slices KDA needs, deltatron/parallel/cp_slice.py), all-gathers K and V of its CP
group and attends its queries to the keys of their documents up to themselves (causal, aligned
to the bottom right); the all-gather's backward reduce-scatters dK and dV. The slices are not
load-balanced: the last rank's queries see the most keys (up to about 2x the mean attention
FLOPs within a long document); the zigzag order that would balance them breaks KDA's contiguous
state hand-off, and permuting the hidden states around every MLA layer costs an all-to-all of
the activations. Documents shorter than a slice are balanced anyway.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from torch.nn.attention.bias import causal_lower_right

from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel import ColumnParallelLinear, gather_from_sequence_parallel_region
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from megatron.core.transformer import multi_latent_attention as _megatron_mla
from megatron.core.transformer.multi_latent_attention import MLASelfAttention

from deltatron.model.attention_kernels import causal_attention, varlen_causal_attention

from deltatron.parallel.cp_slice import CPSlice, cp_slice_of

# Query rows per block when computing max logits without materialising the full [T, T] scores.
_MAX_LOGIT_BLOCK = 1024


def _skip_empty_rotation(apply_rotary_pos_emb):
    """megatron-core's `apply_rotary_pos_emb`, returning `t` itself when `freqs` has zero width.

    Why (see the module docstring): with NoPE (rotary_percent 0) the rotation is the identity, but
    megatron-core's THD path syncs with the host twice per call to compute it. Exactly the same
    values and gradients: with rot_dim = freqs.shape[-1] = 0 megatron-core returns
    cat(rotate(t[..., :0]), t[..., 0:]), i.e. a copy of t (per document on THD), whatever mscale,
    rotary_interleaved or mla_rotary_interleaved say. Any nonzero width goes to megatron-core.
    """

    def apply(t, freqs, *args, **kwargs):
        if isinstance(freqs, torch.Tensor) and freqs.shape[-1] == 0:
            return t
        return apply_rotary_pos_emb(t, freqs, *args, **kwargs)

    apply.original = apply_rotary_pos_emb
    return apply


# Installed once in the namespace MLASelfAttention calls it from (idempotent on re-import).
if not hasattr(_megatron_mla.apply_rotary_pos_emb, "original"):
    _megatron_mla.apply_rotary_pos_emb = _skip_empty_rotation(_megatron_mla.apply_rotary_pos_emb)


class KimiMLASelfAttention(MLASelfAttention):
    """megatron-core MLA with Kimi's norm placement (no q norm, RMSNorm on the KV latent).

    Under tensor parallelism the local (non-TE) path also replaces megatron-core's column-parallel
    KV down-projection by a replicated one: with the column-parallel form, the gradient of the
    shared 64-dim key part, which every rank uses for its own heads, is dropped on all ranks but
    the one owning those output channels (found by the TP parity test). The replicated form gets
    its gradient right in `_ReplicatedDownProjection`.
    """

    def __init__(self, config, submodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        if self.tp_group.size() > 1 and isinstance(self.linear_kv_down_proj, ColumnParallelLinear):
            self.linear_kv_down_proj = _ReplicatedDownProjection(
                self.linear_kv_down_proj, config, config.kv_lora_rank, self.tp_group
            )

    def _resolve_qk_norm_config(self, submodules):
        if self.config.q_lora_rank is not None:
            raise ValueError("Kimi Linear's MLA has no query compression: set model.q_lora_rank=null")
        return dict(
            linear_q_proj=submodules.linear_q_proj,
            linear_q_up_proj=IdentityOp,
            linear_kv_up_proj=submodules.linear_kv_up_proj,
            q_layernorm=IdentityOp,
            kv_layernorm=submodules.kv_layernorm,
        )


class _SumKeyPartGrad(torch.autograd.Function):
    """Identity forward; backward sums the gradient of the shared key channels over TP ranks."""

    @staticmethod
    def forward(ctx, x, split, group):
        ctx.split, ctx.group = split, group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        part = grad[..., ctx.split :].contiguous()
        torch.distributed.all_reduce(part, group=ctx.group)
        grad[..., ctx.split :] = part
        return grad, None, None


class _ReplicatedDownProjection(torch.nn.Module):
    """MLA's KV down-projection d -> kv_lora + rope, the full weight on every TP rank.

    Gradients: the latent part reaches every rank complete (the up-projection reduces it); the
    shared key part is used by each rank's heads only, so without sequence parallelism its
    gradient is summed over TP ranks here. With sequence parallelism megatron-core gathers that part
    along the sequence (its backward sums over ranks) and each rank sees only its tokens, so the
    weight is marked `sequence_parallel` for megatron-core's TP all-reduce of such gradients.
    """

    def __init__(self, column: ColumnParallelLinear, config, latent_dim: int, tp_group):
        super().__init__()
        shards = [torch.empty_like(column.weight) for _ in range(tp_group.size())]
        torch.distributed.all_gather(shards, column.weight.detach().contiguous(), group=tp_group)
        self.weight = torch.nn.Parameter(torch.cat(shards, 0))
        self.weight.sequence_parallel = config.sequence_parallel
        self.latent_dim = latent_dim
        self.sequence_parallel = config.sequence_parallel
        self.tp_group = tp_group

    def forward(self, x):
        out = F.linear(x, self.weight)
        if not self.sequence_parallel:
            out = _SumKeyPartGrad.apply(out, self.latent_dim, self.tp_group)
        return out, None

    # Checkpoints look like megatron-core's linear: the full weight plus an (empty) extra state.
    def get_extra_state(self):
        return None

    def set_extra_state(self, state):
        pass

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, {}, sharded_offsets
        )


def causal_max_logits(
    q: torch.Tensor, k: torch.Tensor, scale: float, document_ids: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Per-head max of scale * q.k over causal pairs. q: [B, N, Tq, D], k: [B, N, Tk, D] with
    Tk >= Tq, the queries being the last Tq key positions (bottom-right causal) -> [N] (fp32).
    document_ids: [Tk] int, the packed document of every key position: pairs across documents
    do not count (one pass over a packed row instead of a loop and a host read per document)."""
    t = q.shape[2]
    offset = k.shape[2] - t
    best = torch.full((q.shape[1],), float("-inf"), device=q.device, dtype=torch.float32)
    for start in range(0, t, _MAX_LOGIT_BLOCK):
        end = min(start + _MAX_LOGIT_BLOCK, t)
        scores = torch.einsum(
            "bnqd,bnkd->bnqk", q[:, :, start:end].float(), k[:, :, : end + offset].float()
        )
        rows = torch.arange(start, end, device=q.device)[:, None] + offset
        cols = torch.arange(end + offset, device=q.device)[None, :]
        hidden = cols > rows
        if document_ids is not None:
            hidden = hidden | (document_ids[None, : end + offset] != document_ids[rows])
        scores = scores.masked_fill(hidden, float("-inf"))
        best = torch.maximum(best, scores.amax(dim=(0, 2, 3)) * scale)
    return best


class SDPACoreAttention(MegatronModule):
    """Causal softmax attention on torch SDPA; the local core attention for MLA.

    forward(q [S, B, N, Dqk], k [S, B, N, Dqk], v [S, B, N, Dv]) -> [S, B, N*Dv]; with THD packed
    sequences q/k/v are [T, N, D] and the result [T, N*Dv].
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type=None,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        k_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        **unused,
    ):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.softmax_scale = softmax_scale
        self.track_max_logits = bool(config.qk_clip or config.log_max_attention_logit)
        self.current_max_attn_logits: Optional[torch.Tensor] = None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask=None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params: Optional[PackedSeqParams] = None,
        **unused,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention does not take an attention bias")
        cp = cp_slice_of(packed_seq_params)
        if cp is not None:
            return self._forward_context_parallel(query, key, value, cp)
        if self.config.context_parallel_size > 1:
            raise ValueError(
                "context parallelism needs the packed CP slice metadata "
                "(deltatron.parallel.cp_slice.cp_packed_seq_params), as the trainer passes it"
            )
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._forward_packed(
                query, key, value, packed_seq_params.cu_seqlens_q, packed_seq_params.max_seqlen_q
            )
        # [S, B, N, D] -> [B, N, S, D]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        out = self._attend(q, k, v)  # [B, N, S, Dv]
        s, b = query.shape[:2]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def _forward_packed(self, query, key, value, cu_seqlens, max_seqlen=None):
        if self.track_max_logits and self.training:
            # the whole packed row at once, documents told apart on the device
            positions = torch.arange(query.shape[0], device=query.device)
            document_ids = torch.searchsorted(cu_seqlens.to(query.device)[1:], positions, right=True)
            q, k = (x.transpose(0, 1)[None] for x in (query, key))  # [1, N, T, D]
            self._track_max_logits(q, k, document_ids)
        # One variable-length flash kernel for all documents where it applies (attention_kernels).
        out = varlen_causal_attention(query, key, value, cu_seqlens, max_seqlen, self.softmax_scale)
        if out is not None:
            return out.reshape(out.shape[0], -1)
        # Documents are contiguous in THD; attend within each one.
        bounds = cu_seqlens.tolist()
        outs = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end == start:
                continue
            q, k, v = (x[start:end].transpose(0, 1)[None] for x in (query, key, value))
            outs.append(self._attend(q, k, v, track=False)[0].transpose(0, 1))  # [t, N, Dv]
        out = torch.cat(outs, dim=0)
        return out.reshape(out.shape[0], -1)

    def _forward_context_parallel(self, query, key, value, cp: CPSlice):
        """THD query/key/value [L, N, D] of this rank's slice -> [L, N*Dv]: attention to the
        all-gathered keys of each query's document, up to the query itself."""
        dqk = key.shape[-1]
        # one gather for K and V: one collective (and one reduce-scatter of dK|dV) per layer
        kv = gather_from_sequence_parallel_region(
            torch.cat([key, value], dim=-1).contiguous(), tensor_parallel_output_grad=True,
            group=cp.group,
        )  # [T, N, Dqk + Dv], the whole row
        bounds = cp.local_cu_seqlens.tolist()
        outs = []
        for piece, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            if b == a:
                continue
            doc_start = cp.start + a - (cp.first_doc_offset if piece == 0 else 0)
            keys = kv[doc_start : cp.start + b].transpose(0, 1)[None]  # [1, N, Tk, Dqk + Dv]
            q = query[a:b].transpose(0, 1)[None]
            outs.append(self._attend(q, keys[..., :dqk], keys[..., dqk:])[0].transpose(0, 1))
        out = torch.cat(outs, dim=0)
        return out.reshape(out.shape[0], -1)

    def _track_max_logits(self, q, k, document_ids=None):
        """Fold this forward's per-head max logit into the step's (see causal_max_logits)."""
        with torch.no_grad():
            step_max = causal_max_logits(q, k, self.softmax_scale, document_ids)
        self.current_max_attn_logits = (
            step_max
            if self.current_max_attn_logits is None
            else torch.maximum(self.current_max_attn_logits, step_max)
        )

    def _attend(self, q, k, v, track: bool = True):
        """q: [B, N, Tq, Dqk]; k: [B, N, Tk, Dqk]; v: [B, N, Tk, Dv] -> [B, N, Tq, Dv]. Causal;
        with Tk > Tq the queries are the last Tq key positions (a CP slice's continuing document).
        track: fold the max logit into the step's (the caller may have done it already)."""
        # Only training forwards count: QK-clip acts on the step's logits, not on evaluation's.
        if track and self.track_max_logits and self.training:
            self._track_max_logits(q, k)
        if k.shape[2] == q.shape[2]:
            return causal_attention(q, k, v, self.softmax_scale)
        mask = causal_lower_right(q.shape[2], k.shape[2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)
