"""The run configuration: typed dataclass schemas that Hydra fills from conf/ and the command line.

conf/config.yaml composes one file per group (model, parallel, optim, data, train, logging) over
`RunConfig`, registered here as the structured base. Because the base is a dataclass tree, a
misspelt key (`train.stpes=5`) or a mistyped value (`train.steps=many`) is rejected by Hydra with
the offending key named, and `__post_init__` checks catch values that are typed right but invalid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore

from deltatron.data.config import DataConfig
from deltatron.model.config import ModelConfig
from deltatron.parallel.layout import ParallelConfig


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (megatron-core's optimizer and OptimizerParamScheduler).

    name: "adamw" (megatron-core's AdamW) or "muonclip" (deltatron.train.muonclip: Muon for the
    hidden weight matrices, AdamW with beta1/beta2/eps for the rest, QK-clip on MLA layers).
    """

    name: str = "adamw"
    lr: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0  # max global grad norm; 0 disables clipping
    # "cosine": warmup then cosine to min_lr; "wsd": warmup, stable, then decay over the last
    # `wsd_decay_fraction` of the steps; "constant": warmup then constant.
    schedule: str = "cosine"
    warmup_steps: int = 20
    wsd_decay_fraction: float = 0.2
    wsd_decay_style: str = "linear"  # linear, cosine, exponential or minus_sqrt
    # MuonClip only (optim=muonclip)
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5  # Newton-Schulz iterations
    # Newton-Schulz precision: bfloat16 (Moonlight/K2) or float32 (exact comparisons in tests;
    # bf16 rounding makes runs under different layouts agree only to about 1% of an update)
    muon_ns_dtype: str = "bfloat16"
    muon_rms_scale: float = 0.2  # update RMS target: 0.2 * sqrt(max(A, B)) scaling (Moonlight)
    qk_clip_tau: Optional[float] = 100.0  # max attention logit per MLA head; null: no QK-clip

    def __post_init__(self) -> None:
        errors = []
        if self.name not in ("adamw", "muonclip"):
            errors.append(f"optim.name={self.name!r}: choose adamw or muonclip (optim=adamw / optim=muonclip)")
        if not 0 <= self.muon_momentum < 1:
            errors.append(f"optim.muon_momentum={self.muon_momentum} must be in [0, 1)")
        if self.muon_ns_steps < 1 or self.muon_rms_scale <= 0:
            errors.append("optim.muon_ns_steps must be >= 1 and optim.muon_rms_scale > 0")
        if self.muon_ns_dtype not in ("bfloat16", "float32"):
            errors.append(f"optim.muon_ns_dtype={self.muon_ns_dtype!r}: choose bfloat16 or float32")
        if self.qk_clip_tau is not None and self.qk_clip_tau <= 0:
            errors.append(f"optim.qk_clip_tau={self.qk_clip_tau} must be > 0 (null disables QK-clip)")
        if self.schedule not in ("cosine", "wsd", "constant"):
            errors.append(f"optim.schedule={self.schedule!r}: choose cosine, wsd or constant")
        if self.wsd_decay_style not in ("linear", "cosine", "exponential", "minus_sqrt"):
            errors.append(f"optim.wsd_decay_style={self.wsd_decay_style!r} is not supported")
        if not 0 < self.wsd_decay_fraction <= 1:
            errors.append("optim.wsd_decay_fraction must be in (0, 1]")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            errors.append(f"need 0 <= optim.min_lr ({self.min_lr}) <= optim.lr ({self.lr}), lr > 0")
        if self.warmup_steps < 0 or self.clip_grad < 0 or self.weight_decay < 0:
            errors.append("optim.warmup_steps, optim.clip_grad and optim.weight_decay must be >= 0")
        if errors:
            raise ValueError("invalid optim config: " + "; ".join(errors))


@dataclass
class TrainConfig:
    steps: int = 300
    micro_batch_size: int = 8
    global_batch_size: int = 8
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), bf16 or fp32
    seed: int = 1234
    eval_interval: int = 50  # validation loss every N steps (0: never)
    eval_batches: int = 4
    dry_run: bool = False  # validate and print the resolved config, then exit
    run_dir: Optional[str] = None  # default: runs/<model>-<time>
    # checkpoints (deltatron/train/resume.py): every save_interval steps and at the end (0: only
    # when preempted); in save_dir (default <run_dir>/checkpoints), the newest keep_last kept
    save_interval: int = 0
    save_dir: Optional[str] = None
    keep_last: int = 3
    # write checkpoints in a background process (tensors are staged to host memory at the step
    # boundary; the directory appears when the write has finished on every rank)
    async_save: bool = False
    # "none", "auto" (the newest complete checkpoint in save_dir, if any) or a checkpoint path
    resume: str = "auto"
    # a model checkpoint (deltatron-import's output, or any save_model / training checkpoint's
    # weights) to start a fresh run from, e.g. to continue pretraining released weights; ignored
    # when resuming
    init_from: Optional[str] = None
    # a step whose loss or gradients are not finite, or (loss_spike_factor > 0) whose loss exceeds
    # loss_spike_factor x the mean of the last good losses, is skipped; max_bad_steps in a row
    # stop the run
    max_bad_steps: int = 5
    loss_spike_factor: float = 0.0
    # Activation recomputation: megatron-core's, selected as with Megatron-LM's --recompute-*
    # flags and passed into its TransformerConfig (`recompute_config`). Layers count the hybrid
    # stack's sub-layers (two per Kimi layer: the KDA/MLA mixer and the dense/MoE FFN).
    #   none:      every activation is kept for the backward
    #   full:      a recomputed unit keeps only its input and runs its forward again in the
    #              backward. recompute_method uniform (default): every sub-layer of every pipeline
    #              stage, in units of recompute_num_layers (default 1) consecutive sub-layers;
    #              block: only the first recompute_num_layers sub-layers of each pipeline stage
    #   selective: only the recompute_modules inside each sub-layer (default [core_attn]; see
    #              RECOMPUTE_MODULES for what works with deltatron's layers)
    recompute_granularity: str = "none"
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    recompute_modules: Optional[list[str]] = None
    # Output-layer loss by blocks of tokens (deltatron/model/chunked_loss.py): > 0 computes the
    # logits and the fp32 cross entropy this many tokens at a time and recomputes each block's
    # logits in the backward, so no [tokens, vocab] tensor is kept (megatron-core's path keeps
    # ~10 bytes per token and vocab entry at bf16: 100 GiB for 64k tokens of a 163,840 vocab).
    # The same loss and gradients; costs one more output-layer matmul. 0: megatron-core's
    # output layer and vocab_parallel_cross_entropy. Passed into its TransformerConfig.
    cross_entropy_chunk_size: int = 0

    def __post_init__(self) -> None:
        errors = self._recompute_errors()
        if self.cross_entropy_chunk_size < 0:
            errors.append(f"train.cross_entropy_chunk_size={self.cross_entropy_chunk_size} must be >= 0 (0: off)")
        if self.steps < 1:
            errors.append(f"train.steps={self.steps} must be >= 1")
        if self.micro_batch_size < 1 or self.global_batch_size < self.micro_batch_size:
            errors.append(
                f"need 1 <= train.micro_batch_size ({self.micro_batch_size}) <= "
                f"train.global_batch_size ({self.global_batch_size})"
            )
        if self.precision not in ("auto", "bf16", "fp32"):
            errors.append(f"train.precision={self.precision!r}: choose auto, bf16 or fp32")
        if self.eval_interval < 0 or self.eval_batches < 1:
            errors.append("train.eval_interval must be >= 0 and train.eval_batches >= 1")
        if self.save_interval < 0 or self.keep_last < 1 or self.max_bad_steps < 1:
            errors.append("need train.save_interval >= 0, train.keep_last >= 1, train.max_bad_steps >= 1")
        if self.loss_spike_factor != 0 and self.loss_spike_factor <= 1:
            errors.append(f"train.loss_spike_factor={self.loss_spike_factor}: use 0 (off) or a factor > 1")
        if errors:
            raise ValueError("invalid train config: " + "; ".join(errors))

    def _recompute_errors(self) -> list[str]:
        errors = []
        g = self.recompute_granularity
        if g not in ("none", "full", "selective"):
            return [f"train.recompute_granularity={g!r}: choose none, full or selective"]
        if g != "full" and (self.recompute_method is not None or self.recompute_num_layers is not None):
            errors.append(
                f"train.recompute_method / train.recompute_num_layers apply to "
                f"train.recompute_granularity=full only (it is {g}); leave them null"
            )
        if g != "selective" and self.recompute_modules is not None:
            errors.append(
                f"train.recompute_modules applies to train.recompute_granularity=selective only (it is {g}); "
                "leave it null"
            )
        if g == "full":
            if self.recompute_method not in (None, "uniform", "block"):
                errors.append(f"train.recompute_method={self.recompute_method!r}: choose uniform or block")
            if self.recompute_num_layers is not None and self.recompute_num_layers < 1:
                errors.append(f"train.recompute_num_layers={self.recompute_num_layers} must be >= 1")
            if self.recompute_method == "block" and self.recompute_num_layers is None:
                errors.append(
                    "train.recompute_method=block needs train.recompute_num_layers (the sub-layers "
                    "recomputed on each pipeline stage)"
                )
        if g == "selective":
            modules = self.recompute_modules if self.recompute_modules is not None else ["core_attn"]
            if not modules:
                errors.append("train.recompute_modules=[] recomputes nothing: name modules or use recompute_granularity=none")
            for m in modules:
                if m in RECOMPUTE_MODULES_REFUSED:
                    errors.append(f"train.recompute_modules: {m!r} {RECOMPUTE_MODULES_REFUSED[m]}")
                elif m not in RECOMPUTE_MODULES:
                    errors.append(
                        f"train.recompute_modules: unknown module {m!r}; choose from {', '.join(RECOMPUTE_MODULES)}"
                    )
        return errors

    def recompute_config(self, model: ModelConfig) -> dict:
        """The recomputation fields of megatron-core's TransformerConfig for this model (empty for
        none). Raises ValueError for choices that do not work with this model or installation."""
        g = self.recompute_granularity
        if g == "none":
            return {}
        if g == "full":
            sublayers = 2 * model.num_layers
            method = self.recompute_method or "uniform"
            num = self.recompute_num_layers or 1
            if num > sublayers:
                raise ValueError(
                    f"train.recompute_num_layers={num} exceeds the model's {sublayers} sub-layers "
                    f"(two per layer of model.num_layers={model.num_layers})"
                )
            if model.residual != "standard" and method == "uniform" and num > 1:
                raise ValueError(
                    f"model.residual={model.residual} recomputes one sub-layer per unit (each sub-layer's "
                    "input is a depth attention over earlier outputs, formed outside the unit): use "
                    "train.recompute_num_layers=1 with recompute_method=uniform, or recompute_method=block"
                )
            return dict(recompute_granularity="full", recompute_method=method, recompute_num_layers=num)
        modules = list(self.recompute_modules) if self.recompute_modules is not None else ["core_attn"]
        from deltatron.model.te import resolve_transformer_impl, te_available

        impl = resolve_transformer_impl(model.transformer_impl)
        has_moe = model.first_k_dense < model.num_layers
        if "layernorm" in modules and not te_available():
            raise ValueError(
                "train.recompute_modules: 'layernorm' needs Transformer Engine installed (megatron-core "
                "0.19.2's CheckpointWithoutOutput reads TE's FP8 state even in bf16/fp32 and fails "
                "without it); install the `te` extra or leave 'layernorm' out"
            )
        if "moe_act" in modules and not (has_moe and impl == "transformer_engine" and model.moe_grouped_gemm):
            raise ValueError(
                "train.recompute_modules: 'moe_act' recomputes the activation inside Transformer "
                "Engine's grouped experts: it needs MoE layers, model.transformer_impl resolving to "
                "transformer_engine and model.moe_grouped_gemm=true (deltatron's local "
                "GroupedGemmExperts does not implement it); use 'moe' instead"
            )
        if ("moe" in modules or "shared_experts" in modules) and not has_moe:
            raise ValueError("train.recompute_modules: 'moe'/'shared_experts' need MoE layers (model.first_k_dense < num_layers)")
        if "shared_experts" in modules and not model.num_shared_experts:
            raise ValueError("train.recompute_modules: 'shared_experts' needs model.num_shared_experts >= 1")
        return dict(recompute_granularity="selective", recompute_modules=modules)

    def describe_recompute(self) -> str:
        """One phrase for banners and plans, e.g. 'full (uniform, 1 sub-layer per unit)'."""
        return describe_recompute(
            self.recompute_granularity, self.recompute_method, self.recompute_num_layers, self.recompute_modules
        )


def describe_recompute(granularity: str, method: Optional[str] = None, num_layers: Optional[int] = None,
                       modules: Optional[list[str]] = None) -> str:
    """TrainConfig's recompute_* fields as one phrase (unset ones read as their defaults: full is
    uniform with 1 sub-layer per unit, selective recomputes core_attn)."""
    if granularity == "full":
        method, num = method or "uniform", num_layers or 1
        if method == "uniform":
            return f"full (uniform, {num} sub-layer{'s' if num > 1 else ''} per unit)"
        return f"full (block, the first {num} sub-layer{'s' if num > 1 else ''} of each pipeline stage)"
    if granularity == "selective":
        return f"selective ({', '.join(modules or ['core_attn'])})"
    return "none"


# Selective recomputation (train.recompute_granularity=selective): megatron-core's module names
# that work with deltatron's layers. Checked on CPU (local modules, tests/test_recompute.py:
# identical loss and gradients): core_attn (MLA's core attention; KDA's kernels already keep only
# their inputs), mla_up_proj (MLA's K/V/Q up-projections), mlp (dense FFN sub-layers), moe (the
# whole MoE sub-layer), shared_experts. 'layernorm' and 'moe_act' need Transformer Engine
# (TrainConfig.recompute_config says why).
RECOMPUTE_MODULES = ("core_attn", "mla_up_proj", "mlp", "moe", "shared_experts", "layernorm", "moe_act")
RECOMPUTE_MODULES_REFUSED = {
    "gdn_norm_out": "is megatron-core's GatedDeltaNet output norm; deltatron's KDA layer has no such hook",
}


@dataclass
class LoggingConfig:
    log_interval: int = 10  # console/wandb line every N steps
    wandb: bool = True
    wandb_mode: str = "offline"  # offline (default: no login needed), online or disabled
    wandb_project: str = "deltatron"
    wandb_entity: Optional[str] = None
    run_name: Optional[str] = None
    # per-device bf16 dense peak TFLOP/s for MFU; without it MFU is reported only for devices in
    # deltatron.train.flops.PEAK_TFLOPS_BF16 (the start-up banner prints which applies)
    peak_tflops: Optional[float] = None
    tensorboard: bool = False  # also write TensorBoard scalars to <run_dir>/tensorboard (extra "obs")
    progress_bar: bool = True  # rich progress bar with ETA when stdout is a terminal (rank 0)

    def __post_init__(self) -> None:
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logging.wandb_mode={self.wandb_mode!r}: choose offline, online or disabled")
        if self.log_interval < 1:
            raise ValueError("logging.log_interval must be >= 1")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
