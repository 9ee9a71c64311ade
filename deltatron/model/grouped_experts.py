"""Routed experts as two grouped GEMMs (torch._grouped_mm) instead of a Python loop over experts.

megatron-core 0.19.2 has a grouped-GEMM expert module only through Transformer Engine
(`TEGroupedMLP`); its local spec runs `SequentialMLP`, one MLP call per expert: for 32 experts
that is ~200 kernel launches per layer and pass, each GEMM a few microseconds of work, plus a
`tolist()` of the token counts. `GroupedGemmExperts` keeps `SequentialMLP`'s parameters
(`local_experts.{i}.linear_fc1/linear_fc2`, so state dicts, dist-checkpointing keys, expert
parallel sharding, the optimizer's parameter groups and Hugging Face name mapping are unchanged)
and only replaces the computation:

    x [N, d] (tokens sorted by expert)  ->  fc1: grouped_mm(x, W1^T [E, d, 2f])  -> [N, 2f]
    -> SwiGLU, times the routing prob (as megatron-core's MLP: in the prob's dtype, cast back)
    -> fc2: grouped_mm(h, W2^T [E, f, d]) -> [N, d]

The weights are stacked each call ([E, 2f, d] and [E, d, f]: one copy of the experts' weights,
memory-bound and small next to the GEMMs), and stacked again in the backward rather than kept
until then (`restacked_in_backward`); autograd splits the stacked gradient back onto each
expert's parameter, so megatron-core's DDP gradient hooks see ordinary per-parameter gradients.

Each expert's group is padded to `ALIGN_TOKENS` rows (zeros, dropped again afterwards) so every
group starts 16-byte aligned for the CUDA grouped-GEMM kernel, with device-side index arithmetic
only: no host synchronisation in the experts. torch._grouped_mm also runs on CPU (a reference
loop inside PyTorch), so the CPU tests exercise this exact code.

Configurations this path does not cover (expert tensor parallelism > 1, biases, FP8/FP4, gates
other than SwiGLU, probs applied on the input, CUDA tensors other than bf16) fall back to
`SequentialMLP.forward`.
"""

from __future__ import annotations

import functools

import torch

from megatron.core.transformer.moe.experts import SequentialMLP

from deltatron.kernels.swiglu import swiglu
from deltatron.model.mlp import plain_swiglu

# Rows per expert group are rounded up to this many: 8 bf16 rows = 16 bytes of leading dimension
# for the grouped kernel's operands; 16 also keeps fp8-style alignment for later use.
ALIGN_TOKENS = 16


def padded_positions(tokens_per_expert: torch.Tensor, num_tokens: int, align: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Where each expert-sorted token goes when every expert's group is padded to `align` rows.

    tokens_per_expert: [E] int (any device); num_tokens: N = its sum (known on the host: the
    dispatcher's output size). Returns (rows [N] int64: padded row of each token, offs [E] int32:
    cumulative end of every padded group, padded_total: an upper bound N + E*(align-1) that needs
    no device read).
    """
    counts = tokens_per_expert.to(torch.int64)
    padded = (counts + align - 1) // align * align
    padded_end = torch.cumsum(padded, 0)
    start = torch.cumsum(counts, 0) - counts  # first sorted index of every expert
    padded_start = padded_end - padded
    expert_of_token = torch.repeat_interleave(
        torch.arange(counts.numel(), device=counts.device), counts, output_size=num_tokens
    )
    idx = torch.arange(num_tokens, device=counts.device)
    rows = idx - start[expert_of_token] + padded_start[expert_of_token]
    padded_total = num_tokens + counts.numel() * (align - 1)
    return rows, padded_end.to(torch.int32), padded_total


def grouped_swiglu(
    x: torch.Tensor, probs: torch.Tensor, offs: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """Grouped SwiGLU experts on expert-sorted rows.

    x: [M, d] rows grouped by expert (group i ends at offs[i]; rows past offs[-1] are ignored and
    their output rows are unspecified); probs: [M] routing weights; w1: [E, 2f, d] (gate then up, megatron-core's
    GLU order); w2: [E, d, f]. Returns [M, d] in x's dtype.
    """
    h = torch._grouped_mm(x, w1.transpose(-2, -1), offs=offs)  # [M, 2f]
    h = swiglu(h, probs)  # megatron-core's MLP: silu(gate) * up, times the probs in their dtype
    return torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)  # [M, d]


class GroupedGemmExperts(SequentialMLP):
    """`SequentialMLP` with the same parameters, computed as two grouped GEMMs (module docstring).

    forward(permuted tokens [N, d], tokens_per_expert [E_local], permuted_probs [N]) ->
    (output [N, d], None), the interface megatron-core's MoELayer calls its experts with.
    """

    def _grouped_supported(self) -> bool:
        cfg = self.config
        return (
            self.num_local_experts > 1
            and self.tp_group.size() == 1
            and plain_swiglu(cfg)
            and not (cfg.fp8 or cfg.fp4)
            and not cfg.moe_apply_probs_on_input
        )

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        x = permuted_local_hidden_states
        # CUDA's grouped kernel takes bf16 only (fp32 GPU runs keep the loop); CPU takes any float
        dtype_ok = x.device.type == "cpu" or x.dtype == torch.bfloat16
        if not (dtype_ok and self._grouped_supported()):
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        num_tokens = x.shape[0]
        fc1 = [e.linear_fc1.weight for e in self.local_experts]
        fc2 = [e.linear_fc2.weight for e in self.local_experts]
        w1, w2 = torch.stack(fc1), torch.stack(fc2)  # [E, 2f, d], [E, d, f]
        tokens_per_expert = torch.as_tensor(tokens_per_expert).to(x.device, non_blocking=True)
        rows, offs, padded_total = padded_positions(tokens_per_expert, num_tokens, ALIGN_TOKENS)
        x_padded = x.new_zeros(padded_total, x.shape[1]).index_copy(0, rows, x)
        probs_padded = permuted_probs.new_zeros(padded_total).index_copy(0, rows, permuted_probs)
        with restacked_in_backward({w1: fc1, w2: fc2}):
            out = grouped_swiglu(x_padded, probs_padded, offs, w1, w2)
        return take_unique_rows(out, rows), None


def wait_for_expert_param_gather(ddp) -> None:
    """Make megatron-core DDP's overlapped parameter all-gather (`overlap_param_gather`) finish
    for the experts' weights before `GroupedGemmExperts` reads them.

    DDP waits for a gather in a forward pre-hook on each module, for that module's own
    parameters (recurse=False). The grouped path stacks its experts' weights without calling
    their modules, so those hooks never ran: with the distributed optimizer or MuonClip every
    replica but a weight's owner kept the previous step's experts (found by MuonClip's
    dp2_overlap parity test). One more pre-hook, on each GroupedGemmExperts, waits for the
    bucket groups of all its parameters. ddp: a megatron-core DistributedDataParallel."""
    if not ddp.ddp_config.overlap_param_gather:
        return
    for module in ddp.module.modules():
        if isinstance(module, GroupedGemmExperts):
            module.register_forward_pre_hook(functools.partial(_finish_param_gather, ddp))


def _finish_param_gather(ddp, module: torch.nn.Module, args) -> None:
    groups = {id(g): g for p in module.parameters() if (g := ddp.param_to_bucket_group.get(p)) is not None}
    for group in groups.values():  # the same chaining of the next gather as DDP's own hook
        group.finish_param_sync(skip_next_bucket_dispatch=ddp.ddp_config.align_param_gather)


class _TakeUniqueRows(torch.autograd.Function):
    """x.index_select(0, rows) for rows without repeats, whose backward writes each gradient row
    to its place (index_copy) instead of index_select's accumulating index_add, which on CUDA
    adds bf16 rows with atomics: 0.55 ms per MoE layer and micro-batch of the proxy on an H200
    (bench/results/train_throughput_h200.profile.txt, indexFuncLargeIndex)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.num_rows = x.shape[0]
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rows,) = ctx.saved_tensors
        grad_x = grad.new_zeros((ctx.num_rows, *grad.shape[1:])).index_copy_(0, rows, grad)
        return grad_x, None


def take_unique_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [M, ...] at rows [N] (distinct indices, N <= M) -> [N, ...], differentiable in x."""
    return _TakeUniqueRows.apply(x, rows)


def restacked_in_backward(stacks: dict):
    """Saved-tensor hooks under which autograd keeps, for a stacked weight it saves for backward
    (grouped_mm saves its operands), the list of expert parameters instead of the stacked copy,
    and stacks them again when the backward needs them.

    stacks: {stacked tensor [E, ...]: the E parameters it was stacked from}. Without this the
    forward keeps a copy of every expert's weights per layer until the backward: 32 x 3 x
    1024 x 1024 bf16 = 201 MB per MoE layer of the proxy, 2.2 GB per micro-batch in flight. The
    parameters do not change between forward and backward, so the restacked tensor is equal, with
    the same strides: the backward runs torch's own grouped-GEMM formulas on the same layouts.
    Every other saved tensor goes to the hooks that were active outside (activation offloading,
    memory accounting), which saved-tensor hooks do not do by themselves: the innermost win.
    """
    # storage address -> (storage offset of the stack, its parameters); no tensor is held here,
    # since autograd keeps these hooks alive as long as the graph
    by_storage = {w.untyped_storage().data_ptr(): (w.storage_offset(), params) for w, params in stacks.items()}
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)  # (pack, unpack) or None

    def pack(t: torch.Tensor):
        found = by_storage.get(t.untyped_storage().data_ptr()) if t.device.type != "meta" else None
        if found is None:
            return ("outer", outer[0](t) if outer else t)
        stack_offset, params = found
        # the saved tensor is the stack itself or a view of it (the transposed operand)
        return ("restack", (params, t.size(), t.stride(), t.storage_offset() - stack_offset))

    def unpack(saved):
        kind, value = saved
        if kind == "outer":
            return outer[1](value) if outer else value
        params, size, stride, offset = value
        restacked = torch.stack(params)
        return restacked.as_strided(size, stride, restacked.storage_offset() + offset)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)
