"""Triton kernels of Block AttnRes's depth attention against the eager PyTorch phases.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by conftest
before any kernel module is imported), on small shapes that still cover: several D chunks with a
ragged last one (D > the per-row chunk of 1024 and not a multiple of the row-range chunk of 256),
query counts that are not powers of two, one source and one query, B > 1 (rows interleave sequence
and batch), row ranges that do not divide the token count, and phase-2 inputs that are strided
slices of a phase-1 output. The eager phases are the reference, in float64; they are themselves
checked against autograd and the straightforward formula in tests/test_attnres.py.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE

pytest.importorskip("triton", reason="the fused AttnRes kernels need the triton package")

from deltatron.kernels import attnres as fused  # noqa: E402
from deltatron.model.attnres import attend_completed, merge_partial  # noqa: E402
from test_kda_triton import rel_err  # noqa: E402  (max abs error over max abs reference, shapes checked)

EPS = 1e-5
# fp32 kernels against the float64 eager phases (relative to the largest reference entry), growing
# with D (fp32 sums over D): measured under the interpreter <= 1e-6 at D <= 300, <= 3.5e-6 at
# D = 1100 (the source and query gradients; outputs <= 1e-6), <= 1e-5 at D = 2304
TOL = 1e-5


def leaf(x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return x.detach().to(DEVICE, dtype).clone().requires_grad_()


def sources_and_queries(m: int, k: int, S: int, B: int, D: int, seed: int = 0):
    """m sources of different scales (so the softmax is far from uniform) and k queries."""
    gen = torch.Generator().manual_seed(seed)
    srcs = [torch.randn(S, B, D, generator=gen) * (0.5 + j) for j in range(m)]
    queries = torch.randn(k, D, generator=gen) * 0.3
    return srcs, queries


def attend_both(srcs, queries, g_out_seed=1):
    """Outputs and gradients of the fused phase 1 (fp32) and the eager one (float64), for the
    same upstream gradients of out and lse."""
    results = []
    for impl, dtype in ((fused.attend, torch.float32), (attend_completed, torch.float64)):
        xs = [leaf(s, dtype) for s in srcs]
        q = leaf(queries, dtype)
        results.append(run_phase1(impl, xs, q, g_out_seed, dtype))
        results[-1].update(q=q.grad, **{f"x{j}": x.grad for j, x in enumerate(xs)})
    return results


def run_phase1(impl, xs, q, seed, dtype, unused=()):
    """Phase 1's outputs (each query's output and lse stacked) after a backward of random upstream
    gradients; the outputs of the queries in `unused` get none (their per-query outputs unused)."""
    results = impl(xs, q, EPS)
    k = q.shape[0]
    outs, lses, weights = (results[:k], results[k : 2 * k], results[2 * k]) if impl is fused.attend else results
    gen = torch.Generator().manual_seed(seed)
    used = [t for i in range(k) if i not in unused for t in (outs[i], lses[i])]
    torch.autograd.backward(used, [torch.randn(t.shape, generator=gen).to(DEVICE, dtype) for t in used])
    return {"out": torch.stack(outs), "lse": torch.stack(lses), "weights": weights}


@pytest.mark.parametrize(
    "m, k, S, B, D",
    [
        (3, 3, 5, 2, 40),  # the common case, rows interleaving sequence and batch
        (1, 1, 7, 1, 24),  # the first block of a stage: one source, one query
        (4, 5, 3, 3, 1100),  # several per-row D chunks (1024) and row-range chunks (256), k not 2^n
        (9, 2, 11, 1, 72),  # the 48B model's 9 completed sources at the last block
        (2, 12, 3, 2, 600),  # a block of 12 sub-layers: query tiles cap the D chunk at 512
    ],
)
def test_attend_matches_eager_outputs_and_gradients(m, k, S, B, D):
    srcs, queries = sources_and_queries(m, k, S, B, D)
    ours, ref = attend_both(srcs, queries)
    for name in ref:
        assert ours[name].shape == ref[name].shape, name
        err = rel_err(ours[name], ref[name])
        assert err < TOL, f"{name}: relative error {err:.2e}"


def test_unused_per_query_outputs_get_no_gradient():
    """Per-query outputs that get no gradient (here the second query's output and log-sum-exp; in
    the model, the first query of a block that has no partial sum to merge reads no log-sum-exp)
    count as zero in both versions, and that query's gradient is exactly zero."""
    srcs, queries = sources_and_queries(3, 3, 4, 2, 40, seed=5)
    results = []
    for impl, dtype in ((fused.attend, torch.float32), (attend_completed, torch.float64)):
        xs, q = [leaf(s, dtype) for s in srcs], leaf(queries, dtype)
        results.append(run_phase1(impl, xs, q, 1, dtype, unused=(1,)))
        results[-1].update(q=q.grad, **{f"x{j}": x.grad for j, x in enumerate(xs)})
    ours, ref = results
    assert ours["q"][1].abs().max() == 0 and ref["q"][1].abs().max() == 0
    for name in ref:
        assert rel_err(ours[name], ref[name]) < TOL, name


def test_attend_weights_are_a_softmax_over_sources():
    srcs, queries = sources_and_queries(4, 3, 6, 2, 32, seed=3)
    weights = fused.attend([s.to(DEVICE) for s in srcs], queries.to(DEVICE), EPS)[-1]
    sums = weights.sum(0)
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-6)
    assert weights.min() > 0 and weights.max() < 1
    # the loudest source does not simply win: logits are of RMS-normalised sources
    assert weights.std() > 1e-3


def merge_both(out, lse, partial, query, g_seed=2):
    results = []
    for impl, dtype in ((fused.merge, torch.float32), (merge_partial, torch.float64)):
        o, l, p, q = (leaf(t, dtype) for t in (out, lse, partial, query))
        h, share = impl(o, l, p, q, EPS)
        g_h = torch.randn(h.shape, generator=torch.Generator().manual_seed(g_seed)).to(DEVICE, dtype)
        h.backward(g_h)
        results.append({"h": h, "share": share, "out": o.grad, "lse": l.grad, "partial": p.grad, "q": q.grad})
    return results


@pytest.mark.parametrize("S, B, D", [(6, 2, 40), (9, 1, 1100), (4, 3, 300)])
def test_merge_matches_eager_outputs_and_gradients(S, B, D):
    gen = torch.Generator().manual_seed(5)
    out = torch.randn(S, B, D, generator=gen)
    lse = torch.randn(S, B, generator=gen) * 2
    partial = torch.randn(S, B, D, generator=gen) * 3
    query = torch.randn(D, generator=gen) * 0.3
    ours, ref = merge_both(out, lse, partial, query)
    for name in ref:
        err = rel_err(ours[name], ref[name])
        assert err < TOL, f"{name}: relative error {err:.2e}"


def test_merge_reads_strided_slices_of_a_phase_one_output():
    """Phase 2 may get strided per-query views (the eager phase 1 returns out[..., k, :] and
    lse[..., k] of [S, B, K, D] / [S, B, K] tensors, the kernel's lse are views of [S, B, K]):
    rows evenly strided, not contiguous; the result equals merging contiguous copies."""
    S, B, K, D = 5, 3, 3, 48
    gen = torch.Generator().manual_seed(7)
    out_all = torch.randn(S, B, K, D, generator=gen).to(DEVICE)
    lse_all = torch.randn(S, B, K, generator=gen).to(DEVICE)
    partial = torch.randn(S, B, D, generator=gen).to(DEVICE)
    query = (torch.randn(D, generator=gen) * 0.3).to(DEVICE)
    for k in range(K):
        o, l = out_all[..., k, :], lse_all[..., k]
        assert not o.is_contiguous()
        h, share = fused.merge(o, l, partial, query, EPS)
        h_ref, share_ref = fused.merge(o.contiguous(), l.contiguous(), partial, query, EPS)
        assert torch.equal(h, h_ref) and torch.equal(share, share_ref)
        h64, _ = merge_partial(o.double(), l.double(), partial.double(), query.double(), EPS)
        assert rel_err(h, h64) < TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sources_keep_their_dtype(dtype):
    """bf16/fp16 hidden states: outputs and source gradients in that dtype, within its rounding of
    the float64 result (the kernels accumulate in fp32)."""
    srcs, queries = sources_and_queries(3, 2, 4, 2, 64, seed=11)
    xs = [leaf(s, dtype) for s in srcs]
    q = leaf(queries)
    results = fused.attend(xs, q, EPS)
    out, lse = torch.stack(results[:2]), torch.stack(results[2:4])
    assert out.dtype == dtype and lse.dtype == torch.float32
    out.float().sum().backward()
    assert all(x.grad.dtype == dtype for x in xs) and q.grad.dtype == torch.float32
    ref_xs = [leaf(s.to(dtype), torch.float64) for s in srcs]
    ref_outs, _, _ = attend_completed(ref_xs, queries.double().to(DEVICE), EPS)
    assert rel_err(out, torch.stack(ref_outs)) < 1e-2


def test_model_with_the_kernels_matches_the_eager_phases(seeded, monkeypatch):
    """A small Block AttnRes model (uneven blocks, MoE and MLA sub-layers) through the kernels
    (forced on for CPU tensors, interpreted) gives the logits and every parameter's gradient of
    the eager phases."""
    import deltatron.model.attnres as attnres
    from deltatron.model.config import ModelConfig
    from deltatron.model.model import build_model
    from test_attnres import SMALL, _randomize_depth_params

    model = build_model(ModelConfig(**SMALL, residual="block_attnres", attnres_blocks=3)).to(DEVICE)
    _randomize_depth_params(model)
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    runs = []
    for fused_on in (True, False):
        calls = []
        monkeypatch.setattr(attnres, "_fused_kernels", lambda x, on=fused_on: calls.append(on) or on)
        logits = model(tokens, None, None)
        grads = torch.autograd.grad(logits.square().mean(), list(model.parameters()), allow_unused=True)
        runs.append((logits, grads))
        assert calls and all(c == fused_on for c in calls)
    (got, g_got), (ref, g_ref) = runs
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for (name, _), a, b in zip(model.named_parameters(), g_got, g_ref):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("K, c_cols", [(3, 3), (1, 2), (6, 6)])
def test_query_gradient_split_over_rows_matches_a_matmul(K, c_cols, monkeypatch):
    """query_grad's row splits (many of them here, the last one ragged, D tiles ragged too) and a
    coefficient matrix wider than K (phase 2 passes its [N, 2] coefficients) give C[:, :K]^T X."""
    monkeypatch.setattr(fused, "_QG_PROGRAMS_PER_SM", 64)
    gen = torch.Generator().manual_seed(9)
    X = torch.randn(203, 300, generator=gen).to(DEVICE, torch.bfloat16)
    C = torch.randn(203, c_cols, generator=gen).to(DEVICE)
    got = fused.query_grad(X, C, K)
    want = C[:, :K].double().t() @ X.double()
    assert got.shape == (K, 300) and got.dtype == torch.float32
    assert rel_err(got, want) < TOL
