"""Chunkwise Kimi Delta Attention in Triton, forward and backward, behind `kda(backend="triton")`.

Same recurrence and chunkwise form as chunk.py (the WY/UT form of the Kimi Linear paper):
    S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T,    o_t = S_t^T (scale q_t)

Kernels (T_total = B * T tokens, NC chunks over all sequences, N sequences, NS = C / 16
sub-blocks per chunk, NV = cdiv(V, 32)):
    forward   scores           grid (NC, H, NS)  A_qk and beta-scaled A_kk, one sub-block of rows
                                                 per program
              intra factors    grid (NC, H)      A_inv = (I + A_kk)^-1 (in place), W, U and the
                                                 decay factors of the state pass
              state_fwd        grid (N, H, NV)   U' = U - W S, O and S_next chunk after chunk;
                                                 the final state
    backward  intra factors    grid (NC, H)      W, U (and the decay factors) recomputed from
                                                 the A_inv the forward kept
              state_fwd        grid (N, H, NV)   recomputed, keeping h (the state entering every
                                                 chunk) and U' instead of O
              state_bwd        grid (N, H, NV)   reverse pass: dh (gradient of the state leaving
                                                 every chunk), dU', the initial state's gradient
              grad_chunk       grid (NC, H)      dv, dA_qk, dA_kk, elementwise parts of dq, dk, dg
              grad_pairwise    grid (NC, H, NS)  dq, dk, dbeta and dG, one sub-block per program;
                               grid (NC, H, *)   then dg, dG's reverse cumsum over each chunk
The forward keeps the inputs, A_qk and A_inv ([T_total, H, C]) for the backward, which recomputes
the rest (W, U and the decay factors from A_inv, and one state pass): the scores and the inverse
are most of the intra pass's cost, so running them once saves more time than their memory costs.
The forward never materialises per-chunk states: the output is produced inside the state pass.
Memory per token and head at K = V = 128, C = 64, in the operand dtype (triton_common.operand_dtype;
bf16 figures first, fp32 ones in brackets): A_qk and A_inv (fp32) kept, 0.38 KB (0.5); the
forward's temporaries A_qk, W, U, Qg, Kg 1.2 KB (2.3); in the backward h and dh, [NC, H, K, V]
each (2 K V / C bytes in bf16: 0.5 KiB each), then grad_chunk's fp32 outputs, all released
before it returns.

Tiles: C in {16, 32, 64, 128} (64 is the target); sub-chunks of SUB = 16 tokens for the
intra-chunk decays. The per-sub-block kernels (scores, grad_pairwise) work on [16, BK] tiles
(triton_common.pair_config). The other chunk-parallel kernels take key channels 32 at a time, the
state passes all of them (padded to a power of two, up to 256) and value columns 32 at a time, so
a single long sequence still spreads over H * NV programs; 8 warps at C = 64 or K = 128 (configs
in intra_config, state_config, grad_config). From C = 64 on, intra factors and grad_chunk use the
K = V = 128 tiles for every head size (smaller heads are padded): with 16-wide fp32 tiles and 8
warps Triton 3.6 miscompiled _grad_chunk_kernel (an out-of-bounds shared-memory read, an illegal
memory access on the H100). In-block pairs (both tokens in one 16-token sub-block) are one tl.dot
per key block through a reference row of the sub-block when the in-block log decays are at most
60 in size (triton_common.in_block_log_decay), else column by column (in_block_decay_step). Sums,
exponents and the inverse are fp32 (16-bit inputs are converted on load). The state passes' and
grad_chunk's products take bf16 operands for bf16 inputs (the operand dtype), fp32 accumulation;
every other tl.dot multiplies fp32 tiles, "tf32" for 16-bit inputs and "tf32x3" (about fp32) for
fp32 inputs (triton_common.dot_precision). No autotuning, so a fresh GPU compiles each kernel once
per shape class. triton_compile_check.py compiles them all for a target (sm_90 by default) without
a GPU and reports shared memory, registers and spills.

Packed documents: every sequence is cut into its own chunks on the host (a chunk never straddles
two documents, the last one may be ragged), so each program reads only its document's tokens and
each sequence starts from its own initial_state row. A batch of B rows is handled as B packed
sequences of length T.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from deltatron.kernels import on_device
from deltatron.kernels.kda.checks import check_kda_inputs
from deltatron.kernels.kda.triton_common import chunk_layout, dot_precision, flatten_for_kernels
from deltatron.kernels.kda.triton_grad import grad_chunk, grad_pairwise
from deltatron.kernels.kda.triton_intra import intra_chunk_factors, intra_chunk_fwd
from deltatron.kernels.kda.triton_state import state_bwd, state_fwd

SUPPORTED_CHUNK_SIZES = (16, 32, 64, 128)


class ChunkKDAFunction(torch.autograd.Function):
    """Autograd boundary of the Triton kernels, on flattened inputs.

    forward(q, k, v, g, beta, initial_state, layout, scale, chunk_size, output_final_state):
        q, k, g: [T_total, H, K]; v: [T_total, H, V]; beta: [T_total, H], all contiguous;
        initial_state: [N, H, K, V] or None; layout: the chunks (triton_common.chunk_layout).
        -> o [T_total, H, V] in v's dtype, final state [N, H, K, V] fp32 (None unless asked).
    Gradients reach q, k, v, g, beta and initial_state, including through the final state.
    """

    @staticmethod
    def forward(
        ctx, q, k, v, g, beta, initial_state, layout, scale, chunk_size, output_final_state
    ):
        ctx.set_materialize_grads(False)
        precision = dot_precision(q.dtype, k.dtype, v.dtype)
        with on_device(q):
            ic = intra_chunk_fwd(q, k, v, g, beta, layout, scale, chunk_size, precision)
            o, ht, _, _ = state_fwd(
                ic, initial_state, layout, precision, v.dtype,
                output=True, final_state=output_final_state, chunk_states=False,
            )
        ctx.save_for_backward(q, k, v, g, beta, initial_state, ic.aqk, ic.ainv)
        ctx.layout = layout
        ctx.scale = scale
        ctx.chunk_size = chunk_size
        return o, ht

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dht):
        q, k, v, g, beta, initial_state, aqk, ainv = ctx.saved_tensors
        layout, scale = ctx.layout, ctx.scale
        precision = dot_precision(q.dtype, k.dtype, v.dtype)
        do = torch.zeros_like(v) if do is None else do.contiguous()
        initial_grad = initial_state is not None and ctx.needs_input_grad[5]
        with on_device(q):
            ic = intra_chunk_factors(q, k, v, g, beta, aqk, ainv, layout, scale, precision)
            _, _, h, vnew = state_fwd(
                ic, initial_state, layout, precision, v.dtype,
                output=False, final_state=False, chunk_states=True,
            )
            dh, dvnew, dh0 = state_bwd(ic, do, dht, layout, precision, initial_grad)
            del ic  # W, U, Qg, Kg, gC: only the state passes read them (A_qk, A_inv stay saved)
            dv, daqk, dakk, dq_part, dk_part, dg_part, dbeta_part = grad_chunk(
                q, k, v, g, beta, ainv, h, dh, vnew, dvnew, do, layout, scale, precision
            )
            del h, dh, vnew, dvnew  # the largest buffers, before the outputs exist
            dq, dk, dg, dbeta = grad_pairwise(
                q, k, g, beta, daqk, dakk, dq_part, dk_part, dg_part, dbeta_part,
                layout, scale, precision,
            )
        if dh0 is not None:
            dh0 = dh0.to(initial_state.dtype)
        return dq, dk, dv, dg, dbeta, dh0, None, None, None, None


def chunk_kda_triton(
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
    """Gated delta rule with per-channel decay, chunkwise in Triton, fp32 inside, differentiable.

    Arguments, shapes and returns as `chunk_kda_torch` (chunk.py), except chunk_size: 16, 32, 64
    or 128 (T and the documents need not be multiples of it). Needs CUDA tensors (or
    TRITON_INTERPRET=1 set before this module is imported, for CPU); K and V up to 256.
    """
    shapes = check_kda_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    if type(chunk_size) is not int or chunk_size not in SUPPORTED_CHUNK_SIZES:
        raise ValueError(
            f"chunk_size={chunk_size!r}: the triton KDA backend supports "
            f"{', '.join(map(str, SUPPORTED_CHUNK_SIZES))} (the torch backend takes any size)"
        )
    offsets, flat = flatten_for_kernels(
        shapes, q, k, v, g, beta, "the triton KDA backend", cpu_backend="torch"
    )
    B, T, H, K, V = (
        shapes.batch, shapes.seq_len, shapes.heads, shapes.head_k_dim, shapes.head_v_dim,
    )
    if T == 0:  # nothing to run: every sequence is empty
        if initial_state is None:
            final = q.new_zeros((shapes.num_seqs, H, K, V), dtype=torch.float32)
        else:
            final = initial_state.float()
        return v.new_zeros(v.shape), (final if output_final_state else None)

    layout = chunk_layout(offsets, chunk_size, q.device)
    init = initial_state.contiguous() if initial_state is not None else None
    o, final = ChunkKDAFunction.apply(
        *flat, init, layout, shapes.scale, chunk_size, output_final_state,
    )
    return o.view(B, T, H, V), final
