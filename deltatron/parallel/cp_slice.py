"""Context parallelism, data side: which tokens a CP rank holds and where its documents start.

Under `parallel.cp = N` a micro-batch is one packed row of T tokens (the trainer folds the B
samples of a micro-batch into one row with `cu_seqlens`, as it does for document boundaries) and
CP rank r holds the contiguous slice [r T/N, (r+1) T/N). Contiguous, not the zigzag order
megatron-core/TE use for softmax attention: KDA's state flows left to right, so a rank's slice must
be one stretch of the sequence for the prefix combine of states (deltatron/parallel/cp_kda.py).

Documents: `cu_seqlens` of the whole row are cut at the slice edges. The slice's first piece may
continue a document that began on an earlier rank (`first_doc_offset` tokens before the slice);
every other piece starts a document inside the slice. KDA carries state, the short convolution
its halo, and MLA its keys only into that first piece.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron.core.packed_seq_params import PackedSeqParams


@dataclass(frozen=True)
class CPSlice:
    """One CP rank's contiguous slice of a packed row of `total` tokens.

    local_cu_seqlens: int32 [n + 1] document pieces inside the slice (0 ... length).
    first_doc_offset: tokens of the slice's first piece's document that lie before the slice
        (0: the slice starts a document, nothing is carried in).
    group: the context-parallel process group (None in process-free unit tests).
    """

    rank: int
    size: int
    start: int
    length: int
    total: int
    local_cu_seqlens: torch.Tensor
    first_doc_offset: int
    group: Optional[dist.ProcessGroup] = None

    @property
    def carries_in(self) -> bool:
        """The first piece continues a document from the previous rank."""
        return self.first_doc_offset > 0

    @property
    def first_piece_length(self) -> int:
        return int(self.local_cu_seqlens[1])

    @property
    def num_pieces(self) -> int:
        return self.local_cu_seqlens.numel() - 1

    def doc_positions(self) -> torch.Tensor:
        """[length] position of each local token inside its (global) document."""
        cu = self.local_cu_seqlens.to(torch.long)
        idx = torch.arange(self.length, device=cu.device)
        piece = torch.searchsorted(cu[1:], idx, right=True)
        pos = idx - cu[piece]
        return pos + (piece == 0).to(torch.long) * self.first_doc_offset


def slice_for_rank(cu_seqlens: torch.Tensor, total: int, rank: int, size: int,
                   group: Optional[dist.ProcessGroup] = None, device=None) -> CPSlice:
    """The slice of CP rank `rank` of `size` of a packed row: cu_seqlens int [N + 1] (global
    document offsets, 0 ... total). total must be a multiple of size. device: where the slice's
    local_cu_seqlens live (default: cu_seqlens' device)."""
    if total % size:
        raise ValueError(
            f"a packed row of {total} tokens cannot be cut into parallel.cp={size} equal slices: "
            "make micro_batch_size * data.seq_length a multiple of parallel.cp"
        )
    length = total // size
    start, end = rank * length, (rank + 1) * length
    bounds = [int(b) for b in cu_seqlens.tolist()]
    if bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(f"cu_seqlens must run from 0 to {total}, got {bounds[0]} ... {bounds[-1]}")
    inside = [b - start for b in bounds if start < b < end]
    local = torch.tensor([0] + inside + [length], dtype=torch.int32, device=device or cu_seqlens.device)
    doc_start = max(b for b in bounds if b <= start)
    return CPSlice(rank, size, start, length, total, local, start - doc_start, group)


@dataclass
class ContextParallelPackedSeqParams(PackedSeqParams):
    """megatron-core's THD packing metadata for a CP rank's slice: `cu_seqlens_q/kv` are the
    slice's own pieces (so code unaware of CP sees local documents), `cp_slice` the rest."""

    cp_slice: Optional[CPSlice] = None


def cp_packed_seq_params(cp: CPSlice) -> ContextParallelPackedSeqParams:
    cu = cp.local_cu_seqlens
    # megatron-core's THD RoPE (MLA's rotary part) assumes TE's zigzag slices: it splits the local
    # tokens by the padded document lengths / cp and takes two halves of each. Kimi's MLA is NoPE
    # (rotary_percent=0: an empty frequency table, the identity), so we hand it one padded
    # document of the whole row, which it splits into this rank's slice (two even halves) with
    # frequencies for `total` positions. Nothing else reads the padded offsets: KDA and our core
    # attention use cu_seqlens_q and cp_slice.
    padded = torch.tensor([0, cp.total], dtype=torch.int32, device=cu.device)
    return ContextParallelPackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=padded,
        cu_seqlens_kv_padded=padded, max_seqlen_q=cp.total, max_seqlen_kv=cp.total,
        cp_group=cp.group, cp_slice=cp,
    )


def cp_slice_of(packed_seq_params) -> Optional[CPSlice]:
    """The CP slice carried by packed_seq_params, or None outside context parallelism."""
    return getattr(packed_seq_params, "cp_slice", None)


def slice_batch(batch: dict, rank: int, size: int, group: Optional[dist.ProcessGroup] = None,
                device=None) -> tuple[dict, CPSlice]:
    """A micro-batch (deltatron.data.loader's dict: tokens/labels/loss_mask [B, T], cu_seqlens over
    the flattened B*T stream) cut to CP rank `rank`'s slice of the flattened row.

    Returns tokens/labels/loss_mask [1, B*T/size] and, when the batch has "dataset" ([B] blend
    entry of each row), "dataset" per local token [B*T/size]; plus the CPSlice (its
    local_cu_seqlens on `device`).
    """
    b, t = batch["tokens"].shape
    cp = slice_for_rank(batch["cu_seqlens"], b * t, rank, size, group, device)
    part = slice(cp.start, cp.start + cp.length)
    out = {key: batch[key].reshape(1, -1)[:, part] for key in ("tokens", "labels", "loss_mask")}
    if "dataset" in batch:
        out["dataset"] = batch["dataset"].repeat_interleave(t)[part]
    return out, cp
