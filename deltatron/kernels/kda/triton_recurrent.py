"""Token-by-token KDA in Triton, forward only: generation, and an independent check of the
chunkwise kernels' state carry-over over long sequences.

One program per (sequence, head, block of BV value columns) walks its sequence one token at a
time, keeping the [K, BV] state in fp32 registers (value columns never mix, so the blocks are
independent), with the recurrence as the naive reference writes it (naive.py):
    S' = exp(g_t) * S,    u = beta_t (v_t - S'^T k_t),    S = S' + k_t u^T,    o_t = S^T (scale q_t)
i.e. S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T without forming a
[K, K] matrix. Every token costs a few [K, BV] multiply-adds and the tokens run in order, so this
is the kernel for a handful of new tokens against a carried state (decoding), not for training:
it has no backward, and calling it on inputs that need gradients is refused.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from deltatron.kernels import on_device
from deltatron.kernels.kda.checks import check_kda_inputs
from deltatron.kernels.kda.triton_common import flatten_for_kernels

@triton.jit
def _recurrent_fwd_kernel(
    q, k, v, g, beta, h0, o, ht, seq_offsets, scale, H,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr,
):
    """Grid (N, H, cdiv(V, BV)). q, k, g: [T_total, H, K]; v, o: [T_total, H, V]; beta:
    [T_total, H]; h0, ht: [N, H, K, V] fp32 (contiguous)."""
    i_n = tl.program_id(0)
    i_h = tl.program_id(1)
    i_v = tl.program_id(2)
    bos = tl.load(seq_offsets + i_n)
    eos = tl.load(seq_offsets + i_n + 1)
    rk = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    mask_k = rk < K
    mask_v = cv < V
    state_offs = rk[:, None] * V + cv[None, :]
    state_mask = mask_k[:, None] & mask_v[None, :]
    seq_state = (i_n * H + i_h).to(tl.int64) * K * V
    if HAS_H0:
        s = tl.load(h0 + seq_state + state_offs, mask=state_mask, other=0.0).to(tl.float32)
    else:
        s = tl.zeros([BK, BV], dtype=tl.float32)
    for i in range(eos - bos):
        token_head = (bos.to(tl.int64) + i) * H + i_h
        q_t = tl.load(q + token_head * K + rk, mask=mask_k, other=0.0).to(tl.float32) * scale
        k_t = tl.load(k + token_head * K + rk, mask=mask_k, other=0.0).to(tl.float32)
        g_t = tl.load(g + token_head * K + rk, mask=mask_k, other=0.0).to(tl.float32)
        v_t = tl.load(v + token_head * V + cv, mask=mask_v, other=0.0).to(tl.float32)
        b_t = tl.load(beta + token_head).to(tl.float32)
        s = s * tl.exp(g_t)[:, None]
        u = b_t * (v_t - tl.sum(s * k_t[:, None], 0))
        s += k_t[:, None] * u[None, :]
        o_t = tl.sum(s * q_t[:, None], 0)
        tl.store(o + token_head * V + cv, o_t.to(o.dtype.element_ty), mask=mask_v)
    if STORE_FINAL:
        tl.store(ht + seq_state + state_offs, s, mask=state_mask)


def recurrent_config(K: int, V: int) -> dict:
    """The whole key dimension per program (padded to a power of two) and 32 value columns (16
    for narrow heads): the state tile stays at most [256, 32] fp32."""
    return dict(
        BK=max(16, triton.next_power_of_2(K)),
        BV=min(32, max(16, triton.next_power_of_2(V))),
        num_warps=4 if K > 64 else 2,
        num_stages=1,
    )


def fused_recurrent_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = True,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """KDA token by token in Triton, forward only. Arguments, shapes and returns as
    `naive_recurrent_kda` (o in v's dtype, the final state fp32). Needs CUDA tensors (or
    TRITON_INTERPRET=1 set before triton is first imported, for CPU); K and V up to 256. Raises
    ValueError for inputs that need gradients: train with the chunkwise kernels."""
    shapes = check_kda_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    tracked = [x for x in (q, k, v, g, beta, initial_state) if x is not None and x.requires_grad]
    if tracked and torch.is_grad_enabled():
        raise ValueError(
            "the fused recurrent KDA kernel has no backward (it is for generation); run it under "
            "torch.no_grad(), or use kda(backend='triton') (chunkwise, differentiable) to train"
        )
    offsets, flat = flatten_for_kernels(
        shapes, q, k, v, g, beta, "the fused recurrent KDA kernel", cpu_backend="naive"
    )
    B, T, H, K, V = (
        shapes.batch, shapes.seq_len, shapes.heads, shapes.head_k_dim, shapes.head_v_dim,
    )
    N = shapes.num_seqs
    seq_offsets = torch.tensor(list(offsets), dtype=torch.int32, device=q.device)
    o = torch.empty((B * T, H, V), dtype=v.dtype, device=v.device)
    final = torch.empty((N, H, K, V), dtype=torch.float32, device=q.device)
    h0 = initial_state.contiguous() if initial_state is not None else None
    cfg = recurrent_config(K, V)
    if N > 0 and H > 0:
        with on_device(q):
            _recurrent_fwd_kernel[(N, H, triton.cdiv(V, cfg["BV"]))](
                *flat, h0 if h0 is not None else final,
                o, final, seq_offsets, shapes.scale, H,
                K=K, V=V, HAS_H0=h0 is not None, STORE_FINAL=output_final_state, **cfg,
            )
    return o.view(B, T, H, V), (final if output_final_state else None)
