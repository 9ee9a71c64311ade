"""Context parallelism (parallel.cp): the KDA state combine without processes, the slicing of
batches, and CP2 / CP4 / CP2xTP2 training against one process on the same long sequence.

The process-free tests run the slices of one sequence in one process and combine their affine
state maps exactly as the CP ranks do after their all-gather; the spawned tests (one 2-process
and one 4-process group) train the tiny model with the trainer and compare losses and parameters
with the single-process run, with document boundaries inside and exactly at slice edges.
"""

from __future__ import annotations

import pytest
import torch

from deltatron.kernels.kda import naive_recurrent_kda
from deltatron.parallel.cp_kda import (
    apply_incoming_state,
    compose_maps,
    local_slice_pass,
    prefix_states,
)
from deltatron.parallel.cp_slice import CPSlice, slice_batch, slice_for_rank


def _inputs(total: int, heads: int = 2, dk: int = 8, dv: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(1, total, heads, dk, generator=g), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(1, total, heads, dk, generator=g), dim=-1)
    v = torch.randn(1, total, heads, dv, generator=g)
    decay = -torch.rand(1, total, heads, dk, generator=g) * 0.3
    beta = torch.rand(1, total, heads, generator=g)
    return [x.requires_grad_() for x in (q, k, v, decay, beta)]


def test_slice_for_rank_cuts_documents_at_the_edges():
    cu = torch.tensor([0, 5, 8, 16, 20], dtype=torch.int32)  # boundary at 8 = an edge of 4 slices of 5
    s1 = slice_for_rank(cu, 20, 1, 4)  # tokens 5..9: starts document 1, boundary at 8
    assert s1.local_cu_seqlens.tolist() == [0, 3, 5] and s1.first_doc_offset == 0 and not s1.carries_in
    s2 = slice_for_rank(cu, 20, 2, 4)  # tokens 10..14 inside document 2 (8..16)
    assert s2.local_cu_seqlens.tolist() == [0, 5] and s2.first_doc_offset == 2
    assert s2.doc_positions().tolist() == [2, 3, 4, 5, 6]
    s3 = slice_for_rank(cu, 20, 3, 4)  # tokens 15..19: one token of document 2, then document 3
    assert s3.local_cu_seqlens.tolist() == [0, 1, 5] and s3.first_doc_offset == 7
    assert s3.doc_positions().tolist() == [7, 0, 1, 2, 3]
    with pytest.raises(ValueError, match="multiple of parallel.cp"):
        slice_for_rank(cu, 20, 0, 3)


def test_slice_batch_flattens_the_micro_batch_into_one_row():
    batch = {
        "tokens": torch.arange(12).view(2, 6), "labels": torch.arange(12).view(2, 6) + 1,
        "loss_mask": torch.ones(2, 6), "cu_seqlens": torch.tensor([0, 4, 6, 12], dtype=torch.int32),
        "dataset": torch.tensor([0, 1]),
    }
    part, cp = slice_batch(batch, 1, 3)  # tokens 4..7
    assert part["tokens"].tolist() == [[4, 5, 6, 7]] and part["dataset"].tolist() == [0, 0, 1, 1]
    assert cp.local_cu_seqlens.tolist() == [0, 2, 4] and cp.first_doc_offset == 0


def test_affine_maps_compose_like_the_recurrence():
    """The (T, B) map of a stretch taken from the kernel's identity columns, composed over two
    stretches, moves any state as the naive recurrence over both does."""
    q, k, v, g, beta = _inputs(24)
    state0 = torch.randn(1, 2, 8, 6)
    maps = []
    for start, end in ((0, 10), (10, 24)):
        # one stretch that continues a document (first_doc_offset > 0), so T is its full product
        n = end - start
        cp = CPSlice(0, 1, 0, n, n, torch.tensor([0, n], dtype=torch.int32), first_doc_offset=1)
        _, _, slice_map = local_slice_pass(
            *(x[:, start:end] for x in (q, k, v, g, beta)), cp, backend="naive",
        )
        maps.append((slice_map[..., :8], slice_map[..., 8:]))
    t, b = compose_maps(maps[0], maps[1])
    _, want = naive_recurrent_kda(q, k, v, g, beta, initial_state=state0)
    assert torch.allclose(t @ state0[0] + b, want[0], atol=1e-5)


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("cu", [[0, 48], [0, 7, 24, 30, 48], [0, 12, 13, 40, 48]],
                         ids=["one_document", "boundary_at_edge", "boundaries_inside"])
def test_slices_combined_match_one_pass(ranks, cu):
    """Every slice run alone, their maps prefix-combined and their outputs corrected: outputs and
    input gradients equal the naive recurrence over the whole sequence (documents crossing slice
    edges, starting exactly at one, and several inside one slice)."""
    total = 48
    cu = torch.tensor(cu, dtype=torch.int32)
    inputs = _inputs(total, seed=ranks)
    want, _ = naive_recurrent_kda(*inputs, cu_seqlens=cu)
    weights = torch.randn(want.shape, dtype=want.dtype)
    want_grads = torch.autograd.grad((want * weights).sum(), inputs)

    slices = [slice_for_rank(cu, total, r, ranks) for r in range(ranks)]
    passes = []
    for cp in slices:
        part = slice(cp.start, cp.start + cp.length)
        passes.append(local_slice_pass(*(x[:, part] for x in inputs), cp, backend="torch", chunk_size=4))
    maps = torch.stack([p[2] for p in passes])
    states = prefix_states(maps[..., :8], maps[..., 8:])
    got = torch.cat([apply_incoming_state(p[0], p[1], s) for p, s in zip(passes, states)], dim=1)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    grads = torch.autograd.grad((got * weights).sum(), inputs)
    for name, a, b in zip("q k v g beta".split(), grads, want_grads):
        assert torch.allclose(a, b, atol=1e-5), f"d{name}: {(a - b).abs().max()}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels run compiled on a CUDA GPU")
def test_slices_combined_with_the_triton_kernels():
    """The combine through the Triton backend (state maps from V + K value columns, K = V = 128 as
    in Kimi Linear: 256 columns, the kernels' limit) against the naive recurrence."""
    total, dk = 1024, 128
    cu = torch.tensor([0, 100, 300, 700, 1024], dtype=torch.int32)
    inputs = [x.detach().cuda() for x in _inputs(total, heads=2, dk=dk, dv=dk)]
    want, _ = naive_recurrent_kda(*inputs, cu_seqlens=cu.cuda())
    slices = [slice_for_rank(cu, total, r, 4, device="cuda") for r in range(4)]
    passes = [
        local_slice_pass(*(x[:, cp.start : cp.start + cp.length] for x in inputs), cp, backend="triton")
        for cp in slices
    ]
    maps = torch.stack([p[2] for p in passes])
    states = prefix_states(maps[..., :dk], maps[..., dk:])
    got = torch.cat([apply_incoming_state(p[0], p[1], s) for p, s in zip(passes, states)], dim=1)
    assert torch.allclose(got, want, atol=2e-4), (got - want).abs().max()


# ---------------------------------------------------------------------------- CP training parity
# Every CP layout trains from the same initial weights on the same batches as one process (one
# micro-batch a single document over all slice edges, one with document boundaries across, at
# and between the edges: tests/cp_parity.py); losses and gradient norms of each step within
# LOSS_RTOL, final parameters within PARAM_ATOL (as tests/test_parallel_parity.py). All runs share
# one 4-process launch (process start-up dominates on a 2-core machine): CP2 runs as CP2 x DP2,
# each data-parallel replica one of the two micro-batches, so it covers CP2 with and without
# document boundaries at the edges and the gradient reduction over dp x cp. CP2 x PP2 sends the
# sliced activations between stages; CP2 x EP2 dispatches tokens over ranks that hold different
# slices (the expert-parallel group spans the CP ranks).
LOSS_RTOL = 1e-5
PARAM_ATOL = 2e-5
FOUR_PROCESS = {
    "cp2_dp2": dict(cp=2),
    "cp4": dict(cp=4),
    "cp2_tp2": dict(cp=2, tp=2, sequence_parallel=True),
    "cp2_pp2": dict(cp=2, pp=2),
    "cp2_ep2": dict(cp=2, ep=2),
}


@pytest.fixture(scope="module")
def cp_reference(tmp_path_factory, process_groups):
    """Single process: the initial weights, the losses and the final weights."""
    import cp_parity
    from test_parallel_parity import _params

    tmp = tmp_path_factory.mktemp("cp")
    init = str(tmp / "init")
    out = cp_parity.train({}, init, str(tmp / "ref"), str(tmp / "run-ref"), save_init=True)
    return tmp, init, out, _params(str(tmp / "ref"))


@pytest.fixture(scope="module")
def cp_four_process(cp_reference):
    import cp_parity
    from distributed import run_distributed

    tmp, init, _, _ = cp_reference
    return run_distributed(cp_parity.layouts_job, 4, FOUR_PROCESS, init, str(tmp))[0]


def _check_cp(name, got, cp_reference):
    from test_parallel_parity import _params

    tmp, _, ref, ref_params = cp_reference
    assert got["loss"] == pytest.approx(ref["loss"], rel=LOSS_RTOL), f"{name}: {got} vs {ref}"
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=LOSS_RTOL), f"{name}: {got} vs {ref}"
    assert ref["loss"][0] != ref["loss"][-1]  # the steps changed the model
    params = _params(str(tmp / name))
    bad = {
        key: err for key, r in ref_params.items() if r.dtype.is_floating_point
        if (err := (params[key] - r).abs().max().item()) > PARAM_ATOL
    }
    assert not bad, f"{name}: parameters differ: {bad}"


@pytest.mark.parametrize("name", sorted(FOUR_PROCESS))
def test_context_parallel_layout_matches_single_process(name, cp_reference, cp_four_process):
    got = cp_four_process[name]
    assert got["sizes"] == {key: FOUR_PROCESS[name].get(key, 1) for key in ("cp", "tp", "pp", "ep")}
    _check_cp(name, got, cp_reference)


# Block AttnRes under CP: the depth attention is per token, so each rank attends over its slice
# of every block representation; the pseudo-query gradients are summed over dp x cp by DDP, and
# under PP the stages hand on the sliced block representations. Uneven blocks (3 over the 8
# sub-layers), so a block spans the two pipeline stages.
ATTNRES = dict(residual="block_attnres", attnres_blocks=3)
ATTNRES_FOUR_PROCESS = {"attnres_cp2_dp2": dict(cp=2), "attnres_cp2_pp2": dict(cp=2, pp=2)}


@pytest.fixture(scope="module")
def attnres_cp_runs(tmp_path_factory, process_groups):
    """The single-process Block AttnRes run (initial and final weights, losses) and the CP
    layouts from the same initial weights, in one 4-process launch."""
    import cp_parity
    from distributed import run_distributed
    from test_parallel_parity import _params

    tmp = tmp_path_factory.mktemp("cp_attnres")
    init = str(tmp / "init")
    ref = cp_parity.train({}, init, str(tmp / "ref"), str(tmp / "run-ref"), save_init=True, model=ATTNRES)
    runs = run_distributed(cp_parity.layouts_job, 4, ATTNRES_FOUR_PROCESS, init, str(tmp), ATTNRES)[0]
    return (tmp, init, ref, _params(str(tmp / "ref"))), runs


@pytest.mark.parametrize("name", sorted(ATTNRES_FOUR_PROCESS))
def test_block_attnres_under_context_parallelism_matches_single_process(name, attnres_cp_runs):
    reference, runs = attnres_cp_runs
    got = runs[name]
    assert got["sizes"] == {key: ATTNRES_FOUR_PROCESS[name].get(key, 1) for key in ("cp", "tp", "pp", "ep")}
    _check_cp(name, got, reference)


@pytest.mark.parametrize(
    "layout, row, message",
    [
        (dict(cp=4), 36, "multiple of 2 x cp = 8"),
        (dict(cp=2, tp=2, sequence_parallel=True), 20, "multiple of 2 x cp x tp (sequence parallelism) = 8"),
        (dict(cp=8), 16, "fewer than KDA's short-convolution history of 3"),
    ],
)
def test_context_parallel_rejects_rows_it_cannot_cut(layout, row, message):
    import re

    import parity
    from deltatron.model.config import ModelConfig
    from deltatron.parallel.layout import ParallelConfig

    with pytest.raises(ValueError, match=re.escape(message)):
        ParallelConfig(**layout).validate_sequence(row, 1, ModelConfig(**parity.MODEL))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(transformer_impl="transformer_engine"), "set model.transformer_impl=local"),
    ],
)
def test_context_parallel_rejects_what_it_does_not_cover(overrides, message):
    import re

    import parity
    from deltatron.model.config import ModelConfig
    from deltatron.parallel.layout import ParallelConfig

    with pytest.raises(ValueError, match=re.escape(message)):
        ParallelConfig(cp=2).validate(2, ModelConfig(**{**parity.MODEL, **overrides}))


# ---------------------------------------------------------------------------- long-context stages
@pytest.mark.parametrize("stage, gpus", [("long_context_32k", 8), ("long_context_128k", 8), ("long_context_1m", 64)])
def test_long_context_stages_fit_their_layouts(stage, gpus):
    """Each stage of the 4k -> 32k -> 128k -> 1M schedule fits its CP layout on H200s in the
    planner (the numbers in its conf/parallel preset), and 128k would not fit without CP."""
    from deltatron.parallel.planner import plan_from_overrides

    plan = plan_from_overrides(["model=proxy", f"+stage={stage}"], gpus=gpus, gpu="h200")
    assert plan.fits and "cp=1 " not in plan.layout, plan.layout
    assert plan.step_breakdown["context-parallel comm"] > 0
    if stage == "long_context_128k":
        no_cp = plan_from_overrides(["model=proxy", f"+stage={stage}", "parallel.cp=1"], gpus=gpus, gpu="h200")
        assert not no_cp.fits
        # CP divides the activations (up to MLA's gathered K|V of the whole row)
        assert plan.ranks[0].activations < no_cp.ranks[0].activations / 6
