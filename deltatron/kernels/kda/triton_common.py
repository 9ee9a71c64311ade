"""Building blocks shared by the Triton KDA kernels (the algorithm is described in triton_chunk.py).

Memory layout every kernel assumes (all contiguous, T_total = B * T: the batch is flattened into
one row of sequences, so a batch and packed documents look the same to the kernels):
    q, k, g, W, Qg, Kg   [T_total, H, K]
    v, U, U', dU'        [T_total, H, V]
    beta                 [T_total, H]
    per-chunk [C, C] matrices (A_qk, A_kk^-1, their gradients) as [T_total, H, C]: row i of a
    chunk is stored with the chunk's i-th token, so a ragged last chunk takes no extra room.
    per-chunk states and vectors as [NC, H, K, V] and [NC, H, K] (NC chunks over all sequences).
Kernels load any float dtype and compute in fp32. What one kernel hands to the next is fp32, except
the operands of the state passes' and the gradient pass's products (A_qk, W, U, Qg, Kg, h, U',
dh, dU'), which are kept in the operand dtype (operand_dtype): bf16 for bf16 inputs.
A chunk is addressed by its first token t0 and its number n of valid rows (n < C only for the
last chunk of a sequence). Rows >= n are read as zeros: zero q, k, v, beta and g = 0 (no decay),
which makes them inert, so they change neither the state nor any valid row.

Decays: every exp() below is of a sum of g's taken directly from the g's, never of a difference
of two prefix sums (which would cancel when a strong decay precedes weak ones: g = -20 then -0.001
per token). All are of sums <= 0 except the in-block factors exp(-L) of in_block_log_decay, which
are used only where |L| <= IN_BLOCK_FACTOR_BOUND (60), inside fp32's range; past it the in-block
pairs take the column-by-column path (in_block_decay_step, products of exp(g) <= 1).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl

# Sub-chunk length of the intra-chunk decomposition; tl.dot's smallest tile side.
SUB = 16

# tl.dot input precision of the fp32 tiles (see dot_precision): "tf32x3" (three TF32 products,
# about fp32 accuracy) for fp32 inputs, "tf32" (10-bit mantissa, finer than bf16 / fp16 inputs)
# for 16-bit ones. DELTATRON_KDA_DOT_PRECISION overrides both ("ieee": exact fp32 FMA, slow). The
# interpreter always multiplies in fp32.
_PRECISIONS = ("tf32x3", "tf32", "ieee", "bf16x3", "bf16x6")
_PRECISION_OVERRIDE = os.environ.get("DELTATRON_KDA_DOT_PRECISION") or None
if _PRECISION_OVERRIDE is not None and _PRECISION_OVERRIDE not in _PRECISIONS:
    raise ValueError(
        f"DELTATRON_KDA_DOT_PRECISION={_PRECISION_OVERRIDE!r}: choose one of "
        f"{', '.join(_PRECISIONS)}"
    )


# Under TRITON_INTERPRET=1 tl.dot multiplies the raw bits of bf16 tiles as integers (numpy has no
# bf16), so `mm` widens its operands to fp32 there: the same products of the same rounded values.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@dataclass(frozen=True)
class ChunkLayout:
    """Where the chunks of every sequence lie in the flattened token axis.

    seq_offsets: [N + 1] int32, token offsets of the sequences (cu_seqlens).
    seq_chunks:  [N + 1] int32, index of every sequence's first chunk (chunks are numbered
                 sequence by sequence), seq_chunks[N] = num_chunks.
    chunks:      [num_chunks, 2] int32, (first token, number of valid tokens) of every chunk.
    """

    seq_offsets: torch.Tensor
    seq_chunks: torch.Tensor
    chunks: torch.Tensor
    num_chunks: int


def chunk_layout(offsets: Sequence[int], chunk_size: int, device: torch.device) -> ChunkLayout:
    """Cut every sequence [offsets[n], offsets[n + 1]) into chunks of chunk_size tokens (the last
    one ragged); empty sequences get no chunk. Built on the host from Python ints.

    Every KDA layer of a micro-batch (and every micro-batch of fixed-length rows) asks for the same
    layout, so layouts are cached by their offsets: the host-to-device copies of its three small
    tensors (each a synchronisation from pageable memory) happen once per distinct layout, not in
    every layer's forward. The tensors are never written."""
    return _chunk_layout(tuple(int(o) for o in offsets), chunk_size, torch.device(device))


@functools.lru_cache(maxsize=64)
def _chunk_layout(offsets: tuple[int, ...], chunk_size: int, device: torch.device) -> ChunkLayout:
    if offsets[-1] >= 2**31:
        raise ValueError(
            f"{offsets[-1]} tokens in one call: the Triton KDA indexes tokens in int32"
        )
    seq_chunks = [0]
    chunks = []
    for start, end in zip(offsets, offsets[1:]):
        for t0 in range(start, end, chunk_size):
            chunks.append((t0, min(chunk_size, end - t0)))
        seq_chunks.append(len(chunks))
    as_int32 = dict(dtype=torch.int32, device=device)
    return ChunkLayout(
        seq_offsets=torch.tensor(list(offsets), **as_int32),
        seq_chunks=torch.tensor(seq_chunks, **as_int32),
        chunks=torch.tensor(chunks, **as_int32).reshape(-1, 2),
        num_chunks=len(chunks),
    )


def dot_precision(*dtypes: torch.dtype) -> str:
    """tl.dot input_precision for a call whose q, k, v have these dtypes: "tf32" when they share
    one 16-bit dtype (a TF32 product is finer than such inputs), else "tf32x3";
    DELTATRON_KDA_DOT_PRECISION overrides."""
    half = dtypes[0] in (torch.bfloat16, torch.float16) and len(set(dtypes)) == 1
    return _PRECISION_OVERRIDE or ("tf32" if half else "tf32x3")


# Largest head dims the Triton backends take: their state tiles hold K (padded to a power of two)
# by a block of value columns in registers.
MAX_HEAD_DIM = 256


def flatten_for_kernels(shapes, q, k, v, g, beta, name: str, cpu_backend: str):
    """What both Triton KDA backends (triton_chunk, triton_recurrent) do before launching, for
    inputs `check_kda_inputs` accepted (`shapes`, its KDAShapes): refuse head dims above
    MAX_HEAD_DIM and non-CUDA tensors (unless TRITON_INTERPRET=1 was set before import), naming
    the backend (`name`) and the one to use on CPU instead. Returns the sequences' token offsets
    (cu_seqlens' or one per batch row, [N + 1] Python ints) and q, k, v, g, beta flattened to
    [B * T, ...], contiguous."""
    K, V = shapes.head_k_dim, shapes.head_v_dim
    if K > MAX_HEAD_DIM or V > MAX_HEAD_DIM:
        raise ValueError(f"head dims K={K}, V={V}: {name} supports up to {MAX_HEAD_DIM}")
    if q.device.type != "cuda" and not INTERPRETED.value:
        raise ValueError(
            f"{name} needs CUDA tensors, got {q.device}; use backend={cpu_backend!r} (or set "
            "TRITON_INTERPRET=1 before importing it, to run the kernels on CPU)"
        )
    B, T = shapes.batch, shapes.seq_len
    offsets = shapes.offsets if shapes.offsets is not None else [b * T for b in range(B + 1)]
    flat = [x.reshape(B * T, *x.shape[2:]).contiguous() for x in (q, k, v, g, beta)]
    return offsets, flat


def operand_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """dtype of the intermediates the state passes and the gradient pass multiply (A_qk, W, U,
    Qg, Kg, the per-chunk states h and U', their gradients dh and dU'), for a call whose q, k, v
    have these dtypes: bf16 when all are bf16, else fp32.

    bf16 operands run the products at the tensor cores' bf16 rate and halve what the sequential
    passes read, at the price of rounding every operand to 8 bits of mantissa (2^-9 relative,
    the inputs' own resolution; accumulation stays fp32, and so do the states the passes carry).
    fla's chunk_kda makes the same choice. fp16 inputs keep fp32 intermediates: the state and U'
    are not bounded by fp16's range (65504) the way the inputs are.
    """
    bf16 = all(d == torch.bfloat16 for d in dtypes)
    return torch.bfloat16 if bf16 else torch.float32


def pair_config(K: int, whole_head: bool) -> dict:
    """Tiles of the per-sub-block kernels, [SUB, BK]: triton_intra._scores_kernel takes every key
    channel at once (whole_head: K padded to a power of two, at least 32), the pairwise backward
    32 at a time; 1 or 2 warps (these programs are small: more of them per multiprocessor hide
    each other's latencies). Measured on an H200 at K = 128, B8 T4k H32: launched alone (the first
    bench/kda_tiles.py, commit 13088c6) the pairwise kernel took 9.9 ms at BK 32 with 4 warps,
    10.9 at 64 / 4, 18.7 at 64 / 8 and 25.4 at 32 / 8, the scores 4.0 ms at 4 warps and 7.1 at 8;
    in the whole operator (bench/results/kda_tiles_h200.json) 2 warps beat 4 by 1.1 ms (pairwise)
    and 0.9 ms (scores)."""
    if not whole_head:  # 1 warp: 36.9 ms for the whole operator against 38.7 at 2 warps
        return dict(BK=32, num_warps=1, num_stages=1)
    BK = max(32, triton.next_power_of_2(K))
    return dict(BK=BK, num_warps=2 if BK <= 128 else 4, num_stages=1)


@triton.jit
def load_tile(ptr, t0, rows, n, stride, cols, ncols):
    """Tile [len(rows), len(cols)] of a token-major tensor in its stored dtype: tile row r is
    token t0 + rows[r].

    ptr already points at this head's first column; stride is the distance between tokens. Rows
    with rows[r] >= n and columns >= ncols read 0. Offsets are int64 (T_total * H * K can pass
    2^31).
    """
    offs = (t0 + rows).to(tl.int64)[:, None] * stride + cols[None, :]
    mask = (rows < n)[:, None] & (cols < ncols)[None, :]
    return tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit
def load_rows(ptr, t0, rows, n, stride, cols, ncols):
    """load_tile's tile as fp32."""
    return load_tile(ptr, t0, rows, n, stride, cols, ncols).to(tl.float32)


@triton.jit
def mm(a, b, PREC: tl.constexpr):
    """a @ b accumulated in fp32, a and b of one dtype: bf16 tiles multiply at the bf16 rate,
    fp32 ones with input_precision PREC (dot_precision)."""
    if INTERPRETED:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def store_rows(ptr, value, t0, rows, n, stride, cols, ncols):
    """Store the tile value [len(rows), len(cols)] where load_rows would read it (valid part only),
    converted to ptr's element type."""
    offs = (t0 + rows).to(tl.int64)[:, None] * stride + cols[None, :]
    mask = (rows < n)[:, None] & (cols < ncols)[None, :]
    tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_vector(ptr, t0, rows, n, stride):
    """fp32 [len(rows)]: one value per token (beta), 0 past the valid rows."""
    offs = (t0 + rows).to(tl.int64) * stride
    return tl.load(ptr + offs, mask=rows < n, other=0.0).to(tl.float32)


@triton.jit
def load_decays(g_ptr, t0, rows, n, stride, cols, ncols):
    """The chunk's log decays g and g_next [C, BK] fp32, g_next[i] = g[i + 1] (0 past row n - 2).

    Prefix sums are cumsum(g): G[i] = sum_{t <= i} g_t. Suffix sums come from g_next:
    cumsum(g_next, reverse) [i] = sum_{t > i} g_t, a direct sum, where total - G[i] would cancel.
    """
    g = load_rows(g_ptr, t0, rows, n, stride, cols, ncols)
    g_next = load_rows(g_ptr, t0 + 1, rows, n - 1, stride, cols, ncols)
    return g, g_next


@triton.jit
def sub_block_decays(g, g_next, C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    """What the decay factors of every sub-block boundary are made of, from within-sub-block sums
    (no cumulative sum runs over the whole chunk), for C rows (C = BC: one sub-block):

        e_in[i]    = exp(sum of g from the start of i's sub-block to i)          [C, BK]
        e_out[j]   = exp(sum of g after j to the end of j's sub-block)           [C, BK]
        totals[m]  = sum of g over sub-block m                                   [NS, BK]

    Every sum is of terms <= 0 (no cancellation). A pair i > j in sub-blocks I > J decays by
    e_in[i] * exp(totals of the sub-blocks strictly between) * e_out[j] (the per-sub-block
    kernels); chunk_decays combines them into exp(G) and exp(Gs).
    """
    NS: tl.constexpr = C // BC
    local = tl.arange(0, BC)[None, :, None]
    g3 = tl.reshape(g, [NS, BC, BK])
    e_in = tl.reshape(tl.exp(tl.cumsum(g3, 1)), [C, BK])
    # g_next at a sub-block's last row is the next sub-block's first token: not "after j" in it
    after = tl.cumsum(tl.where(local < BC - 1, tl.reshape(g_next, [NS, BC, BK]), 0.0), 1, reverse=True)
    e_out = tl.reshape(tl.exp(after), [C, BK])
    return e_in, e_out, tl.sum(g3, 1)


@triton.jit
def chunk_program(chunks):
    """(i_c, i_h, t0, n) of a chunk-parallel program, grid (chunks, H, ...): its chunk and head,
    the chunk's first token and number of valid rows."""
    i_c = tl.program_id(0)
    return i_c, tl.program_id(1), tl.load(chunks + 2 * i_c), tl.load(chunks + 2 * i_c + 1)


@triton.jit
def sub_block_program(chunks, BC: tl.constexpr):
    """(i_c, i_h, i_b, t0, n, first) of a per-sub-block program, grid (chunks, H, C // BC):
    chunk_program's, the sub-block and its first row (first >= n: the sub-block lies past a
    ragged chunk's end, and the program has nothing to do)."""
    i_c, i_h, t0, n = chunk_program(chunks)
    i_b = tl.program_id(2)
    return i_c, i_h, i_b, t0, n, i_b * BC


@triton.jit
def earlier_block_keys(k_ptr, g_ptr, t0, jb, n, stride, cols, ncols, gap,
                       BC: tl.constexpr, BK: tl.constexpr):
    """The key side of the pairs (i, j) with j in sub-block jb and i in a later sub-block I, and
    jb's total: k_j * e_out[j] * exp(gap) [BC, BK], where gap [BK] is the sum of g over the
    sub-blocks strictly between jb and I, and sum of g over jb [BK] (the next gap's term).
    With e_in of I's rows, exp(G_i - G_j) = e_in[i] * exp(gap) * e_out[j] (sub_block_decays)."""
    rows = jb * BC + tl.arange(0, BC)
    g, g_next = load_decays(g_ptr, t0, rows, n, stride, cols, ncols)
    e_in, e_out, total = sub_block_decays(g, g_next, BC, BC, BK)
    keys = load_rows(k_ptr, t0, rows, n, stride, cols, ncols) * e_out * tl.exp(gap)[None, :]
    return keys, tl.reshape(total, [BK])


@triton.jit
def chunk_decays(e_in, e_out, totals, C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    """From sub_block_decays' parts, [C, BK] each:

        decay_in[i]  = exp(G_i)  = exp(sum of g from the chunk's start to i)
        decay_out[i] = exp(Gs_i) = exp(sum of g after i to the chunk's end)

    as the within-sub-block factor times the factor of the whole sub-blocks before (after) i's.
    """
    NS: tl.constexpr = C // BC
    blocks = tl.arange(0, NS)
    earlier = (blocks[None, :] < blocks[:, None])[:, :, None]  # [row block, m, 1]
    before = tl.exp(tl.sum(tl.where(earlier, totals[None, :, :], 0.0), 1))  # [NS, BK]
    later = (blocks[None, :] > blocks[:, None])[:, :, None]
    after = tl.exp(tl.sum(tl.where(later, totals[None, :, :], 0.0), 1))
    decay_in = tl.reshape(tl.reshape(e_in, [NS, BC, BK]) * before[:, None, :], [C, BK])
    decay_out = tl.reshape(tl.reshape(e_out, [NS, BC, BK]) * after[:, None, :], [C, BK])
    return decay_in, decay_out


# In-block pairs go through one product per key block when every |in_block_log_decay| of the
# (chunk, key block) is at most this. Every factor exp(+-L) then lies in [e^-60, e^60] (normal
# fp32), and so does every lower-triangle term the products sum: exp(L_i) exp(-L_j) <= 1 for
# j <= i. Upper-triangle entries of the forward's products may overflow; they are discarded by
# tl.where, never multiplied. The backward's intermediate sums dA @ (k exp(-L)) stay below
# 16 |dA| e^60 (fp32 overflows at e^88.7). Price: exp(L) carries L's rounding, |L| 2^-24 relative,
# so a factor is off by at most 7e-6 relative (fp32 products; tf32's own rounding is 5e-4).
# Past the bound the pairs go column by column (slower): with 40, the kernels took that path in
# most sub-blocks of the strongest heads of bench/kda_op.py's gates (a up to 16, 7-token sums).
IN_BLOCK_FACTOR_BOUND = tl.constexpr(60.0)


@triton.jit
def in_block_log_decay(g, g_next, C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    """[C, BK] log decay between the reference row m = BC / 2 - 1 of every sub-block and each row
    i of it: sum_{m < t <= i} g_t below m, -sum_{i < t <= m} g_t above it, 0 at m, each a direct
    sum of g's (no difference of prefix sums, so no cancellation).

    For i, j in one sub-block, L_i - L_j = sum_{j < t <= i} g_t, so the in-block pair decay
    factors as exp(L_i) * exp(-L_j): with |L| bounded, the in-block pairs become one tl.dot
    (exp(-L_j) >= 1 grows with the decay, hence the bound IN_BLOCK_FACTOR_BOUND).
    """
    NS: tl.constexpr = C // BC
    M: tl.constexpr = BC // 2 - 1
    local = tl.arange(0, BC)[None, :, None]
    after = tl.cumsum(tl.where(local > M, tl.reshape(g, [NS, BC, BK]), 0.0), 1)
    before = tl.cumsum(tl.where(local < M, tl.reshape(g_next, [NS, BC, BK]), 0.0), 1,
                       reverse=True)
    return tl.reshape(after - before, [C, BK])


@triton.jit
def in_block_decay_step(decay, g_ptr, t0, first_of_block, local, jj, n, stride, cols, ncols):
    """One step of the in-block decays, walking the local column jj from BC - 1 down to 0:

        decay_jj[i] = exp(sum_{t in block(i), jj < local(t) <= local(i)} g_t)  if local(i) >= jj,
                      0 above the diagonal,

    from decay_{jj+1} (zeros before the first step): decay_jj = exp(g_{jj+1}) decay_{jj+1} below
    the diagonal and 1 on it. A product of exp(g) factors (each <= 1, at most BC - 1 of them):
    no scan, no exponent of a difference, relative error a few ulps whatever the decay.
    local: [C, 1] rows' positions in their sub-block; g_{jj+1} is read per block (L1 hits).
    """
    g_up = load_rows(g_ptr, t0, first_of_block + jj + 1, n, stride, cols, ncols)
    return tl.where(local > jj, decay * tl.exp(g_up), tl.where(local == jj, 1.0, 0.0))
