"""The token-by-token Triton KDA kernel (deltatron.kernels.kda.triton_recurrent) against the naive
recurrence, and the chunkwise kernels' state carry-over against it.

Without a GPU the kernel runs under the Triton interpreter (TRITON_INTERPRET=1, set by conftest):
small shapes with head dims that are not powers of two, value dims over one column block, packed
documents (an empty one, a one-token one), initial and final states, strong decays, bf16 inputs,
and generation in pieces with the state carried between calls. On a GPU a long sequence checks the
chunkwise kernels' final state against this independent computation.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, INTERPRET, require_triton_kernels
from deltatron.kernels.kda import kda, naive_recurrent_kda
from test_kda_ops import make_inputs
from test_kda_triton import TOL, rel_err


@pytest.fixture(scope="module")
def recurrent():
    require_triton_kernels("the fused recurrent KDA kernel")
    from deltatron.kernels.kda.triton_recurrent import fused_recurrent_kda

    return fused_recurrent_kda


def on_device(*xs):
    return [None if x is None else x.to(DEVICE) for x in xs]


@pytest.mark.parametrize("decay", ["mild", "strong", "spiky"])
@pytest.mark.parametrize("K, V", [(16, 16), (24, 40)])  # 40: two value blocks, the second ragged
def test_matches_the_naive_recurrence(recurrent, decay, K, V):
    q, k, v, g, beta = make_inputs(2, 23, 2, K, V, decay, seed=3)
    init = torch.randn(2, 2, K, V, generator=torch.Generator().manual_seed(4))
    o_ref, s_ref = naive_recurrent_kda(q, k, v, g, beta, initial_state=init)
    o, s = recurrent(*on_device(q, k, v, g, beta), initial_state=init.to(DEVICE))
    assert o.dtype == v.dtype and s.dtype == torch.float32
    assert rel_err(o.cpu(), o_ref) <= TOL
    assert rel_err(s.cpu(), s_ref) <= TOL
    o0, s0 = recurrent(*on_device(q, k, v, g, beta), output_final_state=False)
    o0_ref, _ = naive_recurrent_kda(q, k, v, g, beta)
    assert s0 is None and rel_err(o0.cpu(), o0_ref) <= TOL


def test_packed_documents_start_from_their_own_states(recurrent):
    cu = [0, 0, 1, 9, 30]  # an empty document, a one-token one, two longer ones
    q, k, v, g, beta = make_inputs(1, 30, 2, 16, 16, "mild", seed=5)
    init = torch.randn(4, 2, 16, 16, generator=torch.Generator().manual_seed(6))
    cu_seqlens = torch.tensor(cu, dtype=torch.int32)
    o_ref, s_ref = naive_recurrent_kda(q, k, v, g, beta, initial_state=init, cu_seqlens=cu_seqlens)
    o, s = recurrent(*on_device(q, k, v, g, beta), initial_state=init.to(DEVICE),
                     cu_seqlens=cu_seqlens.to(DEVICE))
    assert rel_err(o.cpu(), o_ref) <= TOL
    assert rel_err(s.cpu(), s_ref) <= TOL
    assert torch.equal(s[0].cpu(), init[0])  # the empty document hands its initial state back


def test_generation_in_pieces_equals_one_call(recurrent):
    """Decoding: the prompt in one call, then one token at a time with the state carried, gives
    the outputs and final state of a single call over all tokens."""
    q, k, v, g, beta = on_device(*make_inputs(1, 12, 2, 16, 16, "mild", seed=7))
    o_all, s_all = recurrent(q, k, v, g, beta)
    o_parts, state = [], None
    for lo, hi in [(0, 8)] + [(t, t + 1) for t in range(8, 12)]:
        o, state = recurrent(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], g[:, lo:hi], beta[:, lo:hi],
                             initial_state=state)
        o_parts.append(o)
    assert torch.allclose(torch.cat(o_parts, 1), o_all, rtol=1e-6, atol=1e-6)
    assert torch.allclose(state, s_all, rtol=1e-6, atol=1e-6)


def test_bf16_inputs(recurrent):
    q, k, v, g, beta = make_inputs(1, 20, 2, 16, 16, "mild", seed=8)
    q, k, v = (x.bfloat16() for x in (q, k, v))
    o_ref, s_ref = naive_recurrent_kda(q.float(), k.float(), v.float(), g, beta)
    o, s = recurrent(*on_device(q, k, v, g, beta))
    assert o.dtype == torch.bfloat16
    assert rel_err(o.float().cpu(), o_ref) <= 8e-3  # the output rounded to bf16 (2^-8)
    assert rel_err(s.cpu(), s_ref) <= TOL  # the state stays fp32 from the rounded inputs


def test_refuses_inputs_that_need_gradients_and_dispatches(recurrent):
    q, k, v, g, beta = on_device(*make_inputs(1, 6, 1, 16, 16, "mild", seed=9))
    with pytest.raises(ValueError, match="no backward"):
        recurrent(q.requires_grad_(), k, v, g, beta)
    with torch.no_grad():
        o, s = recurrent(q, k, v, g, beta)
    o_k, s_k = kda(q.detach(), k, v, g, beta, backend="recurrent")
    assert torch.equal(o, o_k) and torch.equal(s, s_k)


@pytest.mark.skipif(INTERPRET, reason="a long sequence needs the compiled kernels on a CUDA GPU")
def test_chunkwise_state_carry_over_matches_token_by_token(recurrent):
    """16k tokens in fp32 (3xTF32 products in the chunkwise kernels): its final state and last
    outputs against the token-by-token kernel, which shares no code with it."""
    gen = torch.Generator(device="cuda").manual_seed(10)
    B, T, H, D = 1, 16384, 4, 128
    shape = (B, T, H, D)
    q = F.normalize(torch.randn(shape, device="cuda", generator=gen), dim=-1)
    k = F.normalize(torch.randn(shape, device="cuda", generator=gen), dim=-1)
    v = torch.randn(shape, device="cuda", generator=gen)
    g = -0.05 * F.softplus(torch.randn(shape, device="cuda", generator=gen))
    beta = torch.sigmoid(torch.randn(shape[:3], device="cuda", generator=gen))
    o_chunk, s_chunk = kda(q, k, v, g, beta, backend="triton")
    o_rec, s_rec = recurrent(q, k, v, g, beta)
    assert rel_err(s_chunk, s_rec) <= 1e-4
    assert rel_err(o_chunk[:, -256:], o_rec[:, -256:]) <= 1e-4
