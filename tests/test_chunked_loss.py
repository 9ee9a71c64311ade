"""The output-layer loss by blocks of tokens (train.cross_entropy_chunk_size,
deltatron/model/chunked_loss.py): the same per-token loss and gradients as megatron-core's output
layer + vocab_parallel_cross_entropy (the function, the model with tied and untied embeddings, whole
trainer steps, tensor parallelism with and without sequence parallelism in 2 processes), and no
[tokens, vocab] tensor kept for the backward."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import parity

from deltatron.model.config import ModelConfig
from deltatron.model.model import build_model, packed_seq_params
from deltatron.train.config import TrainConfig

SMALL = dict(
    vocab_size=512, hidden_size=64, num_layers=4, kda_num_heads=2, kda_head_dim=16,
    mla_num_heads=2, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    dense_ffn_hidden_size=128, num_experts=4, moe_ffn_hidden_size=32, moe_topk=2,
)
SEQ = 48
CU = torch.tensor([0, 17, SEQ], dtype=torch.int32)


# ------------------------------------------------------------------ the function
def _function_case(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    s, b, h, v = 37, 2, 24, 300
    hidden = (torch.randn(s, b, h, generator=g) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (b, s), generator=g)
    labels[0, 3] = -100  # outside the vocab: megatron-core gives it loss log-sum-exp, masked out here
    mask = (torch.rand(b, s, generator=g) > 0.3).float()
    mask[0, 3] = 0.0
    return hidden, weight, labels, mask


def _megatron_core(hidden, weight, labels, mask):
    from megatron.core import parallel_state, tensor_parallel

    logits = hidden @ weight.t()  # the output layer in one process: [s, b, V]
    loss = tensor_parallel.vocab_parallel_cross_entropy(
        logits, labels.t().contiguous(), tp_group=parallel_state.get_tensor_model_parallel_group()
    ).t()
    (loss * mask).sum().backward()
    return loss.detach(), hidden.grad, weight.grad


def _chunked(hidden, weight, labels, mask, chunk):
    from megatron.core import parallel_state

    from deltatron.model.chunked_loss import chunked_vocab_parallel_cross_entropy

    hidden, weight = (x.detach().clone().requires_grad_() for x in (hidden, weight))
    loss = chunked_vocab_parallel_cross_entropy(
        hidden, weight, labels, chunk, parallel_state.get_tensor_model_parallel_group()
    )
    (loss * mask).sum().backward()
    return loss.detach(), hidden.grad, weight.grad


# 74 = s * b tokens in one block; 16 and 5 do not divide 74; 1 token per block; more than T
@pytest.mark.parametrize("chunk", [1, 5, 16, 37, 74, 1000])
def test_chunked_loss_matches_vocab_parallel_cross_entropy(chunk, process_groups):
    case = _function_case()
    ref = _megatron_core(*(x.detach().clone().requires_grad_() if x.is_floating_point() and x.requires_grad else x
                           for x in case))
    out = _chunked(*case, chunk)
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # masked tokens get no gradient; the out-of-vocab label's loss is the log-sum-exp, as in megatron-core
    assert out[1][3, 0].abs().max() == 0


def test_chunked_loss_in_bf16_matches_within_bf16_rounding(process_groups):
    """bf16 weight and hidden states: logits in bf16, softmax and accumulation in fp32, as
    megatron-core (its gradients are summed in one matmul, ours per block in fp32)."""
    case = _function_case(torch.bfloat16)
    ref = _megatron_core(*(x.detach().clone().requires_grad_() if x.is_floating_point() and x.requires_grad else x
                           for x in case))
    out = _chunked(*case, 16)
    assert out[0].dtype == torch.float32 and out[1].dtype == out[2].dtype == torch.bfloat16
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=0)  # the same bf16 logits, the same fp32 math
    for a, b in zip(out[1:], ref[1:]):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_invalid_chunk_size_names_the_problem():
    with pytest.raises(ValueError, match="cross_entropy_chunk_size=-1 must be >= 0"):
        TrainConfig(cross_entropy_chunk_size=-1)


# ------------------------------------------------------------------ the model
def _model_loss_and_grads(chunk: int, model_kw: dict | None = None):
    from deltatron.parallel.cpu_compat import initialize_rng

    initialize_rng(7)
    cfg = ModelConfig(**SMALL, **(model_kw or {}))
    model = build_model(cfg, cross_entropy_chunk_size=chunk)
    tokens = torch.randint(0, SMALL["vocab_size"], (1, SEQ), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(tokens, -1, dims=1)
    mask = torch.ones(1, SEQ)
    mask[0, 16] = mask[0, -1] = 0.0  # document ends
    loss = model(tokens, None, None, labels=labels, packed_seq_params=packed_seq_params(CU, 31))
    assert loss.shape == (1, SEQ) and loss.dtype == torch.float32
    (loss * mask).sum().div(mask.sum()).backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_kw", [{}, {"untie_embeddings": False}], ids=["untied", "tied"])
@pytest.mark.parametrize("chunk", [7, 16, SEQ])
def test_model_with_chunked_loss_gives_the_same_loss_and_gradients(chunk, model_kw, process_groups):
    loss0, grads0 = _model_loss_and_grads(0, model_kw)
    loss1, grads1 = _model_loss_and_grads(chunk, model_kw)
    assert grads0.keys() == grads1.keys() and len(grads0) > 20
    assert any("output_layer" in n or "word_embeddings" in n for n in grads1)
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-6)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-7, msg=name)


def test_model_without_labels_still_returns_logits(process_groups):
    cfg = ModelConfig(**SMALL)
    model = build_model(cfg, cross_entropy_chunk_size=8)
    tokens = torch.randint(0, SMALL["vocab_size"], (1, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(tokens, None, None)
    assert logits.shape == (1, SEQ, SMALL["vocab_size"])


def _saved(chunk: int, tokens_count: int):
    """Storages the forward keeps for the backward (parameters excluded), via saved_tensors_hooks."""
    from deltatron.parallel.cpu_compat import initialize_rng

    initialize_rng(7)
    model = build_model(ModelConfig(**SMALL), cross_entropy_chunk_size=chunk, recompute_granularity="full",
                        recompute_method="uniform", recompute_num_layers=1)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s
        return t

    tokens = torch.randint(0, SMALL["vocab_size"], (1, tokens_count), generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0, tokens_count], dtype=torch.int32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens, None, None, labels=tokens, packed_seq_params=packed_seq_params(cu, tokens_count)).mean()
    loss.backward()
    return [s.nbytes() for s in storages.values()]


def test_chunked_loss_keeps_no_tokens_by_vocab_tensor(process_groups):
    t = 4 * SEQ
    logits_bytes = t * SMALL["vocab_size"] * 4  # fp32 [T, V]
    ref, chunked = _saved(0, t), _saved(16, t)
    assert max(ref) >= logits_bytes  # megatron-core keeps the fp32 softmax
    # nothing larger than one [T, hidden] tensor (a sub-layer input, the output layer's input)
    assert max(chunked) <= t * SMALL["hidden_size"] * 4 < logits_bytes, (max(chunked), logits_bytes)
    assert sum(ref) - sum(chunked) >= logits_bytes, (sum(ref), sum(chunked))


# ------------------------------------------------------------------ the trainer
def _train(run_dir: str, layout: dict, chunk: int, model_overrides: dict | None = None, steps: int = 2):
    """Losses and parameters after `steps` steps of the parity model (tests/parity.py)."""
    cfg = parity.run_config(layout, run_dir, model_overrides)
    cfg.train = dataclasses.replace(cfg.train, cross_entropy_chunk_size=chunk)
    trainer = parity.make_trainer(cfg)
    assert trainer.model[0].config.cross_entropy_chunk_size == chunk
    return parity.train_steps(trainer, steps), parity.float_state(trainer)


def test_trainer_with_chunked_loss_trains_the_same(tmp_path, process_groups):
    """Whole steps through the trainer (DDP, AdamW, MoE expert-bias update): the same losses and
    parameters; 20 tokens per block do not divide the micro-batch's 64. The gradients differ in
    rounding only (softmax as exp(z - logsumexp), the weight's gradient summed per block), which
    Adam's normalisation turns into parameter differences of ~1e-6 after two steps at lr 1e-3
    (tests/test_parallel_parity.py allows 2e-5 between layouts)."""
    loss, state = parity.compare_runs(_train(str(tmp_path / "off"), {}, 0), _train(str(tmp_path / "on"), {}, 20))
    assert loss < 1e-6 and state < 1e-5, (loss, state)


DENSE = {"first_k_dense": 4}  # tensor parallelism without sequence parallelism: a dense model
TWO_PROCESS = {
    # the output layer's input all-gathered over the sequence, its gradient reduce-scattered
    "tp2_sp": (dict(tp=2, sequence_parallel=True), None),
    # the output layer's input copied to the TP region, its gradient all-reduced
    "tp2": (dict(tp=2), DENSE),
}


def test_tensor_parallel_with_chunked_loss_trains_the_same(tmp_path, process_groups):
    """TP2 (vocab-parallel output layer: max, exp-sum and target logit reduced over the TP group),
    with and without sequence parallelism."""
    from distributed import run_distributed

    results = run_distributed(parity.on_off_job, 2, _train, TWO_PROCESS, (0, 20), str(tmp_path))
    for rank_result in results:
        assert rank_result.keys() == TWO_PROCESS.keys()
        for name, (loss, state) in rank_result.items():
            assert loss < 1e-6 and state < 1e-5, (name, loss, state)


# ------------------------------------------------------------------ the planner
def test_planner_counts_one_block_of_logits():
    from deltatron.parallel.planner import GiB, format_plan, plan_from_overrides

    length = 65536
    base = ["model=proxy", f"data.seq_length={length}", f"model.max_sequence_length={length}",
            "train.micro_batch_size=1", "train.global_batch_size=1", "data.document_boundaries=false",
            "train.recompute_granularity=full"]

    def plan(*extra):
        return plan_from_overrides(base + list(extra), gpus=1, gpu="h200")

    whole, chunked = plan(), plan("train.cross_entropy_chunk_size=4096")
    assert whole.ranks[0].transient_kind == "logits + fp32 softmax" and not whole.fits
    # 163,840 vocab x 65,536 tokens x (2 + 4 + 4) bytes
    assert whole.ranks[0].transient == pytest.approx(10 * 163840 * length)
    assert chunked.fits and chunked.cross_entropy_chunk_size == 4096
    assert chunked.ranks[0].peak < whole.ranks[0].peak - 90 * GiB
    # the block: fp32 + bf16 logits of 4096 tokens, the weight's fp32 + bf16 gradient, grad hidden
    loss_term = 6 * 163840 * 4096 + 6 * 163840 * 1024 + 2 * 1024 * length
    small = plan("train.cross_entropy_chunk_size=4096", "train.recompute_granularity=none",
                 "data.seq_length=4096", "model.max_sequence_length=4096")
    assert small.ranks[0].transient_kind == "chunked loss: one block's logits"
    assert small.ranks[0].transient == pytest.approx(6 * 163840 * 4096 + 6 * 163840 * 1024 + 2 * 1024 * 4096)
    assert loss_term < chunked.ranks[0].transient  # at 64k the recomputed unit is the larger transient
    assert chunked.step_seconds > whole.step_seconds  # one more output-layer matmul
    assert "loss by blocks of 4096 tokens" in format_plan(chunked)
    assert "train.cross_entropy_chunk_size=4096" in format_plan(whole)
