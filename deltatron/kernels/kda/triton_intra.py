"""Triton KDA, intra-chunk forward: decayed scores, the UT transform and W, U (one program per chunk
and head, all chunks in parallel).

Per chunk of C tokens, with G_i = sum_{t <= i} g_t (chunk-local, per channel):
    A_kk[i, j] = beta_i sum_c k_i k_j exp(G_i - G_j)      j < i
    A_qk[i, j] =        sum_c q_i k_j exp(G_i - G_j)      j <= i   (q already scaled)
    A_inv = (I + A_kk)^-1,   W = A_inv Diag(beta) (exp(G) * K),   U = A_inv Diag(beta) V
and the decay factors of the state passes: Qg = scale * q * exp(G), Kg = k * exp(Gs) (Gs_i the sum
of g after token i), gC = exp(G_C) (the chunk total). Layouts in triton_common.py.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
import triton
import triton.language as tl

from deltatron.kernels.kda.triton_common import (
    SUB,
    ChunkLayout,
    block_diag_gather,
    block_diag_spread,
    boundary_decays,
    chunk_decays,
    IN_BLOCK_FACTOR_BOUND,
    in_block_decay_step,
    in_block_log_decay,
    sub_block_decays,
    load_decays,
    load_rows,
    load_vector,
    store_rows,
)


@triton.jit
def intra_scores(
    q_ptr, k_ptr, g_ptr, t0, n, stride, scale,
    K: tl.constexpr, C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    """Decayed scores of one chunk, without beta: (kk, qk), fp32 [C, C] each, zero above the
    diagonal; kk[i, j] = sum_c k_i k_j exp(G_i - G_j) for j < i, qk the same with scale * q_i for
    j <= i. Pointers are at this head's column 0; channels are processed BK at a time.

    Pairs in different sub-blocks of BC tokens go through a boundary between them (one [C, C]
    product per boundary, boundary_decays); pairs inside a sub-block are one [C, C] product
    through the sub-block's reference row (in_block_log_decay) when its decays are bounded, else
    formed column by column (in_block_decay_step), gathered as [C, BC] and spread to the diagonal
    sub-blocks at the end.
    """
    NS: tl.constexpr = C // BC
    rows = tl.arange(0, C)
    sub_cols = tl.arange(0, BC)
    first_of_block = (rows // BC) * BC
    local_col = (rows % BC)[:, None]
    same_block = (rows // BC)[:, None] == (rows // BC)[None, :]
    in_block_strict = same_block & (rows[None, :] < rows[:, None])
    in_block_incl = same_block & (rows[None, :] <= rows[:, None])
    kk = tl.zeros([C, C], dtype=tl.float32)
    qk = tl.zeros([C, C], dtype=tl.float32)
    kk_diag = tl.zeros([C, BC], dtype=tl.float32)  # kk[i, block(i) * BC + c]
    qk_diag = tl.zeros([C, BC], dtype=tl.float32)
    for ik in range(tl.cdiv(K, BK)):
        cols = ik * BK + tl.arange(0, BK)
        qt = load_rows(q_ptr, t0, rows, n, stride, cols, K) * scale
        kt = load_rows(k_ptr, t0, rows, n, stride, cols, K)
        g, g_next = load_decays(g_ptr, t0, rows, n, stride, cols, K)
        e_in, e_out, totals = sub_block_decays(g, g_next, C, BC, BK)
        for b in tl.static_range(NS - 1):
            left, right = boundary_decays(e_in, e_out, totals, b, rows, C, BC, BK)
            k_right = tl.trans(kt * right)
            kk += tl.dot(kt * left, k_right, input_precision=PREC)
            qk += tl.dot(qt * left, k_right, input_precision=PREC)
        log_in = in_block_log_decay(g, g_next, C, BC, BK)
        if tl.max(tl.abs(log_in)) <= IN_BLOCK_FACTOR_BOUND:
            # In-block pairs factored through the reference row: one product for all of them
            # (the entries outside the diagonal sub-blocks are discarded, never multiplied).
            k_in = tl.trans(kt * tl.exp(-log_in))
            out_in = tl.exp(log_in)
            kk += tl.where(in_block_strict, tl.dot(kt * out_in, k_in, input_precision=PREC), 0.0)
            qk += tl.where(in_block_incl, tl.dot(qt * out_in, k_in, input_precision=PREC), 0.0)
        else:
            # Decays too strong to factor: column by column, products of exp(g) <= 1.
            decay = tl.zeros([C, BK], dtype=tl.float32)
            for back in range(BC):
                jj = BC - 1 - back
                decay = in_block_decay_step(decay, g_ptr, t0, first_of_block, local_col, jj, n,
                                            stride, cols, K)
                k_col = decay * load_rows(k_ptr, t0, first_of_block + jj, n, stride, cols, K)
                at_jj = sub_cols[None, :] == jj
                kk_diag += tl.where(at_jj, tl.sum(kt * k_col, 1)[:, None], 0.0)
                qk_diag += tl.where(at_jj, tl.sum(qt * k_col, 1)[:, None], 0.0)
    local = (rows % BC)[:, None]
    kk += block_diag_spread(tl.where(sub_cols[None, :] < local, kk_diag, 0.0), C, BC)
    qk += block_diag_spread(tl.where(sub_cols[None, :] <= local, qk_diag, 0.0), C, BC)
    return kk, qk


@triton.jit
def unit_lower_inverse(a, C: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr):
    """(I + a)^-1 for a strictly lower triangular fp32 [C, C].

    The diagonal BC x BC blocks are inverted by forward substitution (all blocks at once, one
    row per step); with D = their block-diagonal inverse and N = D a_off (a_off: a outside the
    diagonal blocks, strictly block-lower, so N^(C/BC) = 0):
        (I + a)^-1 = (I + N)^-1 D = (I - N + N^2 - ...) D,   evaluated by Horner.
    """
    NS: tl.constexpr = C // BC
    rows = tl.arange(0, C)
    cols = tl.arange(0, C)
    diag3 = tl.reshape(block_diag_gather(a, C, BC), [NS, BC, BC])  # [block, row, col]
    r3 = tl.arange(0, BC)[None, :, None]
    c3 = tl.arange(0, BC)[None, None, :]
    inv3 = tl.where(r3 == c3, 1.0, 0.0) + tl.zeros([NS, BC, BC], dtype=tl.float32)
    for i in range(1, BC):
        a_i = tl.sum(tl.where(r3 == i, diag3, 0.0), 1)  # [NS, BC]: row i of every block
        inv3 = tl.where(r3 == i, inv3 - tl.sum(a_i[:, :, None] * inv3, 1)[:, None, :], inv3)
    inv = block_diag_spread(tl.reshape(inv3, [C, BC]), C, BC)
    if NS > 1:
        off = tl.where((rows // BC)[:, None] > (cols // BC)[None, :], a, 0.0)
        nil = tl.dot(inv, off, input_precision=PREC)
        eye = tl.where(rows[:, None] == cols[None, :], 1.0, 0.0)
        series = eye
        for _ in tl.static_range(NS - 1):
            series = eye - tl.dot(nil, series, input_precision=PREC)
        inv = tl.dot(series, inv, input_precision=PREC)
    return inv


@triton.jit
def intra_factors(
    q, k, v, g, a_inv, bt, w, u, qg, kg, gc, i_c, i_h, t0, n, scale, H,
    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BC: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """W, U and the decay factors the state passes need (so that their sequential loops do no
    scans) of chunk i_c, head i_h, from its A_inv [C, C] and beta [C] (fp32)."""
    rows = tl.arange(0, C)
    for ik in range(tl.cdiv(K, BK)):
        cols = ik * BK + tl.arange(0, BK)
        kt = load_rows(k + i_h * K, t0, rows, n, H * K, cols, K)
        g_t, g_next = load_decays(g + i_h * K, t0, rows, n, H * K, cols, K)
        e_in, e_out, totals = sub_block_decays(g_t, g_next, C, BC, BK)
        decay_in, decay_out = chunk_decays(e_in, e_out, totals, C, BC, BK)  # exp(G), exp(Gs)
        x = kt * decay_in * bt[:, None]
        store_rows(w + i_h * K, tl.dot(a_inv, x, input_precision=PREC), t0, rows, n, H * K, cols, K)
        qt = load_rows(q + i_h * K, t0, rows, n, H * K, cols, K)
        store_rows(qg + i_h * K, qt * decay_in * scale, t0, rows, n, H * K, cols, K)
        store_rows(kg + i_h * K, kt * decay_out, t0, rows, n, H * K, cols, K)
        gc_offs = (i_c * H + i_h).to(tl.int64) * K + cols
        tl.store(gc + gc_offs, tl.exp(tl.sum(g_t, 0)), mask=cols < K)
    for iv in range(tl.cdiv(V, BV)):
        cols = iv * BV + tl.arange(0, BV)
        x = load_rows(v + i_h * V, t0, rows, n, H * V, cols, V) * bt[:, None]
        store_rows(u + i_h * V, tl.dot(a_inv, x, input_precision=PREC), t0, rows, n, H * V, cols, V)


@triton.jit
def _intra_fwd_kernel(
    q, k, v, g, beta, aqk, w, u, qg, kg, gc, ainv, chunks, scale, H,
    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BC: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """Grid (chunks, H). Writes A_qk and A_inv [T_total, H, C], W, Qg, Kg [T_total, H, K],
    U [T_total, H, V] and gC [NC, H, K]."""
    i_c = tl.program_id(0)
    i_h = tl.program_id(1)
    t0 = tl.load(chunks + 2 * i_c)
    n = tl.load(chunks + 2 * i_c + 1)
    rows = tl.arange(0, C)
    cc = tl.arange(0, C)

    kk, qk = intra_scores(
        q + i_h * K, k + i_h * K, g + i_h * K, t0, n, H * K, scale, K, C, BC, BK, PREC
    )
    store_rows(aqk + i_h * C, qk, t0, rows, n, H * C, cc, C)
    bt = load_vector(beta + i_h, t0, rows, n, H)
    a_inv = unit_lower_inverse(kk * bt[:, None], C, BC, PREC)
    store_rows(ainv + i_h * C, a_inv, t0, rows, n, H * C, cc, C)
    intra_factors(q, k, v, g, a_inv, bt, w, u, qg, kg, gc, i_c, i_h, t0, n, scale, H,
                  K, V, C, BC, BK, BV, PREC)


@triton.jit
def _intra_factors_kernel(
    q, k, v, g, beta, ainv, w, u, qg, kg, gc, chunks, scale, H,
    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BC: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """Grid (chunks, H). The backward's recomputation: W, U, Qg, Kg and gC from the A_inv the
    forward kept (no scores, no inverse)."""
    i_c = tl.program_id(0)
    i_h = tl.program_id(1)
    t0 = tl.load(chunks + 2 * i_c)
    n = tl.load(chunks + 2 * i_c + 1)
    rows = tl.arange(0, C)
    a_inv = load_rows(ainv + i_h * C, t0, rows, n, H * C, tl.arange(0, C), C)
    bt = load_vector(beta + i_h, t0, rows, n, H)
    intra_factors(q, k, v, g, a_inv, bt, w, u, qg, kg, gc, i_c, i_h, t0, n, scale, H,
                  K, V, C, BC, BK, BV, PREC)


def intra_config(K: int, V: int, C: int) -> dict:
    """Block sizes and warps of _intra_fwd_kernel: key channels 32 and value columns 64 at a time,
    8 warps from C = 64 on (at K = 128, C = 64 that keeps sm_90 register spills near zero with
    tf32 products; see triton_compile_check.py)."""
    if C >= 64:  # the tiles of K = V = 128 whatever the head dims (see grad_config)
        return dict(BK=32, BV=64, num_warps=8, num_stages=1)
    return dict(
        BK=min(32, max(16, triton.next_power_of_2(K))),
        BV=min(64, max(16, triton.next_power_of_2(V))),
        num_warps=4,
        num_stages=1,
    )


@dataclass
class IntraChunk:
    """What the intra-chunk pass leaves for the state passes and the backward.

    aqk:  [T_total, H, C]  A_qk (scores of scaled q against k, lower triangle)
    ainv: [T_total, H, C]  A_inv = (I + A_kk)^-1
    w:    [T_total, H, K]  W = A_inv Diag(beta) (exp(G) * K)
    u:    [T_total, H, V]  U = A_inv Diag(beta) V
    qg:   [T_total, H, K]  scale * q * exp(G)
    kg:   [T_total, H, K]  k * exp(Gs)
    gc:   [NC, H, K]       exp(G_C), the decay over the whole chunk
    all fp32. The forward keeps aqk and ainv for the backward (0.5 KB per token and head at
    C = 64), which then recomputes only the rest (`intra_chunk_factors`): the scores and the
    inverse are most of the pass's cost.
    """

    aqk: torch.Tensor
    ainv: torch.Tensor
    w: torch.Tensor
    u: torch.Tensor
    qg: torch.Tensor
    kg: torch.Tensor
    gc: torch.Tensor


def _factor_buffers(q: torch.Tensor, v: torch.Tensor, num_chunks: int) -> dict:
    T, H, K = q.shape
    f32 = dict(dtype=torch.float32, device=q.device)
    return dict(
        w=torch.empty((T, H, K), **f32),
        u=torch.empty((T, H, v.shape[-1]), **f32),
        qg=torch.empty((T, H, K), **f32),
        kg=torch.empty((T, H, K), **f32),
        gc=torch.empty((num_chunks, H, K), **f32),
    )


def intra_chunk_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    layout: ChunkLayout,
    scale: float,
    chunk_size: int,
    precision: str,
) -> IntraChunk:
    """Intra-chunk pass over every chunk of every sequence, all chunks in parallel.

    q, k, g: [T_total, H, K]; v: [T_total, H, V]; beta: [T_total, H] (contiguous); precision:
    tl.dot input_precision.
    """
    T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    f32 = dict(dtype=torch.float32, device=q.device)
    out = IntraChunk(
        aqk=torch.empty((T, H, C), **f32),
        ainv=torch.empty((T, H, C), **f32),
        **_factor_buffers(q, v, layout.num_chunks),
    )
    _intra_fwd_kernel[(layout.num_chunks, H)](
        q, k, v, g, beta, out.aqk, out.w, out.u, out.qg, out.kg, out.gc, out.ainv,
        layout.chunks, scale, H,
        K=K, V=V, C=C, BC=SUB, PREC=precision, **intra_config(K, V, C),
    )
    return out


def intra_chunk_factors(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    aqk: torch.Tensor,
    ainv: torch.Tensor,
    layout: ChunkLayout,
    scale: float,
    precision: str,
) -> IntraChunk:
    """The intra-chunk pass again from the forward's A_qk and A_inv ([T_total, H, C] fp32):
    only W, U, Qg, Kg and gC are recomputed. Other arguments as `intra_chunk_fwd`."""
    H, K = q.shape[1:]
    V = v.shape[-1]
    C = aqk.shape[-1]
    out = IntraChunk(aqk=aqk, ainv=ainv, **_factor_buffers(q, v, layout.num_chunks))
    _intra_factors_kernel[(layout.num_chunks, H)](
        q, k, v, g, beta, ainv, out.w, out.u, out.qg, out.kg, out.gc, layout.chunks, scale, H,
        K=K, V=V, C=C, BC=SUB, PREC=precision, **intra_config(K, V, C),
    )
    return out
