"""Triton KDA, the sequential passes over chunks: the state forward (with the output) and backward.

One program per (sequence, head, block of BV value columns) walks its sequence's chunks in order
(forward) or in reverse (backward), keeping the [K, BV] state or state gradient in fp32 registers.
Value columns never mix in either recurrence, so V-blocks run independently. Per chunk, with S
the state entering it and W, U, A_qk, Qg, Kg, gC from the intra-chunk pass (triton_intra.py):
    forward:  U' = U - W S,   O = Qg S + A_qk U',   S_next = gC * S + Kg^T U'
    backward: dU' = A_qk^T dO + Kg dS_next,   dS = Qg^T dO + gC * dS_next - W^T dU'
The loops only load and multiply: every scan and exp was done in the parallel intra-chunk pass.
Layouts in triton_common.py; states are [N, H, K, V] fp32, per-chunk states [NC, H, K, V] in the
operand dtype (triton_common.operand_dtype).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from deltatron.kernels.kda.triton_common import ChunkLayout, load_rows, load_tile, mm, store_rows
from deltatron.kernels.kda.triton_intra import IntraChunk


@triton.jit
def _state_fwd_kernel(
    qg, kg, w, u, aqk, gc, h0, o, ht, h, vnew, seq_offsets, seq_chunks, H,
    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr, STORE_O: tl.constexpr,
    STORE_H: tl.constexpr, PREC: tl.constexpr,
):
    """Grid (N, H, cdiv(V, BV)). Writes o (STORE_O), the final state (STORE_FINAL), and for the
    backward the state entering every chunk h and U' (STORE_H). The products take their operands
    in W's dtype (operand_dtype), the state and U' rounded to it; h and U' are stored in it."""
    OP: tl.constexpr = w.dtype.element_ty
    i_n = tl.program_id(0)
    i_h = tl.program_id(1)
    i_v = tl.program_id(2)
    bos = tl.load(seq_offsets + i_n)
    eos = tl.load(seq_offsets + i_n + 1)
    first_chunk = tl.load(seq_chunks + i_n)
    rows = tl.arange(0, C)
    cc = tl.arange(0, C)
    rk = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    state_offs = rk[:, None] * V + cv[None, :]
    state_mask = (rk < K)[:, None] & (cv < V)[None, :]
    seq_state = (i_n * H + i_h).to(tl.int64) * K * V

    if HAS_H0:
        s = tl.load(h0 + seq_state + state_offs, mask=state_mask, other=0.0).to(tl.float32)
    else:
        s = tl.zeros([BK, BV], dtype=tl.float32)
    for ic in range(tl.cdiv(eos - bos, C)):
        t0 = bos + ic * C
        n = tl.minimum(eos - t0, C)
        chunk = (first_chunk + ic) * H + i_h
        s_op = s.to(OP)
        if STORE_H:
            tl.store(h + chunk.to(tl.int64) * K * V + state_offs, s_op, mask=state_mask)
        w_t = load_tile(w + i_h * K, t0, rows, n, H * K, rk, K)
        u_t = load_rows(u + i_h * V, t0, rows, n, H * V, cv, V)
        v_new = u_t - mm(w_t, s_op, PREC)
        v_op = v_new.to(OP)
        if STORE_O:
            qg_t = load_tile(qg + i_h * K, t0, rows, n, H * K, rk, K)
            a = load_tile(aqk + i_h * C, t0, rows, n, H * C, cc, C)
            o_t = mm(qg_t, s_op, PREC) + mm(a, v_op, PREC)
            store_rows(o + i_h * V, o_t, t0, rows, n, H * V, cv, V)
        if STORE_H:
            store_rows(vnew + i_h * V, v_op, t0, rows, n, H * V, cv, V)
        kg_t = load_tile(kg + i_h * K, t0, rows, n, H * K, rk, K)
        decay = tl.load(gc + chunk.to(tl.int64) * K + rk, mask=rk < K, other=0.0)
        s = s * decay[:, None] + mm(tl.trans(kg_t), v_op, PREC)
    if STORE_FINAL:
        tl.store(ht + seq_state + state_offs, s, mask=state_mask)


@triton.jit
def _state_bwd_kernel(
    qg, kg, w, aqk, gc, do, dht, dh0, dh, dvnew, seq_offsets, seq_chunks, H,
    K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PREC: tl.constexpr,
):
    """Grid (N, H, cdiv(V, BV)). Walks the chunks backwards; writes dh (the gradient of the state
    leaving every chunk), dU' and, if STORE_DH0, the initial state's gradient. Operands in W's
    dtype as in _state_fwd_kernel; dh and dU' are stored in it."""
    OP: tl.constexpr = w.dtype.element_ty
    i_n = tl.program_id(0)
    i_h = tl.program_id(1)
    i_v = tl.program_id(2)
    bos = tl.load(seq_offsets + i_n)
    eos = tl.load(seq_offsets + i_n + 1)
    first_chunk = tl.load(seq_chunks + i_n)
    rows = tl.arange(0, C)
    cc = tl.arange(0, C)
    rk = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    state_offs = rk[:, None] * V + cv[None, :]
    state_mask = (rk < K)[:, None] & (cv < V)[None, :]
    seq_state = (i_n * H + i_h).to(tl.int64) * K * V

    if HAS_DHT:
        ds = tl.load(dht + seq_state + state_offs, mask=state_mask, other=0.0).to(tl.float32)
    else:
        ds = tl.zeros([BK, BV], dtype=tl.float32)
    num_chunks = tl.cdiv(eos - bos, C)
    for back in range(num_chunks):
        ic = num_chunks - 1 - back
        t0 = bos + ic * C
        n = tl.minimum(eos - t0, C)
        chunk = (first_chunk + ic) * H + i_h
        ds_op = ds.to(OP)
        tl.store(dh + chunk.to(tl.int64) * K * V + state_offs, ds_op, mask=state_mask)
        do_t = load_tile(do + i_h * V, t0, rows, n, H * V, cv, V).to(OP)
        a = load_tile(aqk + i_h * C, t0, rows, n, H * C, cc, C)
        kg_t = load_tile(kg + i_h * K, t0, rows, n, H * K, rk, K)
        dv_new = mm(tl.trans(a), do_t, PREC) + mm(kg_t, ds_op, PREC)
        dv_op = dv_new.to(OP)
        store_rows(dvnew + i_h * V, dv_op, t0, rows, n, H * V, cv, V)
        qg_t = load_tile(qg + i_h * K, t0, rows, n, H * K, rk, K)
        w_t = load_tile(w + i_h * K, t0, rows, n, H * K, rk, K)
        decay = tl.load(gc + chunk.to(tl.int64) * K + rk, mask=rk < K, other=0.0)
        ds = ds * decay[:, None]
        ds += mm(tl.trans(qg_t), do_t, PREC)
        ds -= mm(tl.trans(w_t), dv_op, PREC)
    if STORE_DH0:
        tl.store(dh0 + seq_state + state_offs, ds, mask=state_mask)


def state_config(K: int, V: int, seq_heads: Optional[int] = None,
                 multiprocessors: int = 0) -> dict:
    """Block sizes and warps of both state kernels. The whole key dimension is one tile; value
    columns go 64 at a time, or 32 when that leaves fewer programs (seq_heads = sequences x
    heads, times the value blocks) than the GPU has multiprocessors, so that one long sequence
    still spreads over the GPU (seq_heads None: many). On an H200 at K = V = 128, B8 T4k H32
    (bench/kda_tiles.py, whole operator) BV 64 took forward + backward to 34.3 ms from 38.7 at
    BV 32 (each program re-reads W, Qg and Kg, so fewer value blocks read less), BV 16 to 47.7;
    4 warps up to K = 128 (43.5 ms against 46.4 at 8 warps, BV 32), and with 8 warps BV 16 and
    BV 64 crashed there (an illegal memory access, Triton 3.6). One pipeline stage: two stages
    of the fp32 [C, K] tiles would not fit in shared memory at K = 128 (sm_90: 256 KiB asked,
    227 KiB there), so the next chunk's loads only overlap with the current chunk's work as far
    as the hardware reorders them."""
    bk = max(16, triton.next_power_of_2(K))
    bv = min(32, max(16, triton.next_power_of_2(V)))
    if V >= 64 and (seq_heads is None or seq_heads * triton.cdiv(V, 64) >= multiprocessors):
        bv = 64
    return dict(BK=bk, BV=bv, num_warps=4 if bk <= 128 else 8, num_stages=1)


def _state_launch(K: int, V: int, N: int, H: int, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 0
    return state_config(K, V, N * H, sms)


def state_fwd(
    ic: IntraChunk,
    initial_state: Optional[torch.Tensor],
    layout: ChunkLayout,
    precision: str,
    out_dtype: torch.dtype,
    output: bool,
    final_state: bool,
    chunk_states: bool,
) -> tuple[Optional[torch.Tensor], ...]:
    """Forward state pass over all sequences, from the intra-chunk pass's tensors.

    initial_state: [N, H, K, V] or None. Returns (o [T_total, H, V] in out_dtype if output,
    final state [N, H, K, V] fp32 if final_state, and if chunk_states h [NC, H, K, V] (the state
    entering every chunk) and U' [T_total, H, V] in the operand dtype (ic.w's)); None for the rest.
    """
    T, H, K = ic.w.shape
    V = ic.u.shape[-1]
    C = ic.aqk.shape[-1]
    N = layout.seq_offsets.shape[0] - 1
    dev = ic.w.device
    cfg = _state_launch(K, V, N, H, dev)
    f32 = dict(dtype=torch.float32, device=dev)
    o = torch.empty((T, H, V), dtype=out_dtype, device=dev) if output else None
    ht = torch.empty((N, H, K, V), **f32) if final_state else None
    op = dict(dtype=ic.w.dtype, device=dev)
    h = torch.empty((layout.num_chunks, H, K, V), **op) if chunk_states else None
    vnew = torch.empty((T, H, V), **op) if chunk_states else None
    h0 = initial_state.contiguous() if initial_state is not None else None
    unused = ic.u  # stands in for the outputs not asked for: their pointers are never used
    _state_fwd_kernel[(N, H, triton.cdiv(V, cfg["BV"]))](
        ic.qg, ic.kg, ic.w, ic.u, ic.aqk, ic.gc,
        h0 if h0 is not None else unused, o if output else unused, ht if final_state else unused,
        h if chunk_states else unused, vnew if chunk_states else unused,
        layout.seq_offsets, layout.seq_chunks, H,
        K=K, V=V, C=C, HAS_H0=h0 is not None, STORE_FINAL=final_state,
        STORE_O=output, STORE_H=chunk_states, PREC=precision, **cfg,
    )
    return o, ht, h, vnew


def state_bwd(
    ic: IntraChunk,
    do: torch.Tensor,
    dht: Optional[torch.Tensor],
    layout: ChunkLayout,
    precision: str,
    initial_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Backward state pass over all sequences.

    do: [T_total, H, V] (contiguous); dht: [N, H, K, V] gradient of the final state, or None for
    zero. Returns dh [NC, H, K, V] (gradient of the state leaving every chunk) and dU'
    [T_total, H, V] in the operand dtype (ic.w's), and the initial state's gradient [N, H, K, V]
    fp32 (None unless initial_grad).
    """
    T, H, K = ic.w.shape
    V = do.shape[-1]
    C = ic.aqk.shape[-1]
    N = layout.seq_offsets.shape[0] - 1
    cfg = _state_launch(K, V, N, H, do.device)
    f32 = dict(dtype=torch.float32, device=do.device)
    op = dict(dtype=ic.w.dtype, device=do.device)
    dh = torch.empty((layout.num_chunks, H, K, V), **op)
    dvnew = torch.empty((T, H, V), **op)
    dh0 = torch.empty((N, H, K, V), **f32) if initial_grad else None
    dht = dht.contiguous() if dht is not None else None
    _state_bwd_kernel[(N, H, triton.cdiv(V, cfg["BV"]))](
        ic.qg, ic.kg, ic.w, ic.aqk, ic.gc, do,
        dht if dht is not None else dh, dh0 if initial_grad else dh, dh, dvnew,
        layout.seq_offsets, layout.seq_chunks, H,
        K=K, V=V, C=C, HAS_DHT=dht is not None, STORE_DH0=initial_grad, PREC=precision, **cfg,
    )
    return dh, dvnew, dh0
