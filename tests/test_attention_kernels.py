"""MLA's attention paths that make torch's flash kernels eligible (deltatron/model/attention_kernels).

Padding v to the q/k head dim must give plain SDPA's output and gradients; the packed path must
hand the varlen kernel the document offsets, the padded v and a causal window, and return
[T, N, Dv]. On CPU, `_varlen_attn` is replaced by a per-document SDPA reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import deltatron.model.attention_kernels as ak


def _qkv(b=2, n=3, t=37, dqk=24, dv=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda d: torch.randn(b, n, t, d, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    return make(dqk), make(dqk), make(dv)


def test_padded_value_matches_plain_sdpa_with_gradients():
    q, k, v = _qkv()
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    ref.square().sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    out = ak.causal_attention(q, k, v, 0.3, pad_value=True)
    out.square().sum().backward()
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref)
    for got, want in zip((q.grad, k.grad, v.grad), grads):
        torch.testing.assert_close(got, want)


def test_flash_eligibility():
    q = torch.zeros(1, 1, 4, 192, dtype=torch.bfloat16)
    v = torch.zeros(1, 1, 4, 128, dtype=torch.bfloat16)
    assert not ak.flash_eligible(q, v)  # CPU tensors
    assert ak.causal_attention(q.float(), q.float(), v.float(), None).shape[-1] == 128  # plain SDPA


def _reference_varlen(calls):
    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, window_size):
        calls.append(dict(cu=cu_q.tolist(), cu_k=cu_k.tolist(), dtype=cu_q.dtype, max_q=max_q,
                          v_dim=v.shape[-1], window=window_size))
        out = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype)
        bounds = cu_q.tolist()
        for a, b in zip(bounds[:-1], bounds[1:]):
            qi, ki, vi = (x[a:b].transpose(0, 1) for x in (q, k, v))
            out[a:b] = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale).transpose(0, 1)
        return out

    return varlen


def test_varlen_path_attends_within_documents(monkeypatch):
    calls = []
    monkeypatch.setattr(ak, "_varlen_attn", _reference_varlen(calls))
    t, n, dqk, dv = 40, 2, 24, 16
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(t, n, dqk, generator=g) for _ in range(2))
    v = torch.randn(t, n, dv, generator=g)
    cu = torch.tensor([0, 7, 7, 30, 40])
    out = ak.varlen_causal_attention(q, k, v, cu, 23, 0.25, force=True)
    assert out.shape == (t, n, dv)
    assert calls == [dict(cu=[0, 7, 7, 30, 40], cu_k=[0, 7, 7, 30, 40], dtype=torch.int32, max_q=23,
                          v_dim=dqk, window=(-1, 0))]
    for a, b in [(0, 7), (7, 30), (30, 40)]:
        want = F.scaled_dot_product_attention(
            *(x[a:b].transpose(0, 1) for x in (q, k, v)), is_causal=True, scale=0.25
        ).transpose(0, 1)
        torch.testing.assert_close(out[a:b], want)


def test_varlen_path_declines_where_flash_does_not_run():
    q = torch.zeros(8, 2, 24)
    assert ak.varlen_causal_attention(q, q, q[..., :16], torch.tensor([0, 8]), 8, None) is None
    assert ak.varlen_causal_attention(q, q, q[..., :16], torch.tensor([0, 8]), None, None, force=True) is None


def test_packed_max_logits_leave_out_pairs_across_documents(monkeypatch):
    """MLA's max-logit tracking over a packed row (one pass, document ids on the device) equals
    the max over separate per-document passes, including the block loop's edges."""
    from deltatron.model import mla

    monkeypatch.setattr(mla, "_MAX_LOGIT_BLOCK", 16)
    g = torch.Generator().manual_seed(0)
    t, n, d = 50, 3, 8
    q, k = torch.randn(1, n, t, d, generator=g), torch.randn(1, n, t, d, generator=g)
    q[0, 1, 40] = 10 * k[0, 1, 3]  # a large logit between two documents: must not count
    cu = torch.tensor([0, 7, 7, 30, 50])  # with an empty document
    doc = torch.searchsorted(cu[1:], torch.arange(t), right=True)
    packed = mla.causal_max_logits(q, k, 0.5, doc)
    bounds = cu.tolist()
    per_doc = torch.stack([
        mla.causal_max_logits(q[:, :, a:b], k[:, :, a:b], 0.5) for a, b in zip(bounds[:-1], bounds[1:]) if b > a
    ]).amax(0)
    torch.testing.assert_close(packed, per_doc)
    cross_pair = 0.5 * (q[0, 1, 40] @ k[0, 1, 3])
    assert packed[1] < cross_pair <= mla.causal_max_logits(q, k, 0.5)[1]  # counted only unmasked
