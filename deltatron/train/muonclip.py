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

Distribution (`deltatron.parallel.muon_sharding`): each parameter is updated on one
data-parallel replica only, its owner, which keeps its state (fp32 master when the model is bf16,
Muon momentum or Adam moments): optimizer memory is divided by the DP size. megatron-core's DDP
runs with `use_distributed_optimizer=True` on an owner-aligned layout (`OwnerLayoutPlanner`,
DDP's `full_param_layout`): every parameter lies whole in its owner's shard of a gradient bucket,
so DDP's reduce-scatter (overlapped with the backward) hands each owner exactly the reduced
gradients of its parameters, and DDP's parameter all-gather returns the updated parameters to
every replica (`start_param_sync` at the end of the step, or the next forward's pre-hooks with
`parallel.overlap_param_gather`). Each Muon matrix is orthogonalised once, on one TP rank of
its owner replica, from its TP shards gathered in bf16 (the Newton-Schulz precision,
`optim.muon_ns_dtype`), and the slices are scattered back; expert matrices do this inside their
expert-data x expert-tensor grid.

After the reduce-scatter, `main_grad` of a parameter this rank does not own holds its local,
unreduced gradient: the step reads the gradients of owned parameters only (norm, clipping,
updates), and the norm counts each element once, on its owner.

Order of a step:

1. gradient norm over owned gradients and clipping; QK-clip factors (they depend on the forward's
   max logits only);
2. AdamW on the owned AdamW parameters; per grid, Muon on the owned Muon parameters (momentum,
   Newton-Schulz with its TP gather/scatter, update);
3. QK-clip scaling of the owned MLA weights, after their update and before they are shared;
4. the owned masters written into the model (`param.data` is a view of DDP's parameter buffer),
   then DDP's all-gather of the parameter buffers (unless the next forward's hooks do it).

The step has megatron-core's optimizer contract: `step() -> (update_successful, grad_norm,
num_zeros_in_grad)`, gradients clipped to `clip_grad` by their global norm first.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

import torch
import torch.distributed as dist

from deltatron.parallel.muon_sharding import (
    Grid, LayoutItem, WorkItem, check_owner_layout, dense_grid, expert_grid, newton_schulz_cost,
    owner_aligned_layout, owners_from_buffer, plan_tp_owners, shard_divisor, tp_gather, tp_scatter,
)
from deltatron.train.config import OptimConfig
from deltatron.train.muon_params import Block, FusedLayout, ParamSpec, classify, summarize
from deltatron.train.newton_schulz import muon_update_scale, newton_schulz
from deltatron.train.qk_clip import LayerClip, QKClip, mla_attentions

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
    owner_dp: int = 0  # the rank, in the DP group of the parameter's DDP buffer, that updates it
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


@dataclass(frozen=True)
class NormGroups:
    """Groups that tell tensor-parallel duplicates apart for the gradient norm (megatron-core's
    `param_is_not_tensor_parallel_duplicate`): `tp` for dense parameters, `expert_tp` for expert
    ones. The norm itself is summed over all ranks, each gradient element on its owner only."""

    tp: Optional[dist.ProcessGroup]
    expert_tp: Optional[dist.ProcessGroup]


def _no_param_sync() -> None:
    """Nothing to share: one replica, or the next forward's pre-hooks all-gather (DDP)."""


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
        owners: dict[torch.nn.Parameter, int],
        norm_groups: NormGroups,
        qk_clip: Optional[QKClip] = None,
        num_sublayers: int = 0,
        param_sync: Callable[[], None] = _no_param_sync,
    ):
        """named_params: unique keys (model-chunk prefixed names) in model order, the same order
        on every rank of a grid. Expert parameters (megatron's allreduce=False, in DDP's expert
        buffers) belong to the `expert` grid, the others to `dense`. owners: each parameter's
        owner DP index in its grid (`owners_from_ddp`). param_sync: shares the owners' updated
        parameters with every replica after the step (DDP's all-gather). qk_clip: the MLA layers
        to clip (None: no clipping)."""
        self.cfg = cfg
        self.norm_groups = norm_groups
        self.qk_clip = qk_clip
        self.num_sublayers = num_sublayers
        self.param_sync = param_sync
        self.steps = 0
        self._ns_dtype = getattr(torch, cfg.muon_ns_dtype)
        self._qk_clips: list[LayerClip] = []  # the last step's factors, read by log_step_metrics
        self._adam_step: Optional[torch.Tensor] = None  # AdamW's step count on the device
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
            if p not in owners:
                raise ValueError(
                    f"MuonClip: {key} has no owner replica; the model chunks must be wrapped by "
                    "megatron-core DDP with an OwnerLayoutPlanner layout before build_muonclip"
                )
            spec = classify(key, p, layout)
            grid = dense if getattr(p, "allreduce", True) else expert
            group = self.param_groups[0 if spec.optimizer == "muon" else (1 if spec.weight_decay else 2)]
            group["params"].append(p)
            self.entries.append(_Entry(key, p, spec, grid, group, owner_dp=owners[p]))
        self._grids: list[Grid] = []  # in order of first appearance, the same on every rank (TP collectives)
        for e in self.entries:
            if all(e.grid is not g for g in self._grids):
                self._grids.append(e.grid)
        for grid in self._grids:
            self._plan_matrices(grid, ns_steps=cfg.muon_ns_steps)
        self._by_param = {id(e.param): e for e in self.entries}
        for e in self.entries:
            if e.owned:
                self._init_state(e)

    # ------------------------------------------------------------------ set-up
    def _plan_matrices(self, grid: Grid, ns_steps: int) -> None:
        """Each Muon matrix's logical shape and owner TP rank inside its owner replica."""
        entries = [e for e in self.entries if e.grid is grid]
        items = []
        for e in entries:
            item, e.blocks = work_item(e.key, e.param, e.spec, grid.tp_size, ns_steps)
            items.append(item)
        block_owner = plan_tp_owners(items, {e.key: e.owner_dp for e in entries}, grid.dp_size, grid.tp_size)
        for e in entries:
            for b in e.blocks:
                b.owner_tp = block_owner[b.key]

    def _init_state(self, e: _Entry) -> None:
        p = e.param
        e.separate_master = p.dtype != torch.float32
        # fp32: the parameter itself, a view of DDP's parameter buffer (updated in place, never rebound)
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
        # The factors depend only on the forward's max logits, so they are known before any update.
        self._qk_clips = self.qk_clip.factors() if self.qk_clip is not None else []
        qk_rows = self._qk_row_factors(self._qk_clips)
        owned = [e for e in self.entries if e.owned]
        self._apply_adamw([e for e in owned if e.spec.optimizer == "adamw"])
        for grid in self._grids:  # the same grids in the same order on every rank (TP collectives)
            muon = [e for e in owned if e.grid is grid and e.spec.optimizer == "muon"]
            self._apply_muon(muon, self._orthogonalised_updates(grid, muon))
        for e in owned:  # QK-clip on the owner, after the update, before the weights are shared
            for rows in qk_rows.get(id(e.param), []):
                e.master.mul_(rows[:, None].to(e.master.dtype))
        separate = [e for e in owned if e.separate_master]
        if separate:  # copy_ into param.data: a view of DDP's parameter buffer, which the gather reads
            torch._foreach_copy_([e.param.data for e in separate], [e.master for e in separate])
        self.param_sync()
        return True, grad_norm, None

    # ------------------------------------------------------------------ pieces of the step
    def _clip_gradients(self) -> float:
        """Global L2 norm of the reduced gradients, and clipping of the owned ones to clip_grad.

        Only owned gradients are reduced (a non-owned `main_grad` holds this rank's local
        gradient), so each rank sums the squares of its owned, not tensor-parallel-duplicate, not
        pipeline-shared gradients and one all-reduce over all ranks adds every element once."""
        from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
        from megatron.core.transformer.module import param_is_not_shared

        ng = self.norm_groups
        owned = [e for e in self.entries if e.owned]
        counted = [
            e.grad() for e in owned
            if param_is_not_shared(e.param)
            and param_is_not_tensor_parallel_duplicate(e.param, tp_group=ng.tp, expert_tp_group=ng.expert_tp)
        ]
        norm = float(get_grad_norm_fp32(counted))  # grad_stats_parallel_group None: every rank
        if self.cfg.clip_grad > 0:
            coeff = self.cfg.clip_grad / (norm + 1e-6)
            if coeff < 1.0 and owned:
                torch._foreach_mul_([e.grad() for e in owned], coeff)
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
        """Newton-Schulz of each matrix; same-shape matrices (e.g. experts) run as one batch,
        written in the NS dtype by one multi-tensor copy (no fp32 stack)."""
        out: list[Optional[torch.Tensor]] = [None] * len(matrices)
        by_shape: dict[tuple, list[int]] = {}
        for i, m in enumerate(matrices):
            by_shape.setdefault(tuple(m.shape), []).append(i)
        for shape, idx in by_shape.items():
            batch = torch.empty((len(idx), *shape), dtype=self._ns_dtype, device=matrices[idx[0]].device)
            torch._foreach_copy_(list(batch.unbind(0)), [matrices[i] for i in idx])
            batch = newton_schulz(batch, steps=self.cfg.muon_ns_steps, dtype=self._ns_dtype, overwrite=True)
            for i, o in zip(idx, batch.unbind(0)):
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
                target = b.block.view(momentum)
                if target is None:
                    momentum.index_copy_(0, b.block.rows, m)
                else:
                    target.copy_(m)
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
            by_alpha: dict[float, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
            for e in group:
                for b in e.blocks:
                    alpha = -lr * muon_update_scale(b.full_shape, self.cfg.muon_rms_scale)
                    target = b.block.view(e.master)
                    if target is None:  # interleaved rows (MLA's key/value): few, one kernel each
                        e.master.index_add_(0, b.block.rows, updates[b.key].float(), alpha=alpha)
                    else:
                        targets, steps = by_alpha.setdefault(alpha, ([], []))
                        targets.append(target)
                        steps.append(updates[b.key])
            for alpha, (targets, steps) in by_alpha.items():
                _add_scaled(targets, steps, alpha)

    def _apply_adamw(self, entries: list[_Entry]) -> None:
        """torch's AdamW update (decoupled weight decay, bias-corrected moments), by its fused
        multi-tensor kernel: one pass over parameter, gradient and moments where the same
        formula in foreach operations takes ten."""
        if not entries:
            return
        cfg = self.cfg
        device = entries[0].master.device
        if self._adam_step is None or self._adam_step.device != device:
            self._adam_step = torch.zeros((), dtype=torch.float32, device=device)
        # The kernel reads each tensor's step count (for the bias corrections) from state_steps
        # without changing it: one device scalar, set without a host-to-device copy, serves all.
        self._adam_step.fill_(self.steps)
        for (lr, wd), group in self._by_rate(entries).items():
            masters = [e.master for e in group]
            grads = [g if g.dtype == m.dtype else g.to(m.dtype) for g, m in zip((e.grad() for e in group), masters)]
            torch._fused_adamw_(
                masters, grads, [e.state["exp_avg"] for e in group], [e.state["exp_avg_sq"] for e in group],
                [], [self._adam_step] * len(group), lr=lr, beta1=cfg.beta1, beta2=cfg.beta2,
                weight_decay=wd, eps=cfg.eps, amsgrad=False, maximize=False,
            )

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


def _add_scaled(targets: list[torch.Tensor], steps: list[torch.Tensor], alpha: float) -> None:
    """targets[i] += alpha * steps[i], the steps in any dtype (Newton-Schulz's bf16). Widened by
    one multi-tensor copy into a flat buffer of the targets' dtype, then one multi-tensor add:
    a `.float()` per matrix costs a launch and an allocation each (over a thousand for 32
    experts x 11 layers)."""
    dtype = targets[0].dtype
    if all(s.dtype == dtype for s in steps):
        torch._foreach_add_(targets, steps, alpha=alpha)
        return
    flat = torch.empty(sum(s.numel() for s in steps), dtype=dtype, device=targets[0].device)
    wide = [w.view(s.shape) for w, s in zip(flat.split([s.numel() for s in steps]), steps)]
    torch._foreach_copy_(wide, steps)
    torch._foreach_add_(targets, wide, alpha=alpha)


def work_item(
    key: str, param: torch.nn.Parameter, spec: ParamSpec, tp_size: int, ns_steps: int
) -> tuple[WorkItem, list[_MuonBlock]]:
    """A parameter's update cost (for the owner plan) and its Muon matrices (owner TP rank still
    0). Shapes are logical: TP-sharded dimensions times tp_size, so every TP rank of a replica
    computes the same costs from its own shard."""
    blocks = []
    for b in spec.blocks:
        rows = b.num_rows(param.shape[0])
        shape = [rows, param.shape[1]]
        if spec.tp_sharded:
            shape[spec.partition_dim] *= tp_size
        blocks.append(_MuonBlock(f"{key}:{b.label}", b, tuple(shape), 0, spec.tp_sharded, spec.partition_dim))
    full_numel = param.numel() * (tp_size if spec.tp_sharded else 1)
    ns = [newton_schulz_cost(*b.full_shape, ns_steps) for b in blocks]
    # Elementwise work (Adam, momentum, decay) counts ~10 operations per element.
    cost = 10.0 * full_numel + sum(ns)
    return WorkItem(key, cost, tuple((b.key, c) for b, c in zip(blocks, ns))), blocks


class OwnerLayoutPlanner:
    """megatron-core DDP `FullParamLayout`s that put every parameter whole in its owner's DP shard.

    Call `full_param_layout` once per model chunk, in chunk order, after the chunk's dtypes and
    `allreduce` marks are final (Float16Module, fp32 parameters, expert marks: they decide the
    buffers) and before DDP wraps it. Per buffer (megatron-core's `group_params_for_buffers`, the
    grouping DDP itself does) the DP size is that of the buffer's group: the dense grid's for
    dense buffers, the expert grid's for expert buffers. Update costs accumulate per grid over
    all buffers and chunks, so the replicas' optimizer work stays balanced overall. `report`:
    one line per buffer with its padding (also logged)."""

    def __init__(self, cfg: OptimConfig, layout: FusedLayout, dense: Grid, expert: Grid):
        self.cfg = cfg
        self.layout = layout
        self.grids = {False: dense, True: expert}
        self.loads = {False: [0.0] * dense.dp_size, True: [0.0] * expert.dp_size}
        self.report: list[str] = []
        self._chunks = 0

    def full_param_layout(self, module: torch.nn.Module, ddp_config, single_bucket: bool):
        """The layout for DDP(module, ddp_config, full_param_layout=...). single_bucket: DDP makes
        one bucket (a pipeline stage after the first, or a virtual-pipeline chunk after the first)."""
        from megatron.core.distributed.param_and_grad_buffer import group_params_for_buffers
        from megatron.core.optimizer.param_layout import FullParamLayout, PerBufferParamLayout

        if not ddp_config.use_distributed_optimizer:
            raise ValueError(
                "MuonClip's owner layout needs DistributedDataParallelConfig(use_distributed_optimizer=True): "
                "without it DDP all-reduces and refuses padded buckets"
            )
        names = {p: n for n, p in module.named_parameters() if p.requires_grad}
        groups = group_params_for_buffers(list(names), ddp_config.grad_reduce_in_fp32)
        layouts = {}
        for key, (params, indices) in groups.items():
            grid = self.grids[key.is_expert_parallel]
            items = [self._item(names[p], p, grid) for p in params]
            bucket_size = None if single_bucket else _ddp_bucket_size(ddp_config, grid.dp_size)
            divisor = shard_divisor(grid.dp_size, ddp_config.pad_buckets_for_high_nccl_busbw)
            plan = owner_aligned_layout(items, grid.dp_size, bucket_size, divisor, self.loads[key.is_expert_parallel])
            check_owner_layout(plan, items)
            self._log(key, plan, len(params))
            layouts[key] = PerBufferParamLayout(
                param_index_map={p: plan.spans[names[p]] for p in params},
                bucket_indices=plan.buckets,
                per_bucket_numel_unpadded=plan.unpadded,
                param_indices=indices,
                num_optimizer_shards=grid.dp_size,
            )
        self._chunks += 1
        return FullParamLayout(layouts)

    def _item(self, name: str, param: torch.nn.Parameter, grid: Grid) -> LayoutItem:
        spec = classify(name, param, self.layout)
        item, _ = work_item(name, param, spec, grid.tp_size, self.cfg.muon_ns_steps)
        return LayoutItem(name, param.numel(), item.cost, isolated=getattr(param, "shared_embedding", False))

    def _log(self, key, plan, num_params: int) -> None:
        kind = "expert" if key.is_expert_parallel else "dense"
        unpadded = sum(plan.unpadded)
        line = (
            f"MuonClip owner layout: chunk {self._chunks} {kind} {str(key.param_dtype).replace('torch.', '')} "
            f"buffer, dp {plan.dp_size}: {num_params} params in {len(plan.buckets)} bucket(s), "
            f"{plan.numel:,} elements for {unpadded:,} ({100 * plan.padding / max(unpadded, 1):.1f}% padding)"
        )
        logging.getLogger(__name__).info(line)
        self.report.append(line)


def _ddp_bucket_size(ddp_config, dp_size: int) -> Optional[int]:
    """Elements per gradient bucket as megatron-core's DDP chooses them (None: one bucket, as DDP
    does without overlap_grad_reduce)."""
    if not ddp_config.overlap_grad_reduce:
        return None
    return ddp_config.bucket_size or max(40_000_000, 1_000_000 * dp_size)


def owners_from_ddp(model_chunks: list, dense: Grid, expert: Grid) -> dict[torch.nn.Parameter, int]:
    """Owner DP index of every parameter of these DDP-wrapped chunks, read from the positions in
    DDP's buffers (`owners_from_buffer`). An index is a rank in the buffer's own DP group, so
    that group must be the grid's (same ranks, same order) for the owner to be the rank that
    receives the gradient."""
    owners: dict[torch.nn.Parameter, int] = {}
    for chunk in model_chunks:
        if not getattr(chunk, "ddp_config", None) or not chunk.ddp_config.use_distributed_optimizer:
            raise ValueError(
                "MuonClip needs its model chunks wrapped by megatron-core DDP with "
                "use_distributed_optimizer=True and an OwnerLayoutPlanner full_param_layout "
                "(deltatron.train.trainer builds them so for optim=muonclip)"
            )
        for buffers, grid, kind in ((chunk.buffers, dense, "dense"), (chunk.expert_parallel_buffers, expert, "expert")):
            for buffer in buffers:
                ranks = dist.get_process_group_ranks(buffer.data_parallel_group)
                if ranks != dist.get_process_group_ranks(grid.dp_group):
                    raise RuntimeError(
                        f"MuonClip: DDP reduces {kind} gradients over ranks {ranks}, but the {kind} grid's "
                        f"DP group is {dist.get_process_group_ranks(grid.dp_group)}: owners would not get their gradients"
                    )
                owners.update(owners_from_buffer(buffer))
    return owners


def _start_param_sync(model_chunks: list) -> None:
    """DDP's all-gather of the parameter buffers: every replica receives each owner's shard."""
    for chunk in model_chunks:
        chunk.start_param_sync()


def build_muonclip(model_chunks: list, cfg: OptimConfig) -> MuonClipOptimizer:
    """MuonClip for megatron-core DDP-wrapped model chunks (laid out by `OwnerLayoutPlanner`), on
    the current process groups."""
    from megatron.core import parallel_state as ps

    config = model_chunks[0].config
    named = [
        (f"{i}.{name}" if len(model_chunks) > 1 else name, p)
        for i, chunk in enumerate(model_chunks)
        for name, p in _unwrap(chunk).named_parameters()
    ]
    norm_groups = NormGroups(tp=ps.get_tensor_model_parallel_group(), expert_tp=ps.get_expert_tensor_parallel_group())
    dense, expert = dense_grid(), expert_grid()
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
    # With overlap_param_gather the next forward's pre-hooks all-gather (checkpoint saves and
    # evaluation force it first: deltatron.train.checkpoint.gather_params). With one replica the
    # owner's update is already in every parameter: DDP's all-gather would copy each buffer onto
    # itself (11 ms per step for the proxy on an H200).
    overlap = model_chunks[0].ddp_config.overlap_param_gather
    replicated = dense.dp_size > 1 or expert.dp_size > 1
    return MuonClipOptimizer(
        named, cfg, FusedLayout.from_config(config),
        dense=dense, expert=expert, owners=owners_from_ddp(model_chunks, dense, expert),
        norm_groups=norm_groups, qk_clip=qk, num_sublayers=config.num_layers,
        param_sync=partial(_start_param_sync, model_chunks) if replicated and not overlap else _no_param_sync,
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
