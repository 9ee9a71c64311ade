"""Token-by-token Kimi Delta Attention: the readable reference the other backends are tested against.

Per sequence and head, with state S in R^{K x V} (fp32):
    S'  = Diag(exp(g_t)) S_{t-1}
    S_t = S' + beta_t k_t (v_t - S'^T k_t)^T        = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T (scale * q_t)                        (the output reads the updated state)
"""

from __future__ import annotations

from typing import Optional

import torch

from deltatron.kernels.kda.checks import check_kda_inputs


def _recurrence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 q, k, g: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H]; state: [B, H, K, V]."""
    outputs = []
    for t in range(q.shape[1]):
        q_t, k_t, v_t = q[:, t], k[:, t], v[:, t]  # [B, H, K], [B, H, K], [B, H, V]
        state = state * g[:, t].exp()[..., None]
        predicted = torch.einsum("bhk,bhkv->bhv", k_t, state)
        delta = beta[:, t, :, None] * (v_t - predicted)
        state = state + k_t[..., None] * delta[..., None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q_t, state))
    if outputs:
        o = torch.stack(outputs, dim=1)
    else:
        o = v.new_zeros(v.shape)
    return o, state


def naive_recurrent_kda(
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
    """Gated delta rule with per-channel decay, one token at a time in fp32: the test oracle.

    Arguments, shapes and returns as `chunk_kda_torch` (chunk.py), without chunk_size.
    """
    shapes = check_kda_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    qf = q.float() * shapes.scale
    kf, vf, gf, bf = k.float(), v.float(), g.float(), beta.float()
    if initial_state is None:
        init = q.new_zeros(
            (shapes.num_seqs, shapes.heads, shapes.head_k_dim, shapes.head_v_dim), dtype=torch.float32
        )
    else:
        init = initial_state.float()

    if shapes.offsets is None:
        o, final = _recurrence(qf, kf, vf, gf, bf, init)
    else:
        pieces, finals = [], []
        for n, (start, end) in enumerate(zip(shapes.offsets, shapes.offsets[1:])):
            part = slice(start, end)
            o_n, s_n = _recurrence(
                qf[:, part], kf[:, part], vf[:, part], gf[:, part], bf[:, part], init[n : n + 1]
            )
            pieces.append(o_n)
            finals.append(s_n)
        o = torch.cat(pieces, dim=1)
        final = torch.cat(finals, dim=0)
    return o.to(v.dtype), (final if output_final_state else None)
