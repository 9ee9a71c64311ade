"""Kimi Delta Attention operator: the naive oracle against hand computation, the chunkwise form
against the oracle (outputs, final states, gradients), packed documents, input validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deltatron.kernels.kda import available_backends, chunk_kda_torch, kda, naive_recurrent_kda

# Relative tolerance (max abs difference over max abs reference) for chunk vs naive in fp32.
# Measured: ~2e-7 (forward) and ~4e-7 (gradients), both forms ~2e-7 from float64.
FWD_TOL = 1e-5
GRAD_TOL = 1e-5


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = ""):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual.double() - expected.double()).abs().max().item()
    ref = expected.double().abs().max().item()
    assert err <= tol * max(ref, 1e-6), f"{what}: max abs err {err:.3e} vs max abs ref {ref:.3e}"


def make_inputs(B, T, H, K, V, decay="mild", seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    if decay == "mild":
        g = -F.softplus(torch.randn(B, T, H, K, generator=gen)) * 0.3
    elif decay == "strong":  # every channel loses e^-5 .. e^-20 per token
        g = -(5 + 15 * torch.rand(B, T, H, K, generator=gen))
    elif decay == "mixed":  # half the channels barely decay, the rest down to -20 per token
        strong = torch.rand(B, T, H, K, generator=gen) < 0.5
        g = torch.where(
            strong,
            -20 * torch.rand(B, T, H, K, generator=gen),
            -0.01 * torch.rand(B, T, H, K, generator=gen),
        )
    elif decay == "near_bound":  # -6 .. -7 per token: in-block log decays up to 56 (factored)
        g = -(6 + torch.rand(B, T, H, K, generator=gen))
    elif decay == "spiky":  # long memory with rare near-resets: large cumulative decays
        spike = torch.rand(B, T, H, K, generator=gen) < 0.1
        g = torch.where(spike, torch.full((B, T, H, K), -30.0), -1e-3 * torch.rand(B, T, H, K, generator=gen))
    else:
        raise AssertionError(decay)
    beta = torch.rand(B, T, H, generator=gen) * 0.98 + 0.01
    return q, k, v, g, beta


def random_state(N, H, K, V, seed=1):
    return torch.randn(N, H, K, V, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# The oracle itself.


def test_naive_hand_computed():
    """T=2, K=V=2, numbers worked out by hand from the formula."""
    s0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    q = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    v = torch.tensor([[10.0, 20.0], [1.0, -1.0]])
    g = torch.tensor([[math.log(0.5), 0.0], [0.0, math.log(0.25)]])
    beta = torch.tensor([0.5, 1.0])
    # t=1: S' = [[0.5, 1], [3, 4]], S'^T k = [0.5, 1], S1 = S' + 0.5 k (v - [0.5, 1])^T
    #      = [[5.25, 10.5], [3, 4]], o1 = S1^T [1, 1] = [8.25, 14.5]
    # t=2: S' = [[5.25, 10.5], [0.75, 1]], S'^T k = [3.75, 7.1], v - S'^T k = [-2.75, -8.1],
    #      S2 = S' + k [-2.75, -8.1] = [[3.6, 5.64], [-1.45, -5.48]], o2 = S2^T [0, 1] = [-1.45, -5.48]
    o_expected = torch.tensor([[8.25, 14.5], [-1.45, -5.48]])
    s_expected = torch.tensor([[3.6, 5.64], [-1.45, -5.48]])

    def b1h1(x):  # [T, ...] -> [1, T, 1, ...]
        return x[None, :, None]

    o, s = naive_recurrent_kda(
        b1h1(q), b1h1(k), b1h1(v), b1h1(g), beta[None, :, None], scale=1.0,
        initial_state=s0[None, None],
    )
    torch.testing.assert_close(o[0, :, 0], o_expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(s[0, 0], s_expected, rtol=0, atol=1e-5)
    # With beta = 1 and a unit key the state now maps k_2 exactly to v_2 (the delta rule).
    torch.testing.assert_close(s[0, 0].T @ k[1], v[1], rtol=0, atol=1e-5)
    # The default scale is K ** -0.5.
    o_default, _ = naive_recurrent_kda(
        b1h1(q), b1h1(k), b1h1(v), b1h1(g), beta[None, :, None], initial_state=s0[None, None]
    )
    torch.testing.assert_close(o_default[0, :, 0], o_expected / math.sqrt(2), rtol=0, atol=1e-5)


def test_naive_matches_matrix_form():
    """The oracle against S_t = (I - b k k^T) Diag(exp g) S_{t-1} + b k v^T in float64."""
    B, T, H, K, V = 2, 7, 3, 3, 4
    q, k, v, g, beta = make_inputs(B, T, H, K, V, decay="mild", seed=3)
    s0 = random_state(B, H, K, V, seed=4)
    scale = 0.7
    o, s = naive_recurrent_kda(q, k, v, g, beta, scale=scale, initial_state=s0)
    eye = torch.eye(K, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            S = s0[b, h].double()
            for t in range(T):
                kt, vt, qt = k[b, t, h].double(), v[b, t, h].double(), q[b, t, h].double()
                bt = beta[b, t, h].double()
                S = (eye - bt * torch.outer(kt, kt)) @ torch.diag(g[b, t, h].double().exp()) @ S
                S = S + bt * torch.outer(kt, vt)
                torch.testing.assert_close(o[b, t, h].double(), S.T @ (scale * qt), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(s[b, h].double(), S, rtol=1e-5, atol=1e-6)


def reference_fp64(q, k, v, g, beta, scale, s0):
    """The recurrence in float64, vectorised over B and H: the precision yardstick."""
    q, k, v, g, beta, S = (x.double() for x in (q, k, v, g, beta, s0))
    outs = []
    for t in range(q.shape[1]):
        S = g[:, t, :, :, None].exp() * S
        kt = k[:, t, :, :, None]
        S = S + beta[:, t, :, None, None] * kt * (v[:, t, :, None, :] - (kt * S).sum(-2, keepdim=True))
        outs.append((scale * q[:, t, :, :, None] * S).sum(-2))
    return torch.stack(outs, dim=1), S


# --------------------------------------------------------------------------------------------------
# Chunkwise against the oracle.


@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("decay", ["mild", "strong", "mixed"])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_matches_naive(chunk_size, decay, with_state):
    B, T, H, K, V = 2, 131, 2, 16, 32  # 131 = ragged last chunk for both chunk sizes
    q, k, v, g, beta = make_inputs(B, T, H, K, V, decay=decay)
    s0 = random_state(B, H, K, V) if with_state else None
    o_ref, s_ref = naive_recurrent_kda(q, k, v, g, beta, initial_state=s0)
    o, s = chunk_kda_torch(q, k, v, g, beta, initial_state=s0, chunk_size=chunk_size)
    assert o.dtype == v.dtype and s.dtype == torch.float32
    assert_rel_close(o, o_ref, FWD_TOL, "o")
    assert_rel_close(s, s_ref, FWD_TOL, "final state")


@pytest.mark.parametrize("decay", ["mixed", "spiky"])
def test_precision_against_float64(decay):
    """Both fp32 forms within a few ulps of float64. Exponents formed as differences of large
    cumulative sums (G_i - G_j with G ~ -300) lose ~1e-5 relative here: this catches that."""
    B, T, H, K, V = 2, 128, 2, 16, 16
    q, k, v, g, beta = make_inputs(B, T, H, K, V, decay=decay, seed=20)
    s0 = random_state(B, H, K, V, seed=21)
    o64, s64 = reference_fp64(q, k, v, g, beta, K ** -0.5, s0)
    for name, fn, kw in (
        ("naive", naive_recurrent_kda, {}),
        ("chunk16", chunk_kda_torch, {"chunk_size": 16}),
        ("chunk64", chunk_kda_torch, {"chunk_size": 64}),
    ):
        o, s = fn(q, k, v, g, beta, initial_state=s0, **kw)
        assert_rel_close(o, o64, 2e-6, f"{name} o")
        assert_rel_close(s, s64, 2e-6, f"{name} final state")


@pytest.mark.parametrize("T", [1, 5, 64, 100])
def test_chunk_short_and_exact_lengths(T):
    """T below one chunk, equal to one chunk, an odd chunk size (7, prime) and chunks of one."""
    q, k, v, g, beta = make_inputs(1, T, 2, 8, 8, decay="mixed", seed=T)
    s0 = random_state(1, 2, 8, 8)
    o_ref, s_ref = naive_recurrent_kda(q, k, v, g, beta, initial_state=s0)
    for chunk_size in (64, 7, 1):
        o, s = chunk_kda_torch(q, k, v, g, beta, initial_state=s0, chunk_size=chunk_size)
        assert_rel_close(o, o_ref, FWD_TOL, f"o C={chunk_size}")
        assert_rel_close(s, s_ref, FWD_TOL, f"state C={chunk_size}")


def _grads(fn, inputs, upstream_o, upstream_s, **kwargs):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    q, k, v, g, beta, s0 = leaves
    o, s = fn(q, k, v, g, beta, initial_state=s0, **kwargs)
    loss = (o * upstream_o).sum() + (s * upstream_s).sum()
    return o.detach(), s.detach(), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize(
    "chunk_size,decay", [(16, "mild"), (64, "mixed"), (64, "strong"), (64, "spiky")]
)
def test_chunk_gradients_match_naive(chunk_size, decay):
    B, T, H, K, V = 2, 100, 2, 16, 16
    inputs = [*make_inputs(B, T, H, K, V, decay=decay, seed=5), random_state(B, H, K, V, seed=6)]
    gen = torch.Generator().manual_seed(7)
    do = torch.randn(B, T, H, V, generator=gen)
    ds = torch.randn(B, H, K, V, generator=gen)
    _, _, ref = _grads(naive_recurrent_kda, inputs, do, ds)
    _, _, got = _grads(chunk_kda_torch, inputs, do, ds, chunk_size=chunk_size)
    for name, a, b in zip(("q", "k", "v", "g", "beta", "initial_state"), got, ref):
        assert_rel_close(a, b, GRAD_TOL, f"d{name}")


def test_padding_tokens_leave_state_unchanged():
    """k = v = g = beta = 0 is an identity step: the form the chunked code pads with."""
    q, k, v, g, beta = make_inputs(1, 20, 2, 8, 8, seed=8)
    s0 = random_state(1, 2, 8, 8)
    _, s_ref = naive_recurrent_kda(q, k, v, g, beta, initial_state=s0)

    def pad(x):
        return torch.cat([x, torch.zeros_like(x[:, :9])], dim=1)

    q2 = torch.cat([q, torch.randn_like(q[:, :9])], dim=1)  # q does not touch the state
    for fn in (naive_recurrent_kda, chunk_kda_torch):
        _, s = fn(q2, pad(k), pad(v), pad(g), pad(beta), initial_state=s0)
        assert_rel_close(s, s_ref, FWD_TOL, fn.__name__)


def test_low_precision_inputs():
    """bf16 q/k/v with fp32 g and beta: o comes back in bf16, the state in fp32."""
    q, k, v, g, beta = make_inputs(1, 40, 2, 16, 16, seed=9)
    qb, kb, vb = (x.bfloat16() for x in (q, k, v))
    o_ref, s_ref = naive_recurrent_kda(qb, kb, vb, g, beta)
    o, s = chunk_kda_torch(qb, kb, vb, g.bfloat16(), beta, chunk_size=16)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    o2, s2 = chunk_kda_torch(qb, kb, vb, g, beta, chunk_size=16)
    assert_rel_close(o2.float(), o_ref.float(), 1e-2, "o bf16")
    assert_rel_close(s2, s_ref, FWD_TOL, "state from bf16 inputs")
    assert torch.isfinite(o.float()).all() and torch.isfinite(s).all()


def test_no_final_state_and_empty_sequence():
    q, k, v, g, beta = make_inputs(2, 10, 2, 8, 8)
    for fn in (naive_recurrent_kda, chunk_kda_torch):
        o, s = fn(q, k, v, g, beta, output_final_state=False)
        assert s is None and o.shape == (2, 10, 2, 8)
        s0 = random_state(2, 2, 8, 8)
        o, s = fn(*(x[:, :0] for x in (q, k, v, g, beta)), initial_state=s0)
        assert o.shape == (2, 0, 2, 8)
        torch.testing.assert_close(s, s0)


# --------------------------------------------------------------------------------------------------
# Packed documents.

DOC_LENGTHS = [37, 1, 64, 50]


def _packed(lengths, decay="mild", seed=10, H=2, K=16, V=16):
    T = sum(lengths)
    q, k, v, g, beta = make_inputs(1, T, H, K, V, decay=decay, seed=seed)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    s0 = random_state(len(lengths), H, K, V, seed=seed + 1)
    return [q, k, v, g, beta, s0], cu


def _per_document(inputs, cu):
    """Each document on its own through the oracle (B = 1, no cu_seqlens)."""
    q, k, v, g, beta, s0 = inputs
    outs, states = [], []
    for n in range(len(cu) - 1):
        part = slice(int(cu[n]), int(cu[n + 1]))
        o, s = naive_recurrent_kda(
            q[:, part], k[:, part], v[:, part], g[:, part], beta[:, part], initial_state=s0[n : n + 1]
        )
        outs.append(o)
        states.append(s)
    return torch.cat(outs, dim=1), torch.cat(states, dim=0)


@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("lengths,decay", [(DOC_LENGTHS, "mild"), ([5, 0, 70, 3], "mixed")])
def test_varlen_matches_separate_documents(chunk_size, lengths, decay):
    inputs, cu = _packed(lengths, decay=decay)
    o_ref, s_ref = _per_document(inputs, cu)
    q, k, v, g, beta, s0 = inputs
    for name, fn, kw in (
        ("naive", naive_recurrent_kda, {}),
        ("chunk", chunk_kda_torch, {"chunk_size": chunk_size}),
    ):
        o, s = fn(q, k, v, g, beta, initial_state=s0, cu_seqlens=cu, **kw)
        assert_rel_close(o, o_ref, FWD_TOL, f"{name} o")
        assert_rel_close(s, s_ref, FWD_TOL, f"{name} final states")
    if 0 in lengths:  # an empty document hands back its initial state
        n = lengths.index(0)
        torch.testing.assert_close(s[n], s0[n])


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_varlen_gradients_match_separate_documents(chunk_size):
    inputs, cu = _packed(DOC_LENGTHS, decay="mixed", seed=12)
    gen = torch.Generator().manual_seed(13)
    do = torch.randn_like(inputs[2])
    ds = torch.randn(inputs[5].shape, generator=gen)

    def per_doc(q, k, v, g, beta, initial_state):
        return _per_document([q, k, v, g, beta, initial_state], cu)

    _, _, ref = _grads(per_doc, inputs, do, ds)
    _, _, got = _grads(chunk_kda_torch, inputs, do, ds, cu_seqlens=cu, chunk_size=chunk_size)
    for name, a, b in zip(("q", "k", "v", "g", "beta", "initial_state"), got, ref):
        assert_rel_close(a, b, GRAD_TOL, f"d{name}")


@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_documents_do_not_see_each_other(backend):
    lengths = [30, 40, 25]
    inputs, cu = _packed(lengths, seed=14)
    o, s = kda(*inputs[:5], initial_state=inputs[5], cu_seqlens=cu, backend=backend, chunk_size=16)
    # New tokens and a new initial state for document 1 only.
    changed = [x.clone() for x in inputs]
    doc1 = slice(30, 70)
    gen = torch.Generator().manual_seed(15)
    for i in range(5):
        x = changed[i]
        x[:, doc1] = torch.rand(x[:, doc1].shape, generator=gen) * (-3 if i == 3 else 1)
    changed[5][1] = torch.randn(changed[5][1].shape, generator=gen)
    o2, s2 = kda(*changed[:5], initial_state=changed[5], cu_seqlens=cu, backend=backend, chunk_size=16)
    assert not torch.allclose(o2[:, doc1], o[:, doc1]) and not torch.allclose(s2[1], s[1])
    for keep in (slice(0, 30), slice(70, 95)):
        torch.testing.assert_close(o2[:, keep], o[:, keep], rtol=0, atol=0)
    torch.testing.assert_close(s2[[0, 2]], s[[0, 2]], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# The dispatch boundary and validation.


def test_dispatch():
    assert set(available_backends()) >= {"torch", "naive"}
    q, k, v, g, beta = make_inputs(1, 20, 2, 8, 8)
    o_t, s_t = kda(q, k, v, g, beta, backend="torch", chunk_size=8)
    o_c, s_c = chunk_kda_torch(q, k, v, g, beta, chunk_size=8)
    assert torch.equal(o_t, o_c) and torch.equal(s_t, s_c)
    o_n, s_n = kda(q, k, v, g, beta, backend="naive")
    assert_rel_close(o_t, o_n, FWD_TOL, "torch vs naive through kda()")
    with pytest.raises(ValueError, match="KDA backend 'cuda' is not available"):
        kda(q, k, v, g, beta, backend="cuda")


def _bad_cases():
    B, T, H, K, V = 2, 12, 2, 4, 6
    base = dict(zip(("q", "k", "v", "g", "beta"), make_inputs(B, T, H, K, V)))
    one = dict(zip(("q", "k", "v", "g", "beta"), make_inputs(1, T, H, K, V)))

    def case(name, match, src=base, **changes):
        return pytest.param({**src, **changes}, match, id=name)

    return [
        case("q-3d", r"q must be \[B, T, H, K\]", q=base["q"][0]),
        case("k-shape", "k must have q's shape", k=base["k"][..., :3]),
        case("g-shape", "g .* must have q's shape", g=base["g"][:, :5]),
        case("v-shape", r"v must be \[B, T, H, V\]", v=base["v"][:, :, :1]),
        case("beta-shape", r"beta must be \[B, T, H\]", beta=base["beta"][..., None]),
        case("int-q", "floating-point", q=base["q"].long()),
        case("scale", "scale must be a number", scale="big"),
        case("cu-batch", "requires batch size 1", cu_seqlens=torch.tensor([0, 5, 12])),
        case("cu-start", "must start at 0", one, cu_seqlens=torch.tensor([1, 5, 12])),
        case("cu-end", "must end at T = 12", one, cu_seqlens=torch.tensor([0, 5, 11])),
        case("cu-order", "non-decreasing", one, cu_seqlens=torch.tensor([0, 7, 5, 12])),
        case("cu-float", "int32 or int64", one, cu_seqlens=torch.tensor([0.0, 12.0])),
        case("cu-2d", "1-D", one, cu_seqlens=torch.tensor([[0, 12]])),
        case("state-shape", r"initial_state must be \[N, H, K, V\] = \(2, 2, 4, 6\)",
             initial_state=torch.zeros(2, 2, 6, 4)),
        case("state-docs", r"= \(2, 2, 4, 6\) \(N = number of documents\)", one,
             initial_state=torch.zeros(1, 2, 4, 6), cu_seqlens=torch.tensor([0, 5, 12])),
    ]


@pytest.mark.parametrize("kwargs,match", _bad_cases())
@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_bad_inputs_raise(kwargs, match, backend):
    with pytest.raises(ValueError, match=match):
        kda(**kwargs, backend=backend)


@pytest.mark.parametrize("chunk_size", [0, -4, 2.5, True])
def test_bad_chunk_size(chunk_size):
    q, k, v, g, beta = make_inputs(1, 4, 1, 4, 4)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        chunk_kda_torch(q, k, v, g, beta, chunk_size=chunk_size)


def test_offsets_are_read_back_once_per_cu_seqlens_tensor(monkeypatch):
    """Every KDA layer of a forward gets the same cu_seqlens: one host read (a GPU sync), not
    one per layer; a tensor changed in place, or another tensor, is read again."""
    from deltatron.kernels.kda.checks import check_kda_inputs

    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1) or tolist(self))
    q, k, g = (torch.randn(1, 10, 2, 4) for _ in range(3))
    v, beta = torch.randn(1, 10, 2, 3), torch.rand(1, 10, 2)

    def offsets(cu):
        return check_kda_inputs(q, k, v, g, beta, None, None, cu).offsets

    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    assert [offsets(cu) for _ in range(3)] == [(0, 4, 10)] * 3 and len(reads) == 1
    cu[1] = 6
    assert offsets(cu) == (0, 6, 10) and len(reads) == 2
    assert offsets(torch.tensor([0, 5, 10], dtype=torch.int32)) == (0, 5, 10) and len(reads) == 3
