"""Chunkwise-parallel Kimi Delta Attention in pure PyTorch (the CPU path and the GPU fallback).

Same recurrence as `naive.py`:
    S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T,    o_t = S_t^T (scale q_t)

The sequence is cut into chunks of C tokens. Inside a chunk, with G_i = sum_{s<=i} g_s the
chunk-local cumulative log decay (per channel) and S the state entering the chunk:

    A_kk[i, j] = beta_i sum_c k_i[c] k_j[c] exp(G_i[c] - G_j[c])      j < i
    A_qk[i, j] =        sum_c q_i[c] k_j[c] exp(G_i[c] - G_j[c])      j <= i
    M = (I + A_kk)^{-1} Diag(beta)                          (WY / UT transform, a triangular solve)
    W = M (exp(G) * K),   U = M V,   U' = U - W S           (U' are the delta-rule corrections)
    O      = (exp(G) * Q) S + A_qk U'
    S_next = Diag(exp(G_C)) S + (exp(G_C - G) * K)^T U'

Only the state passing is sequential (one step per chunk); everything else is batched over all
chunks of all sequences.

Numerics: exp(+G) and exp(-G) are never formed, since strong decays (g of -20 per token) overflow
them. Every exponent is a decay between two positions, sum_{j < t <= i} g_t with j <= i, so it is
<= 0, and it is summed from the g's directly (masked cumulative sums), never taken as a difference
G_i - G_j of two prefix sums: the g's share one sign, so a direct sum keeps full relative
precision, while the difference of two prefix sums near -300 loses ~1e-5 to cancellation. A_kk
and A_qk are built from sub-blocks of s tokens: on the diagonal sub-blocks pairwise
([.., s, s, K] temporaries), between sub-blocks through the boundary r = the last token of the
earlier block, exp(G_i - G_j) = exp(G_i - G_r) exp(G_r - G_j), both factors <= 1
([.., C/s, C, K] temporaries). That keeps memory at O(C (s + C/s) K) per chunk instead of
O(C^2 K).

Packed documents (cu_seqlens): every document is padded to whole chunks on its own (padding has
k = v = g = beta = 0, which leaves the state unchanged), so a chunk never holds two documents. The
chunks are laid out step-major (all first chunks, then all second chunks, ...) with documents
sorted by length, so the documents still running at step j are a prefix and every state-passing
step works on contiguous slices.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from deltatron.kernels.kda.checks import check_kda_inputs


def _sub_block_size(chunk_size: int) -> int:
    """The divisor s of chunk_size that minimises s + chunk_size / s (the temporaries' size)."""
    divisors = [d for d in range(1, chunk_size + 1) if chunk_size % d == 0]
    return min(divisors, key=lambda d: (d + chunk_size // d, -d))


def _suffix_sums(g: torch.Tensor) -> torch.Tensor:
    """out[..., j, :] = sum_{t > j} g[..., t, :] along dim -2 (exclusive reverse cumsum)."""
    inclusive = g.flip(-2).cumsum(-2).flip(-2)
    return F.pad(inclusive[..., 1:, :], (0, 0, 0, 1))


def _decayed_scores(
    q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, sub: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Intra-chunk score matrices, without beta.

    q, k, g: [..., C, K] (g the per-token log decay). Returns (kk, qk), each [..., C, C], lower
    triangular including the diagonal, with G the cumulative sum of g along C:
        kk[i, j] = sum_c k_i[c] k_j[c] exp(G_i[c] - G_j[c]),   qk[i, j] = the same with q_i.
    Every exponent sum_{j < t <= i} g_t is summed from the g's themselves, never as a difference
    of two cumulative sums: the g's share one sign, so the sum keeps full relative precision,
    where a difference of two large prefix sums would cancel (g = -20 then -0.001 per token).
    """
    *lead, C, K = k.shape
    nsub = C // sub
    dev = k.device
    qb = q.reshape(*lead, nsub, sub, K)
    kb = k.reshape(*lead, nsub, sub, K)
    gb = g.reshape(*lead, nsub, sub, K)

    # Diagonal sub-blocks: exp(sum_{j < t <= i} g_t) for j <= i inside the block.
    pos = torch.arange(sub, device=dev)
    after = (pos[None, :] > pos[:, None])[..., None]  # [s_j, s_t, 1]: t > j
    since = (gb[..., None, :, :] * after).cumsum(-2)  # [..., nsub, s_j, s_i, K]
    causal = after.logical_not()  # read as [s_i, s_j, 1]: not j > i
    decay = since.transpose(-3, -2).exp() * causal  # [..., nsub, s_i, s_j, K]
    k_decay = kb[..., None, :, :] * decay  # k_j exp(G_i - G_j)
    kk_diag = torch.einsum("...ic,...ijc->...ij", kb, k_decay)  # [..., nsub, s, s]
    qk_diag = torch.einsum("...ic,...ijc->...ij", qb, k_decay)
    eye = torch.eye(nsub, dtype=k.dtype, device=dev)[:, None, :, None]  # [a, 1, b, 1]
    kk = (kk_diag[..., :, :, None, :] * eye).reshape(*lead, C, C)
    qk = (qk_diag[..., :, :, None, :] * eye).reshape(*lead, C, C)
    if nsub == 1:
        return kk, qk

    # Between sub-blocks (block of i > block b of j), through the last token r of block b:
    # exp(G_i - G_j) = exp(G_i - G_r) exp(G_r - G_j), both exponents <= 0.
    right = kb * _suffix_sums(gb).exp()  # k_j exp(G_r - G_j), [..., nsub, s, K]
    later = (
        torch.arange(C, device=dev)[None, :] // sub > torch.arange(nsub, device=dev)[:, None]
    )[..., None]  # [nsub(b), C(i), 1]: block(i) > b
    left_decay = (g[..., None, :, :] * later).cumsum(-2).exp() * later  # exp(G_i - G_r)
    kk_off = torch.einsum("...bic,...bjc->...ibj", k[..., None, :, :] * left_decay, right)
    qk_off = torch.einsum("...bic,...bjc->...ibj", q[..., None, :, :] * left_decay, right)
    kk = kk + kk_off.reshape(*lead, C, C)
    qk = qk + qk_off.reshape(*lead, C, C)
    return kk, qk


def _chunk_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    init: torch.Tensor,
    active: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """KDA over chunks laid out step-major.

    q (already scaled), k, g: [Nc, H, C, K]; v: [Nc, H, C, V]; beta: [Nc, H, C]; all fp32.
    init: [N, H, K, V] fp32, sequences sorted by number of chunks, most first.
    active[j]: number of sequences with more than j chunks; the chunks of step j are rows
    sum(active[:j]) ... sum(active[:j+1]) - 1 and belong to sequences 0 ... active[j] - 1.
    Returns o [Nc, H, C, V] and the final states [N, H, K, V] in the sorted order.
    """
    K = k.shape[-1]
    G = g.cumsum(-2)  # decay since the chunk start (a same-sign sum: no cancellation)
    kk, qk = _decayed_scores(q, k, g, _sub_block_size(k.shape[-2]))
    a_kk = beta[..., :, None] * kk.tril(-1)

    # (I + A_kk) [W | U] = Diag(beta) [exp(G) K | V]; the unit diagonal is implied.
    rhs = beta[..., None] * torch.cat([G.exp() * k, v], dim=-1)
    wu = torch.linalg.solve_triangular(a_kk, rhs, upper=False, unitriangular=True)
    w, u = wu[..., :K], wu[..., K:]

    k_to_end = (k * _suffix_sums(g).exp()).transpose(-1, -2)  # exp(G_C - G) K, [Nc, H, K, C]
    chunk_decay = G[..., -1:, :].exp().transpose(-1, -2)  # exp(G_C), [Nc, H, K, 1]

    num_seqs = init.shape[0]
    state = init[: active[0]]
    # States of sequences that are done, in reverse sorted order (empty sequences first).
    done = [init[active[0] :]] if active[0] < num_seqs else []
    states_in, corrections = [], []
    start = 0
    for j, n in enumerate(active):
        rows = slice(start, start + n)
        start += n
        states_in.append(state)
        corr = u[rows] - w[rows] @ state  # U' = U - W S
        corrections.append(corr)
        state = chunk_decay[rows] * state + k_to_end[rows] @ corr
        n_next = active[j + 1] if j + 1 < len(active) else 0
        if n_next < n:
            done.append(state[n_next:])
        state = state[:n_next]
    final = torch.cat(done[::-1], dim=0)

    s_in = torch.cat(states_in, dim=0)  # [Nc, H, K, V]
    corr = torch.cat(corrections, dim=0)  # [Nc, H, C, V]
    o = (q * G.exp()) @ s_in + qk @ corr
    return o, final


def chunk_kda_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = True,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gated delta rule with per-channel decay, chunkwise parallel, fp32 inside, differentiable.

    Args:
        q, k: [B, T, H, K], already L2-normalised over K by the caller (not normalised here).
        v: [B, T, H, V].
        g: [B, T, H, K] per-channel log decay (<= 0), any float dtype (fp32 preferred).
        beta: [B, T, H] write strength, already passed through a sigmoid.
        scale: multiplies q; defaults to K ** -0.5.
        initial_state: [N, H, K, V] (computed in fp32) or None for zeros. N = B, or the number of
            documents when cu_seqlens is given.
        output_final_state: return the state after the last token of every sequence.
        cu_seqlens: [N + 1] int32/int64 offsets of packed documents into T (requires B == 1).
            Every document starts from its own initial_state row and sees no other document.
        chunk_size: tokens per chunk C. Neither T nor the documents need to be multiples of it.

    Returns:
        o: [B, T, H, V] in v's dtype; final_state: [N, H, K, V] fp32, or None when
        output_final_state is False. Gradients reach q, k, v, g, beta and initial_state.
    """
    shapes = check_kda_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    C = chunk_size
    B, T, H, K, V, N = (
        shapes.batch, shapes.seq_len, shapes.heads, shapes.head_k_dim, shapes.head_v_dim,
        shapes.num_seqs,
    )
    dev = q.device
    qf = q.float() * shapes.scale
    kf, vf, gf, bf = k.float(), v.float(), g.float(), beta.float()[..., None]
    if initial_state is None:
        init = torch.zeros((N, H, K, V), dtype=torch.float32, device=dev)
    else:
        init = initial_state.float()

    if shapes.offsets is None:
        lengths = [T] * B
    else:
        lengths = [b - a for a, b in zip(shapes.offsets, shapes.offsets[1:])]
    num_chunks = [math.ceil(n / C) for n in lengths]
    steps = max(num_chunks)
    if steps == 0:  # nothing to process: T == 0
        o = torch.zeros((B, T, H, V), dtype=v.dtype, device=dev)
        return o, (init if output_final_state else None)
    active = [sum(1 for n in num_chunks if n > j) for j in range(steps)]

    if shapes.offsets is None:
        # B sequences of the same length: pad T to whole chunks, step-major [steps * B, C, ...].
        pad = steps * C - T

        def to_chunks(x: torch.Tensor) -> torch.Tensor:
            x = F.pad(x, (0, 0, 0, 0, 0, pad))
            x = x.reshape(B, steps, C, H, x.shape[-1]).transpose(0, 1)
            return x.reshape(steps * B, C, H, x.shape[-1]).transpose(1, 2)  # [Nc, H, C, D]

        sorted_init = init
    else:
        # Documents sorted by chunk count (stable), each padded on its own; step j holds the
        # j-th chunk of the first active[j] sorted documents.
        order = sorted(range(N), key=lambda n: -num_chunks[n])
        rank = [0] * N
        for r, n in enumerate(order):
            rank[n] = r
        offsets = torch.tensor(shapes.offsets, dtype=torch.long)
        order_t = torch.tensor(order, dtype=torch.long)
        chunk_doc = torch.cat([order_t[:n] for n in active])
        chunk_step = torch.cat([torch.full((n,), j, dtype=torch.long) for j, n in enumerate(active)])
        src = (offsets[chunk_doc] + chunk_step * C)[:, None] + torch.arange(C)  # [Nc, C]
        valid = src < offsets[chunk_doc + 1][:, None]
        src = torch.where(valid, src, 0).reshape(-1).to(dev)
        valid = valid.reshape(-1, 1, 1).to(device=dev, dtype=torch.float32)
        num_rows = chunk_doc.numel()

        def to_chunks(x: torch.Tensor) -> torch.Tensor:
            x = x[0].index_select(0, src) * valid  # padding is zero
            return x.reshape(num_rows, C, H, x.shape[-1]).transpose(1, 2)  # [Nc, H, C, D]

        # Where every token lands in the chunked layout.
        step_start = torch.tensor([0] + active[:-1], dtype=torch.long).cumsum(0)
        doc = torch.repeat_interleave(torch.arange(N), torch.tensor(lengths, dtype=torch.long))
        pos = torch.arange(T) - offsets[doc]
        rows = step_start[pos // C] + torch.tensor(rank, dtype=torch.long)[doc]
        token_at = (rows * C + pos % C).to(dev)
        rank_dev = torch.tensor(rank, dtype=torch.long, device=dev)
        sorted_init = init.index_select(0, order_t.to(dev))

    o, final = _chunk_core(
        to_chunks(qf), to_chunks(kf), to_chunks(vf), to_chunks(gf), to_chunks(bf)[..., 0],
        sorted_init, active,
    )  # o: [Nc, H, C, V]

    o = o.transpose(1, 2)  # [Nc, C, H, V]
    if shapes.offsets is None:
        o = o.reshape(steps, B, C, H, V).transpose(0, 1).reshape(B, steps * C, H, V)[:, :T]
    else:
        o = o.reshape(-1, H, V).index_select(0, token_at)[None]
        final = final.index_select(0, rank_dev)  # back from sorted to document order
    return o.to(v.dtype), (final if output_final_state else None)
