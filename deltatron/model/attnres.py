"""Attention Residuals (Kimi, arXiv 2603.15031): softmax attention over depth instead of the
fixed residual sum.

Full AttnRes: the input of sub-layer l (mixer or FFN alike) is

    h_l = sum_{i<l} alpha_{i->l} v_i,    alpha_{.->l} = softmax_i(w_l . RMSNorm_l(v_i))

over the token embedding v_0 and every earlier sub-layer output v_i = f_i(RMSNorm(h_i)); w_l in R^d
is a learned pseudo-query per sub-layer, zero-initialised so training starts from the uniform
average. A final aggregation of the same kind (its own query) feeds the final norm and the head.

Block AttnRes: the L sub-layers form N contiguous blocks. Inside block n the outputs are summed into
a running block representation b_n^i = f_1 + ... + f_i; sub-layer i of block n attends over the
completed blocks [b_0 = embedding, b_1, ..., b_{n-1}] plus, from its second sub-layer on, the
current partial sum b_n^{i-1}. Full AttnRes is the case N = L (every block one sub-layer), and this
module computes both with the same code: `residual=attnres` is Block AttnRes with N = L.

Two-phase computation (per block, per pipeline stage): the queries are parameters, so the
attention of all of a block's sub-layers over the completed blocks does not depend on the block's
own outputs. Phase 1 computes it for the whole block in one pass over the completed blocks
(`attend_completed`: normalised outputs plus the softmax max and sum of exponentials); phase 2
merges each sub-layer's one extra source, the partial sum, with an exact online-softmax update
(`merge_partial`) just before that sub-layer runs.

Keys: RMSNorm_l(v) = g_l * v / rms(v), with g_l the weight of a norm module built from the stack's
norm spec, so w_l . RMSNorm_l(v) = (w_l * g_l) . v / rms(v). We fold g_l into the query
(`effective_queries`) and never materialise normalised keys: one dot product and one rms
per (block, token) serve all queries of a block.

Shapes follow megatron-core: hidden states are [S, B, D] (sequence, batch, hidden); under sequence
parallelism S is this rank's sequence shard. The depth softmax is per token, so it needs no
communication; the pseudo-query and key-norm gradients are summed over tensor-parallel ranks by
megatron-core (they are marked `sequence_parallel`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.utils import make_viewless_tensor

from deltatron.kernels import runs_fused
from deltatron.model.model import KimiLinearStack


# ---------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class BlockLayout:
    """Which block each of the L sub-layers belongs to.

    Blocks are contiguous and as even as possible; with L = q*N + r the first r blocks hold q+1
    sub-layers. Sources are numbered by block: 0 is the embedding, n >= 1 block n.
    """

    num_sublayers: int
    num_blocks: int

    def __post_init__(self) -> None:
        if not 1 <= self.num_blocks <= self.num_sublayers:
            raise ValueError(
                f"attnres_blocks={self.num_blocks} must be in 1..{self.num_sublayers} "
                "(the number of sub-layers)"
            )

    @functools.cached_property
    def block_ends(self) -> tuple[int, ...]:
        """Exclusive end (sub-layer index) of each block 1..N."""
        base, extra = divmod(self.num_sublayers, self.num_blocks)
        ends, end = [], 0
        for n in range(self.num_blocks):
            end += base + (1 if n < extra else 0)
            ends.append(end)
        return tuple(ends)

    def block_of(self, sublayer: int) -> int:
        """1-based block of a 0-based global sub-layer index."""
        for n, end in enumerate(self.block_ends):
            if sublayer < end:
                return n + 1
        raise IndexError(f"sub-layer {sublayer} is outside 0..{self.num_sublayers - 1}")

    def ends_block(self, sublayer: int) -> bool:
        return sublayer + 1 in self.block_ends

    def completed_after(self, end: int) -> int:
        """Number of completed sources (embedding included) once sub-layers [0, end) have run."""
        return 1 + sum(1 for e in self.block_ends if e <= end)

    def open_after(self, end: int) -> bool:
        """Whether a block is partially summed once sub-layers [0, end) have run."""
        return 0 < end < self.num_sublayers and end not in self.block_ends


def block_layout(residual: str, num_sublayers: int, attnres_blocks: int) -> BlockLayout:
    """The layout of `ModelConfig.residual`: one sub-layer per block for full AttnRes."""
    if residual == "attnres":
        return BlockLayout(num_sublayers, num_sublayers)
    if residual == "block_attnres":
        return BlockLayout(num_sublayers, attnres_blocks)
    raise ValueError(f"residual={residual!r} has no AttnRes block layout (attnres or block_attnres)")


# ------------------------------------------------------------------------------------ the math
def _wide(x: Tensor) -> Tensor:
    """x in fp32, or wider if it already is (float64 in gradient checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _inverse_rms(x: Tensor, eps: float) -> Tensor:
    """[S, B, D] fp32 -> [S, B]: 1 / sqrt(mean(x^2) + eps)."""
    return torch.rsqrt(x.pow(2).mean(-1) + eps)


def stack_grads(grads: Sequence[Optional[Tensor]], like: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    """The gradients of a phase-1 function's k per-query outputs (None for an unused one) stacked
    along `dim` as one tensor of `dtype`; `like`: a tensor of the outputs' shape [S, B(, D)]."""
    zero = None
    out = []
    for g in grads:
        if g is None:
            zero = torch.zeros(like.shape, dtype=dtype, device=like.device) if zero is None else zero
            g = zero
        out.append(g.to(dtype))
    return torch.stack(out, dim)


class _Phase1(torch.autograd.Function):
    """Softmax attention of k queries over m sources, per token (see `attend_completed`).

    Saves only the sources themselves (alive anyway as block representations), the queries and
    per-token statistics ([m, S, B, k] weights and [m, S, B] inverse RMS); the fp32 copies of the
    sources are made again in backward instead of being kept for every block of every stage.
    """

    @staticmethod
    def forward(ctx, eps: float, queries: Tensor, *sources: Tensor):
        ctx.set_materialize_grads(False)  # unused outputs (weights, some lse) get no zero-filled grads
        xs = [_wide(c) for c in sources]
        rinv = torch.stack([_inverse_rms(x, eps) for x in xs])  # [m, S, B]
        logits = torch.stack([x @ queries.t() for x in xs]) * rinv.unsqueeze(-1)  # [m, S, B, k]
        lse = torch.logsumexp(logits, dim=0)  # [S, B, k]
        weights = torch.exp(logits - lse)
        out = None
        for w, x in zip(weights, xs):  # one read of each source serves all k queries
            term = w.unsqueeze(-1) * x.unsqueeze(-2)  # [S, B, k, D]
            out = term if out is None else out.add_(term)
        ctx.save_for_backward(queries, weights, rinv, *sources)
        ctx.mark_non_differentiable(weights)
        return (*out.to(sources[0].dtype).unbind(-2), *lse.unbind(-1), weights)

    @staticmethod
    def backward(ctx, *grads):
        queries, weights, rinv, *sources = ctx.saved_tensors
        k, d = queries.shape
        wide = torch.promote_types(sources[0].dtype, torch.float32)
        g_out = stack_grads(grads[:k], sources[0], -2, wide)  # [S, B, k, D]
        g_lse = stack_grads(grads[k : 2 * k], rinv[0], -1, wide)  # [S, B, k]
        xs = [_wide(c) for c in sources]
        # d loss / d weight_j, then the softmax (and logsumexp) backward
        g_w = torch.stack([torch.einsum("sbkd,sbd->sbk", g_out, x) for x in xs])  # [m, S, B, k]
        g_logits = weights * (g_w - (weights * g_w).sum(0, keepdim=True) + g_lse.unsqueeze(0))
        g_q = torch.zeros_like(queries)
        grads = []
        for j, x in enumerate(xs):
            r = rinv[j].unsqueeze(-1)  # [S, B, 1]
            g_z = g_logits[j] * r  # logits = (x @ q^T) * r
            g_r = (g_logits[j] * (x @ queries.t())).sum(-1, keepdim=True)  # [S, B, 1]
            g_x = (
                torch.einsum("sbk,sbkd->sbd", weights[j], g_out)  # out = sum_j w_j x_j
                + g_z @ queries
                - g_r * r.pow(3) / d * x  # d r / d x = -r^3 x / D
            )
            g_q += torch.einsum("sbk,sbd->kd", g_z, x)
            grads.append(g_x.to(sources[j].dtype))
        return (None, g_q, *grads)


def _fused_kernels(x: Tensor) -> bool:
    """Whether the phases run as the Triton kernels of deltatron.kernels.attnres: for CUDA tensors
    in fp32, bf16 or fp16 (the kernels accumulate in fp32), where Triton imports. Elsewhere
    (CPU, float64 gradient checks) they run as the eager functions above, which are also the
    kernels' test reference."""
    return runs_fused(x)


def attend_completed(
    completed: Sequence[Tensor], queries: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Phase 1: all k queries of a block over its m completed sources in one pass.

    completed: m tensors [S, B, D]; queries: [k, D] fp32 effective queries.
    Returns (outs: k tensors [S, B, D] in the sources' dtype, each query's softmax-weighted sum;
    lses: k tensors [S, B] fp32, the log-sum-exp of each query's logits, which phase 2 merges with;
    weights [m, S, B, k], the softmax over the completed sources, without gradient, for metrics).
    Per-query outputs rather than one [S, B, k, D] tensor: indexing that one would make autograd
    zero-fill and add a full-size gradient for every query.
    """
    if _fused_kernels(completed[0]):
        from deltatron.kernels.attnres import attend

        results = attend(completed, queries, eps)
    else:
        results = _Phase1.apply(eps, queries, *completed)
    k = queries.shape[0]
    return results[:k], results[k : 2 * k], results[2 * k]


class _Phase2(torch.autograd.Function):
    """Online-softmax merge of one source into a phase-1 result (see `merge_partial`); saves the
    inputs as they are and the per-token share, no fp32 copies."""

    @staticmethod
    def forward(ctx, out: Tensor, lse: Tensor, partial: Tensor, query: Tensor, eps: float):
        ctx.set_materialize_grads(False)
        p = _wide(partial)
        r = _inverse_rms(p, eps)  # [S, B]
        lp = (p @ query) * r
        share = torch.sigmoid(lse - lp)  # exp(lse) / (exp(lse) + exp(lp))
        h = share.unsqueeze(-1) * _wide(out) + (1 - share).unsqueeze(-1) * p
        ctx.save_for_backward(out, partial, query, r, share)
        ctx.mark_non_differentiable(share)
        return h.to(out.dtype), share

    @staticmethod
    def backward(ctx, g_h: Optional[Tensor], _g_share):
        if g_h is None:  # h unused: no gradient anywhere
            return None, None, None, None, None
        out, partial, query, r, share = ctx.saved_tensors
        g_h, o, p = _wide(g_h), _wide(out), _wide(partial)
        s = share.unsqueeze(-1)
        g_s = (g_h * (o - p)).sum(-1)  # [S, B]
        g_lse = g_s * share * (1 - share)  # d sigmoid(lse - lp)
        g_lp = -g_lse
        rr = r.unsqueeze(-1)
        dot = (p @ query).unsqueeze(-1)  # lp = dot * r
        g_p = (1 - s) * g_h + g_lp.unsqueeze(-1) * (rr * query - dot * rr.pow(3) / p.shape[-1] * p)
        g_q = torch.einsum("sb,sbd->d", g_lp * r, p)
        return (s * g_h).to(out.dtype), g_lse, g_p.to(partial.dtype), g_q, None


def merge_partial(
    out: Tensor, lse: Tensor, partial: Tensor, query: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Phase 2: add the partial block sum to one query's phase-1 result (online softmax).

    out: [S, B, D] phase-1 output of this query; lse: [S, B] its log-sum-exp; partial: [S, B, D];
    query: [D] fp32. Returns (h [S, B, D] in out's dtype; the weight of the completed sources as a
    whole, [S, B] without gradient; the partial sum's weight is one minus it).
    """
    if _fused_kernels(partial):
        from deltatron.kernels.attnres import merge

        return merge(out, lse, partial, query, eps)
    return _Phase2.apply(out, lse, partial, query, eps)


def depth_attention_reference(sources: Sequence[Tensor], pseudo_query: Tensor, key_norm: nn.Module) -> Tensor:
    """The straightforward formula for one sub-layer, for tests: stack every source, apply the
    key norm module, softmax over depth. sources: n tensors [S, B, D]; returns [S, B, D] fp32."""
    v = torch.stack(list(sources))  # [n, S, B, D]
    logits = (key_norm(v).float() * pseudo_query.float()).sum(-1)  # [n, S, B]
    alpha = torch.softmax(logits, dim=0)
    return (alpha.unsqueeze(-1) * v.float()).sum(0)


def run_block_group(
    completed: list[Tensor],
    partial: Optional[Tensor],
    queries: Tensor,
    eps: float,
    run_layer: Callable[[int, Tensor], Tensor],
    record: Optional[Callable[[int, list[Tensor], Optional[Tensor]], None]] = None,
) -> Optional[Tensor]:
    """Two-phase computation of k consecutive sub-layers of one block.

    completed: the m completed sources, [S, B, D] each (they do not change inside a block);
    partial: the block's partial sum before the first of these sub-layers, [S, B, D] or None;
    queries: [k, D] fp32 effective queries; run_layer(k, h) -> f_k(norm(h)) with h [S, B, D] in
    the sources' dtype. record(k, completed weights [S, B] each, partial weight [S, B] or None)
    receives the softmax weights when given (metrics). Returns the partial sum after the group.
    """
    outs, lses, weights = attend_completed(completed, queries, eps)  # phase 1
    for k in range(queries.shape[0]):
        if partial is None:
            h, share = outs[k], None
        else:  # phase 2: the one source that changes inside the block
            h, share = merge_partial(outs[k], lses[k], partial, queries[k], eps)
        if record is not None:
            with torch.no_grad():
                scale = 1 if share is None else share
                record(k, [w[..., k] * scale for w in weights], None if share is None else 1 - share)
        f = run_layer(k, h)
        partial = f if partial is None else partial + f
    return partial


# --------------------------------------------------------------------------------- parameters
class DepthQuery(MegatronModule):
    """One sub-layer's (or the final aggregation's) pseudo-query w in R^D, zero-initialised, and
    its key norm, built from the stack's norm spec (local RMSNorm or Transformer Engine's)."""

    def __init__(self, config, norm_spec):
        super().__init__(config=config)
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.pseudo_query = nn.Parameter(
            torch.zeros(config.hidden_size, device=device, dtype=config.params_dtype)
        )
        # every TP rank sees other tokens under sequence parallelism: megatron-core sums the grads
        self.pseudo_query.sequence_parallel = config.sequence_parallel
        self.key_norm = build_module(
            norm_spec, config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
        )
        for name in ("weight", "eps"):
            if not hasattr(self.key_norm, name):
                raise TypeError(
                    f"AttnRes key norm {type(self.key_norm).__name__} has no `{name}`; it needs an "
                    "RMSNorm with a weight and eps (deltatron's RMSNorm or Transformer Engine's)"
                )

    @property
    def eps(self) -> float:
        return float(self.key_norm.eps)



def effective_queries(queries: Sequence[DepthQuery]) -> Tensor:
    """[k, D] fp32: the effective queries w * g of k sub-layers (or of the final aggregation), each
    its pseudo-query times its key norm's weight: the query against keys normalised without weight.
    A fixed number of autograd ops whatever k (this runs for every block of every step)."""
    pseudo = torch.stack([dq.pseudo_query for dq in queries]).float()
    weight = torch.stack([dq.key_norm.weight for dq in queries]).float()
    return pseudo * weight


# ----------------------------------------------------------------------------------- metrics
class DepthMetrics:
    """Detached sums for logging: per sub-layer the RMS of its output f(norm(h)) (the paper's
    PreNorm-dilution signal), and for AttnRes (num_blocks given) per sub-layer and the final
    aggregation (row L) the mean softmax weight on each source (column 0 the embedding, n block n).
    """

    def __init__(self, num_sublayers: int, num_blocks: Optional[int], device):
        self.num_blocks = num_blocks
        rows, cols = (num_sublayers + 1, num_blocks + 1) if num_blocks else (0, 0)
        self.weight_sum = torch.zeros(rows, cols, dtype=torch.float64, device=device)
        self.tokens = torch.zeros(rows, dtype=torch.float64, device=device)
        self.sq_sum = torch.zeros(num_sublayers, dtype=torch.float64, device=device)
        self.elements = torch.zeros(num_sublayers, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add_weights(self, row: int, sources: Sequence[int], weights: Sequence[Tensor]) -> None:
        """weights[j]: [S, B] weight of source sources[j] for every token."""
        for src, w in zip(sources, weights):
            self.weight_sum[row, src] += w.double().sum()
        self.tokens[row] += weights[0].numel()

    @torch.no_grad()
    def add_output(self, sublayer: int, out: Tensor) -> None:
        self.sq_sum[sublayer] += out.double().pow(2).sum()
        self.elements[sublayer] += out.numel()


# ----------------------------------------------------------------------------------- the stack
class AttnResStack(KimiLinearStack):
    """The hybrid stack with (Block) Attention Residuals between its sub-layers.

    Each sub-layer is megatron-core's layer with its residual add removed (the spec gives it a
    bias-dropout without add), so it returns f(norm(h)); this stack forms every input h from the
    depth attention. Under pipeline parallelism a stage receives the completed block
    representations and the partial sum it needs, and hands on its own
    (`deltatron.parallel.attnres_pipeline`); `stage_sublayers` (sub-layers per pipeline stage, in
    pipeline order) tells each stage what its neighbours hold.
    """

    def __init__(self, config, submodules, *, final_norm, stage_sublayers: Optional[Sequence[int]] = None, **kwargs):
        super().__init__(config, submodules, final_norm=final_norm, **kwargs)
        if config.fp8 or config.fp4:
            raise ValueError(
                "model.residual=attnres/block_attnres runs its layers without megatron-core's fp8/fp4 "
                "contexts; train it in bf16 or fp32"
            )
        self.layout = block_layout(config.residual, config.num_layers, config.attnres_blocks)
        self.sublayer_ids = [layer.layer_number - 1 for layer in self.layers]  # global, 0-based
        # keyed by global sub-layer index: checkpoint names agree across pipeline layouts
        self.depth_queries = nn.ModuleDict(
            {str(l): DepthQuery(config, final_norm) for l in self.sublayer_ids}
        )
        if self.post_process:
            self.final_depth_query = DepthQuery(config, final_norm)
        # consecutive local sub-layers of one block: each group is one phase-1 pass
        self.groups: list[list[int]] = []
        for i, l in enumerate(self.sublayer_ids):
            if self.groups and self.layout.block_of(self.sublayer_ids[self.groups[-1][-1]]) == self.layout.block_of(l):
                self.groups[-1].append(i)
            else:
                self.groups.append([i])
        self.stage_plan = None
        if not (self.pre_process and self.post_process):
            from deltatron.parallel.attnres_pipeline import StagePlan

            if stage_sublayers is None:
                raise ValueError(
                    "AttnRes under pipeline parallelism needs the stage split: build the model with a "
                    "layer_pattern holding '|' stage boundaries (deltatron.train.trainer.stage_pattern)"
                )
            first = self.sublayer_ids[0] if self.sublayer_ids else None
            self.stage_plan = StagePlan.for_stage(
                self.layout, tuple(stage_sublayers), self.pp_group.size(), first, len(self.layers)
            )
        self.metrics: Optional[DepthMetrics] = None

    # ------------------------------------------------------------------ helpers
    def _recompute(self, local_index: int) -> bool:
        """Whether full activation recomputation covers this sub-layer (recompute_granularity=full:
        method uniform recomputes every sub-layer, one per unit, method block the first
        recompute_num_layers of this stage). A unit cannot span sub-layers here: each one's input
        is a depth attention formed outside it (TrainConfig.recompute_config refuses uniform > 1)."""
        c = self.config
        if c.recompute_granularity != "full" or not self.training:
            return False
        if c.recompute_method == "block":
            return local_index < c.recompute_num_layers
        return True

    def _run_layer(self, i: int, h: Tensor, layer_kwargs: dict) -> Tensor:
        """f_i(norm(h)) of local sub-layer i. h, result: [S, B, D]."""
        layer = self.layers[i]

        def run(x):
            out = layer(hidden_states=x, **layer_kwargs)
            return out[0] if isinstance(out, tuple) else out

        if not self._recompute(i):
            return run(h)
        # megatron-core's checkpoint, as its own stacks use (on CPU: deltatron.parallel.cpu_compat, 7)
        return tensor_parallel.checkpoint(run, self.config.distribute_saved_activations, h)

    def _final_aggregate(self, completed: list[Tensor]) -> Tensor:
        """The final aggregation over every source ([S, B, D] each) -> [S, B, D]."""
        final = self.final_depth_query
        outs, _, weights = attend_completed(completed, effective_queries([final]), final.eps)
        if self.metrics is not None:
            self.metrics.add_weights(self.layout.num_sublayers, range(len(completed)), [w[..., 0] for w in weights])
        return outs[0]

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor],
        inference_context=None,
        rotary_pos_emb: Optional[Tensor] = None,
        *,
        inference_params=None,
        packed_seq_params=None,
        padding_mask=None,
    ) -> Tensor:
        """hidden_states: [S, B, D] the embedding on the first stage (ignored on later stages,
        which read `self.input_tensor`). Returns [S, B, D] final-normed states on the last stage,
        else the packed hand-off for the next stage ([k*S, B, D], see attnres_pipeline)."""
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError(
                "AttnRes has no megatron-core inference (KV-cache) path; run generation with "
                "model.residual=standard models or a full forward pass"
            )
        handoff = None
        if self.stage_plan is not None:
            from deltatron.parallel.attnres_pipeline import rank_cache

            handoff = rank_cache().begin(self.stage_plan)
        if self.pre_process:
            completed, partial = [hidden_states], None
        else:
            completed, partial = handoff.receive(self.input_tensor)
        layer_kwargs = dict(
            attention_mask=attention_mask, inference_context=None, rotary_pos_emb=rotary_pos_emb,
            packed_seq_params=packed_seq_params, padding_mask=padding_mask,
        )
        for group in self.groups:
            ids = [self.sublayer_ids[i] for i in group]
            queries = [self.depth_queries[str(l)] for l in ids]
            q = effective_queries(queries)  # [k, D]

            def run_layer(k, h, group=group, ids=ids):
                f = self._run_layer(group[k], h, layer_kwargs)
                if self.metrics is not None:
                    self.metrics.add_output(ids[k], f)
                return f

            def record(k, completed_w, partial_w, ids=ids):
                srcs = list(range(len(completed_w)))
                w = list(completed_w)
                if partial_w is not None:
                    srcs.append(self.layout.block_of(ids[k]))
                    w.append(partial_w)
                self.metrics.add_weights(ids[k], srcs, w)

            partial = run_block_group(
                completed, partial, q, queries[0].eps, run_layer,
                record if self.metrics is not None else None,
            )
            if self.layout.ends_block(ids[-1]):  # a group never spans two blocks
                completed = completed + [partial]
                partial = None
        if self.post_process:
            h = self._final_aggregate(completed)
            hidden_states = self.final_norm(h)
        else:
            hidden_states = handoff.send(completed, partial)
        return make_viewless_tensor(inp=hidden_states, requires_grad=hidden_states.requires_grad, keep_graph=True)


# ------------------------------------------------------------------------------ model helpers
def attnres_stacks(model_chunks) -> list[AttnResStack]:
    """The AttnRes stacks inside (DDP/Float16Module-wrapped) model chunks; [] for standard models."""
    return [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, AttnResStack)]


def _hybrid_stacks(model_chunks) -> list[KimiLinearStack]:
    return [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, KimiLinearStack)]


def _record_standard_output(stack: KimiLinearStack, module, args, kwargs, output) -> None:
    """Forward hook on a standard sub-layer: its output f(norm(h)) is what it adds to h."""
    out = output[0] if isinstance(output, tuple) else output
    stack.metrics.add_output(module.layer_number - 1, out.detach() - kwargs["hidden_states"].detach())


def start_depth_metrics(model_chunks) -> None:
    """Record, during the next forward passes, every sub-layer's output RMS and (AttnRes models)
    the depth-attention weights. Standard stacks record through forward hooks on their layers."""
    import functools

    for stack in _hybrid_stacks(model_chunks):
        device = next(stack.parameters()).device
        if isinstance(stack, AttnResStack):
            stack.metrics = DepthMetrics(stack.config.num_layers, stack.layout.num_blocks, device)
        else:
            stack.metrics = DepthMetrics(stack.config.num_layers, None, device)
            stack._metric_hooks = [
                layer.register_forward_hook(functools.partial(_record_standard_output, stack), with_kwargs=True)
                for layer in stack.layers
            ]


def collect_depth_metrics(model_chunks, group=None) -> dict[str, float]:
    """Stop recording and return the means over every rank (a collective over `group`, default the
    world; ranks contribute zeros for layers they do not hold), keyed for the monitor:

    residual/output_rms/sub{l:02d} (every model) and attnres/weight/sub{l:02d}/src{j} (AttnRes: sub
    "final" for the final aggregation; src 0 is the embedding, src n block n). {} when nothing was
    recording.
    """
    import torch.distributed as dist

    stacks = [s for s in _hybrid_stacks(model_chunks) if getattr(s, "metrics", None) is not None]
    if not stacks:
        return {}
    first = stacks[0].metrics
    total = DepthMetrics(first.sq_sum.numel(), first.num_blocks, first.sq_sum.device)
    for stack in stacks:
        for name in ("weight_sum", "tokens", "sq_sum", "elements"):
            getattr(total, name).add_(getattr(stack.metrics, name))
        stack.metrics = None
        for hook in getattr(stack, "_metric_hooks", []):
            hook.remove()
        stack._metric_hooks = []
    flat = torch.cat([total.weight_sum.flatten(), total.tokens, total.sq_sum, total.elements])
    if dist.is_initialized():
        dist.all_reduce(flat, group=group)
    flat = flat.cpu()  # one device-to-host read; the per-entry tests and divisions below run on the host
    rows, cols = total.weight_sum.shape
    sub = total.sq_sum.numel()
    weight_sum, tokens, sq_sum, elements = flat.split([rows * cols, rows, sub, sub])
    weight_sum = weight_sum.view(rows, cols)
    out = {}
    for r in range(rows):
        if tokens[r] == 0:
            continue
        name = "final" if r == rows - 1 else f"{r:02d}"
        for j in range(cols):
            if weight_sum[r, j] > 0:  # the sources this sub-layer sees (softmax weights are > 0)
                out[f"attnres/weight/sub{name}/src{j}"] = float(weight_sum[r, j] / tokens[r])
    for l in range(sub):
        if elements[l] > 0:
            out[f"residual/output_rms/sub{l:02d}"] = float((sq_sum[l] / elements[l]).sqrt())
    return out


__all__ = [
    "AttnResStack", "BlockLayout", "DepthMetrics", "DepthQuery", "attend_completed", "block_layout",
    "collect_depth_metrics", "depth_attention_reference", "merge_partial", "run_block_group",
    "start_depth_metrics",
]
