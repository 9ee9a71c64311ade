"""Who updates which parameter under MuonClip, and the collectives that move the pieces.

Ranks that hold copies or tensor-parallel shards of the same parameters form a grid of
`dp` replicas x `tp` shards: for dense parameters the data(x context)-parallel by tensor-parallel
ranks of one pipeline stage, for expert parameters the expert-data-parallel by expert-tensor-
parallel ranks of one expert-parallel rank. Inside its grid every parameter gets

* one owner replica d (a DP index): only the ranks of replica d keep the parameter's optimizer
  state (fp32 master, momentum or Adam moments; each TP rank its own shard of it) and compute its
  update, then replica d broadcasts the new values over the DP group (ZeRO-1 by whole tensors);
* for each of its Muon matrices, one owner TP rank t in replica d: the TP ranks of replica d send
  it their shards of the momentum-updated matrix (bf16), it runs Newton-Schulz on the full matrix
  once, and scatters each rank its slice of the result.

Assignment is greedy, largest first, onto the least loaded replica (by estimated update cost)
and then the least loaded TP rank of that replica (by Newton-Schulz cost), computed identically
on every rank of the grid from the same ordered parameter list.

The broadcast overlaps the optimizer's compute: the plan also splits every replica's Muon
parameters into a few waves (`split_waves`, contiguous runs in plan order of about equal
Newton-Schulz cost), so the optimizer broadcasts wave w while Newton-Schulz runs on wave w + 1.
`dp_broadcast` therefore only issues its collectives (asynchronously) and returns a
`PendingBroadcast`; its `wait()` completes them and writes the received values. Receivers must
list the same tensors in the same order as the owner, so every rank of the grid computes the wave
of every parameter, not only of its own, and issues the collectives in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


@dataclass(frozen=True)
class Grid:
    """A DP x TP grid of ranks holding the same parameters (this rank's view of it)."""

    dp_group: dist.ProcessGroup
    tp_group: dist.ProcessGroup

    @property
    def dp_size(self) -> int:
        return self.dp_group.size()

    @property
    def dp_rank(self) -> int:
        return self.dp_group.rank()

    @property
    def tp_size(self) -> int:
        return self.tp_group.size()

    @property
    def tp_rank(self) -> int:
        return self.tp_group.rank()


def dense_grid() -> Grid:
    """Grid of non-expert parameters: the groups megatron-core's DDP reduces them over."""
    from megatron.core import parallel_state as ps

    return Grid(
        dp_group=ps.get_data_parallel_group(with_context_parallel=True, with_gtp_remat=False),
        tp_group=ps.get_tensor_model_parallel_group(),
    )


def expert_grid() -> Grid:
    """Grid of expert parameters (megatron's allreduce=False): expert-DP x expert-TP."""
    from megatron.core import parallel_state as ps

    return Grid(
        dp_group=ps.get_expert_data_parallel_group(with_gtp_remat=False),
        tp_group=ps.get_expert_tensor_parallel_group(),
    )


@dataclass(frozen=True)
class WorkItem:
    """A parameter to place: its update cost and the Newton-Schulz cost of each Muon matrix."""

    key: str
    cost: float
    blocks: tuple[tuple[str, float], ...] = ()  # (block key, cost)


@dataclass
class Plan:
    param_owner: dict[str, int]  # param key -> owner DP index
    block_owner: dict[str, int]  # block key -> owner TP index (inside the param's owner replica)
    dp_load: list[float]
    tp_load: list[list[float]]  # [dp][tp]
    wave: dict[str, int]  # key of a param with blocks (Muon) -> its wave (`split_waves`)


def plan_owners(items: list[WorkItem], dp_size: int, tp_size: int, num_waves: int = 1) -> Plan:
    """Greedy balanced placement; deterministic for a given item list (ties: lowest index).
    items: in plan order (the same on every rank of the grid), which `split_waves` keeps."""
    dp_load = [0.0] * dp_size
    tp_load = [[0.0] * tp_size for _ in range(dp_size)]
    param_owner, block_owner = {}, {}
    for item in sorted(items, key=lambda i: (-i.cost, i.key)):
        d = min(range(dp_size), key=lambda r: (dp_load[r], r))
        dp_load[d] += item.cost
        param_owner[item.key] = d
        for block_key, cost in sorted(item.blocks, key=lambda b: (-b[1], b[0])):
            t = min(range(tp_size), key=lambda r: (tp_load[d][r], r))
            tp_load[d][t] += cost
            block_owner[block_key] = t
    muon = [(i.key, sum(c for _, c in i.blocks)) for i in items if i.blocks]
    return Plan(param_owner, block_owner, dp_load, tp_load, split_waves(muon, param_owner, num_waves))


def split_waves(costs: list[tuple[str, float]], owner: dict[str, int], num_waves: int) -> dict[str, int]:
    """Wave (0 .. num_waves - 1) of every parameter: each owner's parameters, in the given (plan)
    order, cut into contiguous runs of about equal cumulative cost.

    costs: (param key, Newton-Schulz cost) in plan order; owner: param key -> owner DP index. A
    parameter goes to the wave its cost midpoint falls in (of the owner's total), so the waves of
    one owner are non-decreasing along plan order and each is within one parameter's cost of
    total / num_waves. Pure arithmetic on the same inputs in the same order: every rank of the
    grid gets the same split (receivers list each wave's tensors as their owner does).
    """
    total: dict[int, float] = {}
    for key, cost in costs:
        total[owner[key]] = total.get(owner[key], 0.0) + cost
    done: dict[int, float] = {}
    wave = {}
    for key, cost in costs:
        d = owner[key]
        before = done.get(d, 0.0)
        done[d] = before + cost
        w = int(num_waves * (before + 0.5 * cost) / total[d]) if total[d] > 0 else 0
        wave[key] = min(w, num_waves - 1)
    return wave


def newton_schulz_cost(rows: int, cols: int, steps: int) -> float:
    """Multiply-adds of `steps` quintic Newton-Schulz iterations on an [rows, cols] matrix."""
    m, n = min(rows, cols), max(rows, cols)
    return steps * (2.0 * m * m * n + m * m * m)


# ---------------------------------------------------------------------------- collectives
def _flat(tensors: list[torch.Tensor], dtype: torch.dtype, device) -> torch.Tensor:
    if not tensors:
        return torch.empty(0, dtype=dtype, device=device)
    return _flatten_dense_tensors([t.to(dtype) for t in tensors])


def tp_gather(grid: Grid, pieces_for: list[list[torch.Tensor]], dtype: torch.dtype, device) -> list[list[torch.Tensor]]:
    """Gather each TP rank's pieces of the matrices owned by every TP rank of this replica.

    pieces_for[t]: this rank's pieces of the matrices owned by TP rank t, in plan order (every TP
    rank lists the same matrices with pieces of the same shapes). Returns, for the matrices this
    rank owns, from_rank[r] = TP rank r's pieces (same order); other entries are not returned.
    """
    mine = pieces_for[grid.tp_rank]
    received: list[list[torch.Tensor]] = [[] for _ in range(grid.tp_size)]
    for t in range(grid.tp_size):
        flat = _flat(pieces_for[t], dtype, device)
        if flat.numel() == 0:
            continue
        dst = dist.get_global_rank(grid.tp_group, t)
        if t == grid.tp_rank:
            bufs = [torch.empty_like(flat) for _ in range(grid.tp_size)]
            dist.gather(flat, bufs, dst=dst, group=grid.tp_group)
            received = [_unflatten_dense_tensors(b, mine) for b in bufs]
        else:
            dist.gather(flat, None, dst=dst, group=grid.tp_group)
    return received


def tp_scatter(
    grid: Grid, slices_from: list[list[list[torch.Tensor]] | None], templates: list[list[torch.Tensor]],
    dtype: torch.dtype, device,
) -> list[list[torch.Tensor]]:
    """Scatter each owner's results to the TP ranks of this replica.

    slices_from[t]: on TP rank t itself, per destination rank r the slices for r (plan order);
    None elsewhere. templates[t]: tensors shaped like this rank's slices of t's matrices.
    Returns per owner t this rank's slices (dtype `dtype`).
    """
    out: list[list[torch.Tensor]] = []
    for t in range(grid.tp_size):
        if not templates[t]:
            out.append([])
            continue
        recv = torch.empty(sum(x.numel() for x in templates[t]), dtype=dtype, device=device)
        src = dist.get_global_rank(grid.tp_group, t)
        if t == grid.tp_rank:
            send = [_flat(per_rank, dtype, device) for per_rank in slices_from[t]]
            dist.scatter(recv, send, src=src, group=grid.tp_group)
        else:
            dist.scatter(recv, None, src=src, group=grid.tp_group)
        out.append(list(_unflatten_dense_tensors(recv, templates[t])))
    return out


@dataclass
class PendingBroadcast:
    """`dp_broadcast`'s collectives in flight. Until `wait()` the receivers' tensors keep their old
    values (the data lands in separate buffers), so compute may go on beside the transfer."""

    works: list[dist.Work]
    receives: list[tuple[torch.Tensor, list[torch.Tensor]]]  # (flat buffer, tensors it fills)
    sends: list[torch.Tensor]  # what this rank sends (flattened), kept alive until the transfer is done

    def wait(self) -> None:
        """Complete the broadcasts (on GPU: the current stream waits for them, the host does not)
        and copy what this rank received into its tensors. A second call does nothing."""
        for work in self.works:
            work.wait()
        for flat, tensors in self.receives:
            torch._foreach_copy_([t.data for t in tensors], list(_unflatten_dense_tensors(flat, tensors)))
        self.works, self.receives, self.sends = [], [], []


def dp_broadcast(grid: Grid, tensors_by_owner: list[list[torch.Tensor]]) -> PendingBroadcast:
    """Every replica d sends its tensors_by_owner[d] to the other replicas; returns at once.

    tensors_by_owner[d]: this rank's local tensors owned by replica d, in plan order, the same on
    every rank of the DP group (shapes and dtypes included). One asynchronous broadcast per owner
    and dtype, issued in the same order on every rank. Call `wait()` on the result to finish:
    receivers get the new values then (blocking use: `dp_broadcast(...).wait()`). Until then the
    senders must not change their tensors (a lone tensor is sent from its own storage, not a copy).
    """
    pending = PendingBroadcast([], [], [])
    if grid.dp_size == 1:
        return pending
    for d, tensors in enumerate(tensors_by_owner):
        src = dist.get_global_rank(grid.dp_group, d)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for dtype in sorted(by_dtype, key=str):
            group = by_dtype[dtype]
            if d == grid.dp_rank:
                flat = _flatten_dense_tensors([t.data for t in group])
                pending.sends.append(flat)
            else:  # receives: its old values would only be overwritten
                flat = torch.empty(sum(t.numel() for t in group), dtype=dtype, device=group[0].device)
                pending.receives.append((flat, group))
            pending.works.append(dist.broadcast(flat, src=src, group=grid.dp_group, async_op=True))
    return pending
