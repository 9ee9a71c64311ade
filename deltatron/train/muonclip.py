"""MuonClip (Kimi K2, arXiv 2507.20534; Moonlight, arXiv 2502.16982) as a sharded optimizer.

Per step, with lr and weight decay wd from the schedule (megatron-core's OptimizerParamScheduler
drives `param_groups` exactly as it drives its own optimizers):

* Muon, for the hidden layers' weight matrices (`muon_params.PARAM_RULE`), per logical matrix G:
      M <- mu M + G;   D = G + mu M (Nesterov) or M;   O = NewtonSchulz5(D) in bf16;
      W <- W (1 - lr wd) - lr * 0.2 sqrt(max(A, B)) * O
  (Moonlight's sum-form momentum; torch.optim.Muon's EMA form differs only by the factor 1 - mu,
  which Newton-Schulz's normalisation removes.)
* AdamW for everything else (torch's AdamW formula, decoupled weight decay).
* QK-clip on every MLA layer after the update (`qk_clip`), before the new weights are shared.

Distribution (`deltatron.parallel.muon_sharding`): megatron-core DDP all-reduces gradients into
`param.main_grad` as for its non-distributed optimizer; then each parameter is updated on one
data-parallel replica only, which keeps its state (fp32 master when the model is bf16, Muon
momentum or Adam moments): optimizer memory is divided by the DP size. Each Muon matrix is
orthogonalised once, on one TP rank of that replica, from its TP shards gathered in bf16 (the
Newton-Schulz precision, `optim.muon_ns_dtype`), and
the slices are scattered back; expert matrices do this inside their expert-data x expert-tensor
grid. The owning replica then broadcasts the new parameters over its DP group.

Order of a step, so that the broadcasts run behind the Newton-Schulz compute rather than after
it (each stage's broadcast is asynchronous, `muon_sharding.dp_broadcast`):

1. clip gradients; QK-clip factors (they depend on the forward's max logits only);
2. AdamW: update the owned parameters, write them into the model, launch their broadcast;
3. Muon in `NS_WAVES` waves (every replica's Muon parameters cut in plan order into runs of about
   equal Newton-Schulz cost, `muon_sharding.split_waves`), per wave: momentum, Newton-Schulz
   (with its TP gather/scatter), update, QK-clip scaling of the wave's MLA weights, write into the
   model, launch the wave's broadcast, then finish the previous stage's broadcast (its transfer
   had this wave's compute to hide behind; at most two stages' buffers are alive);
4. finish the last broadcast.

Every parameter's arithmetic is the same as when the stages ran one after another: the stages only
reorder independent per-tensor work (checked bit for bit on CPU, where Newton-Schulz of a batch
equals that of each matrix; on GPU a smaller batch could select another matmul kernel).

The step has megatron-core's optimizer contract: `step() -> (update_successful, grad_norm,
num_zeros_in_grad)`, gradients clipped to `clip_grad` by their global norm first.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from deltatron.parallel.muon_sharding import (
    Grid, PendingBroadcast, WorkItem, dense_grid, dp_broadcast, expert_grid, newton_schulz_cost,
    plan_owners, tp_gather, tp_scatter,
)
from deltatron.train.config import OptimConfig
from deltatron.train.muon_params import Block, FusedLayout, ParamSpec, classify, summarize
from deltatron.train.newton_schulz import muon_update_scale, newton_schulz
from deltatron.train.qk_clip import LayerClip, QKClip, mla_attentions

# Waves the Muon parameters of each replica are cut into. Wave w's broadcast runs during wave
# w + 1's Newton-Schulz, so only the last wave's broadcast (~1/NS_WAVES of the Muon parameters)
# stays exposed; more waves hide more but run Newton-Schulz in smaller batches and issue more
# collectives. 3: on 2 H200s (DP2, proxy model) one rank's Newton-Schulz products took 39 ms of
# kernel time per step and the broadcasts 10 ms (bench/results/muonclip_h200x2_gbs4.profile.txt).
NS_WAVES = 3


@dataclass
class _MuonBlock:
    key: str
    block: Block
    full_shape: tuple[int, int]  # the logical matrix across TP ranks
    owner_tp: int
    tp_sharded: bool
    partition_dim: int


@dataclass
class _Entry:
    """One local parameter tensor and, on its owner replica, its optimizer state."""

    key: str
    param: torch.nn.Parameter
    spec: ParamSpec
    grid: Grid
    group: dict
    owner_dp: int = 0
    wave: int = -1  # Muon: its wave (`NS_WAVES`), the same on every rank of the grid; AdamW: -1
    blocks: list[_MuonBlock] = field(default_factory=list)
    master: Optional[torch.Tensor] = None  # fp32; the parameter's own storage when it is fp32
    separate_master: bool = False  # bf16 parameter: the master is copied into it after updates
    state: dict = field(default_factory=dict)

    @property
    def owned(self) -> bool:
        return self.owner_dp == self.grid.dp_rank

    def grad(self) -> torch.Tensor:
        g = getattr(self.param, "main_grad", None)
        if g is None:
            g = self.param.grad
        return torch.zeros_like(self.param, dtype=torch.float32) if g is None else g


@dataclass
class _Stage:
    """Parameters of one grid updated and then broadcast together: the AdamW ones, or one wave of
    Muon ones. entries: every replica's, in plan order (receivers list what the owners send)."""

    grid: Grid
    muon: bool
    entries: list[_Entry]

    def params_by_owner(self) -> list[list[torch.nn.Parameter]]:
        """`dp_broadcast`'s argument: [owner DP index] -> the parameters it sends, in plan order."""
        return [[e.param for e in self.entries if e.owner_dp == d] for d in range(self.grid.dp_size)]


@dataclass(frozen=True)
class NormGroups:
    """Process groups over which gradient norms are summed (as megatron-core's optimizers do):
    `dense` holds the other TP/PP shards of dense parameters, `expert` those of expert
    parameters (None when no parameter is expert-parallel)."""

    dense: dist.ProcessGroup
    expert: Optional[dist.ProcessGroup]
    tp: dist.ProcessGroup
    expert_tp: Optional[dist.ProcessGroup]


class MuonClipOptimizer:
    """Muon + AdamW + QK-clip over this rank's parameters, sharded as described above."""

    def __init__(
        self,
        named_params: list[tuple[str, torch.nn.Parameter]],
        cfg: OptimConfig,
        layout: FusedLayout,
        *,
        dense: Grid,
        expert: Grid,
        norm_groups: NormGroups,
        qk_clip: Optional[QKClip] = None,
        num_sublayers: int = 0,
    ):
        """named_params: unique keys (model-chunk prefixed names) in model order, the same order
        on every rank of a grid. qk_clip: the MLA layers to clip (None: no clipping)."""
        self.cfg = cfg
        self.norm_groups = norm_groups
        self.qk_clip = qk_clip
        self.num_sublayers = num_sublayers
        self.steps = 0
        self._ns_dtype = getattr(torch, cfg.muon_ns_dtype)
        self._qk_clips: list[LayerClip] = []  # the last step's factors, read by log_step_metrics
        base = dict(lr=cfg.lr, min_lr=cfg.min_lr, max_lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.param_groups = [
            dict(name="muon", params=[], wd_mult=1.0, default_config=True, **base),
            dict(name="adamw", params=[], wd_mult=1.0, **base),
            dict(name="adamw_no_decay", params=[], wd_mult=0.0, **{**base, "weight_decay": 0.0}),
        ]
        self.entries: list[_Entry] = []
        for key, p in named_params:
            if not p.requires_grad:
                continue
            spec = classify(key, p, layout)
            grid = expert if spec.expert else dense
            group = self.param_groups[0 if spec.optimizer == "muon" else (1 if spec.weight_decay else 2)]
            group["params"].append(p)
            self.entries.append(_Entry(key, p, spec, grid, group))
        self._plan(dense, ns_steps=cfg.muon_ns_steps)
        if expert is not dense:
            self._plan(expert, ns_steps=cfg.muon_ns_steps)
        self._stages = self._make_stages()
        self._by_param = {id(e.param): e for e in self.entries}
        for e in self.entries:
            if e.owned:
                self._init_state(e)

    # ------------------------------------------------------------------ set-up
    def _plan(self, grid: Grid, ns_steps: int) -> None:
        entries = [e for e in self.entries if e.grid is grid]
        items = []
        for e in entries:
            blocks = []
            for b in e.spec.blocks:
                rows = e.param.shape[0] if b.rows is None else int(b.rows.numel())
                shape = [rows, e.param.shape[1]]
                if e.spec.tp_sharded:
                    shape[e.spec.partition_dim] *= grid.tp_size
                blocks.append((f"{e.key}:{b.label}", b, tuple(shape)))
            full_numel = e.param.numel() * (grid.tp_size if e.spec.tp_sharded else 1)
            # Elementwise work (Adam, momentum, decay) counts ~10 operations per element.
            ns = [newton_schulz_cost(*shape, ns_steps) for _, _, shape in blocks]
            items.append(WorkItem(e.key, 10.0 * full_numel + sum(ns), tuple((k, c) for (k, _, _), c in zip(blocks, ns))))
            e.blocks = [
                _MuonBlock(k, b, shape, 0, e.spec.tp_sharded, e.spec.partition_dim) for k, b, shape in blocks
            ]
        plan = plan_owners(items, grid.dp_size, grid.tp_size, num_waves=NS_WAVES)
        for e in entries:
            e.owner_dp = plan.param_owner[e.key]
            e.wave = plan.wave.get(e.key, -1)
            for b in e.blocks:
                b.owner_tp = plan.block_owner[b.key]

    def _make_stages(self) -> list[_Stage]:
        """The step's stages in the order every rank runs them (their collectives in that order):
        each grid's AdamW parameters, then each grid's Muon waves; empty stages left out. Grids in
        order of first appearance in the parameter list."""
        grids: list[Grid] = []
        for e in self.entries:
            if all(e.grid is not g for g in grids):
                grids.append(e.grid)
        adamw = [e for e in self.entries if e.spec.optimizer == "adamw"]
        muon = [e for e in self.entries if e.spec.optimizer == "muon"]
        stages = [_Stage(g, False, [e for e in adamw if e.grid is g]) for g in grids]
        stages += [
            _Stage(g, True, [e for e in muon if e.grid is g and e.wave == w]) for g in grids for w in range(NS_WAVES)
        ]
        return [s for s in stages if s.entries]

    def _init_state(self, e: _Entry) -> None:
        p = e.param
        e.separate_master = p.dtype != torch.float32
        e.master = p.detach().float().clone() if e.separate_master else p.data
        if e.spec.optimizer == "muon":
            e.state["momentum"] = {
                b.key: torch.zeros_like(b.block.take(e.master)) for b in e.blocks
            }
        else:
            e.state["exp_avg"] = torch.zeros_like(e.master)
            e.state["exp_avg_sq"] = torch.zeros_like(e.master)

    def describe(self) -> list[str]:
        """Start-up lines: the group rule and which parameters fell where."""
        return summarize([e.spec for e in self.entries])

    # ------------------------------------------------------------------ megatron-core contract
    def zero_grad(self, set_to_none: bool = True) -> None:
        for e in self.entries:
            e.param.grad = None

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss  # bf16/fp32 training: no loss scaling

    def get_loss_scale(self) -> torch.Tensor:
        return torch.ones(1)

    @torch.no_grad()
    def step(self) -> tuple[bool, float, None]:
        grad_norm = self._clip_gradients()
        self.steps += 1
        # The factors depend only on the forward's max logits, so they are known before any update
        # and each MLA weight is scaled right after its own update, before its broadcast.
        self._qk_clips = self.qk_clip.factors() if self.qk_clip is not None else []
        qk_rows = self._qk_row_factors(self._qk_clips)
        in_flight: Optional[PendingBroadcast] = None
        for stage in self._stages:  # AdamW, then the Muon waves (module docstring)
            self._update_stage(stage, qk_rows)
            launched = dp_broadcast(stage.grid, stage.params_by_owner())
            # The previous stage's transfer had this stage's compute to hide behind; finishing it
            # now keeps at most two stages' flat buffers alive rather than a copy of every parameter.
            if in_flight is not None:
                in_flight.wait()
            in_flight = launched
        if in_flight is not None:
            in_flight.wait()
        return True, grad_norm, None

    # ------------------------------------------------------------------ pieces of the step
    def _update_stage(self, stage: _Stage, qk_rows: dict[int, list[torch.Tensor]]) -> None:
        """Update this replica's parameters of the stage and write them into the model (bf16
        parameters: from their fp32 masters). qk_rows (`_qk_row_factors`): the stage takes the
        factors of its weights out, so each weight is scaled once, after its own update."""
        owned = [e for e in stage.entries if e.owned]
        if stage.muon:
            self._apply_muon(owned, self._orthogonalised_updates(stage.grid, owned))
        else:
            self._apply_adamw(owned)
        for e in stage.entries:
            for rows in qk_rows.pop(id(e.param), []):
                if e.owned:
                    e.master.mul_(rows[:, None].to(e.master.dtype))
        separate = [e for e in owned if e.separate_master]
        if separate:
            torch._foreach_copy_([e.param.data for e in separate], [e.master for e in separate])

    def _clip_gradients(self) -> float:
        from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
        from megatron.core.transformer.module import param_is_not_shared

        ng = self.norm_groups
        dense, expert = [], []
        for e in self.entries:
            p = e.param
            if param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(
                p, tp_group=ng.tp, expert_tp_group=ng.expert_tp
            ):
                (expert if e.spec.expert else dense).append(e.grad())
        total = float(get_grad_norm_fp32(dense, grad_stats_parallel_group=ng.dense)) ** 2
        if ng.expert is not None:
            total += float(get_grad_norm_fp32(expert, grad_stats_parallel_group=ng.expert)) ** 2
        norm = math.sqrt(total)
        if self.cfg.clip_grad > 0:
            coeff = self.cfg.clip_grad / (norm + 1e-6)
            if coeff < 1.0:
                torch._foreach_mul_([e.grad() for e in self.entries], coeff)
        return norm

    def _orthogonalised_updates(self, grid: Grid, owned: list[_Entry]) -> dict[str, torch.Tensor]:
        """Momentum step and Newton-Schulz results (NS dtype, this rank's slice) of the Muon
        matrices of `owned`, keyed by block. owned: Muon parameters of this grid owned by this
        replica (the same list on every TP rank of the replica). Collective over the TP group."""
        mu, nesterov = self.cfg.muon_momentum, self.cfg.muon_nesterov
        keys, pieces, momenta = [], [], []
        for e in owned:
            g = e.grad()
            for b in e.blocks:
                keys.append(b.key)
                pieces.append(b.block.take(g))
                momenta.append(e.state["momentum"][b.key])
        if momenta:  # one multi-tensor kernel per operation rather than one per matrix
            torch._foreach_mul_(momenta, mu)
            torch._foreach_add_(momenta, pieces)
        dirs = torch._foreach_add(pieces, momenta, alpha=mu) if nesterov and momenta else momenta
        directions: dict[str, torch.Tensor] = dict(zip(keys, dirs))
        by_owner = [[b for e in owned for b in e.blocks if b.owner_tp == t] for t in range(grid.tp_size)]
        if not any(by_owner):
            return {}  # every rank of this TP group sees the same (empty) plan
        mine = by_owner[grid.tp_rank]
        device = owned[0].param.device if owned else torch.device("cpu")

        # Full matrices of the blocks this rank orthogonalises: TP shards gathered in the NS dtype.
        if grid.tp_size > 1:
            sharded = [[directions[b.key] for b in blocks if b.tp_sharded] for blocks in by_owner]
            received = tp_gather(grid, sharded, self._ns_dtype, device)
        full, j = [], 0
        for b in mine:
            if grid.tp_size > 1 and b.tp_sharded:
                full.append(torch.cat([received[r][j] for r in range(grid.tp_size)], dim=b.partition_dim))
                j += 1
            else:
                full.append(directions[b.key])
        ortho = self._batched_newton_schulz(full)

        if grid.tp_size == 1:
            return {b.key: o for b, o in zip(mine, ortho)}
        slices = [None] * grid.tp_size
        slices[grid.tp_rank] = [
            [o.chunk(grid.tp_size, dim=b.partition_dim)[r] if b.tp_sharded else o for b, o in zip(mine, ortho)]
            for r in range(grid.tp_size)
        ]
        templates = [[directions[b.key] for b in blocks] for blocks in by_owner]
        got = tp_scatter(grid, slices, templates, self._ns_dtype, device)
        return {b.key: s for blocks, ss in zip(by_owner, got) for b, s in zip(blocks, ss)}

    def _batched_newton_schulz(self, matrices: list[torch.Tensor]) -> list[torch.Tensor]:
        """Newton-Schulz of each matrix; same-shape matrices (e.g. experts) run as one batch."""
        out: list[Optional[torch.Tensor]] = [None] * len(matrices)
        by_shape: dict[tuple, list[int]] = {}
        for i, m in enumerate(matrices):
            by_shape.setdefault(tuple(m.shape), []).append(i)
        for idx in by_shape.values():
            batch = newton_schulz(
                torch.stack([matrices[i] for i in idx]), steps=self.cfg.muon_ns_steps, dtype=self._ns_dtype
            )
            for i, o in zip(idx, batch):
                out[i] = o
        return out

    # ------------------------------------------------------------------ checkpoints
    def _state_tensors(self, e: _Entry) -> dict[str, torch.Tensor]:
        """An owned parameter's state, each tensor shaped like the parameter (local shard)."""
        out = {"master": e.master} if e.separate_master else {}
        if e.spec.optimizer == "muon":
            momentum = torch.zeros_like(e.master)
            for b in e.blocks:
                m = e.state["momentum"][b.key]
                if b.block.rows is None:
                    momentum.copy_(m)
                else:
                    momentum.index_copy_(0, b.block.rows, m)
            out["momentum"] = momentum
        else:
            out["exp_avg"], out["exp_avg_sq"] = e.state["exp_avg"], e.state["exp_avg_sq"]
        return out

    def sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool = False) -> dict:
        """This rank's optimizer state for dist_checkpointing, laid out like the model's parameters.

        Same contract as megatron-core's optimizers: save this dict, or load into it and pass the
        result to `load_state_dict` (the template is the same for saving and loading).

        model_sharded_state_dict: the model chunks' sharded_state_dict (megatron-core's, with the
        parameters themselves as data). Every state tensor of a parameter takes that parameter's
        sharding (TP slices, expert indices, fused GLU halves), so a checkpoint loads under any
        other layout; only the owner replica contributes it (as the main replica).
        """
        from megatron.core.dist_checkpointing.optimizer import (
            get_param_id_to_sharded_param_map, make_sharded_optimizer_tensor,
        )

        by_index = get_param_id_to_sharded_param_map(model_sharded_state_dict, [e.param for e in self.entries])
        out: dict = {"optimizer.steps": self.steps}
        for i, e in enumerate(self.entries):
            if not e.owned:
                continue
            if i not in by_index:
                raise KeyError(f"{e.key} is not in the model's sharded state dict")
            model_param = by_index[i]
            for name, tensor in self._state_tensors(e).items():
                sharded = make_sharded_optimizer_tensor(model_param, tensor, prefix=f"optimizer.{name}")
                out[f"{name}/{e.key}"] = dataclasses.replace(sharded, replica_id=_main_replica(sharded.replica_id))
        return out

    def reload_model_params(self) -> None:
        """Copy the model's (newly loaded) parameters into the fp32 masters of bf16 parameters,
        as megatron-core's optimizers do."""
        for e in self.entries:
            if e.owned and e.separate_master:
                e.master.copy_(e.param.data)

    def load_state_dict(self, state: dict) -> None:
        """Take the state loaded by dist_checkpointing for `sharded_state_dict`'s template."""
        self.steps = int(state["optimizer.steps"])
        for e in self.entries:
            if not e.owned:
                continue
            if e.separate_master:
                e.master.copy_(state[f"master/{e.key}"])
                e.param.data.copy_(e.master)
            if e.spec.optimizer == "muon":
                momentum = state[f"momentum/{e.key}"]
                for b in e.blocks:
                    e.state["momentum"][b.key].copy_(b.block.take(momentum))
            else:
                e.state["exp_avg"].copy_(state[f"exp_avg/{e.key}"])
                e.state["exp_avg_sq"].copy_(state[f"exp_avg_sq/{e.key}"])

    @staticmethod
    def _by_rate(entries: list[_Entry]) -> dict[tuple[float, float], list[_Entry]]:
        """Entries grouped by their param group's (lr, weight decay), as the scheduler set them."""
        groups: dict[tuple[float, float], list[_Entry]] = {}
        for e in entries:
            groups.setdefault((e.group["lr"], e.group["weight_decay"]), []).append(e)
        return groups

    def _apply_muon(self, entries: list[_Entry], updates: dict[str, torch.Tensor]) -> None:
        """W <- W (1 - lr wd) - lr * scale(A, B) * O for every owned Muon matrix."""
        for (lr, wd), group in self._by_rate(entries).items():
            torch._foreach_mul_([e.master for e in group], 1.0 - lr * wd)
            whole, steps, alphas = [], [], []
            for e in group:
                for b in e.blocks:
                    alpha = -lr * muon_update_scale(b.full_shape, self.cfg.muon_rms_scale)
                    step = updates[b.key].float()
                    if b.block.rows is None:
                        whole.append(e.master)
                        steps.append(step)
                        alphas.append(alpha)
                    else:
                        e.master.index_add_(0, b.block.rows, step, alpha=alpha)
            if whole:
                torch._foreach_mul_(steps, alphas)
                torch._foreach_add_(whole, steps)

    def _apply_adamw(self, entries: list[_Entry]) -> None:
        """torch's AdamW update (decoupled weight decay, bias-corrected moments)."""
        cfg = self.cfg
        bias1 = 1.0 - cfg.beta1**self.steps
        bias2 = 1.0 - cfg.beta2**self.steps
        for (lr, wd), group in self._by_rate(entries).items():
            masters = [e.master for e in group]
            grads = [e.grad().float() for e in group]
            m = [e.state["exp_avg"] for e in group]
            v = [e.state["exp_avg_sq"] for e in group]
            torch._foreach_lerp_(m, grads, 1.0 - cfg.beta1)
            torch._foreach_mul_(v, cfg.beta2)
            torch._foreach_addcmul_(v, grads, grads, value=1.0 - cfg.beta2)
            torch._foreach_mul_(masters, 1.0 - lr * wd)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, math.sqrt(bias2))
            torch._foreach_add_(denom, cfg.eps)
            torch._foreach_addcdiv_(masters, m, denom, value=-lr / bias1)

    def _qk_row_factors(self, clips: list[LayerClip]) -> dict[int, list[torch.Tensor]]:
        """id(weight) -> the row factors its master is scaled by after its update, for the q and
        kv weights of every MLA layer, on every step. The factors of unclipped heads are exactly
        1, so scaling every layer gives the same bits as scaling only clipped ones, without
        reading "is anything clipped?" back to the host."""
        rows_by_param: dict[int, list[torch.Tensor]] = {}
        for c in clips:
            for weight, rows in ((c.q_weight, c.q_rows), (c.kv_weight, c.kv_rows)):
                if id(weight) not in self._by_param:
                    raise RuntimeError(f"QK-clip: MLA layer {c.layer_number}'s weight is not in the optimizer")
                rows_by_param.setdefault(id(weight), []).append(rows)
        return rows_by_param

    def log_step_metrics(self) -> dict[str, float]:
        """optim/qk_max_logit/layer{N} and optim/qk_clipped_heads/layer{N} of the last step; a
        collective over the QK-clip stats group that reads back to the host, so every rank calls
        it on log steps only. {} without QK-clip."""
        if self.qk_clip is None:
            return {}
        return self.qk_clip.stats(self._qk_clips, self.num_sublayers)


def build_muonclip(model_chunks: list, cfg: OptimConfig) -> MuonClipOptimizer:
    """MuonClip for megatron-core DDP-wrapped model chunks, on the current process groups."""
    from megatron.core import parallel_state as ps

    config = model_chunks[0].config
    named = [
        (f"{i}.{name}" if len(model_chunks) > 1 else name, p)
        for i, chunk in enumerate(model_chunks)
        for name, p in _unwrap(chunk).named_parameters()
    ]
    expert_parallel = (
        ps.get_expert_model_parallel_world_size() > 1
        or ps.get_expert_tensor_parallel_world_size() != ps.get_tensor_model_parallel_world_size()
    )
    norm_groups = NormGroups(
        dense=ps.get_model_parallel_group(),
        expert=ps.get_expert_tensor_model_pipeline_parallel_group() if expert_parallel else None,
        tp=ps.get_tensor_model_parallel_group(),
        expert_tp=ps.get_expert_tensor_parallel_group(),
    )
    dense = dense_grid()
    qk = None
    if cfg.qk_clip_tau is not None:
        if not getattr(config, "qk_clip", False):
            raise ValueError(
                "optim.qk_clip_tau is set but the model config has qk_clip=False, so MLA records no "
                "max logits: build the model with qk_clip=True (the trainer does for optim=muonclip)"
            )
        qk = QKClip(
            mla_attentions(model_chunks), cfg.qk_clip_tau,
            dp_group=ps.get_data_parallel_group(with_context_parallel=True),
            stats_group=ps.get_model_parallel_group(),
        )
    return MuonClipOptimizer(
        named, cfg, FusedLayout.from_config(config),
        dense=dense, expert=expert_grid() if expert_parallel else dense,
        norm_groups=norm_groups, qk_clip=qk, num_sublayers=config.num_layers,
    )


def _main_replica(replica_id):
    """The model tensor's replica id with its data-parallel component (the last) set to 0: the
    owner replica writes the state, whichever DP rank it is."""
    if isinstance(replica_id, tuple):
        return (*replica_id[:-1], 0)
    return 0


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    while hasattr(module, "module"):
        module = module.module
    return module
