"""The CPU compatibility layer that lets megatron-core run on gloo processes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deltatron.parallel import cpu_compat

from distributed import run_distributed

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is inactive with CUDA")


def test_enable_patches_cuda_assumptions_and_is_idempotent():
    assert cpu_compat.enable() is True
    assert cpu_compat.enable() is True
    assert torch.cuda.current_device() == "cpu"
    torch.cuda.synchronize()  # a no-op instead of a "no CUDA" error
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        pass
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer.moe import moe_utils

    assert schedules.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
    assert schedules.torch.float32 is torch.float32  # everything else passes through
    split = moe_utils.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True)
    assert isinstance(split, np.ndarray) and split.tolist() == [1, 2]


SMALL = dict(
    vocab_size=256, hidden_size=64, num_layers=4, kda_num_heads=2, kda_head_dim=16,
    mla_num_heads=2, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    dense_ffn_hidden_size=128, num_experts=4, moe_ffn_hidden_size=32, moe_topk=2,
)


def _loss_and_grad_norm(tp: int, ep: int, dispatcher: str):
    from deltatron.model.config import ModelConfig
    from deltatron.model.model import build_model
    from deltatron.parallel.setup import init_process_groups

    init_process_groups(tp=tp, ep=ep, seed=7)
    cfg = ModelConfig(**SMALL, moe_token_dispatcher=dispatcher)
    # megatron-core's MoE refuses TP without sequence parallelism in training
    model = build_model(
        cfg, tensor_model_parallel_size=tp, expert_model_parallel_size=ep, sequence_parallel=tp > 1
    )
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    loss = model(tokens, None, None, labels=tokens).mean()
    loss.backward()
    return loss.item()


def _tp_parity(rank, world_size):
    # The same seed builds the same full weights whatever the TP size (CPU initialisation splits
    # full tensors), so a TP=2 run must reproduce the TP=1 loss.
    ref = _loss_and_grad_norm(tp=1, ep=1, dispatcher="alltoall")
    tp2 = _loss_and_grad_norm(tp=2, ep=1, dispatcher="alltoall")
    return ref, tp2


def _ep_runs(rank, world_size):
    # The all-to-all dispatcher needs patches 2 and 4 on gloo.
    return _loss_and_grad_norm(tp=1, ep=2, dispatcher="alltoall")


def test_tensor_parallel_forward_backward_on_gloo_matches_one_rank():
    results = run_distributed(_tp_parity, 2)
    for ref, tp2 in results:
        assert tp2 == pytest.approx(ref, rel=1e-5)


def test_expert_parallel_all_to_all_runs_on_gloo():
    losses = run_distributed(_ep_runs, 2)
    assert all(np.isfinite(losses))
