"""Memory and throughput planner: will a run configuration fit on N GPUs, and how fast will it go?

    deltatron-plan model=kimi_linear_48b_a3b parallel=tp2 train.micro_batch_size=1 \\
        data.seq_length=4096 train.global_batch_size=2048 --gpus 64 --gpu h100

The configuration is composed from conf/ exactly as the trainer composes it (Hydra overrides),
and the layout is checked by the trainer's own `ParallelConfig.validate`. For every pipeline rank
the planner adds up, in bytes per GPU:

* weights, bf16 (2 B/param; fp32 runs 4 B), gradients in megatron-core DDP's fp32 `main_grad`
  buffer (4 B/param: the trainer reduces gradients in fp32);
* optimizer state, as the trainer builds it:
  - AdamW on GPUs is megatron-core's distributed optimizer: fp32 master + two fp32 moments
    (12 B/param) sharded over the data-parallel ranks (dense parameters: dp x cp ranks; expert
    parameters: the expert-data-parallel ranks, world / (pp x ep x etp));
  - MuonClip (deltatron.train.muonclip): Muon matrices keep an fp32 master and one momentum
    (8 B/param), AdamW parameters master + two moments (12 B/param), by whole tensors over the
    same data-parallel ranks (deltatron.parallel.muon_sharding's greedy placement: at most the
    average plus one tensor), plus the Newton-Schulz workspace of the largest matrix; its
    gradient buffer's padding (whole tensors per owner's shard, logged at start-up) is not counted;
* activations saved for the backward pass, counted tensor by tensor for each sub-layer type
  from what its forward saves (`_kda_items`, `_mla_items`, `_mlp_items`, `_moe_items`), times the
  micro-batches in flight on that pipeline rank under megatron-core's schedule (1F1B: pp - rank;
  interleaved: its warm-up count of model chunks + 1, divided by vpp), divided by tensor
  parallelism for head/hidden-sharded tensors and, with sequence parallelism, for the residual
  stream too; with full recompute as the trainer runs it (`train.recompute_*`, megatron-core's
  checkpointing; `recomputed_sublayers`) a recomputed unit keeps only its input, and the largest
  unit's activations come back as a transient while it is recomputed; selective recompute is
  planned as none (an upper bound);
* context parallelism (parallel.cp): activations per rank are those of its 1/cp of the row, plus
  MLA's all-gathered K|V of the whole row and KDA's wider fp32 kernel values
  (`_context_parallel_items`);
* AttnRes caches (model.residual): block sums (attnres_blocks + 1) or every sub-layer output
  (2 x layers + 1) x tokens x hidden per micro-batch in flight;
* transient peaks, of which the largest counts: MoE token-dispatch buffers (top-k copies of the
  tokens, times the routing imbalance), the output layer's logits and fp32 softmax on the last
  stage (with train.cross_entropy_chunk_size > 0 one block's logits, fp32 copy and bf16 gradient,
  plus the output weight's fp32 gradient accumulator: deltatron/model/chunked_loss.py), the
  recomputed unit, MuonClip's Newton-Schulz workspace.

A layout fits when peak x (1 + fragmentation) + reserved <= the GPU's memory; `MemoryAssumptions`
documents both allowances. The peak (before allowances) is what torch.cuda.max_memory_allocated
reports, which bench/plan_validate.py measures to check this model.

Step time: every rank's FLOPs per micro-batch (deltatron.train.flops, split by kernel kind) at
`KernelRates` (measured achievable rates, not spec peaks), plus tensor-parallel and expert-parallel
collectives at `GPUSpec` link bandwidths (under CP also MLA's K|V all-gather and dK|dV
reduce-scatter, and the last CP rank's larger share of causal attention), times the micro-batches
plus the pipeline bubble (recomputed sub-layers count their forward twice: 4/3 of their FLOPs)
((pp - 1) / vpp micro-batches), plus the exposed data-parallel gradient/parameter traffic and the
optimizer step. MFU divides the model FLOPs (3 x forward, as the trainer logs) by the spec peak.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Optional

from deltatron.model.config import ModelConfig
from deltatron.parallel.layout import ParallelConfig
from deltatron.train.config import describe_recompute

GiB = 1024**3


# ---------------------------------------------------------------------------- assumptions
@dataclass(frozen=True)
class GPUSpec:
    """One GPU model. Memory is what the driver reports (nvidia-smi's total); bandwidths are
    achievable per-GPU collective bus bandwidths, not link peaks."""

    name: str
    memory_bytes: int
    peak_tflops: float  # bf16 dense spec-sheet peak (deltatron.train.flops.PEAK_TFLOPS_BF16)
    hbm_gbps: float  # memory bandwidth, for the (memory-bound) optimizer step
    nvlink_gbps: float = 360.0  # NVLink 4 (450 GB/s per direction): NCCL busbw inside a node
    network_gbps: float = 40.0  # 400 Gb/s InfiniBand NDR per GPU (50 GB/s), NCCL busbw across nodes
    gpus_per_node: int = 8


GPUS = {
    "h100": GPUSpec("H100 80GB HBM3", 81559 * 2**20, 989.0, 3350.0),
    "h200": GPUSpec("H200 141GB HBM3e", 143771 * 2**20, 989.0, 4800.0),
}


@dataclass(frozen=True)
class KernelRates:
    """Achievable TFLOP/s per GPU by kernel kind (bf16), from measurements on one H100
    (../shared/reference/measurements.md and bench/results): a bf16 8192^3 matmul reaches 767;
    the model's projections (inner dims 2304-9216) are taken at 70% of that; the routed experts'
    grouped GEMMs at that rate for many tokens per expert, falling to half of it at 256 tokens
    per expert (skinny GEMMs; so fewer, fuller experts per GPU run faster); flash attention fwd+bwd
    measured 488 at T=4096; our Triton KDA fwd+bwd took 64.3 ms for 8 x 4096 tokens of 32 heads
    of 128 (bench result, H100), i.e. 6.2 TFLOP/s in Kimi Linear eq. 13 FLOPs. H200 has the same
    compute; its faster memory would help the memory-bound KDA kernel, which we do not count."""

    dense: float = 540.0
    # routed experts' grouped GEMMs: the dense rate for large token counts per expert, half of
    # it at `experts_half_tokens` tokens per expert per micro-batch (skinny GEMMs), i.e.
    # rate = experts * n / (n + experts_half_tokens)
    experts: float = 540.0
    experts_half_tokens: float = 256.0
    attention: float = 450.0
    kda: float = 6.2
    # share of the data-parallel gradient reduction that the backward pass does not hide
    # (megatron-core DDP overlaps bucketed reduce-scatters with the backward)
    dp_grad_exposed: float = 0.2


@dataclass(frozen=True)
class MemoryAssumptions:
    """Allowances on top of the counted peak (torch.cuda.max_memory_allocated)."""

    # CUDA context (~0.5 GiB), NCCL communicators and their buffers for the TP/PP/DP/EP groups
    # (~0.3-0.5 GiB each), cuBLAS/Transformer Engine workspaces
    reserved_gib: float = 5.0
    # the caching allocator's reserved-but-unallocated memory over the allocated peak
    fragmentation: float = 0.08
    # dropless MoE: an expert-parallel rank receives this many times the average token count
    # (the aux-loss-free bias keeps routing near balance, early steps are worse)
    moe_imbalance: float = 1.3


# ---------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class LayerParams:
    """Parameters of one sub-layer: TP-sharded (split over tensor-parallel ranks), replicated on
    every TP rank, and routed experts (split over ep x etp); `muon` is the part MuonClip updates
    with Muon (deltatron.train.muon_params.PARAM_RULE), the rest uses AdamW. `largest` is the
    biggest single tensor (for MuonClip's whole-tensor sharding), `largest_muon` the biggest
    logical Muon matrix (Newton-Schulz runs on it whole)."""

    sharded: int = 0
    replicated: int = 0
    experts: int = 0
    muon: int = 0
    largest: int = 0
    largest_muon: int = 0
    num_experts: int = 0  # routed experts (their tensors are sharded whole over EP)
    muon_replicated: int = 0  # Muon matrices replicated over TP (MLA's down-projections)

    @property
    def total(self) -> int:
        return self.sharded + self.replicated + self.experts


def kda_params(cfg: ModelConfig) -> LayerParams:
    d, h, dk = cfg.hidden_size, cfg.kda_num_heads, cfg.kda_head_dim
    hk = h * dk
    linears = 3 * d * hk + d * dk + dk * hk + d * h + d * dk + dk * hk + hk * d  # q k v f_a f_b beta g_a g_b o
    small = 3 * hk * cfg.kda_conv_kernel + h + hk  # convolutions, A_log, dt_bias (sharded, AdamW)
    return LayerParams(
        sharded=linears + small, replicated=dk + d,  # o_norm (shared by heads), pre-norm
        muon=linears, largest=d * hk, largest_muon=d * hk,
    )


def mla_params(cfg: ModelConfig) -> LayerParams:
    d, n = cfg.hidden_size, cfg.mla_num_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    if cfg.q_lora_rank is None:
        q, q_rep = d * n * qk, 0
    else:  # the q down-projection and its norm are replicated like the kv ones
        q, q_rep = cfg.q_lora_rank * n * qk, d * cfg.q_lora_rank + cfg.q_lora_rank
    kv_down = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)  # replicated under TP (model/mla.py)
    kv_up = cfg.kv_lora_rank * n * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    out = n * cfg.v_head_dim * d
    return LayerParams(
        sharded=q + kv_up + out, replicated=kv_down + q_rep + cfg.kv_lora_rank + d,
        muon=q + kv_up + out + kv_down + (d * cfg.q_lora_rank if cfg.q_lora_rank else 0),
        largest=max(q, kv_up, out, kv_down),
        largest_muon=max(q, cfg.kv_lora_rank * n * max(cfg.qk_nope_head_dim, cfg.v_head_dim), out, kv_down),
        muon_replicated=kv_down + (d * cfg.q_lora_rank if cfg.q_lora_rank else 0),
    )


def dense_mlp_params(cfg: ModelConfig) -> LayerParams:
    d, f = cfg.hidden_size, cfg.dense_ffn_hidden_size
    return LayerParams(sharded=3 * d * f, replicated=d, muon=3 * d * f, largest=2 * d * f, largest_muon=d * f)


def moe_params(cfg: ModelConfig) -> LayerParams:
    d, fe = cfg.hidden_size, cfg.moe_ffn_hidden_size
    shared = 3 * d * fe * cfg.num_shared_experts
    experts = cfg.num_experts * 3 * d * fe
    return LayerParams(
        sharded=shared, replicated=cfg.num_experts * d + d, experts=experts,
        muon=shared + experts, largest=max(2 * d * fe * max(cfg.num_shared_experts, 1), cfg.num_experts * d),
        largest_muon=d * fe * max(cfg.num_shared_experts, 1), num_experts=cfg.num_experts,
    )


def sublayer_kinds(cfg: ModelConfig) -> list[str]:
    """The 2 x num_layers sub-layers in order: 'kda' | 'mla', then 'mlp' | 'moe'."""
    mla = set(cfg.mla_layer_indices())
    kinds = []
    for i in range(cfg.num_layers):
        kinds.append("mla" if i in mla else "kda")
        kinds.append("mlp" if i < cfg.first_k_dense else "moe")
    return kinds


def params_by_kind(cfg: ModelConfig) -> dict[str, LayerParams]:
    return {"kda": kda_params(cfg), "mla": mla_params(cfg), "mlp": dense_mlp_params(cfg), "moe": moe_params(cfg)}


def embedding_params(cfg: ModelConfig) -> int:
    return cfg.vocab_size * cfg.hidden_size  # vocab-parallel: sharded over TP


def output_params(cfg: ModelConfig) -> tuple[int, int]:
    """(output layer, sharded over TP; final norm, replicated). A tied output layer reuses the
    embedding on a one-stage pipeline and keeps a copy on the last stage otherwise."""
    return cfg.vocab_size * cfg.hidden_size, cfg.hidden_size


def pipeline_ranks(cfg: ModelConfig, par: ParallelConfig) -> list[list[list[int]]]:
    """Kimi layer indices per pipeline rank, per model chunk: the trainer's split
    (deltatron.train.trainer.stage_pattern: `parallel.pipeline_layers`, or as even as possible
    with earlier stages taking the extras), virtual stage s on rank s % pp."""
    stages = par.pp * (par.vpp or 1)
    sizes = par.pipeline_layers
    if sizes is None:
        base, extra = divmod(cfg.num_layers, stages)
        sizes = [base + (1 if s < extra else 0) for s in range(stages)]
    bounds, start = [], 0
    for n in sizes:
        bounds.append(list(range(start, start + n)))
        start += n
    return [[bounds[c * par.pp + r] for c in range(par.vpp or 1)] for r in range(par.pp)]


# ---------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class Items:
    """Bytes per token a sub-layer saves for its backward, by how they divide over ranks:
    `replicated` (the residual stream: divided by TP only under sequence parallelism), `sharded`
    (heads / hidden split over TP), `full` (gathered over the sequence: never divided), `routed`
    (per routed token copy on the expert side, before top-k and imbalance factors)."""

    replicated: float = 0.0
    sharded: float = 0.0
    full: float = 0.0
    routed: float = 0.0


def _norm(a: int, width: int) -> int:
    """Bytes per token deltatron's RMSNorm (model/norm.py) saves itself over `width` elements, on
    a GPU (the fused kernel, deltatron/kernels/rms_norm.py): its input and one fp32 rstd. Its
    output, saved by the next linear, is counted by the caller."""
    return a * width + 4


def _kda_items(cfg: ModelConfig, a: int, documents: bool) -> Items:
    """KimiDeltaAttention.forward (deltatron/model/kda.py) on a GPU, tensor by tensor: the
    pre-norm's (`_norm`); the gathered input x that every input projection saves and the
    gathered low-rank f_a, g_a outputs; the short convolutions' inputs (the fused kernels
    recompute the rest, deltatron/kernels/short_conv.py); the recurrence kernel's inputs q, k, v,
    g (fp32) and beta (fp32: sigmoid's output, and with more than one row per micro-batch also
    the kernel's contiguous copy, counted here in both cases)
    and the A_qk, A_inv it keeps (chunk-size wide per head; A_qk in the activations' dtype, the
    kernel's operand dtype for bf16, A_inv fp32); the decay gate's input; the
    gated output norm's inputs o and gate, and the output projection's input; with packed
    documents the int64 positions in the document."""
    h, hk = cfg.hidden_size, cfg.kda_num_heads * cfg.kda_head_dim
    hv, heads = hk, cfg.kda_num_heads  # value heads = key heads, dv = dk (ModelConfig)
    sharded = (
        a * (2 * hk + hv)  # short convolutions' inputs
        + a * (2 * hk + hv) + 4 * hk + 2 * 4 * heads  # recurrence inputs: q, k, v, g, beta (x2)
        + (a + 4) * cfg.kda_chunk_size * heads  # A_qk and A_inv the recurrence keeps
        + a * hk  # decay gate's input
        + 2 * a * hv + a * hv  # output norm's o and gate; output projection's input
    )
    full = a * h + a * 2 * cfg.kda_head_dim + (8 if documents else 0)
    return Items(replicated=_norm(a, h), sharded=sharded, full=full)


def _mla_items(cfg: ModelConfig, a: int) -> Items:
    """megatron-core MLASelfAttention (no q compression): the pre-norm's tensors (`_norm`) and
    its output (the input of q_proj and the kv down-projection), the kv latent before and after
    its RMSNorm with the shared key part, q and k (nope + rope, per head), v, the attention
    output (the output projection's input; flash/TE attention keeps only q, k, v, out and an
    fp32 log-sum-exp; on CPU, SDPA's math path also keeps the attention probabilities)."""
    n, qk = cfg.mla_num_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    sharded = a * n * (2 * qk + 2 * cfg.v_head_dim) + 4 * n
    full = a * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    if cfg.q_lora_rank:
        full += a * 2 * cfg.q_lora_rank
    h = cfg.hidden_size
    return Items(replicated=_norm(a, h) + a * h, sharded=sharded, full=full)


def _context_parallel_items(cfg: ModelConfig, a: int, cp: int) -> dict[str, Items]:
    """What context parallelism adds per local token (deltatron/parallel/cp_kda.py, the MLA path
    of deltatron/model/mla.py): MLA keeps the all-gathered K|V of the whole row (cp x the local
    tokens) for its backward; KDA runs its kernel with K extra fp32 value columns (the slice's
    state map), so its fp32 value input and output are V + K wide."""
    if cp == 1:
        return {}
    n, qk = cfg.mla_num_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    hk = cfg.kda_num_heads * cfg.kda_head_dim
    return {
        "mla": Items(sharded=cp * a * n * (qk + cfg.v_head_dim)),
        "kda": Items(sharded=4 * 2 * (hk + hk)),
    }


def _mlp_items(cfg: ModelConfig, a: int) -> Items:
    """SwiGLU MLP (deltatron.model.mlp, the fused activation a GPU runs): the pre-norm's tensors
    (`_norm`) and its output (fc1's input); fc1's output (gate and up, which the fused SwiGLU
    keeps) and fc2's input: 3 x ffn per token (counted with saved-tensor hooks, the kernel run by
    the Triton interpreter; megatron-core's eager glu on CPU keeps 5)."""
    return Items(
        replicated=_norm(a, cfg.hidden_size) + a * cfg.hidden_size,
        sharded=3 * a * cfg.dense_ffn_hidden_size,
    )


def _moe_items(cfg: ModelConfig, a: int) -> Items:
    """megatron-core MoE layer: the pre-norm's tensors (`_norm`) and its output; the router in
    fp32 (its input cast to fp32, logits, sigmoid scores, normalised probabilities); the shared
    expert as a SwiGLU MLP; per routed copy of a token, with grouped GEMMs
    (deltatron.model.grouped_experts, the fused SwiGLU a GPU runs): the dispatched input and its
    copy in the expert-padded rows (fc1's input), fc1's output, fc2's input, the routing prob
    (fp32) and two int64 row indices; with megatron-core's
    per-expert loop: the dispatched input, fc1's output, SiLU output, fc2's input and the expert
    output kept for the probability-weighted combine. (The grouped path's padding of every
    expert's rows to a multiple of 16 adds at most 15 rows per expert and layer: under 1% at
    training shapes, not counted.)"""
    h, fe = cfg.hidden_size, cfg.moe_ffn_hidden_size
    router = 4 * h + 3 * 4 * cfg.num_experts
    routed = 2 * a * h + 3 * a * fe + 4 + 2 * 8 if cfg.moe_grouped_gemm else 2 * a * h + 4 * a * fe
    return Items(
        replicated=_norm(a, h) + a * h + router,
        sharded=3 * a * fe * cfg.num_shared_experts,  # fc1's output and fc2's input, as _mlp_items
        routed=routed,
    )


# ---------------------------------------------------------------------------- the plan
@dataclass
class RankMemory:
    """Bytes on one GPU of a pipeline rank."""

    pipeline_rank: int
    layers: list[int]
    params: float  # local parameter count
    weights: float
    gradients: float
    optimizer: float
    activations: float
    in_flight: float  # micro-batches of this rank's layers held at the peak
    attnres_cache: float
    transient: float
    transient_kind: str

    @property
    def peak(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.attnres_cache + self.transient


@dataclass
class Plan:
    model: str
    gpu: GPUSpec
    world: int
    layout: str
    dp: int
    expert_dp: int
    optimizer: str
    recompute: str
    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    num_microbatches: int
    ranks: list[RankMemory]
    required: list[float]  # per pipeline rank: peak x (1 + fragmentation) + reserved
    capacity: float
    step_seconds: float
    step_breakdown: dict[str, float]
    tokens_per_second: float
    mfu: float
    assumptions: dict = field(default_factory=dict)
    cross_entropy_chunk_size: int = 0  # train.cross_entropy_chunk_size (0: whole logits)

    @property
    def worst(self) -> int:
        return max(range(len(self.ranks)), key=lambda i: self.required[i])

    @property
    def fits(self) -> bool:
        return max(self.required) <= self.capacity


def _layer_flops(cfg: ModelConfig, kind: str, seq_length: int) -> dict[str, float]:
    """Training FLOPs per token of one sub-layer by kernel kind (deltatron.train.flops)."""
    from deltatron.train.flops import kda_recurrence_flops, mla_attention_flops

    p = params_by_kind(cfg)[kind]
    if kind == "moe":
        routed = cfg.moe_topk * 3 * cfg.hidden_size * cfg.moe_ffn_hidden_size
        return {"dense": 6.0 * (p.total - p.experts), "experts": 6.0 * routed}
    out = {"dense": 6.0 * p.total}
    if kind == "mla":
        out["attention"] = 3.0 * mla_attention_flops(cfg, seq_length)
    if kind == "kda":
        out["kda"] = 3.0 * kda_recurrence_flops(cfg)
    return out


def recomputed_sublayers(num_sublayers: int, recompute: str, method: Optional[str] = None,
                         num_layers: Optional[int] = None) -> list[list[int]]:
    """The units of one model chunk's sub-layers (0..num_sublayers-1, in order) that full recompute
    checkpoints, as megatron-core's `checkpointed_forward` (and AttnResStack) cut them: uniform,
    consecutive units of num_layers sub-layers covering the chunk; block, the first num_layers
    sub-layers, one unit each. [] for none and selective."""
    if recompute != "full":
        return []
    method, n = method or "uniform", num_layers or 1
    if method == "uniform":
        return [list(range(i, min(i + n, num_sublayers))) for i in range(0, num_sublayers, n)]
    return [[i] for i in range(min(n, num_sublayers))]


def in_flight_microbatches(par: ParallelConfig, rank: int, num_microbatches: int) -> float:
    """Micro-batches of a rank's layers whose activations are held at its peak, under
    megatron-core's schedules: none/1F1B: min(pp - rank, M); interleaved: (warm-up model chunks
    + 1) / vpp, with megatron-core's warm-up (pp - rank - 1) x 2 + (vpp - 1) x pp."""
    if par.pp == 1:
        return 1.0
    if not par.vpp:
        return float(min(par.pp - rank, num_microbatches))
    warmup = (par.pp - rank - 1) * 2 + (par.vpp - 1) * par.pp
    return min(warmup + 1, num_microbatches * par.vpp) / par.vpp


def build_plan(
    model: ModelConfig,
    par: ParallelConfig,
    *,
    world: int,
    gpu: GPUSpec,
    seq_length: int,
    micro_batch_size: int,
    global_batch_size: int,
    optimizer: str = "adamw",
    precision: str = "bf16",
    recompute: str = "none",
    recompute_method: Optional[str] = None,
    recompute_num_layers: Optional[int] = None,
    cross_entropy_chunk_size: int = 0,
    documents: bool = True,
    rates: KernelRates = KernelRates(),
    memory: MemoryAssumptions = MemoryAssumptions(),
) -> Plan:
    """The plan of one configuration on `world` GPUs of kind `gpu` (see the module docstring).
    recompute, recompute_method, recompute_num_layers: the trainer's train.recompute_granularity,
    _method and _num_layers (full: method uniform and 1 sub-layer per unit unless given).
    cross_entropy_chunk_size: train.cross_entropy_chunk_size (0: megatron-core's whole logits).
    Raises ValueError naming the problem for layouts the trainer would reject."""
    if recompute not in ("none", "full", "selective"):
        raise ValueError(f"recompute={recompute!r}: choose none, full or selective")
    if recompute_method not in (None, "uniform", "block"):
        raise ValueError(f"recompute_method={recompute_method!r}: choose uniform or block")
    if model.residual != "standard" and recompute == "full" and (recompute_method or "uniform") == "uniform":
        recompute_num_layers = 1  # AttnResStack recomputes one sub-layer per unit
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision={precision!r}: plan bf16 (GPU training) or fp32")
    par.validate(world, model)
    par.validate_sequence(seq_length, micro_batch_size, model)
    if par.ep > 1 and par.tp > 1 and not par.sequence_parallel and model.first_k_dense < model.num_layers:
        raise ValueError(
            f"parallel.ep={par.ep} with parallel.tp={par.tp} needs parallel.sequence_parallel=true "
            "(megatron-core: expert and tensor parallelism in training require sequence parallelism)"
        )
    t, cp, pp = par.tp, par.cp, par.pp
    etp = par.etp or par.tp
    dp = par.data_parallel_size(world)
    expert_dp = world // (pp * par.ep * etp)
    if global_batch_size % (micro_batch_size * dp):
        raise ValueError(
            f"train.global_batch_size={global_batch_size} must be a multiple of micro_batch_size*dp "
            f"= {micro_batch_size}*{dp}"
        )
    num_microbatches = global_batch_size // (micro_batch_size * dp)
    sp = par.sequence_parallel and t > 1
    a = 2 if precision == "bf16" else 4
    weight_bytes = a
    kinds = sublayer_kinds(model)
    params = params_by_kind(model)
    items = {
        "kda": _kda_items(model, a, documents), "mla": _mla_items(model, a),
        "mlp": _mlp_items(model, a), "moe": _moe_items(model, a),
    }
    for kind, extra in _context_parallel_items(model, a, cp).items():
        base = items[kind]
        items[kind] = Items(base.replicated, base.sharded + extra.sharded, base.full, base.routed)
    tokens = micro_batch_size * seq_length / cp  # tokens of one micro-batch on this TP group
    local_tokens = tokens / (t if sp else 1)  # of the residual stream on this rank
    k_routed = model.moe_topk * memory.moe_imbalance

    def act_bytes(kind: str) -> float:
        it = items[kind]
        per_token = it.replicated / (t if sp else 1) + it.sharded / t + it.full
        routed = it.routed * k_routed * local_tokens
        if it.routed and etp > 1:
            # expert-TP gathers the routed tokens over etp ranks and splits the expert width
            fe = model.moe_ffn_hidden_size
            routed = k_routed * local_tokens * (2 * a * model.hidden_size * etp + 4 * a * fe)
        return per_token * tokens + routed

    ranks: list[RankMemory] = []
    chunks = pipeline_ranks(model, par)
    for r, rank_chunks in enumerate(chunks):
        layers = [i for c in rank_chunks for i in c]
        subs = [kinds[2 * i + j] for i in layers for j in (0, 1)]
        dense = sum(params[k].sharded / t + params[k].replicated for k in subs)
        expert = sum(params[k].experts / (par.ep * etp) for k in subs)
        # this rank's Muon matrices (MuonClip): dense ones split over TP unless replicated
        muon_dense = sum(
            (params[k].muon - params[k].experts - params[k].muon_replicated) / t + params[k].muon_replicated
            for k in subs
        )
        if r == 0:
            dense += embedding_params(model) / t
        if r == pp - 1:
            out, norm = output_params(model)
            if model.untie_embeddings or pp > 1:
                dense += out / t
            dense += norm
        local = dense + expert
        weights = weight_bytes * local
        gradients = 4.0 * local  # fp32 main_grad buffer (grad_reduce_in_fp32)
        master = 4.0 if precision == "bf16" else 0.0
        ns_workspace = 0.0
        if optimizer == "adamw" and precision == "bf16":
            # megatron-core's distributed optimizer: fp32 master + 2 moments, sharded over DP
            optim = (master + 8.0) * (dense / (dp * cp) + expert / expert_dp)
        elif optimizer == "adamw":
            optim = 8.0 * local  # fp32 on CPU: megatron-core's plain optimizer, moments only
        else:
            muon_bytes, adam_bytes = master + 4.0, master + 8.0
            largest = max((params[k].largest for k in subs), default=0)
            # routed experts are all Muon matrices; embedding, output layer, norms, convolutions,
            # A_log, dt_bias and the router use AdamW
            dense_state = muon_bytes * muon_dense + adam_bytes * (dense - muon_dense)
            optim = dense_state / (dp * cp) + muon_bytes * expert / expert_dp + adam_bytes * largest / t
            largest_muon = max((params[k].largest_muon for k in subs), default=0)
            # the full matrix gathered in bf16, Newton-Schulz's X, X X^T, and the polynomial terms
            ns_workspace = 6 * 2.0 * largest_muon
        in_flight = in_flight_microbatches(par, r, num_microbatches)
        # each model chunk is one stack: its recomputed units keep their input only
        per_mb, recomputed_unit = 0.0, 0.0
        for chunk in rank_chunks:
            chunk_subs = [kinds[2 * i + j] for i in chunk for j in (0, 1)]
            units = recomputed_sublayers(len(chunk_subs), recompute, recompute_method, recompute_num_layers)
            covered = {s for u in units for s in u}
            per_mb += len(units) * a * model.hidden_size * local_tokens
            per_mb += sum(act_bytes(k) for s, k in enumerate(chunk_subs) if s not in covered)
            for u in units:
                recomputed_unit = max(recomputed_unit, sum(act_bytes(chunk_subs[s]) for s in u))
        # the final norm and output layer input on the last stage
        if r == pp - 1:
            per_mb += 2 * a * model.hidden_size * local_tokens
        activations = per_mb * in_flight
        blocks = {"standard": 0, "block_attnres": model.attnres_blocks + 1, "attnres": 2 * model.num_layers + 1}[model.residual]
        attnres = blocks * a * model.hidden_size * local_tokens * in_flight
        transients = {
            "pipeline send/recv buffers": 2.0 * a * model.hidden_size * local_tokens * (2 if pp > 1 else 0),
        }
        if "moe" in subs:
            transients["MoE dispatch buffers"] = 2.0 * k_routed * etp * a * model.hidden_size * local_tokens
        if r == pp - 1 and cross_entropy_chunk_size > 0:
            # one block's logits: fp32, with the bf16 matmul output (forward) or bf16 logit
            # gradient (backward) beside it; the output weight's fp32 gradient accumulator and,
            # bf16, one block's weight gradient; the gradient of the output layer's input
            block = min(cross_entropy_chunk_size, tokens)
            low = a if a != 4 else 0  # fp32: the matmul output is the fp32 tensor, updated in place
            vh = model.vocab_size / t * model.hidden_size
            transients["chunked loss: one block's logits"] = (
                (4 + low) * model.vocab_size / t * block + (4 + low) * vh + a * model.hidden_size * tokens
            )
        elif r == pp - 1:
            # logits (bf16), their fp32 copy and softmax in the vocab-parallel cross entropy
            transients["logits + fp32 softmax"] = (a + 4 + 4) * model.vocab_size / t * tokens
        if recomputed_unit:
            transients["recomputed unit"] = recomputed_unit
        if ns_workspace:
            transients["Newton-Schulz workspace"] = ns_workspace
        kind = max(transients, key=transients.get)
        ranks.append(RankMemory(
            pipeline_rank=r, layers=layers, params=local, weights=weights, gradients=gradients,
            optimizer=optim, activations=activations, in_flight=in_flight, attnres_cache=attnres,
            transient=transients[kind], transient_kind=kind,
        ))
    required = [rm.peak * (1 + memory.fragmentation) + memory.reserved_gib * GiB for rm in ranks]

    # ---- step time
    def rank_seconds(rm: RankMemory) -> dict[str, float]:
        flops: dict[str, float] = {}
        for chunk in chunks[rm.pipeline_rank]:
            units = recomputed_sublayers(2 * len(chunk), recompute, recompute_method, recompute_num_layers)
            covered = {s for u in units for s in u}
            for s, (i, j) in enumerate((i, j) for i in chunk for j in (0, 1)):
                again = 4.0 / 3.0 if s in covered else 1.0  # a recomputed forward: 4 passes' FLOPs, not 3
                for key, v in _layer_flops(model, kinds[2 * i + j], seq_length).items():
                    flops[key] = flops.get(key, 0.0) + v * again
        if rm.pipeline_rank == pp - 1:
            # the chunked loss runs the output layer's forward matmul again in the backward
            passes = 8.0 if cross_entropy_chunk_size > 0 else 6.0
            flops["dense"] = flops.get("dense", 0.0) + passes * model.vocab_size * model.hidden_size
        work_tokens = micro_batch_size * seq_length / (cp * t)  # a rank's share of a micro-batch
        # tokens each local expert gets per micro-batch: this rank's tokens and those of the
        # other EP ranks (x etp gathered), top-k copies spread over all experts
        per_expert = local_tokens * model.moe_topk * par.ep * etp / max(model.num_experts, 1)
        rate = {
            "dense": rates.dense, "attention": rates.attention, "kda": rates.kda,
            "experts": rates.experts * per_expert / (per_expert + rates.experts_half_tokens),
        }
        # contiguous CP slices: the last rank's queries see the most keys, (2 cp - 1) / cp x the
        # mean causal attention work within one long document (the slowest rank sets the pace)
        imbalance = {"experts": memory.moe_imbalance, "attention": (2 * cp - 1) / cp}
        compute = sum(
            v * work_tokens * imbalance.get(key, 1.0) / (rate[key] * 1e12)
            for key, v in flops.items()
        )
        subs = [kinds[2 * i + j] for i in rm.layers for j in (0, 1)]
        tp_comm = 0.0
        if t > 1:  # all-gather + reduce-scatter per sub-layer, forward and backward
            tp_comm = len(subs) * 4 * a * model.hidden_size * tokens * (t - 1) / t / (gpu.nvlink_gbps * 1e9)
        ep_comm = 0.0
        if par.ep > 1 and "moe" in subs:
            # megatron-core orders expert ranks etp-ep-edp-pp: an EP group is etp x ep
            # consecutive ranks, inside one node when that is at most a node's GPUs
            bw = gpu.nvlink_gbps if par.ep * etp <= gpu.gpus_per_node else gpu.network_gbps
            per_layer = 4 * k_routed * a * model.hidden_size * local_tokens * (par.ep - 1) / par.ep
            ep_comm = subs.count("moe") * per_layer / (bw * 1e9)
        cp_comm = 0.0
        if cp > 1 and "mla" in subs:
            # all-gather of K|V of the whole row per MLA layer, reduce-scatter of dK|dV backward;
            # CP groups are consecutive after TP, inside a node while tp x cp fits one
            bw = gpu.nvlink_gbps if t * cp <= gpu.gpus_per_node else gpu.network_gbps
            qk = model.qk_nope_head_dim + model.qk_rope_head_dim
            row = micro_batch_size * seq_length * a * model.mla_num_heads / t * (qk + model.v_head_dim)
            cp_comm = subs.count("mla") * 2 * row * (cp - 1) / cp / (bw * 1e9)
        return {
            "compute": compute, "tensor-parallel": tp_comm, "expert all-to-all": ep_comm,
            "context-parallel": cp_comm,
        }

    per_rank = [rank_seconds(rm) for rm in ranks]
    slowest = max(range(pp), key=lambda i: sum(per_rank[i].values()))
    micro = per_rank[slowest]
    per_mb = sum(micro.values())
    bubble = (pp - 1) / (par.vpp or 1) * per_mb
    rm = ranks[slowest]
    dp_bw = gpu.network_gbps if world > gpu.gpus_per_node else gpu.nvlink_gbps
    dense_local = rm.params - sum(params[kinds[2 * i + 1]].experts / (par.ep * etp) for i in rm.layers)
    expert_local = rm.params - dense_local

    def ring(nbytes: float, n: int) -> float:
        return nbytes * (n - 1) / n / (dp_bw * 1e9) if n > 1 else 0.0

    # reduce-scatter fp32 gradients (partly hidden by the backward), all-gather bf16 params: both
    # optimizers (MuonClip's buckets are laid out so that each owner's shard holds its whole
    # tensors, deltatron.parallel.muon_sharding; their few percent of padding is not modelled)
    grads = ring(4.0 * dense_local, dp * cp) + ring(4.0 * expert_local, expert_dp)
    params_gather = ring(a * dense_local, dp * cp) + ring(a * expert_local, expert_dp)
    dp_time = rates.dp_grad_exposed * grads + params_gather
    # optimizer step: memory-bound pass over state, gradients and weights
    opt_time = (rm.optimizer * 2 + rm.gradients + rm.weights * 2) / (gpu.hbm_gbps * 1e9)
    breakdown = {
        "compute": micro["compute"] * num_microbatches,
        "tensor-parallel comm": micro["tensor-parallel"] * num_microbatches,
        "expert all-to-all": micro["expert all-to-all"] * num_microbatches,
        "context-parallel comm": micro["context-parallel"] * num_microbatches,
        "pipeline bubble": bubble,
        "data-parallel comm (exposed)": dp_time,
        "optimizer step": opt_time,
    }
    step = sum(breakdown.values())
    tokens_per_step = global_batch_size * seq_length
    from deltatron.train.flops import training_flops_per_token

    model_flops = training_flops_per_token(model, seq_length) * tokens_per_step
    return Plan(
        model=model.name, gpu=gpu, world=world, layout=par.describe(world), dp=dp, expert_dp=expert_dp,
        optimizer=optimizer,
        recompute="selective (planned as none: an upper bound)" if recompute == "selective"
        else describe_recompute(recompute, recompute_method, recompute_num_layers),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size, global_batch_size=global_batch_size,
        num_microbatches=num_microbatches, ranks=ranks, required=required, capacity=float(gpu.memory_bytes),
        step_seconds=step, step_breakdown=breakdown, tokens_per_second=tokens_per_step / step,
        mfu=model_flops / (step * world * gpu.peak_tflops * 1e12),
        assumptions={"rates": asdict(rates), "memory": asdict(memory)},
        cross_entropy_chunk_size=cross_entropy_chunk_size,
    )


# ---------------------------------------------------------------------------- report
def _gib(x: float) -> str:
    return f"{x / GiB:7.2f}"


def format_plan(plan: Plan) -> str:
    mem = plan.assumptions["memory"]
    lines = [
        f"deltatron-plan: {plan.model} on {plan.world} x {plan.gpu.name}: {plan.layout}, expert-dp {plan.expert_dp}",
        f"  batch {plan.global_batch_size} x {plan.seq_length} tokens per step, micro-batch {plan.micro_batch_size}, "
        f"{plan.num_microbatches} micro-batches per data-parallel rank; optimizer {plan.optimizer}; recompute {plan.recompute}; "
        + (f"loss by blocks of {plan.cross_entropy_chunk_size} tokens" if plan.cross_entropy_chunk_size
           else "whole-sequence logits"),
        "",
        "memory per GPU (GiB)          " + "".join(f"   pp{r.pipeline_rank:<4d}" for r in plan.ranks),
    ]
    rows = [
        ("  layers", lambda r: f"{r.layers[0] + 1:>3d}-{r.layers[-1] + 1:<3d}" if r.layers else "   -   "),
        ("  parameters (B)", lambda r: f"{r.params / 1e9:7.2f}"),
        ("  weights", lambda r: _gib(r.weights)),
        ("  gradients (fp32)", lambda r: _gib(r.gradients)),
        ("  optimizer state", lambda r: _gib(r.optimizer)),
        ("  activations", lambda r: _gib(r.activations)),
        ("    micro-batches in flight", lambda r: f"{r.in_flight:7.2f}"),
        ("  AttnRes cache", lambda r: _gib(r.attnres_cache)),
        ("  largest transient", lambda r: _gib(r.transient)),
        ("  = peak allocated", lambda r: _gib(r.peak)),
    ]
    for label, fn in rows:
        lines.append(f"{label:<30s}" + "".join(f"  {fn(r)}" for r in plan.ranks))
    lines.append(f"{'  required (+frag, reserved)':<30s}" + "".join(f"  {_gib(x)}" for x in plan.required))
    lines.append(
        f"  capacity {plan.capacity / GiB:.2f} GiB; required = peak x {1 + mem['fragmentation']:.2f} "
        f"+ {mem['reserved_gib']:.1f} GiB reserved"
    )
    for r in plan.ranks:
        lines.append(f"  pp{r.pipeline_rank} largest transient: {r.transient_kind}")
    lines.append("")
    lines.append(
        f"step time {plan.step_seconds:.2f} s: "
        + ", ".join(f"{k} {v:.2f}" for k, v in plan.step_breakdown.items() if v > 0)
    )
    lines.append(
        f"estimated {plan.tokens_per_second:,.0f} tokens/s ({plan.tokens_per_second / plan.world:,.0f} per GPU), "
        f"MFU {100 * plan.mfu:.1f}% of {plan.gpu.peak_tflops:.0f} TFLOP/s"
    )
    worst = plan.worst
    if plan.fits:
        lines.append(
            f"FITS: the fullest GPU (pp{worst}) needs {plan.required[worst] / GiB:.2f} of "
            f"{plan.capacity / GiB:.2f} GiB"
        )
    else:
        over = [r for r, req in zip(plan.ranks, plan.required) if req > plan.capacity]
        for r in over:
            terms = sorted(
                [("weights", r.weights), ("gradients", r.gradients), ("optimizer state", r.optimizer),
                 ("activations", r.activations), ("AttnRes cache", r.attnres_cache), (r.transient_kind, r.transient)],
                key=lambda kv: -kv[1],
            )
            lines.append(
                f"DOES NOT FIT: pp{r.pipeline_rank} needs {plan.required[r.pipeline_rank] / GiB:.2f} GiB > "
                f"{plan.capacity / GiB:.2f} GiB ({', '.join(f'{k} {v / GiB:.2f}' for k, v in terms[:4])} GiB)"
            )
        recompute = "" if plan.recompute.startswith("full (uniform") else (
            "activation recomputation (train.recompute_granularity=full), "
        )
        chunked = "" if plan.cross_entropy_chunk_size else "the chunked loss (train.cross_entropy_chunk_size=4096), "
        lines.append(
            "  options: more tensor/pipeline/expert parallelism, a smaller train.micro_batch_size or "
            f"data.seq_length, {recompute}{chunked}more GPUs, or a larger GPU (--gpu)"
        )
    return "\n".join(lines)


def plan_to_dict(plan: Plan) -> dict:
    out = asdict(plan)
    out["gpu"] = asdict(plan.gpu)
    out["fits"] = plan.fits
    out["peak_bytes"] = [r.peak for r in plan.ranks]
    return out


# ---------------------------------------------------------------------------- CLI
def compose_run_config(overrides: list[str]):
    """The trainer's RunConfig from conf/ and Hydra overrides (deltatron.train.__main__)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from deltatron.train.__main__ import conf_dir, to_run_config
    from deltatron.train.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    return to_run_config(cfg)[0]


def recompute_overrides(recompute: str) -> list[str]:
    """The Hydra overrides that `--recompute X` stands for, placed after the others:
    train.recompute_granularity=X, with the fields that do not apply to X reset (those that do,
    e.g. train.recompute_method with full, are kept)."""
    out = [f"train.recompute_granularity={recompute}"]
    if recompute != "full":
        out += ["train.recompute_method=null", "train.recompute_num_layers=null"]
    if recompute != "selective":
        out += ["train.recompute_modules=null"]
    return out


def plan_from_overrides(overrides: list[str], *, gpus: int, gpu: str, recompute: Optional[str] = None) -> Plan:
    """The plan of the run these overrides configure. Activation recomputation is the run's own
    (train.recompute_*); `recompute` (none/full/selective) replaces its granularity."""
    if gpu not in GPUS:
        raise ValueError(f"--gpu {gpu!r}: choose one of {', '.join(GPUS)}")
    if recompute is not None:
        overrides = list(overrides) + recompute_overrides(recompute)  # Hydra: the last value wins
    run = compose_run_config(overrides)
    precision = "bf16" if run.train.precision in ("auto", "bf16") else "fp32"
    if run.train.recompute_granularity == "full":
        run.train.recompute_config(run.model)  # the trainer's checks of method and unit size
    return build_plan(
        run.model, run.parallel, world=gpus, gpu=GPUS[gpu], seq_length=run.data.seq_length,
        micro_batch_size=run.train.micro_batch_size, global_batch_size=run.train.global_batch_size,
        optimizer=run.optim.name, precision=precision, recompute=run.train.recompute_granularity,
        recompute_method=run.train.recompute_method, recompute_num_layers=run.train.recompute_num_layers,
        cross_entropy_chunk_size=run.train.cross_entropy_chunk_size, documents=run.data.document_boundaries,
    )


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="deltatron-plan",
        description="Per-GPU memory and estimated throughput of a run configuration; exits 1 when "
        "it does not fit. Positional arguments are the trainer's Hydra overrides.",
    )
    parser.add_argument("--gpus", type=int, required=True, help="world size (number of GPUs)")
    parser.add_argument("--gpu", default="h100", help=f"GPU kind: {', '.join(GPUS)} (default h100)")
    parser.add_argument(
        "--recompute", default=None, choices=("none", "full", "selective"),
        help="activation recomputation: short for the override train.recompute_granularity=X "
        "(default: the run configuration's train.recompute_*; full plans megatron-core's "
        "checkpointing as the trainer runs it, method and unit size from train.recompute_method "
        "and train.recompute_num_layers, uniform 1 by default)",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=kimi_linear_48b_a3b parallel.tp=2")
    args = parser.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o and not o.startswith("~")]
    if bad:
        parser.error(f"{bad[0]!r} is not a Hydra override (key=value, e.g. parallel.tp=2)")
    if args.gpus < 1:
        parser.error(f"--gpus {args.gpus}: need at least 1")
    try:
        plan = plan_from_overrides(args.overrides, gpus=args.gpus, gpu=args.gpu.lower(), recompute=args.recompute)
    except SystemExit as exc:  # the trainer's configuration checks
        print(f"deltatron-plan: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # Hydra: unknown key or group, wrong type; layout checks
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""
        print(f"deltatron-plan: {type(exc).__name__}: {exc}{cause}", file=sys.stderr)
        return 2
    print(json.dumps(plan_to_dict(plan), indent=1) if args.json else format_plan(plan))
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
