"""The output layer and its cross entropy by blocks of tokens (train.cross_entropy_chunk_size).

megatron-core computes the loss as logits = output_layer(hidden) ([T, V/tp] in the weight dtype),
then vocab_parallel_cross_entropy on them, which keeps an fp32 copy turned in place into the
softmax for its backward: about (2 + 4 + 4) bytes per token and vocab entry at bf16, 100 GiB for
64k tokens of a 163,840-entry vocabulary. `chunked_vocab_parallel_cross_entropy` computes the same
per-token loss `chunk` tokens at a time and keeps only the output layer's input, the weight, the
labels and one fp32 log-sum-exp per token; the backward recomputes each block's logits to form the
gradients of the hidden states and of the weight. The extra memory is one block's logits at a
time (forward and backward) and, for a weight in bf16, an fp32 [V/tp, h] accumulator for its
gradient.

The arithmetic is megatron-core's (tensor_parallel/cross_entropy.py, VocabParallelCrossEntropy's
helpers are called per block): logits in the weight dtype, then fp32 for the maximum, exp-sum,
target logit and softmax; labels outside this tensor-parallel rank's vocab range contribute no
target logit here (so a label outside the whole vocab, e.g. -100, gets loss log-sum-exp and no
one-hot term, exactly as in megatron-core; the trainer's loss mask removes such tokens). Under
tensor parallelism the three per-token statistics are all-reduced over the TP group once, after
the last block: the maximum with MAX, the exp-sums rescaled to the global maximum and the target
logits with SUM, as megatron-core's forward does per call. The output layer's input goes through
megatron-core's own mappings first: the sequence-parallel all-gather (reduce-scatter of the
gradient) or the copy to the TP region (all-reduce of the gradient), as ColumnParallelLinear does.

`ChunkedLossOutputLayer` is megatron-core's ColumnParallelLinear that, while `defer_logits` is set
(KimiLinearModel.forward with labels, deltatron/model/model.py), returns a `DeferredLogits` (its
input and weight) instead of logits; the model's compute_language_model_loss then runs the blocked
loss on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.tensor_parallel.utils import VocabUtility
from megatron.core.utils import get_pg_rank, get_pg_size


def _target_mask(target: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels outside [start, end), their index into this rank's vocab range or 0): megatron-core's
    masking in calculate_predicted_logits."""
    mask = (target < start) | (target >= end)
    masked = (target - start).masked_fill(mask, 0)
    return mask, masked


class _ChunkedVocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, chunk: int, tp_group):
        # hidden [N, h] in the weight dtype, weight [V/tp, h], target [N] int64
        n, vp = hidden.shape[0], weight.shape[0]
        rank, world = get_pg_rank(tp_group), get_pg_size(tp_group)
        start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(vp, rank, world)
        f32 = dict(dtype=torch.float32, device=hidden.device)
        local_max, sum_exp, predicted = (torch.empty(n, **f32) for _ in range(3))
        target_mask = torch.empty(n, dtype=torch.bool, device=hidden.device)
        for r0 in range(0, n, chunk):
            r1 = min(n, r0 + chunk)
            logits = torch.matmul(hidden[r0:r1], weight.t())
            logits, m = VocabParallelCrossEntropy.calculate_logits_max(logits)
            mask, _, pred, s, _ = VocabParallelCrossEntropy.calculate_predicted_logits(
                logits, target[r0:r1], m, start, end
            )
            del logits
            local_max[r0:r1], sum_exp[r0:r1], predicted[r0:r1], target_mask[r0:r1] = m, s, pred, mask
        if world > 1:
            global_max = local_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
            shift = local_max - global_max  # <= 0; 0 on the rank that holds the maximum
            sum_exp.mul_(torch.exp(shift))
            # target logit minus the global maximum, from the one rank that holds the target
            predicted.add_(shift.masked_fill_(target_mask, 0.0))
            dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=tp_group)
            dist.all_reduce(predicted, op=dist.ReduceOp.SUM, group=tp_group)
        else:
            global_max = local_max
        loss = torch.log(sum_exp) - predicted  # megatron-core's calculate_cross_entropy_loss
        lse = global_max.add_(torch.log(sum_exp))  # log-sum-exp of the full vocab row
        ctx.save_for_backward(hidden, weight, target, lse)
        ctx.chunk, ctx.range = chunk, (start, end)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, target, lse = ctx.saved_tensors
        start, end = ctx.range
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_loss = grad_loss.float()
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # the weight's gradient summed over blocks in fp32 (a bf16 weight's gradient would lose
        # the blocks' low bits otherwise)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for r0 in range(0, hidden.shape[0], ctx.chunk):
            r1 = min(hidden.shape[0], r0 + ctx.chunk)
            h = hidden[r0:r1]
            logits = torch.matmul(h, weight.t()).float()
            softmax = logits.sub_(lse[r0:r1].unsqueeze(-1)).exp_()
            mask, masked_target = _target_mask(target[r0:r1], start, end)
            grad_2d, arange_1d, softmax_update, grad_input = (
                VocabParallelCrossEntropy.prepare_gradient_calculation_operands(softmax, mask)
            )
            grad_logits = VocabParallelCrossEntropy.calculate_gradients(
                grad_2d, arange_1d, masked_target, softmax_update, grad_input, grad_loss[r0:r1]
            ).to(weight.dtype)  # as the logits' .float() hands its gradient back to the matmul
            del logits, softmax, grad_2d, grad_input
            if need_hidden:
                torch.matmul(grad_logits, weight, out=grad_hidden[r0:r1])
            if need_weight:
                if grad_weight.dtype == grad_logits.dtype:
                    grad_weight.addmm_(grad_logits.t(), h)
                else:
                    grad_weight.add_(torch.matmul(grad_logits.t(), h))
            del grad_logits
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def chunked_vocab_parallel_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int, tp_group
) -> torch.Tensor:
    """Per-token cross entropy of logits = hidden @ weight^T against labels, `chunk` tokens at a
    time, without keeping any [tokens, vocab] tensor.

    hidden: [s, b, h], the whole sequence of this tensor-parallel group (gathered under sequence
    parallelism; the caller's mapping reduces its gradient over the TP group). weight: this rank's
    vocab shard [V/tp, h]. labels: [b, s]. Returns the loss [b, s] in fp32, as megatron-core's
    LanguageModule.compute_language_model_loss.
    """
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    s, b, h = hidden.shape
    flat = hidden.reshape(s * b, h).to(weight.dtype)
    target = labels.transpose(0, 1).reshape(s * b).long()  # [b s] -> [s b], as megatron-core
    loss = _ChunkedVocabParallelCrossEntropy.apply(flat, weight, target, chunk, tp_group)
    return loss.view(s, b).transpose(0, 1).contiguous()


@dataclass
class DeferredLogits:
    """What ChunkedLossOutputLayer returns instead of logits: the output layer's input (after its
    tensor-parallel mapping) and weight, for the blocked loss."""

    hidden: torch.Tensor
    weight: torch.Tensor
    tp_group: object


class ChunkedLossOutputLayer(ColumnParallelLinear):
    """megatron-core's vocab-parallel output layer; while `defer_logits` is set its forward
    returns (DeferredLogits, None) instead of (logits, bias). Same parameters and state dict."""

    defer_logits: bool = False

    def forward(self, input_, weight: Optional[torch.Tensor] = None, runtime_gather_output: Optional[bool] = None):
        if not self.defer_logits:
            return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        if weight is None:
            weight = self.weight
        if self.bias is not None or self.gather_output or runtime_gather_output:
            raise RuntimeError("the chunked output-layer loss needs the vocab-parallel output layer without bias or gather")
        if self.gradient_accumulation_fusion or self.config.defer_embedding_wgrad_compute:
            raise RuntimeError(
                "train.cross_entropy_chunk_size does not support gradient_accumulation_fusion or "
                "defer_embedding_wgrad_compute (the output layer's weight gradient goes through autograd)"
            )
        if self.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=True, group=self.tp_group)
        else:
            hidden = copy_to_tensor_model_parallel_region(input_, group=self.tp_group)
        return DeferredLogits(hidden, weight, self.tp_group), None


__all__ = [
    "chunked_vocab_parallel_cross_entropy", "ChunkedLossOutputLayer", "DeferredLogits",
]
