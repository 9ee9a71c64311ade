"""KDA under context parallelism: each CP rank runs its contiguous slice, the ranks combine states.

The gated delta rule is affine in the state entering a stretch of tokens. For a slice holding
one document piece throughout, with S_in the state entering it,

    S_end = T S_in + B,     T = prod_t (I - beta_t k_t k_t^T) Diag(exp(g_t))   [K, K] per head
    o_t   = o_t(S_in = 0) + scale q_t^T T_{<=t} S_in                           (T_{<=t}: the same
                                                                              product up to t)

B and o_t(S_in = 0) are the slice run with a zero state. T_{<=t}^T q_t and T come from the same
kernel call: appending K value columns that start as the identity and receive v = 0 makes those
columns of the state equal T_{<=t} (the columns of a delta-rule state evolve independently), so
their output is scale T_{<=t}^T q_t and their final state T. One kernel call per rank, with
V + K value columns, gives everything; the kernel boundary (`deltatron.kernels.kda.kda`) is used
as is.

Combine: every rank all-gathers (T_r, B_r) [H, K, K + V] and scans S_in(r+1) = T_r S_in(r) + B_r
locally (cp steps of a [K, K] x [K, V] product per head: cheaper than any log-step exchange for
the CP sizes one uses). Backward is autograd: the scan's backward carries state gradients from
later ranks to earlier ones (the reverse prefix), and the all-gather's backward (megatron-core's
`gather_from_sequence_parallel_region`) reduce-scatters them to the rank that produced (T_r, B_r).

Documents: only the slice's first piece continues a document from the previous rank; a piece
boundary inside the slice resets the state, so a slice holding one (or more) boundary passes on
T_r = 0 (the state it hands on is its last piece's B_r alone), and a slice that starts a document
ignores S_in.

The short convolutions (kernel W) need the W - 1 input rows before the slice: `conv_halo`
all-gathers each rank's last W - 1 rows (the backward returns their gradient to the owner).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

from deltatron.kernels.kda import kda
from deltatron.parallel.cp_slice import CPSlice


class _AlsoDependOn(torch.autograd.Function):
    """x unchanged, with `other` made part of the autograd graph (zero gradient). Every rank must
    run the same collectives in its backward: a rank whose result does not depend on a gathered
    tensor (rank 0's incoming state is zero) would otherwise skip that gather's reduce-scatter
    while the others wait in it."""

    @staticmethod
    def forward(ctx, x, other):
        ctx.other_shape, ctx.other_dtype = other.shape, other.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_zeros(ctx.other_shape, dtype=ctx.other_dtype)


def prefix_states(transitions: torch.Tensor, finals: torch.Tensor) -> torch.Tensor:
    """States entering each slice from the slices' affine maps (an exclusive scan).

    transitions: [R, H, K, K] T_r; finals: [R, H, K, V] B_r (slice r's end state from zero).
    Returns [R, H, K, V]: S_in(0) = 0, S_in(r + 1) = T_r S_in(r) + B_r.
    """
    state = torch.zeros_like(finals[0])
    out = []
    for r in range(finals.shape[0]):
        out.append(state)
        state = transitions[r] @ state + finals[r]
    return torch.stack(out)


def compose_maps(first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor]):
    """The affine state map of two consecutive stretches: S -> T2 (T1 S + B1) + B2.
    Each map is (T [H, K, K], B [H, K, V])."""
    (t1, b1), (t2, b2) = first, second
    return t2 @ t1, t2 @ b1 + b2


def local_slice_pass(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    cp: CPSlice, *, backend: str = "torch", chunk_size: int = 64, scale: Optional[float] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """The slice's own work, no communication.

    q, k, g: [1, L, H, K]; v: [1, L, H, V]; beta: [1, L, H] (the slice's tokens, one packed row).
    Returns
        o_zero   [1, L, H, V] in v's dtype: the output with a zero incoming state;
        readout  [1, F, H, K] in v's dtype: scale T_{<=t}^T q_t over the first piece's F tokens
                 (None when the slice starts a document: nothing comes in);
        slice_map [H, K, K + V] fp32: (T | B), T = 0 unless the whole slice continues one document.
    """
    _, length, heads, dk = q.shape
    dv = v.shape[-1]
    cu = cp.local_cu_seqlens
    if cp.carries_in:
        # extra value columns: v = 0, initial state = identity in the first piece only. They keep
        # v's dtype (one input dtype keeps the Triton kernels on their fast path); the state map
        # itself comes out of the kernel in fp32.
        v_run = torch.cat([v, v.new_zeros((1, length, heads, dk))], -1)
        init = torch.zeros((cp.num_pieces, heads, dk, dv + dk), dtype=torch.float32, device=q.device)
        init[0, :, :, dv:] = torch.eye(dk, device=q.device)
    else:
        v_run, init = v, None
    o_run, final = kda(
        q, k, v_run, g, beta, scale=scale, initial_state=init, output_final_state=True,
        cu_seqlens=cu, backend=backend, chunk_size=chunk_size,
    )
    o_zero = o_run[..., :dv]
    readout = o_run[:, : cp.first_piece_length, :, dv:] if cp.carries_in else None
    last = final[-1, :, :, :dv]
    if cp.carries_in and cp.num_pieces == 1:
        transition = final[0, :, :, dv:]
    else:
        transition = last.new_zeros((heads, dk, dk))
    return o_zero, readout, torch.cat([transition, last], dim=-1)


def apply_incoming_state(
    o_zero: torch.Tensor, readout: Optional[torch.Tensor], state_in: torch.Tensor
) -> torch.Tensor:
    """The slice's output for its true incoming state: o_zero [1, L, H, V] plus readout [1, F, H, K]
    times state_in [H, K, V] on the first piece's F tokens, added in fp32 -> o_zero's dtype."""
    if readout is None:
        return o_zero
    first = readout.shape[1]
    correction = torch.einsum("bthk,hkv->bthv", readout.float(), state_in.float())
    head = (o_zero[:, :first].float() + correction).to(o_zero.dtype)
    return torch.cat([head, o_zero[:, first:]], dim=1)


def kda_context_parallel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    cp: CPSlice, *, backend: str = "torch", chunk_size: int = 64, scale: Optional[float] = None,
) -> torch.Tensor:
    """KDA over a sequence split contiguously over cp.group; shapes as `local_slice_pass`.
    Returns this rank's o [1, L, H, V] in v's dtype, equal to the single-process run's slice
    (in fp32; in 16-bit to the rounding of the output itself)."""
    o_zero, readout, slice_map = local_slice_pass(
        q, k, v, g, beta, cp, backend=backend, chunk_size=chunk_size, scale=scale
    )
    maps = gather_from_sequence_parallel_region(
        slice_map[None].contiguous(), tensor_parallel_output_grad=True, group=cp.group
    )  # [cp, H, K, K + V]
    dk = q.shape[-1]
    # Only the states entering this rank are needed: scan up to it (later maps get zero gradient).
    state_in = prefix_states(maps[: cp.rank + 1, ..., :dk], maps[: cp.rank + 1, ..., dk:])[-1]
    o = apply_incoming_state(o_zero, readout, state_in)
    return _AlsoDependOn.apply(o, maps)


def conv_halo(x: torch.Tensor, rows: int, cp: CPSlice) -> torch.Tensor:
    """The `rows` rows before this rank's slice (the previous rank's last rows; zeros on rank 0).

    x: [B, L, C] the slice's convolution input -> [B, rows, C]. Needs L >= rows.
    """
    if x.shape[1] < rows:
        raise ValueError(
            f"a context-parallel slice of {x.shape[1]} tokens is shorter than the short "
            f"convolution's {rows} history rows: use a longer sequence or a smaller parallel.cp"
        )
    tail = x[:, x.shape[1] - rows :].transpose(0, 1).contiguous()  # [rows, B, C]
    tails = gather_from_sequence_parallel_region(tail, tensor_parallel_output_grad=True, group=cp.group)
    if cp.rank == 0:
        return _AlsoDependOn.apply(torch.zeros_like(x[:, :rows]), tails)
    return tails[(cp.rank - 1) * rows : cp.rank * rows].transpose(0, 1)
