"""Which parameters MuonClip updates with Muon and which with AdamW, and Muon's logical matrices.

One rule, `PARAM_RULE` below, decides the group of every parameter; the trainer prints it and the
resulting groups at start-up. Muon orthogonalises whole logical matrices, so fused projections are
split into `Block`s (row sets of the local tensor) before Newton-Schulz; Newton-Schulz commutes
with row and column permutations, so the order of rows inside a block does not matter.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Union

import torch

PARAM_RULE = (
    "Muon: every 2-D matrix of a linear projection inside the hidden layers (a parameter named "
    "`weight` or `weightN`), except the MoE router. Fused projections are split into their logical "
    "matrices (SwiGLU fc1 -> gate, up; MLA kv up-projection -> key, value) and every MoE expert is "
    "its own matrix. AdamW: everything else - token embedding and output layer, norms, biases, "
    "1-D parameters (AttnRes pseudo-queries and key norms among them), KDA's short-convolution kernels (*_conv), A_log and dt_bias, the router. "
    "AdamW weight decay follows megatron-core's rule: none on biases and 1-D parameters."
)

_LINEAR_WEIGHT = re.compile(r"(^|\.)weight\d*$")
_GLU_FC1 = re.compile(r"(^|\.)linear_fc1\.weight\d*$")
_KV_UP = re.compile(r"(^|\.)linear_kv_up_proj\.weight$")


@dataclass(frozen=True)
class FusedLayout:
    """How fused projections of the model are laid out (from its megatron-core config).

    glu: the MLP/expert fc1 weights hold [gate; up] rows (per tensor-parallel shard).
    kv_key_dim, kv_value_dim: MLA's kv up-projection holds, per head, key rows then value rows.
    """

    glu: bool
    kv_key_dim: int = 0
    kv_value_dim: int = 0

    @classmethod
    def from_config(cls, config) -> "FusedLayout":
        mla = bool(getattr(config, "multi_latent_attention", False))
        return cls(
            glu=bool(config.gated_linear_unit),
            kv_key_dim=config.qk_head_dim if mla else 0,
            kv_value_dim=config.v_head_dim if mla else 0,
        )


@dataclass(frozen=True)
class Block:
    """One logical matrix inside a local parameter tensor.

    rows: its rows along dim 0 of the local tensor: None (the whole tensor), a slice (a contiguous
    range, e.g. SwiGLU's gate and up halves: taken as views, updated in place) or an index tensor
    (interleaved rows, MLA's per-head key and value rows: taken as copies). Under tensor
    parallelism a block's full matrix is the concatenation of every TP rank's block along the
    parameter's partition dim.
    """

    label: str
    rows: Union[None, slice, torch.Tensor]

    def view(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        """This block of a local [rows, cols] tensor as a view of it; None for interleaved rows."""
        if self.rows is None:
            return t
        return t[self.rows] if isinstance(self.rows, slice) else None

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """This block of a local [rows, cols] tensor: a view where `view` gives one, else a copy."""
        v = self.view(t)
        return v if v is not None else t.index_select(0, self.rows)

    def num_rows(self, total: int) -> int:
        """Rows of the block in a local tensor of `total` rows."""
        if self.rows is None:
            return total
        if isinstance(self.rows, slice):
            return len(range(*self.rows.indices(total)))
        return int(self.rows.numel())


@dataclass(frozen=True)
class ParamSpec:
    name: str
    optimizer: str  # "muon" or "adamw"
    weight_decay: bool
    expert: bool  # reduced over the expert data-parallel group (megatron's allreduce=False)
    tp_sharded: bool
    partition_dim: int
    blocks: tuple[Block, ...] = ()


def _row_blocks(name: str, local_shape: tuple[int, int], layout: FusedLayout, device) -> tuple[Block, ...]:
    rows = local_shape[0]
    if layout.glu and _GLU_FC1.search(name):
        half = rows // 2  # megatron-core keeps [gate; up] within each TP shard
        return (
            Block("gate", slice(0, half)),
            Block("up", slice(half, rows)),
        )
    if _KV_UP.search(name):
        per_head = layout.kv_key_dim + layout.kv_value_dim
        if per_head == 0 or rows % per_head:
            raise ValueError(
                f"{name}: {rows} rows are not whole heads of key ({layout.kv_key_dim}) + value "
                f"({layout.kv_value_dim}) rows; FusedLayout does not match the model config"
            )
        r = torch.arange(rows, device=device).view(rows // per_head, per_head)
        return (
            Block("key", r[:, : layout.kv_key_dim].reshape(-1)),
            Block("value", r[:, layout.kv_key_dim :].reshape(-1)),
        )
    return (Block("matrix", None),)


def classify(name: str, param: torch.nn.Parameter, layout: FusedLayout) -> ParamSpec:
    """Apply PARAM_RULE to one parameter (name as in the model's named_parameters)."""
    expert = not getattr(param, "allreduce", True)
    tp_sharded = bool(getattr(param, "tensor_model_parallel", False))
    partition_dim = int(getattr(param, "partition_dim", -1)) if tp_sharded else -1
    is_linear_weight = bool(_LINEAR_WEIGHT.search(name))
    if is_linear_weight and param.dim() > 2:
        raise ValueError(
            f"{name} is a {param.dim()}-D weight: stacked (e.g. grouped-expert) weights have no "
            "per-matrix Muon rule; build experts as separate 2-D weights (megatron-core's "
            "SequentialMLP or TE grouped linears do)"
        )
    muon = (
        is_linear_weight
        and param.dim() == 2
        and not getattr(param, "is_embedding_or_output_parameter", False)
        and ".router." not in f".{name}"
    )
    # megatron-core's default: no decay on biases and 1-D parameters
    decay = not (name.endswith(".bias") or param.dim() == 1)
    if not muon:
        return ParamSpec(name, "adamw", decay, expert, tp_sharded, partition_dim)
    blocks = _row_blocks(name, tuple(param.shape), layout, param.device)
    if len(blocks) > 1 and tp_sharded and partition_dim != 0:
        raise ValueError(f"{name}: fused projection split along rows but sharded along dim {partition_dim}")
    return ParamSpec(name, "muon", True, expert, tp_sharded, partition_dim, blocks)


def summarize(specs: list[ParamSpec]) -> list[str]:
    """Start-up lines: the rule, then each group's parameter names (layer/expert indices as *)."""
    lines = [f"optimizer groups: {PARAM_RULE}"]
    for group in ("muon", "adamw"):
        names = Counter(
            re.sub(r"\.\d+\.", ".*.", re.sub(r"\.\d+\.", ".*.", s.name))
            + (" [" + "+".join(b.label for b in s.blocks) + "]" if len(s.blocks) > 1 else "")
            for s in specs
            if s.optimizer == group
        )
        listed = ", ".join(f"{n} x{c}" if c > 1 else n for n, c in sorted(names.items()))
        lines.append(f"  {group} ({sum(names.values())} tensors on this rank): {listed}")
    return lines
