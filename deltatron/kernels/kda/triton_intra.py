"""Triton KDA, intra-chunk forward: decayed scores (one program per sub-block of 16 rows), then
the UT transform and W, U (one program per chunk and head); all chunks in parallel.

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
    chunk_decays,
    IN_BLOCK_FACTOR_BOUND,
    in_block_decay_step,
    in_block_log_decay,
    sub_block_decays,
    chunk_program,
    sub_block_program,
    earlier_block_keys,
    load_decays,
    load_rows,
    load_vector,
    operand_dtype,
    pair_config,
    store_rows,
)


@triton.jit
def _scores_kernel(
    q, k, g, beta, aqk, akk, chunks, scale, H,
    K: tl.constexpr, C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    """Grid (chunks, H, C // BC): one program per sub-block I of BC rows writes rows I of
        A_qk[i, j] = sum_c scale q_i k_j exp(G_i - G_j)          j <= i
        A_kk[i, j] = beta_i sum_c k_i k_j exp(G_i - G_j)         j < i
    ([T_total, H, C], A_qk in the operand dtype and A_kk fp32, zero above the diagonal), except
    that A_kk's diagonal block holds (I + A_kk[I, I])^-1 - I, for merge_block_inverse. All key
    channels at once (BK >= K).

    A pair across sub-blocks (J < I) factors through the boundary after J:
    exp(G_i - G_j) = e_in_I[i] * exp(totals of the blocks between) * e_out_J[j], every factor an
    exp of a sum of g's <= 0 (sub_block_decays): one [BC, BK] x [BK, BC] product per block pair
    and score. Pairs inside I go through I's reference row (in_block_log_decay) when its decays
    are bounded, else column by column (in_block_decay_step).
    """
    i_c, i_h, i_b, t0, n, first = sub_block_program(chunks, BC)
    if first >= n:
        return
    local = tl.arange(0, BC)
    rows = first + local
    ck = tl.arange(0, BK)
    sk = H * K
    qt = load_rows(q + i_h * K, t0, rows, n, sk, ck, K) * scale
    kt = load_rows(k + i_h * K, t0, rows, n, sk, ck, K)
    kbt = kt * load_vector(beta + i_h, t0, rows, n, H)[:, None]
    g_t, g_next = load_decays(g + i_h * K, t0, rows, n, sk, ck, K)
    e_in, e_out, total = sub_block_decays(g_t, g_next, BC, BC, BK)

    # Pairs inside I first, so that only q_in and k_in stay live through the loop below.
    strict = local[None, :] < local[:, None]
    incl = local[None, :] <= local[:, None]
    log_in = in_block_log_decay(g_t, g_next, BC, BC, BK)
    if tl.max(tl.abs(log_in)) <= IN_BLOCK_FACTOR_BOUND:
        # In-block pairs factored through the reference row: one product for all of them.
        out_in = tl.exp(log_in)
        k_ref = tl.trans(kt * tl.exp(-log_in))
        qk = tl.where(incl, tl.dot(qt * out_in, k_ref, input_precision=PREC), 0.0)
        kk = tl.where(strict, tl.dot(kbt * out_in, k_ref, input_precision=PREC), 0.0)
    else:
        # Decays too strong to factor: column by column, products of exp(g) <= 1.
        qk = tl.zeros([BC, BC], dtype=tl.float32)
        kk = tl.zeros([BC, BC], dtype=tl.float32)
        decay = tl.zeros([BC, BK], dtype=tl.float32)
        first_rows = first + tl.zeros([BC], dtype=tl.int32)
        for back in range(BC):
            jj = BC - 1 - back
            decay = in_block_decay_step(decay, g + i_h * K, t0, first_rows, local[:, None], jj,
                                        n, sk, ck, K)
            k_col = decay * load_rows(k + i_h * K, t0, first_rows + jj, n, sk, ck, K)
            at_jj = local[None, :] == jj
            qk += tl.where(at_jj & incl, tl.sum(qt * k_col, 1)[:, None], 0.0)
            kk += tl.where(at_jj & strict, tl.sum(kbt * k_col, 1)[:, None], 0.0)
    store_rows(aqk + i_h * C + first, qk, t0, rows, n, H * C, local, BC)
    # the diagonal block's own inverse, for merge_block_inverse (one small substitution per
    # program here instead of all of a chunk's in one program there)
    store_rows(akk + i_h * C + first, unit_lower_block_inverse(kk, BC), t0, rows, n, H * C,
               local, BC)

    q_in = qt * e_in
    k_in = kbt * e_in
    gap = tl.zeros([BK], dtype=tl.float32)  # sum of g over the blocks strictly between
    for back in range(i_b):
        jb = i_b - 1 - back
        keys, total_j = earlier_block_keys(k + i_h * K, g + i_h * K, t0, jb, n, sk, ck, K, gap,
                                           BC, BK)
        kr = tl.trans(keys)
        store_rows(aqk + i_h * C + jb * BC, tl.dot(q_in, kr, input_precision=PREC),
                   t0, rows, n, H * C, local, BC)
        store_rows(akk + i_h * C + jb * BC, tl.dot(k_in, kr, input_precision=PREC),
                   t0, rows, n, H * C, local, BC)
        gap += total_j
    zeros = tl.zeros([BC, BC], dtype=tl.float32)
    for jb in range(i_b + 1, C // BC):  # right of the diagonal block
        store_rows(aqk + i_h * C + jb * BC, zeros, t0, rows, n, H * C, local, BC)
        store_rows(akk + i_h * C + jb * BC, zeros, t0, rows, n, H * C, local, BC)


@triton.jit
def unit_lower_block_inverse(a, BC: tl.constexpr):
    """(I + a)^-1 - I for a strictly lower triangular fp32 [BC, BC] (one sub-block), by forward
    substitution, one row per step: row i of the inverse is e_i - sum_{j < i} a[i, j] inv[j]."""
    r = tl.arange(0, BC)[:, None]
    c = tl.arange(0, BC)[None, :]
    inv = tl.where(r == c, 1.0, 0.0)
    for i in tl.static_range(1, BC):
        a_i = tl.sum(tl.where(r == i, a, 0.0), 0)  # row i of a, [BC]
        inv = tl.where(r == i, inv - tl.sum(a_i[:, None] * inv, 0)[None, :], inv)
    return tl.where(r == c, 0.0, inv)


@triton.jit
def merge_block_inverse(ainv, t0, n, stride, C: tl.constexpr, BC: tl.constexpr,
                        PREC: tl.constexpr):
    """Overwrite one chunk's rows of ainv ([T_total, H, C] at this head; on entry A below the
    diagonal BC x BC blocks and D_I - I on them, D_I = (I + A[I, I])^-1 from _scores_kernel)
    with (I + A)^-1, one block of rows at a time, each from the finished ones above it:
        inv[I] = D_I (E_I - sum_{J < I} A[I, J] inv[J])        (E_I: rows I of the identity)
    All products are [BC, BC] x [BC, C]: no [C, C] tile is ever a tl.dot operand (at C = 128 one
    takes more shared memory than a multiprocessor has). Rows past a ragged chunk's end read as
    zeros (D_I = I there) and are not written.
    """
    NS: tl.constexpr = C // BC
    local = tl.arange(0, BC)
    cols = tl.arange(0, C)
    eye = tl.where(local[:, None] == local[None, :], 1.0, 0.0)
    for I in tl.static_range(NS):
        rows = I * BC + local
        x = tl.where(rows[:, None] == cols[None, :], 1.0, 0.0)  # E_I, [BC, C]
        for J in tl.static_range(I):
            a_ij = load_rows(ainv + J * BC, t0, rows, n, stride, local, BC)
            inv_j = load_rows(ainv, t0, J * BC + local, n, stride, cols, C)
            x -= tl.dot(a_ij, inv_j, input_precision=PREC)
        d = load_rows(ainv + I * BC, t0, rows, n, stride, local, BC) + eye
        tl.debug_barrier()  # every thread has read rows I before they are overwritten
        store_rows(ainv, tl.dot(d, x, input_precision=PREC), t0, rows, n, stride, cols, C)
        tl.debug_barrier()  # rows I are written before the next blocks read them


@triton.jit
def _intra_factors_kernel(
    q, k, v, g, beta, ainv, w, u, qg, kg, gc, chunks, scale, H,
    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BC: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, INVERT: tl.constexpr,
):
    """Grid (chunks, H). W, U and the decay factors the state passes need (Qg, Kg, gC: so that
    their sequential loops do no scans) of every chunk, from A_inv and beta. INVERT (the
    forward): ainv holds _scores_kernel's beta-scaled A_kk (with the inverses of its diagonal
    blocks) on entry and is overwritten with A_inv = (I + A_kk)^-1; else (the backward's
    recomputation) it holds the forward's A_inv."""
    i_c, i_h, t0, n = chunk_program(chunks)
    rows = tl.arange(0, C)
    cc = tl.arange(0, C)
    if INVERT:
        merge_block_inverse(ainv + i_h * C, t0, n, H * C, C, BC, PREC)
    a_inv = load_rows(ainv + i_h * C, t0, rows, n, H * C, cc, C)
    bt = load_vector(beta + i_h, t0, rows, n, H)
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


def intra_config(K: int, V: int, C: int) -> dict:
    """Block sizes and warps of _intra_factors_kernel: key channels and value columns 32 at a time,
    4 warps. Measured on an H200 at K = V = 128, C = 64, B8 T4k H32 (bench/kda_tiles.py, whole
    operator): forward 12.3 ms against 15.3 with BV 64 and 8 warps (which had the fewest register
    spills), 13.0 with BV 64 and 4 warps."""
    if C >= 64:  # the tiles of K = V = 128 whatever the head dims (see grad_config)
        return dict(BK=32, BV=32, num_warps=4, num_stages=1)
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
    ainv and gc fp32, the others (the state passes' operands) in the operand dtype
    (triton_common.operand_dtype). The forward keeps aqk and ainv for the backward (0.38 KB per
    token and head at C = 64 with bf16 operands, 0.5 KB in fp32), which then recomputes only the
    rest (`intra_chunk_factors`): the scores and the inverse are most of the pass's cost.
    """

    aqk: torch.Tensor
    ainv: torch.Tensor
    w: torch.Tensor
    u: torch.Tensor
    qg: torch.Tensor
    kg: torch.Tensor
    gc: torch.Tensor


def _factor_buffers(q: torch.Tensor, v: torch.Tensor, num_chunks: int, op: torch.dtype) -> dict:
    T, H, K = q.shape
    as_op = dict(dtype=op, device=q.device)
    return dict(
        w=torch.empty((T, H, K), **as_op),
        u=torch.empty((T, H, v.shape[-1]), **as_op),
        qg=torch.empty((T, H, K), **as_op),
        kg=torch.empty((T, H, K), **as_op),
        gc=torch.empty((num_chunks, H, K), dtype=torch.float32, device=q.device),
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
    op = operand_dtype(q.dtype, k.dtype, v.dtype)
    out = IntraChunk(
        aqk=torch.empty((T, H, C), dtype=op, device=q.device),
        ainv=torch.empty((T, H, C), dtype=torch.float32, device=q.device),
        **_factor_buffers(q, v, layout.num_chunks, op),
    )
    grid = (layout.num_chunks, H)
    _scores_kernel[grid + (C // SUB,)](
        q, k, g, beta, out.aqk, out.ainv, layout.chunks, scale, H,
        K=K, C=C, BC=SUB, PREC=precision, **pair_config(K, whole_head=True),
    )
    _intra_factors_kernel[grid](
        q, k, v, g, beta, out.ainv, out.w, out.u, out.qg, out.kg, out.gc, layout.chunks, scale, H,
        K=K, V=V, C=C, BC=SUB, PREC=precision, INVERT=True, **intra_config(K, V, C),
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
    """The intra-chunk pass again from the forward's A_qk and A_inv ([T_total, H, C]): only W, U,
    Qg, Kg and gC are recomputed. Other arguments as `intra_chunk_fwd`."""
    H, K = q.shape[1:]
    V = v.shape[-1]
    C = aqk.shape[-1]
    out = IntraChunk(aqk=aqk, ainv=ainv, **_factor_buffers(q, v, layout.num_chunks, aqk.dtype))
    _intra_factors_kernel[(layout.num_chunks, H)](
        q, k, v, g, beta, ainv, out.w, out.u, out.qg, out.kg, out.gc, layout.chunks, scale, H,
        K=K, V=V, C=C, BC=SUB, PREC=precision, INVERT=False, **intra_config(K, V, C),
    )
    return out
