"""Triton KDA, intra-chunk backward: every gradient that needs no sequential pass (one program per
chunk and head, all chunks in parallel), once the state passes have produced per chunk the state
S entering it (h), the gradient dS_next of the state leaving it (dh), U' and dU'.

Forward of one chunk (notation of triton_intra.py / triton_state.py; Xk = beta exp(G) K,
Xv = beta V, L = I + A_kk, A_inv = L^-1):
    W = A_inv Xk,  U = A_inv Xv,  U' = U - W S,  O = Qg S + A_qk U',  S_next = gC S + Kg^T U'
Backward, given dO, dS_next, dU' (= A_qk^T dO + Kg dS_next, from the state pass):
    dA_qk = tril(dO U'^T),   dQg = dO S^T,   dKg = U' dS_next^T,   dgC = rowsum(S * dS_next)
    dW = -dU' S^T,   dXk = A_inv^T dW,   dXv = A_inv^T dU'   (dU = dU')
    dA_kk = -strict_tril(dXk W^T + dXv U^T) = -strict_tril(dXv U'^T),   dv = beta dXv,
    dbeta = rowsum(dXk * exp(G) K) + rowsum(dXv * V) + (the A_kk term below)
Each decayed pair score sum_c x_i[c] y_j[c] exp(G_i[c] - G_j[c]) with gradient dA[i, j] gives
    dx_i += sum_j dA[i, j] y_j exp(G_i - G_j),  dy_j += sum_i dA[i, j] x_i exp(G_i - G_j)
and d G_i += x_i * dx_i, d G_j -= y_j * dy_j; the elementwise factors exp(G), exp(Gs), gC add
their own terms, and dg is the reverse cumulative sum of dG over the chunk (G_i = sum_{t<=i} g_t).

_grad_chunk_kernel (grad_chunk) does everything up to dA_kk (it needs reductions over V and over
K); _grad_pairwise_kernel (grad_pairwise) then pushes dA_qk and dA_kk through the decayed scores,
with the same sub-block decomposition as the forward, and finishes dq, dk, dg, dbeta.

Cancellation: d(exp(G_i - G_j)) adds +x to dG_i and -x to dG_j, and the reverse cumsum cancels
them below j. Terms whose exponent is identically 0 (the diagonal of A_qk, Kg of a chunk's last
row) would be O(1) on both sides whatever the decay and leave rounding noise larger than a dg that
strong decays make small, so they are kept out of dG instead of being added and cancelled.
"""

from __future__ import annotations

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
    load_tile,
    load_vector,
    mm,
    pair_config,
    store_rows,
)


@triton.jit
def _grad_chunk_kernel(
    q, k, v, g, beta, ainv, h, dh, vnew, dvnew, do,
    dv, daqk, dakk, dq_part, dk_part, dg_part, dbeta_part, chunks, scale, H,
    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, PREC: tl.constexpr,
):
    """Grid (chunks, H). Writes dv, dA_qk, dA_kk ([T_total, H, C], masked to their triangles),
    and the elementwise parts of dq, dk, dG and dbeta (fp32) for _grad_pairwise_kernel. The
    products take their operands in the dtype the state passes stored h, U', dh and dU' in
    (operand_dtype).

    dA_kk comes as -dXv U'^T: with dXk = A_inv^T dW = -dXv S^T, the two terms of
    -(dXk W^T + dXv U^T) combine into -dXv (U - W S)^T. Summed separately they are of U's size
    and cancel down to U''s (the part of V the state does not predict), which costs bf16
    operands most of their digits."""
    OP: tl.constexpr = h.dtype.element_ty
    i_c, i_h, t0, n = chunk_program(chunks)
    rows = tl.arange(0, C)
    cc = tl.arange(0, C)
    bt = load_vector(beta + i_h, t0, rows, n, H)
    a_inv_t = tl.trans(load_rows(ainv + i_h * C, t0, rows, n, H * C, cc, C)).to(OP)

    # Value side: dA_qk, dXv (-> dv, dbeta, dA_kk), one block of value columns at a time.
    daq = tl.zeros([C, C], dtype=tl.float32)
    dak = tl.zeros([C, C], dtype=tl.float32)
    db = tl.zeros([C], dtype=tl.float32)
    for iv in range(tl.cdiv(V, BV)):
        cv = iv * BV + tl.arange(0, BV)
        do_t = load_tile(do + i_h * V, t0, rows, n, H * V, cv, V).to(OP)
        vn = load_tile(vnew + i_h * V, t0, rows, n, H * V, cv, V)
        dvn = load_tile(dvnew + i_h * V, t0, rows, n, H * V, cv, V)
        daq += mm(do_t, tl.trans(vn), PREC)
        dxv = mm(a_inv_t, dvn, PREC)
        store_rows(dv + i_h * V, dxv * bt[:, None], t0, rows, n, H * V, cv, V)
        db += tl.sum(dxv * load_rows(v + i_h * V, t0, rows, n, H * V, cv, V), 1)
        dak -= mm(dxv.to(OP), tl.trans(vn), PREC)
    store_rows(daqk + i_h * C, tl.where(rows[:, None] >= cc[None, :], daq, 0.0),
               t0, rows, n, H * C, cc, C)

    # Key side, one block of key channels at a time: the state products need a sweep over V.
    chunk_state = (i_c * H + i_h).to(tl.int64) * K * V
    for ik in range(tl.cdiv(K, BK)):
        ck = ik * BK + tl.arange(0, BK)
        dqg = tl.zeros([C, BK], dtype=tl.float32)
        dw = tl.zeros([C, BK], dtype=tl.float32)
        dkg = tl.zeros([C, BK], dtype=tl.float32)
        dgc = tl.zeros([BK], dtype=tl.float32)
        for iv in range(tl.cdiv(V, BV)):
            cv = iv * BV + tl.arange(0, BV)
            state_offs = chunk_state + ck[:, None] * V + cv[None, :]
            state_mask = (ck < K)[:, None] & (cv < V)[None, :]
            s = tl.load(h + state_offs, mask=state_mask, other=0.0)
            ds_next = tl.load(dh + state_offs, mask=state_mask, other=0.0)
            do_t = load_tile(do + i_h * V, t0, rows, n, H * V, cv, V).to(OP)
            vn = load_tile(vnew + i_h * V, t0, rows, n, H * V, cv, V)
            dvn = load_tile(dvnew + i_h * V, t0, rows, n, H * V, cv, V)
            dqg += mm(do_t, tl.trans(s), PREC)
            dw -= mm(dvn, tl.trans(s), PREC)
            dkg += mm(vn, tl.trans(ds_next), PREC)
            dgc += tl.sum(s.to(tl.float32) * ds_next.to(tl.float32), 1)
        g_t, g_next = load_decays(g + i_h * K, t0, rows, n, H * K, ck, K)
        e_in, e_out, totals = sub_block_decays(g_t, g_next, C, BC, BK)
        decay_in, decay_out = chunk_decays(e_in, e_out, totals, C, BC, BK)  # exp(G), exp(Gs)
        qt = load_rows(q + i_h * K, t0, rows, n, H * K, ck, K)
        kt = load_rows(k + i_h * K, t0, rows, n, H * K, ck, K)
        qg = qt * decay_in * scale
        kb = kt * decay_in
        kg = kt * decay_out
        dxk = mm(a_inv_t, dw.to(OP), PREC)
        db += tl.sum(dxk * kb, 1)
        dkb = dxk * bt[:, None]
        store_rows(dq_part + i_h * K, dqg * decay_in * scale, t0, rows, n, H * K, ck, K)
        store_rows(dk_part + i_h * K, dkb * decay_in + dkg * decay_out, t0, rows, n, H * K, ck, K)
        # Kg_j = k_j exp(G_C - G_j) and gC = exp(G_C) depend on the chunk total G_C, a prefix sum
        # of the last row: its gradient joins dG there and the reverse cumsum hands it to every
        # row. The last row's own Kg = k exp(0) depends on no g, so its term is left out of both
        # sides rather than added and cancelled (an O(1) term whose rounding would swamp a small
        # dg under strong decay).
        kg_term = tl.where((rows < n - 1)[:, None], dkg * kg, 0.0)
        d_total = tl.sum(kg_term, 0) + dgc * tl.exp(tl.sum(g_t, 0))
        dg_t = dqg * qg + dkb * kb - kg_term
        dg_t += tl.where((rows == n - 1)[:, None], d_total[None, :], 0.0)
        store_rows(dg_part + i_h * K, dg_t, t0, rows, n, H * K, ck, K)
    store_rows(dakk + i_h * C, tl.where(rows[:, None] > cc[None, :], dak, 0.0),
               t0, rows, n, H * C, cc, C)
    tl.store(dbeta_part + (t0 + rows).to(tl.int64) * H + i_h, db, mask=rows < n)


@triton.jit
def _grad_pairwise_kernel(
    q, k, g, beta, daqk, dakk, dq_part, dk_part, dg_part, dbeta_part,
    dq, dk, dbeta, chunks, scale, H,
    K: tl.constexpr, C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    """Grid (chunks, H, C // BC): one program per sub-block I of BC rows. Adds the decayed-score
    terms of dA_qk (scores scale*q_i . k_j) and dA_kk (scores beta_i k_i . k_j) to the parts from
    _grad_chunk_kernel for the rows of I; writes dq, dk, dbeta there and dG (before its reverse
    cumsum over the chunk, which grad_pairwise runs next) over dg_part's rows of I.

    Key channels BK at a time. The rows of I meet the earlier sub-blocks J as the row
    side of the pairs (I, J) and the later ones M as the column side of (M, I); the decay of a
    pair across blocks factors through the boundary after the earlier block,
        exp(G_i - G_j) = e_in_I[i] * exp(totals of the blocks between) * e_out_J[j],
    every factor an exp of a sum of g's <= 0 (sub_block_decays), so each pair of blocks is one
    [BC, BC] x [BC, BK] product per score. Pairs inside I are handled as in the forward.
    """
    i_c, i_h, i_b, t0, n, first = sub_block_program(chunks, BC)
    if first >= n:
        return
    local = tl.arange(0, BC)
    rows = first + local
    sk = H * K
    bt = load_vector(beta + i_h, t0, rows, n, H)
    db = load_vector(dbeta_part + i_h, t0, rows, n, H)
    # dA tiles of the pairs inside I, the same for every block of key channels
    daq_in = load_rows(daqk + i_h * C + first, t0, rows, n, H * C, local, BC)
    dak_in = load_rows(dakk + i_h * C + first, t0, rows, n, H * C, local, BC)
    strict = local[None, :] < local[:, None]
    # dA_qk[i, i]: the pair (i, i) has no decay (exp(0)), so it feeds dq and dk but not dg; it is
    # kept out of the dG sums, where it would be added and cancelled.
    daq_ii = tl.sum(tl.where(local[None, :] == local[:, None], daq_in, 0.0), 1)[:, None]
    daq_in = tl.where(strict, daq_in, 0.0)
    dak_in = tl.where(strict, dak_in, 0.0)
    for ik in range(tl.cdiv(K, BK)):
        ck = ik * BK + tl.arange(0, BK)
        qt = load_rows(q + i_h * K, t0, rows, n, sk, ck, K) * scale
        kt = load_rows(k + i_h * K, t0, rows, n, sk, ck, K)
        kbt = kt * bt[:, None]
        g_t, g_next = load_decays(g + i_h * K, t0, rows, n, sk, ck, K)
        e_in, e_out, total = sub_block_decays(g_t, g_next, BC, BC, BK)

        # Row side, earlier blocks J = I - 1 .. 0: dq and dk(A_kk rows) of I, before e_in.
        dqa = tl.zeros([BC, BK], dtype=tl.float32)  # w.r.t. scale * q
        dkr = tl.zeros([BC, BK], dtype=tl.float32)  # w.r.t. beta_i k_i, before beta
        gap = tl.zeros([BK], dtype=tl.float32)  # sum of g over the blocks strictly between
        for back in range(i_b):
            jb = i_b - 1 - back
            kr, total_j = earlier_block_keys(k + i_h * K, g + i_h * K, t0, jb, n, sk, ck, K, gap,
                                             BC, BK)
            daq = load_rows(daqk + i_h * C + jb * BC, t0, rows, n, H * C, local, BC)
            dak = load_rows(dakk + i_h * C + jb * BC, t0, rows, n, H * C, local, BC)
            dqa += tl.dot(daq, kr, input_precision=PREC)
            dkr += tl.dot(dak, kr, input_precision=PREC)
            gap += total_j
        dqa *= e_in
        dkr *= e_in

        # Column side, later blocks M = I + 1 ..: dk of I as the key of A_qk and A_kk, before
        # e_out.
        dkc = tl.zeros([BC, BK], dtype=tl.float32)
        gap = tl.zeros([BK], dtype=tl.float32)
        for mb in range(i_b + 1, tl.cdiv(n, BC)):
            rows_m = mb * BC + local
            g_m, gn_m = load_decays(g + i_h * K, t0, rows_m, n, sk, ck, K)
            e_in_m, e_out_m, total_m = sub_block_decays(g_m, gn_m, BC, BC, BK)
            left = e_in_m * tl.exp(gap)[None, :]
            q_m = load_rows(q + i_h * K, t0, rows_m, n, sk, ck, K) * scale
            kb_m = (load_rows(k + i_h * K, t0, rows_m, n, sk, ck, K)
                    * load_vector(beta + i_h, t0, rows_m, n, H)[:, None])
            daq = load_rows(daqk + i_h * C + first, t0, rows_m, n, H * C, local, BC)
            dak = load_rows(dakk + i_h * C + first, t0, rows_m, n, H * C, local, BC)
            dkc += tl.dot(tl.trans(daq), q_m * left, input_precision=PREC)
            dkc += tl.dot(tl.trans(dak), kb_m * left, input_precision=PREC)
            gap += tl.reshape(total_m, [BK])
        dkc *= e_out

        # Pairs inside I (j < i; the diagonal of A_qk is added at the end).
        log_in = in_block_log_decay(g_t, g_next, BC, BC, BK)
        if tl.max(tl.abs(log_in)) <= IN_BLOCK_FACTOR_BOUND:
            # Factored through the sub-block's reference row (triton_common): one product each.
            out_in = tl.exp(log_in)
            in_out = tl.exp(-log_in)
            k_in = kt * in_out
            dqa += out_in * tl.dot(daq_in, k_in, input_precision=PREC)
            dkr += out_in * tl.dot(dak_in, k_in, input_precision=PREC)
            col = tl.dot(tl.trans(daq_in), qt * out_in, input_precision=PREC)
            col += tl.dot(tl.trans(dak_in), kbt * out_in, input_precision=PREC)
            dkc += in_out * col
        else:
            # Decays too strong to factor: column by column, products of exp(g) <= 1.
            decay = tl.zeros([BC, BK], dtype=tl.float32)
            first_rows = first + tl.zeros([BC], dtype=tl.int32)
            for back in range(BC):
                jj = BC - 1 - back
                decay = in_block_decay_step(decay, g + i_h * K, t0, first_rows, local[:, None],
                                            jj, n, sk, ck, K)
                at_jj = local[None, :] == jj
                # dA_qk[i, jj], 0 unless jj < i
                aq = tl.sum(tl.where(at_jj, daq_in, 0.0), 1)[:, None]
                ak = tl.sum(tl.where(at_jj, dak_in, 0.0), 1)[:, None]
                k_col = decay * load_rows(k + i_h * K, t0, first_rows + jj, n, sk, ck, K)
                dqa += aq * k_col
                dkr += ak * k_col
                col = tl.sum((aq * qt + ak * kbt) * decay, 0)
                dkc += tl.where((local == jj)[:, None], col[None, :], 0.0)

        dq_t = load_rows(dq_part + i_h * K, t0, rows, n, sk, ck, K)
        dq_t += (dqa + daq_ii * kt) * scale
        dk_t = load_rows(dk_part + i_h * K, t0, rows, n, sk, ck, K)
        dk_t += dkr * bt[:, None] + dkc + daq_ii * qt
        dgpos = load_rows(dg_part + i_h * K, t0, rows, n, sk, ck, K)
        dgpos += qt * dqa + kbt * dkr - kt * dkc
        db += tl.sum(kt * dkr, 1)
        store_rows(dq + i_h * K, dq_t, t0, rows, n, sk, ck, K)
        store_rows(dk + i_h * K, dk_t, t0, rows, n, sk, ck, K)
        store_rows(dg_part + i_h * K, dgpos, t0, rows, n, sk, ck, K)
    tl.store(dbeta + (t0 + rows).to(tl.int64) * H + i_h, db.to(dbeta.dtype.element_ty),
             mask=rows < n)


@triton.jit
def _chunk_reverse_cumsum_kernel(
    x, out, chunks, H, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
):
    """Grid (chunks, H, cdiv(K, BK)): out[i] = sum of x over rows i .. end of i's chunk (x fp32
    [T_total, H, K]; out in its own dtype)."""
    i_c, i_h, t0, n = chunk_program(chunks)
    rows = tl.arange(0, C)
    ck = tl.program_id(2) * BK + tl.arange(0, BK)
    x_t = load_rows(x + i_h * K, t0, rows, n, H * K, ck, K)
    store_rows(out + i_h * K, tl.cumsum(x_t, 0, reverse=True), t0, rows, n, H * K, ck, K)


def grad_config(K: int, V: int, C: int) -> dict:
    """Block sizes and warps of _grad_chunk_kernel: from C = 64 on, key channels 32 and value
    columns 64 (32 at C = 128) at a time with 8 warps (on an H200 at K = V = 128, B8 T4k H32,
    bench/kda_tiles.py: forward + backward 37.9 ms against 38.7 with BV 32, 39.5 with 4 warps,
    40.9 with BK 64, fp32 operands). With bf16 operands 4 warps timed faster in the sweep (22.1 ms against 23.7, commit
    df76fa2) but hit an illegal memory access on the H200 in the accuracy tests at B2 T4k H4
    (commit de59dd1; the same with the kernel split in a value side and a key side, 0baa161).
    The source is the same at 8 warps, which passes; compute-sanitizer at 4 warps (B2 T4k H4)
    reports "Out-of-range shared or local address" at a tl.dot of this kernel (triton_common.mm),
    in some chunks only: a Triton 3.6 miscompile of its layouts. 8 warps stay."""
    if C >= 64:
        # Always the K = V = 128 tiles, padding smaller heads: with 8 warps and 16-wide tiles
        # (K = 32, V = 16 at C = 64), Triton 3.6 compiled _grad_chunk_kernel's
        # tl.dot(tl.trans(a_inv), dw) into a shared-memory read past the allocation (an illegal
        # memory access on an H100, compute-sanitizer: "Invalid __shared__ read of size 512
        # bytes"); these tiles are the ones measured at realistic shapes.
        # BV 32 at C = 128: with BV 64 the fp32 kernel asks for 256 KiB of shared memory
        return dict(BK=32, BV=64 if C == 64 else 32, num_warps=8, num_stages=1)
    return dict(
        BK=min(32, max(16, triton.next_power_of_2(K))),
        BV=min(32, max(16, triton.next_power_of_2(V))),
        num_warps=4,
        num_stages=1,
    )


def grad_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    ainv: torch.Tensor,
    h: torch.Tensor,
    dh: torch.Tensor,
    vnew: torch.Tensor,
    dvnew: torch.Tensor,
    do: torch.Tensor,
    layout: ChunkLayout,
    scale: float,
    precision: str,
) -> tuple[torch.Tensor, ...]:
    """First backward stage, from the forward's A_inv [T_total, H, C] (fp32) and the state passes
    (h, dh [NC, H, K, V], U' = vnew and dU' = dvnew [T_total, H, V], in the operand dtype,
    triton_common.operand_dtype).

    q, k, g: [T_total, H, K]; v, do: [T_total, H, V]; beta: [T_total, H]. Returns dv (v's dtype),
    dA_qk and dA_kk [T_total, H, C], and the elementwise parts of dq, dk, dG (before its reverse
    cumsum) [T_total, H, K] and of dbeta [T_total, H], fp32, for grad_pairwise.
    """
    T, H, K = q.shape
    V = v.shape[-1]
    C = ainv.shape[-1]
    f32 = dict(dtype=torch.float32, device=q.device)
    dv = torch.empty_like(v)
    daqk = torch.empty((T, H, C), **f32)
    dakk = torch.empty((T, H, C), **f32)
    dq_part = torch.empty((T, H, K), **f32)
    dk_part = torch.empty((T, H, K), **f32)
    dg_part = torch.empty((T, H, K), **f32)
    dbeta_part = torch.empty((T, H), **f32)
    _grad_chunk_kernel[(layout.num_chunks, H)](
        q, k, v, g, beta, ainv, h, dh, vnew, dvnew, do,
        dv, daqk, dakk, dq_part, dk_part, dg_part, dbeta_part, layout.chunks, scale, H,
        K=K, V=V, C=C, BC=SUB, PREC=precision, **grad_config(K, V, C),
    )
    return dv, daqk, dakk, dq_part, dk_part, dg_part, dbeta_part


def cumsum_config(K: int) -> dict:
    """Tiles of _chunk_reverse_cumsum_kernel: up to 64 key channels per program."""
    return dict(BK=min(64, max(16, triton.next_power_of_2(K))), num_warps=4, num_stages=1)


def grad_pairwise(
    q: torch.Tensor,
    k: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    daqk: torch.Tensor,
    dakk: torch.Tensor,
    dq_part: torch.Tensor,
    dk_part: torch.Tensor,
    dg_part: torch.Tensor,
    dbeta_part: torch.Tensor,
    layout: ChunkLayout,
    scale: float,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Second backward stage: the decayed-score terms, added to grad_chunk's parts (shapes
    there; dg_part is overwritten with dG). Returns dq, dk, dg, dbeta in the dtypes of q, k, g,
    beta."""
    T, H, K = q.shape
    C = daqk.shape[-1]
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dg = torch.empty_like(g)
    dbeta = torch.empty_like(beta)
    _grad_pairwise_kernel[(layout.num_chunks, H, C // SUB)](
        q, k, g, beta, daqk, dakk, dq_part, dk_part, dg_part, dbeta_part,
        dq, dk, dbeta, layout.chunks, scale, H,
        K=K, C=C, BC=SUB, PREC=precision, **pair_config(K, whole_head=False),
    )
    cfg = cumsum_config(K)
    _chunk_reverse_cumsum_kernel[(layout.num_chunks, H, triton.cdiv(K, cfg["BK"]))](
        dg_part, dg, layout.chunks, H, K=K, C=C, **cfg,
    )
    return dq, dk, dg, dbeta
