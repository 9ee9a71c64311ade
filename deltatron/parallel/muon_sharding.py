"""Who updates which parameter under MuonClip, and the collectives that move the pieces.

Ranks that hold copies or tensor-parallel shards of the same parameters form a grid of
`dp` replicas x `tp` shards: for dense parameters the data(x context)-parallel by tensor-parallel
ranks of one pipeline stage, for expert parameters the expert-data-parallel by expert-tensor-
parallel ranks of one expert-parallel rank. Inside its grid every parameter gets

* one owner replica d (a DP index): only the ranks of replica d keep the parameter's optimizer
  state (fp32 master, momentum or Adam moments; each TP rank its own shard of it), receive its
  reduced gradient and compute its update (ZeRO-1 by whole tensors);
* for each of its Muon matrices, one owner TP rank t in replica d: the TP ranks of replica d send
  it their shards of the momentum-updated matrix (bf16), it runs Newton-Schulz on the full matrix
  once, and scatters each rank its slice of the result.

The owner replica is a position: megatron-core's DDP runs with `use_distributed_optimizer=True`
on an owner-aligned layout (`owner_aligned_layout`, passed as DDP's `full_param_layout`), so its
reduce-scatter of each gradient bucket leaves on DP rank r exactly the reduced gradients of the
parameters in r's shard, and its parameter all-gather (`start_param_sync`, or the forward
pre-hooks with overlap_param_gather) returns each owner's updated parameters to every replica.
Owners are read back from DDP's buffers (`owners_from_buffer`), in the buffer's own DP group.
Within a bucket, parameters go largest first to the replica with the least estimated update cost
among those whose shard stays near an even share of the bucket (the shards are padded to the
largest, so imbalance costs memory and bandwidth); the owner TP rank of each matrix is then the
least loaded one of that replica by Newton-Schulz cost (`plan_tp_owners`). Everything is computed
identically on every rank of the grid from the same ordered parameter list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.optimizer.param_layout import bucket_end_divisor, pad_param_start, pad_to_divisor
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


def plan_tp_owners(items: list[WorkItem], param_owner: dict[str, int], dp_size: int, tp_size: int) -> dict[str, int]:
    """Owner TP rank of every Muon matrix (block key -> TP index inside its parameter's owner
    replica): largest Newton-Schulz cost first onto the least loaded TP rank of that replica.
    Deterministic (ties: lowest index), so every rank of the grid computes the same answer from
    the same items; param_owner: param key -> owner DP index (`owner_aligned_layout`)."""
    tp_load = [[0.0] * tp_size for _ in range(dp_size)]
    block_owner = {}
    for item in sorted(items, key=lambda i: (-i.cost, i.key)):
        d = param_owner[item.key]
        for block_key, cost in sorted(item.blocks, key=lambda b: (-b[1], b[0])):
            t = min(range(tp_size), key=lambda r: (tp_load[d][r], r))
            tp_load[d][t] += cost
            block_owner[block_key] = t
    return block_owner


# ---------------------------------------------------------------------------- owner-aligned layout
# A bucket closes once its elements reach PADDING_FLOOR * dp * (its largest parameter), as
# megatron-core's layer-wise optimizer does: some shard holds that parameter whole, so a bucket
# smaller than dp times it would be mostly padding (overhead capped near 1 / 0.9 - 1 = 11%).
PADDING_FLOOR = 0.9
# A shard may exceed the bucket's even share (max(largest, elements / dp)) by this fraction when
# that lets a parameter go to a replica with less update cost; beyond it, the least-filled shard.
BALANCE_SLACK = 0.05


@dataclass(frozen=True)
class LayoutItem:
    """A parameter of one DDP buffer, as the layout sees it: numel is the local (this TP rank's)
    element count, cost its owner's update cost (`WorkItem.cost`). isolated: megatron-core's
    `shared_embedding` (tied embedding under PP): a bucket of its own, whole in shard 0, so the
    same DP index owns it on the first and the last stage (their all-reduce of its gradient)."""

    key: str
    numel: int
    cost: float
    isolated: bool = False


@dataclass
class BufferLayout:
    """Where the parameters of one DDP buffer lie, in whole-buffer element offsets.

    Bucket b spans buckets[b] = (start, end); with dp ranks its shards are dp equal runs of
    S_b = (end - start) / dp elements and rank r's shard is [start + r S_b, start + (r+1) S_b),
    the part megatron-core's reduce-scatter leaves reduced on rank r. Every parameter lies whole
    in the shard of its owner (spans[key] = (start, end, bucket id)), at a 64-element offset."""

    dp_size: int
    spans: dict[str, tuple[int, int, int]]
    owner: dict[str, int]
    buckets: list[tuple[int, int]]
    unpadded: list[int]  # parameter elements per bucket

    @property
    def numel(self) -> int:
        return self.buckets[-1][1] if self.buckets else 0

    @property
    def padding(self) -> int:
        return self.numel - sum(self.unpadded)


def owner_aligned_layout(
    items: list[LayoutItem], dp_size: int, bucket_size: int | None, shard_divisor: int, load: list[float]
) -> BufferLayout:
    """Layout of one DDP buffer whose every parameter lies in its owner's DP shard.

    items: the buffer's parameters in model (forward) order, the same on every rank of the grid.
    Buckets are contiguous runs in backprop order (reversed items), closed at bucket_size elements
    or more (None: one bucket; `PADDING_FLOOR`). In each bucket parameters go largest first to the
    replica with the least update cost (load, [dp], added to in place: carry it across the
    buffers of one grid) among those whose shard stays within the bucket's even share
    (`BALANCE_SLACK`), else to the least-filled shard. Shards are padded to the largest, a
    multiple of shard_divisor (a multiple of 64; see `shard_divisor`). Deterministic."""
    out = BufferLayout(dp_size, {}, {}, [], [])
    for run, isolated in _bucket_runs(items, dp_size, bucket_size):
        shards = _pack_isolated(run[0], dp_size, load) if isolated else _pack_bucket(run, dp_size, load)
        _emit_bucket(out, shards, shard_divisor, padding_like=run[0].numel if isolated else 0)
    return out


def shard_divisor(dp_size: int, pad_for_high_nccl_busbw: bool) -> int:
    """Shard sizes are multiples of this: every shard start is 64-aligned and every bucket
    dp * S_b meets megatron-core's bucket-end rule (lcm(dp, 128), or with 2^16 for busbw)."""
    return math.lcm(64, bucket_end_divisor(dp_size, pad_for_high_nccl_busbw) // dp_size)


def _bucket_runs(items: list[LayoutItem], dp_size: int, bucket_size: int | None) -> list[tuple[list[LayoutItem], bool]]:
    """The buckets' parameters, in backprop order; (run, isolated) per bucket."""
    runs: list[tuple[list[LayoutItem], bool]] = []
    run: list[LayoutItem] = []
    total = largest = 0  # of run
    for item in reversed(items):
        if item.isolated:
            if run:
                runs.append((run, False))
            runs.append(([item], True))
            run, total, largest = [], 0, 0
            continue
        run.append(item)
        total, largest = total + item.numel, max(largest, item.numel)
        if bucket_size is not None and total >= max(bucket_size, int(PADDING_FLOOR * dp_size * largest)):
            runs.append((run, False))
            run, total, largest = [], 0, 0
    if run:
        runs.append((run, False))
    return runs


def _pack_bucket(run: list[LayoutItem], dp_size: int, load: list[float]) -> list[list[LayoutItem]]:
    """The bucket's parameters per shard (in placement order); adds their costs to load."""
    cap = max(max(i.numel for i in run), -(-sum(i.numel for i in run) // dp_size)) * (1 + BALANCE_SLACK)
    shards: list[list[LayoutItem]] = [[] for _ in range(dp_size)]
    fill = [0] * dp_size  # elements used in each shard, parameters 64-aligned
    for item in sorted(run, key=lambda i: (-i.numel, i.key)):
        fits = [r for r in range(dp_size) if pad_param_start(fill[r]) + item.numel <= cap]
        r = min(fits, key=lambda s: (load[s], s)) if fits else min(range(dp_size), key=lambda s: (fill[s], s))
        shards[r].append(item)
        fill[r] = pad_param_start(fill[r]) + item.numel
        load[r] += item.cost
    return shards


def _pack_isolated(item: LayoutItem, dp_size: int, load: list[float]) -> list[list[LayoutItem]]:
    load[0] += item.cost
    return [[item]] + [[] for _ in range(dp_size - 1)]


def _emit_bucket(out: BufferLayout, shards: list[list[LayoutItem]], divisor: int, padding_like: int) -> None:
    """Append a bucket holding `shards` to out. padding_like: the least shard size (an isolated
    parameter's numel, so its bucket is dp shards of it)."""
    fills = []
    for shard in shards:
        fill = 0
        for item in shard:
            fill = pad_param_start(fill) + item.numel
        fills.append(fill)
    size = pad_to_divisor(max(max(fills), padding_like, 1), divisor)
    start, bucket_id = out.numel, len(out.buckets)
    for r, shard in enumerate(shards):
        cursor = start + r * size
        for item in shard:
            cursor = pad_param_start(cursor)
            out.spans[item.key] = (cursor, cursor + item.numel, bucket_id)
            out.owner[item.key] = r
            cursor += item.numel
    out.buckets.append((start, start + out.dp_size * size))
    out.unpadded.append(sum(i.numel for shard in shards for i in shard))


def check_owner_layout(layout: BufferLayout, items: list[LayoutItem]) -> None:
    """Raise if the layout breaks what MuonClip or megatron-core's buffer needs (DDP checks only
    the bucket order and bounds): every item placed once, 64-aligned, whole inside its owner's
    shard, no two overlapping; buckets back to back from 0, each a multiple of dp long, their
    ids non-decreasing by steps of one along backprop order."""
    dp = layout.dp_size
    if sorted(layout.spans) != sorted(i.key for i in items):
        raise RuntimeError("owner layout: the placed parameters are not the buffer's parameters")
    if any(a[1] != b[0] for a, b in zip(layout.buckets, layout.buckets[1:])) or (layout.buckets and layout.buckets[0][0]):
        raise RuntimeError(f"owner layout: buckets {layout.buckets} are not back to back from 0")
    for item in items:
        start, end, b = layout.spans[item.key]
        b_start, b_end = layout.buckets[b]
        if (b_end - b_start) % dp or b_start % dp:
            raise RuntimeError(f"owner layout: bucket {b} {layout.buckets[b]} is not divisible by dp={dp}")
        size = (b_end - b_start) // dp
        lo = b_start + layout.owner[item.key] * size
        if end - start != item.numel or start % 64 or not (lo <= start and end <= lo + size):
            raise RuntimeError(
                f"owner layout: {item.key} at [{start}, {end}) is not a 64-aligned whole parameter in "
                f"its owner {layout.owner[item.key]}'s shard [{lo}, {lo + size}) of bucket {b}"
            )
    spans = sorted(layout.spans.items(), key=lambda kv: kv[1][0])
    for (key_a, a), (key_b, b) in zip(spans, spans[1:]):
        if a[1] > b[0]:
            raise RuntimeError(f"owner layout: {key_a} and {key_b} overlap")
    ids = [layout.spans[i.key][2] for i in reversed(items)]
    if ids and (ids[0] != 0 or any(b - a not in (0, 1) for a, b in zip(ids, ids[1:])) or ids[-1] != len(layout.buckets) - 1):
        raise RuntimeError(f"owner layout: bucket ids along backprop order {ids} are not contiguous runs")


def owners_from_buffer(buffer) -> dict[torch.nn.Parameter, int]:
    """Owner DP index of every parameter of a megatron-core `_ParamAndGradBuffer` laid out by
    `owner_aligned_layout`: the rank, in the buffer's data-parallel group, whose reduce-scatter
    shard holds it (as megatron-core's layer-wise optimizer reads owners from positions). Raises
    if a parameter straddles two shards: that rank would receive only part of its gradient."""
    owners = {}
    dp = buffer.data_parallel_world_size
    for param, (start, end, b) in buffer.param_index_map.items():
        b_start, b_end = buffer.bucket_indices[b]
        size = (b_end - b_start) // dp
        owner = (start - b_start) // size
        if (end - 1 - b_start) // size != owner:
            raise RuntimeError(
                f"a parameter at [{start}, {end}) straddles the DP shards of bucket {b} (shard size "
                f"{size}): the buffer was not laid out by owner_aligned_layout"
            )
        owners[param] = owner
    return owners


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
