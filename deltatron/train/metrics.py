"""Training-health metrics beyond the loss: MoE routing, KDA gates, gradient norms per parameter
group, the step-time split and the per-rank straggler/memory signal.

Everything here follows one rule: nothing touches the device or the network on a step that does
not log. Model probes are forward hooks installed for the log step only (`ModelProbes.start`) and
accumulate into device tensors; `ModelProbes.collect` reduces all of them in one all-reduce (plus
one MAX all-reduce for the router bias range) on the log step and reads them back in one transfer.
Gradient norms per group are one all-reduce and one read on the log step, from whole reduced
gradients or, under the distributed optimizer, from each rank's own shard of them. Host timers are
`perf_counter` reads; the per-rank numbers are one all_gather of a few floats per log step.

The metric names form one namespace, `METRIC_NAMESPACES` (deltatron.train.namespaces), documented
in the README's "Observability" section; the dashboard (deltatron.train.dashboard) is built from
it.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

from deltatron.train.namespaces import METRIC_NAMESPACES  # noqa: F401  (re-exported)


# ----------------------------------------------------------------------------------- model probes
@dataclass
class _Sums:
    """Device accumulators of one log step, indexed by Kimi layer (0-based)."""

    expert_tokens: torch.Tensor  # [L, E] tokens routed to each expert
    topk_changed: torch.Tensor  # [L, 2] probe tokens whose expert set changed, probe tokens
    kda: torch.Tensor  # [L, 4] sum exp(g), count, sum beta, count
    bias: torch.Tensor  # [L, 2] max expert bias, -min expert bias (MAX-reduced)


class ModelProbes:
    """Forward hooks on megatron-core's routers and on KDA's gate projections for one log step.

    Top-k change: on each log step the router keeps the inputs of up to `probe_tokens` tokens of
    its first micro-batch and the experts it chose for them; on the next log step it routes those
    same inputs again with its current weights and expert bias, and reports the fraction of tokens
    whose expert set differs. That isolates the router's own drift (weights and load-balancing
    bias) from changes in the hidden states feeding it, at one small matmul per layer.
    """

    def __init__(self, model_chunks: list, num_layers: int, num_experts: int, probe_tokens: int = 1024):
        from megatron.core.transformer.moe.router import TopKRouter

        from deltatron.model.kda import KimiDeltaAttention

        modules = [m for chunk in model_chunks for m in chunk.modules()]
        self.routers = [m for m in modules if isinstance(m, TopKRouter)]
        self.kda = [m for m in modules if isinstance(m, KimiDeltaAttention)]
        self.num_layers, self.num_experts = num_layers, max(num_experts, 1)
        self.probe_tokens = probe_tokens
        params = [p for chunk in model_chunks for p in chunk.parameters()]
        self.device = params[0].device if params else torch.device("cpu")
        self._sums: Optional[_Sums] = None
        self._hooks: list = []
        self._probe: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (inputs, top-k map)
        self._probed: set[int] = set()

    @staticmethod
    def _layer(sublayer_number: int) -> int:
        return (sublayer_number - 1) // 2  # two hybrid sub-layers per Kimi layer

    def start(self) -> None:
        """Record during the next forward passes (call before a log step's train_step)."""
        L, E, dev = self.num_layers, self.num_experts, self.device
        self._sums = _Sums(
            torch.zeros(L, E, dtype=torch.float64, device=dev), torch.zeros(L, 2, dtype=torch.float64, device=dev),
            torch.zeros(L, 4, dtype=torch.float64, device=dev), torch.full((L, 2), float("-inf"), device=dev),
        )
        self._probed = set()
        for r in self.routers:
            self._hooks.append(r.register_forward_hook(self._on_router))
        for k in self.kda:
            self._hooks.append(k.linear_f_b.register_forward_hook(functools.partial(self._on_decay, k)))
            self._hooks.append(k.linear_beta.register_forward_hook(functools.partial(self._on_beta, k)))

    @torch.no_grad()
    def _on_router(self, router, args, output) -> None:
        layer = self._layer(router.layer_number)
        routing_map = output[1]  # [tokens, experts] bool
        self._sums.expert_tokens[layer] += routing_map.sum(0).double()
        if router.expert_bias is not None:
            b = router.expert_bias.float()
            self._sums.bias[layer] = torch.stack([b.max(), -b.min()])
        if layer in self._probed or not router.training:
            return
        self._probed.add(layer)  # one probe per layer and log step: its first micro-batch
        x = args[0].detach().reshape(-1, args[0].shape[-1])[: self.probe_tokens]
        if layer in self._probe:
            old_x, old_map = self._probe[layer]
            # megatron-core's top-k selection itself, not router.routing(): that would count these
            # tokens into the expert-bias update and run its compiled bias step in another grad mode
            c = router.config
            _, new_map = topk_routing_with_score_function(
                router.gating(old_x.unsqueeze(1)).view(-1, c.num_moe_experts), router.topk,
                use_pre_softmax=c.moe_router_pre_softmax, num_groups=c.moe_router_num_groups,
                group_topk=c.moe_router_group_topk, scaling_factor=c.moe_router_topk_scaling_factor,
                score_function=router.score_function, expert_bias=router.expert_bias, fused=c.moe_router_fusion,
            )
            changed = (new_map != old_map).any(dim=1).double()
            self._sums.topk_changed[layer] += torch.stack([changed.sum(), changed.new_tensor(float(changed.numel()))])
        self._probe[layer] = (x.clone(), routing_map[: x.shape[0]].clone())

    @torch.no_grad()
    def _on_decay(self, kda, module, args, output) -> None:
        # the same gate as KimiDeltaAttention.forward: g = -exp(A_log) * softplus(f_b(f_a(x)) + dt_bias)
        gate_in = output[0].float() + kda.dt_bias
        g = -kda.A_log.exp()[:, None] * torch.nn.functional.softplus(gate_in.view(*gate_in.shape[:-1], kda.local_heads, -1))
        row = self._sums.kda[self._layer(kda.layer_number)]
        row[0] += g.exp().sum().double()
        row[1] += g.numel()

    @torch.no_grad()
    def _on_beta(self, kda, module, args, output) -> None:
        beta = torch.sigmoid(output[0].float())
        row = self._sums.kda[self._layer(kda.layer_number)]
        row[2] += beta.sum().double()
        row[3] += beta.numel()

    def collect(self) -> dict[str, object]:
        """Stop recording; the step's moe/ and kda/ metrics, reduced over every rank (collective
        over the world: ranks contribute zeros for layers they do not hold). {} if not started."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        s, self._sums = self._sums, None
        if s is None:
            return {}
        flat = torch.cat([s.expert_tokens.flatten(), s.topk_changed.flatten(), s.kda.flatten()])
        bias = s.bias.flatten().clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flat)
            dist.all_reduce(bias, op=dist.ReduceOp.MAX)
        L, E = self.num_layers, self.num_experts
        # one device-to-host read for everything
        tokens, changed, kda, bias = torch.cat([flat, bias.double()]).cpu().split([L * E, L * 2, L * 4, L * 2])
        tokens, changed, kda, bias = tokens.view(L, E), changed.view(L, 2), kda.view(L, 4), bias.view(L, 2)
        out: dict[str, object] = {}
        worst = 0.0
        for layer in range(L):
            n = f"layer{layer + 1}"
            total = float(tokens[layer].sum())
            if total > 0:
                # load relative to a perfectly balanced router (1.0 each): invariant to how many
                # ranks saw the same tokens (tensor parallelism without sequence parallelism)
                load = tokens[layer] * E / total
                out[f"moe/{n}/load"] = [round(float(v), 4) for v in load]
                out[f"moe/{n}/max_load"] = float(load.max())
                out[f"moe/{n}/min_load"] = float(load.min())
                worst = max(worst, float(load.max()))
                if torch.isfinite(bias[layer]).all():
                    out[f"moe/{n}/bias_range"] = float(bias[layer, 0] + bias[layer, 1])
                if changed[layer, 1] > 0:
                    out[f"moe/{n}/topk_changed"] = float(changed[layer, 0] / changed[layer, 1])
            if kda[layer, 1] > 0:
                out[f"kda/{n}/decay"] = float(kda[layer, 0] / kda[layer, 1])
                out[f"kda/{n}/beta"] = float(kda[layer, 2] / kda[layer, 3])
        if worst:
            out["moe/max_load"] = worst
        return out


# ----------------------------------------------------------------------------------- gradients
def param_group(name: str) -> str:
    """The `optim/grad_norm/{g}` group of a parameter, from its megatron-core module path."""
    if "embedding" in name or "output_layer" in name:
        return "embedding"
    if ".router." in name:
        return "router"
    if ".experts." in name and "shared_experts" not in name:
        return "experts"
    if "self_attention" in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    return "other"  # final norm, AttnRes pseudo-queries


GRAD_GROUPS = ("embedding", "attention", "router", "experts", "mlp", "other")


def shard_range(bucket_numel: int, dp_rank: int, dp_size: int) -> tuple[int, int]:
    """[start, end) of a grad bucket that data-parallel rank `dp_rank` reduces under the
    distributed optimizer: megatron-core's `shard_buffer` cuts each bucket (padded to a multiple
    of dp_size) into dp_size equal contiguous pieces, and its reduce-scatter leaves the reduced
    gradient of piece r on rank r only."""
    size = bucket_numel // dp_size
    return dp_rank * size, (dp_rank + 1) * size


def owned_grad(main_grad: torch.Tensor, param_range: tuple[int, int], shard: tuple[int, int]) -> torch.Tensor:
    """The elements of a parameter's gradient (flattened) that lie in this rank's shard; empty if
    none. param_range and shard are [start, end) offsets in the same bucket (`bucket.param_to_index`
    and `shard_range`); a parameter may straddle shard boundaries, so any part of it can be owned."""
    lo, hi = max(param_range[0], shard[0]), min(param_range[1], shard[1])
    start = param_range[0]
    return main_grad.view(-1)[max(lo - start, 0) : max(hi - start, 0)]


def _whole_grads(model_chunks: list):
    """(name, param, reduced gradient, is expert) per parameter after DDP's all-reduce."""
    for chunk in model_chunks:
        for name, p in chunk.named_parameters():
            grad = getattr(p, "main_grad", None)
            if grad is None:
                grad = p.grad
            if grad is not None:
                yield name, p, grad, not getattr(p, "allreduce", True)


def _owned_grad_shards(model_chunks: list):
    """(name, param, the reduced gradient elements this rank owns, is expert) per parameter part
    under the distributed optimizer, walking megatron-core DDP's grad buffers (dense and expert,
    each sharded over its own data-parallel group) bucket by bucket."""
    for chunk in model_chunks:
        names = {p: n for n, p in chunk.named_parameters()}
        for expert, buffers in ((False, chunk.buffers), (True, chunk.expert_parallel_buffers)):
            for buffer in buffers:
                group = buffer.data_parallel_group
                for bucket in buffer.buckets:
                    shard = shard_range(bucket.grad_data.numel(), group.rank(), group.size())
                    for p in bucket.params_list:
                        yield names[p], p, owned_grad(p.main_grad, bucket.param_to_index[p], shard), expert


def grad_norms_by_group(model_chunks: list, sharded: bool = False) -> dict[str, float]:
    """optim/grad_norm/{group}: L2 norms of the reduced gradients (before clipping); one
    all-reduce and one device-to-host read. Call after the gradient reduction, before the step.

    sharded=False (megatron-core DDP all-reduces): every rank holds its parameters' whole reduced
    gradients (`main_grad`); the world all-reduce counts each data-parallel replica, so each sum is
    divided by its replica count. sharded=True (the distributed optimizer reduce-scatters): each
    rank holds the reduced values only on its shard of each grad bucket and sums just those, so
    every element is counted once, by its owner. Tensor-parallel duplicates count once either way.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    device = next(p.device for chunk in model_chunks for p in chunk.parameters())
    sums = torch.zeros(2, len(GRAD_GROUPS), dtype=torch.float64, device=device)  # [dense/expert, group] squared sums
    grads = _owned_grad_shards(model_chunks) if sharded else _whole_grads(model_chunks)
    for name, p, grad, expert in grads:
        if param_is_not_tensor_parallel_duplicate(p):
            sums[int(expert), GRAD_GROUPS.index(param_group(name))] += grad.detach().double().pow(2).sum()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
        if not sharded:
            sums[0] /= parallel_state.get_data_parallel_world_size(with_context_parallel=True)
            sums[1] /= parallel_state.get_expert_data_parallel_world_size()
    sq = sums.sum(0).cpu().tolist()
    return {f"optim/grad_norm/{g}": math.sqrt(sq[i]) for i, g in enumerate(GRAD_GROUPS) if sq[i] > 0}


# ----------------------------------------------------------------------------------- timers, ranks
@dataclass
class StepTimer:
    """Host-side seconds per phase, summed over the steps since the last log step.

    On a GPU the phases end when their kernels are queued, not run; the loss read-back at the end
    of forward-backward (it is needed on every step anyway) and the synchronize before the log
    line make the window's total exact, while the split between phases is as good as the host's
    view of an asynchronous device.
    """

    totals: dict[str, float] = field(default_factory=lambda: {"data_wait": 0.0, "forward_backward": 0.0, "optimizer": 0.0})
    steps: int = 0
    window_start: float = field(default_factory=time.perf_counter)

    def add(self, phase: str, seconds: float) -> None:
        self.totals[phase] += seconds

    def read(self) -> dict[str, float]:
        """The window's mean seconds per step (per phase and in total), then a new window."""
        steps = max(self.steps, 1)
        now = time.perf_counter()
        out = {f"perf/{k}_s": v / steps for k, v in self.totals.items()}
        out["perf/step_time_s"] = (now - self.window_start) / steps
        self.totals = {k: 0.0 for k in self.totals}
        self.steps, self.window_start = 0, now
        return out


def rank_stats(step_time: float, device: torch.device) -> dict[str, float]:
    """Straggler and memory signal: one all_gather of [step time, peak GB, reserved GB] per rank.

    perf/straggler_ratio is the slowest rank's mean step time over the median rank's (1.0: none
    slower); system/* give this rank's (rank 0's) memory and the maximum over ranks.
    """
    if device.type == "cuda":
        peak, reserved = torch.cuda.max_memory_allocated() / 1e9, torch.cuda.memory_reserved() / 1e9
    else:
        import resource

        peak = reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB -> GB (Linux)
    mine = torch.tensor([step_time, peak, reserved], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
        table = torch.stack(gathered).cpu()
    else:
        table = mine.cpu().unsqueeze(0)
    times = table[:, 0].tolist()
    median = statistics.median(times)
    slowest = max(range(len(times)), key=times.__getitem__)
    mem_rank = max(range(len(times)), key=lambda r: float(table[r, 1]))
    return {
        "perf/straggler_ratio": times[slowest] / median if median > 0 else 1.0,
        "perf/slowest_rank": slowest,
        "system/peak_memory_gb": peak,
        "system/reserved_memory_gb": reserved,
        "system/max_peak_memory_gb": float(table[:, 1].max()),
        "system/max_reserved_memory_gb": float(table[:, 2].max()),
        "system/max_memory_rank": mem_rank,
    }
