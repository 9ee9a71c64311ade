"""QK-clip for MLA layers (Kimi K2's MuonClip): per-head rescaling of query and key weights.

The core attention records each head's largest attention logit S_max over the step (our
`SDPACoreAttention`, or TE's, sets megatron-core's `current_max_attn_logits`, [local heads]).
After the optimizer step, every head with S_max > tau gets gamma = tau / S_max (every other
head gamma = 1, so the scaling below leaves it bit for bit as it was and the clip decision never
leaves the device) and

* its query rows of the non-shared ("nope") part in `linear_q_proj` are scaled by sqrt(gamma),
* its query rows of the shared-key ("rope", unrotated under NoPE) part by gamma,
* its key rows in `linear_kv_up_proj` by sqrt(gamma);

the shared 64-dim key rows of the kv down-projection and all value rows stay untouched, so the
head's logit q.k scales by exactly gamma (both the nope and the shared-key term). KDA layers have
no softmax logits and are not clipped.

What megatron-core offers and why this module exists: `MLASelfAttention.clip_qk` implements the
same scaling (alpha = 0.5) for our layout, but computes eta = min(tau / S_max, 1), which turns
negative for a head whose max logit is negative, and it updates the module's weights on every
rank. MuonClip keeps each weight's fp32 master on one data-parallel replica, so the scaling must be
applied to that master before the replica broadcasts it; here the factors are computed once
(`LayerClip`) and applied by the optimizer to whichever tensor holds the master. Tests check the
result against megatron-core's `clip_qk`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class LayerClip:
    """One MLA layer's clip factors for its local heads.

    gamma: [n_local] (1 where the head is not clipped). q_rows: [n_local*(dn+dr)] factors for the
    rows of linear_q_proj.weight; kv_rows: [n_local*(dn+dv)] for linear_kv_up_proj.weight.
    """

    layer_number: int
    q_weight: torch.nn.Parameter
    kv_weight: torch.nn.Parameter
    gamma: torch.Tensor
    max_logits: torch.Tensor  # [n_local], after the data-parallel max
    q_rows: torch.Tensor
    kv_rows: torch.Tensor


def clip_factors(max_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """gamma per head: tau / S_max where S_max > tau, else 1. max_logits: [n] -> [n] fp32."""
    s = max_logits.float()
    return torch.where(s > tau, tau / s.clamp_min(tau), torch.ones_like(s))


def row_factors(gamma: torch.Tensor, nope_dim: int, pe_dim: int, value_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row factors of linear_q_proj ([n*(nope+pe)]) and linear_kv_up_proj ([n*(nope+v)])."""
    root = gamma.sqrt()[:, None]
    q = torch.cat([root.expand(-1, nope_dim), gamma[:, None].expand(-1, pe_dim)], dim=1)
    kv = torch.cat([root.expand(-1, nope_dim), torch.ones_like(root).expand(-1, value_dim)], dim=1)
    return q.reshape(-1), kv.reshape(-1)


def mla_attentions(model_chunks: list) -> list:
    """Every megatron-core MLA self-attention module in the model chunks (wrappers included)."""
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    return [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, MLASelfAttention)]


class QKClip:
    """Reads the step's max logits of every local MLA layer and turns them into `LayerClip`s."""

    def __init__(self, attentions: list, tau: float, dp_group, stats_group):
        """dp_group: the ranks that saw other micro-batches of the same heads (data x context
        parallel); stats_group: the ranks holding other heads or layers (tensor x pipeline)."""
        self.attentions = attentions
        self.tau = tau
        self.dp_group = dp_group
        self.stats_group = stats_group
        for attn in attentions:
            if attn.config.q_lora_rank is not None:
                raise ValueError("QK-clip here assumes MLA without query compression (q_lora_rank=None)")

    def factors(self) -> list[LayerClip]:
        """The step's clip factors (collective over dp_group); resets the recorded maxima."""
        if not self.attentions:
            return []
        logits = []
        for attn in self.attentions:
            m = attn.core_attention.current_max_attn_logits
            if m is None:
                raise RuntimeError(
                    f"MLA layer {attn.layer_number} recorded no max attention logits this step: QK-clip "
                    "needs a core attention that sets current_max_attn_logits (deltatron's "
                    "SDPACoreAttention does when the model config has qk_clip=True)"
                )
            logits.append(m.detach().float())
        stacked = torch.stack(logits)  # [layers, n_local]
        if self.dp_group.size() > 1:
            dist.all_reduce(stacked, op=dist.ReduceOp.MAX, group=self.dp_group)
        out = []
        for attn, s in zip(self.attentions, stacked):
            attn.core_attention.current_max_attn_logits = None
            c = attn.config
            gamma = clip_factors(s, self.tau)
            q_rows, kv_rows = row_factors(gamma, c.qk_head_dim, c.qk_pos_emb_head_dim, c.v_head_dim)
            out.append(
                LayerClip(
                    attn.layer_number, attn.linear_q_proj.weight, attn.linear_kv_up_proj.weight,
                    gamma, s, q_rows.to(attn.linear_q_proj.weight.device),
                    kv_rows.to(attn.linear_kv_up_proj.weight.device),
                )
            )
        return out

    def stats(self, clips: list[LayerClip], num_sublayers: int) -> dict[str, float]:
        """Per layer: max logit and number of clipped heads, over all TP/PP ranks (collective
        over stats_group; for log steps: it reads the result back to the host). Keys use Kimi
        layer numbers (two hybrid sub-layers per layer)."""
        device = clips[0].gamma.device if clips else torch.device("cpu")
        if torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        max_logit = torch.full((num_sublayers,), float("-inf"), device=device)
        clipped = torch.zeros(num_sublayers, device=device)
        for c in clips:
            max_logit[c.layer_number - 1] = c.max_logits.max()
            clipped[c.layer_number - 1] = (c.gamma < 1).sum()
        if self.stats_group.size() > 1:
            dist.all_reduce(max_logit, op=dist.ReduceOp.MAX, group=self.stats_group)
            dist.all_reduce(clipped, group=self.stats_group)
        max_logit, clipped = torch.stack([max_logit, clipped]).cpu()  # one device-to-host read
        out = {}
        for i in torch.nonzero(torch.isfinite(max_logit)).flatten().tolist():
            layer = i // 2 + 1
            out[f"optim/qk_max_logit/layer{layer}"] = float(max_logit[i])
            out[f"optim/qk_clipped_heads/layer{layer}"] = int(clipped[i])
        return out
