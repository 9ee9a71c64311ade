"""Block AttnRes across pipeline stages: what each stage hands on, and a per-rank block cache.

A stage's layers need every completed block representation produced upstream (b_0 = embedding,
b_1, ...) and the partial sum of a block that is still open at the stage boundary. megatron-core's
schedules send one tensor per hand-off and backpropagate only that one, so a stage packs what it
hands on into that tensor: the sources concatenated along the sequence dim, [k*S, B, D] for k
sources of [S, B, D] (S the per-rank sequence shard under sequence parallelism). Gradients reach
every part because the packing is one autograd op. The count k differs between hand-offs but is
fixed by the layout, so `AttnResP2PCommunicator` knows every receive's shape in advance.

Interleaved stages (vpp): rank r runs chunk v at stage t = v*P + r, and chunk v+1 at t + P for the
same micro-batch. By then it already holds every block completed up to the end of stage t (it
received or produced them in chunk v), so the hand-off into stage t + P carries only the blocks
completed in stages t+1 .. t+P-1 (plus the partial sum). Each rank keeps those it owns in
`RankCache`, one entry per (micro-batch, block), stored once however many later chunks read it.

Gradients of cached blocks: a later chunk reads a cached block as a detached leaf; the leaf's
gradient is added to the cache entry as soon as it is accumulated (and the leaf's .grad freed).
The chunk that put the block into the cache packed its hand-off with `_HandOff`, whose backward
adds the entry's accumulated gradient to the block's gradient in that chunk's graph and drops the
entry. A micro-batch's backward runs downstream stages first, so every reader's backward precedes
the owner's; when the rank's first chunk is done, the micro-batch's cache is empty.

Bytes: `_HandOff` adds the bytes of every packed hand-off to `RankCache.bytes_sent[micro-batch]`;
`AttnResP2PCommunicator` counts what the schedule really sends forward (`wire_bytes`), as a check.
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator, _batched_p2p_ops, _p2p_ops
from megatron.core.pipeline_parallel.schedules import get_schedule_table

from deltatron.model.attnres import BlockLayout


# ------------------------------------------------------------------------------- static plan
@dataclass(frozen=True)
class StagePlan:
    """What one pipeline stage (global index `stage`, pipeline order) receives, sends and caches.

    Block ranges are half-open ranges of source indices (0 = embedding, n = block n).
    """

    stage: int
    num_stages: int
    pp_size: int
    start: int  # first global sub-layer of the stage
    end: int  # one past its last
    cached: int  # sources [0, cached) this rank already holds when the stage starts
    received: tuple[int, int]  # sources it receives
    receives_partial: bool
    sent: tuple[int, int]  # sources it sends to the next stage
    sends_partial: bool
    keeps: tuple[int, int]  # sources it puts into the rank's cache for its later chunks

    @classmethod
    def for_stage(cls, layout: BlockLayout, stage_sublayers: tuple[int, ...], pp_size: int,
                  first_sublayer: Optional[int], num_sublayers: int) -> "StagePlan":
        """The plan of the stage whose sub-layers start at `first_sublayer`.

        stage_sublayers: sub-layers of every stage in pipeline order (chunk 0 of every rank, then
        chunk 1, ...), summing to layout.num_sublayers.
        """
        if sum(stage_sublayers) != layout.num_sublayers or len(stage_sublayers) % pp_size:
            raise ValueError(
                f"pipeline stages of {list(stage_sublayers)} sub-layers do not fit "
                f"{layout.num_sublayers} sub-layers over {pp_size} pipeline ranks"
            )
        ends, e = [], 0
        for n in stage_sublayers:
            e += n
            ends.append(e)
        starts = [e - n for e, n in zip(ends, stage_sublayers)]
        if first_sublayer not in starts or num_sublayers == 0:
            raise ValueError(f"no pipeline stage starts at sub-layer {first_sublayer}: stages {starts}")
        t = starts.index(first_sublayer)
        if stage_sublayers[t] != num_sublayers:
            raise ValueError(f"stage {t} has {num_sublayers} sub-layers, the plan says {stage_sublayers[t]}")
        n_done = lambda k: layout.completed_after(ends[k]) if k >= 0 else 0  # noqa: E731
        cached = n_done(t - pp_size)  # chunk v-1 of this rank ran stage t-P
        last_chunk = t + pp_size >= len(stage_sublayers)
        return cls(
            stage=t, num_stages=len(stage_sublayers), pp_size=pp_size,
            start=starts[t], end=ends[t], cached=cached,
            received=(cached, n_done(t - 1)) if t > 0 else (0, 0),
            receives_partial=layout.open_after(starts[t]),
            # the next stage's rank holds what it had at stage t+1-P
            sent=(n_done(t + 1 - pp_size), n_done(t)) if t + 1 < len(stage_sublayers) else (0, 0),
            sends_partial=layout.open_after(ends[t]),
            keeps=(cached, n_done(t)) if not last_chunk else (0, 0),
        )

    @property
    def sent_count(self) -> int:
        """Tensors of [S, B, D] in the hand-off to the next stage."""
        return self.sent[1] - self.sent[0] + int(self.sends_partial)


# ------------------------------------------------------------------------------ rank cache
@dataclass
class CacheEntry:
    value: Tensor  # the block representation, detached ([S, B, D])
    grad: Optional[Tensor] = None  # gradient accumulated by the chunks that read it

    def add_grad(self, g: Tensor) -> None:
        self.grad = g.clone() if self.grad is None else self.grad + g


@dataclass
class RankCache:
    """Per-rank state of one schedule run: block cache and byte counts per micro-batch."""

    entries: dict[int, dict[int, CacheEntry]] = field(default_factory=dict)
    bytes_sent: dict[int, int] = field(default_factory=dict)
    forward_calls: dict[int, int] = field(default_factory=dict)  # stage -> micro-batches seen
    wire_bytes: int = 0  # what the p2p communicator really sent forward (all micro-batches)

    def reset(self) -> None:
        self.entries.clear()
        self.bytes_sent.clear()
        self.forward_calls.clear()
        self.wire_bytes = 0

    def begin(self, plan: StagePlan) -> "StageHandOff":
        """A stage's forward starts. Every chunk runs its micro-batches in order (megatron-core's
        schedules), so the stage's call count is the micro-batch index."""
        mb = self.forward_calls.get(plan.stage, 0)
        self.forward_calls[plan.stage] = mb + 1
        return StageHandOff(self, plan, mb)

    def cached_bytes(self) -> int:
        return sum(e.value.numel() * e.value.element_size() for d in self.entries.values() for e in d.values())


_RANK_CACHE = RankCache()


def rank_cache() -> RankCache:
    return _RANK_CACHE


@contextlib.contextmanager
def schedule_scope(forward_only: bool):
    """Around one forward(-backward) schedule run: start with an empty cache; after a training
    run every entry must have been consumed by its owner's backward (the cache is freed)."""
    cache = rank_cache()
    cache.reset()
    yield cache
    if forward_only:
        cache.entries.clear()
    elif any(cache.entries.values()):
        left = {mb: sorted(d) for mb, d in cache.entries.items() if d}
        cache.entries.clear()
        raise RuntimeError(f"AttnRes block cache entries outlived their backward pass: {left}")


# ----------------------------------------------------------------------------- hand-off op
class _HandOff(torch.autograd.Function):
    """Pack the sent sources into one tensor and register the kept ones in the rank cache.

    Inputs: the stage's sources that are new to this rank (block order) and then the partial sum,
    if any. Backward: each sent source gets its slice of the incoming gradient, each kept source
    the gradient its later readers accumulated in the cache (whose entry is then dropped).
    """

    @staticmethod
    def forward(ctx, cache: RankCache, mb: int, send_idx: tuple, keep: tuple, *tensors: Tensor) -> Tensor:
        ctx.cache, ctx.mb, ctx.send_idx, ctx.keep, ctx.n = cache, mb, send_idx, keep, len(tensors)
        ctx.seq = tensors[0].shape[0]
        out = torch.cat([tensors[i] for i in send_idx], dim=0)
        cache.bytes_sent[mb] = cache.bytes_sent.get(mb, 0) + out.numel() * out.element_size()
        entries = cache.entries.setdefault(mb, {})
        for block, i in keep:  # forward-only runs need them too; the schedule scope clears them
            entries[block] = CacheEntry(tensors[i].detach())
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grads: list[Optional[Tensor]] = [None] * ctx.n
        for i, g in zip(ctx.send_idx, grad_out.split(ctx.seq, dim=0)):
            grads[i] = g if grads[i] is None else grads[i] + g
        entries = ctx.cache.entries.get(ctx.mb, {})
        for block, i in ctx.keep:
            entry = entries.pop(block, None)
            if entry is not None and entry.grad is not None:
                grads[i] = entry.grad if grads[i] is None else grads[i] + entry.grad
        if not entries:
            ctx.cache.entries.pop(ctx.mb, None)
        return (None, None, None, None, *grads)


@dataclass
class StageHandOff:
    """One stage's forward for one micro-batch: unpack its input, pack its output."""

    cache: RankCache
    plan: StagePlan
    mb: int

    def receive(self, packed: Tensor) -> tuple[list[Tensor], Optional[Tensor]]:
        """packed: [k*S, B, D] from the previous stage. Returns (completed sources, each [S, B, D]:
        cached ones as leaves, received ones as slices; the partial sum or None)."""
        plan = self.plan
        lo, hi = plan.received
        k = hi - lo + int(plan.receives_partial)
        if packed is None or packed.shape[0] % k:
            raise RuntimeError(
                f"AttnRes stage {plan.stage} expected {k} sources packed along the sequence dim, got "
                f"{None if packed is None else tuple(packed.shape)}"
            )
        parts = list(packed.split(packed.shape[0] // k, dim=0))
        completed = [self._read_cached(b) for b in range(plan.cached)] + parts[: hi - lo]
        partial = parts[-1] if plan.receives_partial else None
        return completed, partial

    def _read_cached(self, block: int) -> Tensor:
        entry = self.cache.entries.get(self.mb, {}).get(block)
        if entry is None:
            raise RuntimeError(
                f"AttnRes stage {self.plan.stage}, micro-batch {self.mb}: block {block} is not in this "
                "rank's cache (the schedule must run each chunk's micro-batches in order)"
            )
        leaf = entry.value.detach().requires_grad_(torch.is_grad_enabled())
        if leaf.requires_grad:
            def to_cache(t: Tensor, entry=entry) -> None:
                entry.add_grad(t.grad)
                t.grad = None

            leaf.register_post_accumulate_grad_hook(to_cache)
        return leaf

    def send(self, completed: Sequence[Tensor], partial: Optional[Tensor]) -> Tensor:
        """completed: every source after this stage ([S, B, D] each); partial: the open block's sum or
        None. Returns the packed hand-off [k*S, B, D]."""
        plan = self.plan
        if len(completed) != plan.sent[1]:
            raise RuntimeError(f"AttnRes stage {plan.stage} holds {len(completed)} sources, plan {plan}")
        if (partial is not None) != plan.sends_partial:
            raise RuntimeError(f"AttnRes stage {plan.stage}: partial block sum does not match {plan}")
        # sources new to this rank (received or produced here) are inputs of the op; older ones
        # (cached leaves) are never sent, since the next stage's rank holds at least as many
        new_lo = plan.cached
        if plan.sent[0] < new_lo:
            raise RuntimeError(f"AttnRes stage {plan.stage} would resend cached blocks: {plan}")
        tensors = list(completed[new_lo:]) + ([partial] if partial is not None else [])
        send_idx = tuple(range(plan.sent[0] - new_lo, plan.sent[1] - new_lo))
        if partial is not None:
            send_idx += (len(tensors) - 1,)
        keep = tuple((b, b - new_lo) for b in range(plan.keeps[0], plan.keeps[1]))
        return _HandOff.apply(self.cache, self.mb, send_idx, keep, *tensors)


# ---------------------------------------------------------------------------- communicator
class AttnResP2PCommunicator(P2PCommunicator):
    """megatron-core's P2P communicator for AttnRes hand-offs of varying size.

    A hand-off's size depends on the stage it comes from, so one `tensor_shape` per schedule run
    does not fit, and exchanging shapes first (megatron-core's variable_seq_lengths) deadlocks
    when the two ranks' calls are not paired one to one (interleaved schedules with few
    micro-batches). Every size is known in advance instead: `start` lists, in megatron-core's own
    schedule order (`get_schedule_table`), the chunk each received activation and each received
    gradient belongs to, with that chunk's packed shape; `_communicate` allocates its receive
    buffers from those lists and otherwise does what megatron-core's does (its `_p2p_ops` or
    `_batched_p2p_ops`). It also counts the bytes sent forward into `RankCache.wire_bytes`.
    """

    def __init__(self, pp_group, config):
        super().__init__(pp_group, config)
        if config.use_ring_exchange_p2p:
            raise ValueError("AttnRes pipeline hand-offs do not support use_ring_exchange_p2p")
        self.expect_forward: deque = deque()
        self.expect_backward: deque = deque()

    def start(self, plans: Sequence[StagePlan], num_microbatches: int, forward_only: bool,
              seq_length: int, micro_batch_size: int) -> None:
        """Before a schedule run. plans: this rank's stage plans by chunk; seq_length: the
        per-rank sequence length of one source (after context and sequence parallel splits)."""
        pp, rank, chunks = self.pp_group.size(), self.pp_group.rank(), len(plans)
        if chunks > 1:
            table = get_schedule_table(num_microbatches, chunks, self.config.microbatch_group_size_per_vp_stage)
            order = [chunk for _, chunk in table]
        else:
            order = [0] * num_microbatches

        def shape(k):
            return (k * seq_length, micro_batch_size, self.config.hidden_size)

        in_k = [p.received[1] - p.received[0] + int(p.receives_partial) for p in plans]
        self.expect_forward = deque(
            shape(in_k[c]) for c in order if not (rank == 0 and c == 0)  # the first stage reads data
        )
        backward = [] if forward_only else [chunks - 1 - c for c in order]
        self.expect_backward = deque(
            shape(plans[c].sent_count) for c in backward if not (rank == pp - 1 and c == chunks - 1)
        )

    def finish(self) -> None:
        """After a schedule run: every announced receive happened."""
        if self.expect_forward or self.expect_backward:
            left = (len(self.expect_forward), len(self.expect_backward))
            self.expect_forward.clear()
            self.expect_backward.clear()
            raise RuntimeError(f"AttnRes pipeline: {left} (activation, gradient) receives were planned but not made")

    def _next_shape(self, queue: deque, what: str):
        if not queue:
            raise RuntimeError(f"AttnRes pipeline: the schedule receives more {what} than planned")
        return queue.popleft()

    def _communicate(self, *, tensor_send_next, tensor_send_prev, recv_prev, recv_next, tensor_shape,
                     wait_on_reqs=True):
        config = self.config
        if tensor_send_next is not None:
            rank_cache().wire_bytes += tensor_send_next.numel() * tensor_send_next.element_size()
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"

        def buffer(shape):
            return torch.empty(shape, requires_grad=True, device=device, dtype=config.pipeline_dtype)

        tensor_recv_prev = buffer(self._next_shape(self.expect_forward, "activations")) if recv_prev else None
        tensor_recv_next = buffer(self._next_shape(self.expect_backward, "gradients")) if recv_next else None
        p2p = _batched_p2p_ops if config.batch_p2p_comm else _p2p_ops
        reqs = p2p(
            tensor_send_prev=tensor_send_prev, tensor_recv_prev=tensor_recv_prev,
            tensor_send_next=tensor_send_next, tensor_recv_next=tensor_recv_next,
            group=self.pp_group, prev_pipeline_rank=self.prev_rank, next_pipeline_rank=self.next_rank,
        )
        if wait_on_reqs and len(reqs) > 0:
            for req in reqs if isinstance(reqs, list) else reqs.values():
                req.wait()
            reqs = None
        if config.batch_p2p_comm and config.batch_p2p_sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        return tensor_recv_prev, tensor_recv_next, reqs


def schedule_kwargs(config) -> dict:
    """Extra arguments for megatron-core's forward_backward function under pipeline parallelism
    with AttnRes: our communicator and the default process groups it needs alongside."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel.schedules import _build_default_pg_collection

    return dict(
        p2p_communicator=AttnResP2PCommunicator(parallel_state.get_pipeline_model_parallel_group(), config),
        pg_collection=_build_default_pg_collection(),
    )


__all__ = [
    "AttnResP2PCommunicator", "RankCache", "StageHandOff", "StagePlan", "rank_cache",
    "schedule_kwargs", "schedule_scope",
]
