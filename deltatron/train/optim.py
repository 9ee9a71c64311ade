"""Optimizer and learning-rate schedule from megatron-core.

AdamW is megatron-core's optimizer (distributed optimizer when data-parallel and on GPU);
`optim=muonclip` selects deltatron.train.muonclip instead. AdamW's weight
decay follows megatron-core's rule (none on biases and 1-D parameters: norms, KDA's A_log and
dt_bias). The schedule is megatron-core's OptimizerParamScheduler: warmup then cosine, WSD
(warmup-stable-decay) or constant.

Without Apex or Transformer Engine, megatron-core 0.19.2 falls back to per-tensor Python loops
for its multi-tensor kernels; `install_device_multi_tensor_ops` replaces two of them:
- the gradient norm of clipping (`get_grad_norm_fp32`'s `local_multi_tensor_l2_norm`) builds a
  host list of every gradient's norm (`torch.tensor([torch.norm(g) for g in grads])`): one
  device-to-host copy and synchronisation per parameter, 966 per step in the proxy model
  (torch.cuda.set_sync_debug_mode shows them), each stalling the host behind the GPU. The
  replacement computes the same norm on the device with `torch._foreach_norm`;
- `local_multi_tensor_scale` (clipping's in-place scaling of every gradient, and the
  mixed-precision optimizer's copy of its fp32 masters into the bf16 parameters) runs
  `dst.copy_(src * scale)`, two kernels per parameter; the replacement is one foreach call.

Without Apex or Transformer Engine megatron-core's Adam is `torch.optim.AdamW` with torch's
default implementation, `foreach`: one pass over the parameters per operation (about eight: the
moments, weight decay, the denominator, the update). `use_fused_adamw` selects torch's fused
kernel instead (one pass; the issue's references train with `AdamW(fused=True)` too). Apex's or
TE's FusedAdam stays where present.
"""

from __future__ import annotations

import torch

from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from deltatron.train.config import OptimConfig


def build_optimizer(model_chunks, cfg: OptimConfig, *, bf16: bool, distributed: bool):
    """The optimizer `cfg.name` names for the (DDP-wrapped) model chunks: megatron-core's AdamW,
    or MuonClip (deltatron.train.muonclip; shards its own state, so `distributed` is for AdamW)."""
    install_device_multi_tensor_ops()
    if cfg.name == "muonclip":
        from deltatron.train.muonclip import build_muonclip

        return build_muonclip(model_chunks, cfg)
    config = OptimizerConfig(
        optimizer="adam",  # megatron-core's Adam applies decoupled weight decay (AdamW)
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.beta1,
        adam_beta2=cfg.beta2,
        adam_eps=cfg.eps,
        clip_grad=cfg.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=distributed,
    )
    optimizer = get_megatron_optimizer(config, model_chunks)
    use_fused_adamw(optimizer)
    for inner in _distributed_parts(optimizer):
        align_state_index(inner)
        load_adam_steps_per_parameter(inner)
    return optimizer


def use_fused_adamw(optimizer) -> None:
    """Switch every torch.optim.AdamW inside megatron-core's `optimizer` (plain, mixed-precision,
    distributed or chained) to torch's fused implementation. Its "step" state lives on the
    parameter's device (fp32), which torch creates on the first step and
    `load_adam_steps_per_parameter` keeps there on resume."""
    for part in _parts(optimizer):
        inner = getattr(part, "optimizer", None)
        if type(inner) is torch.optim.AdamW:
            for group in [inner.defaults, *inner.param_groups]:
                group["fused"], group["foreach"] = True, False


def multi_tensor_l2_norm_on_device(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for megatron-core's `local_multi_tensor_l2_norm` (the amp_C.multi_tensor_l2norm
    signature; chunk_size, noop_flag and per_tensor are unused there too): the L2 norm of all
    tensors together as a [1] fp32 tensor on their device, with no host synchronisation."""
    tensors = [t for tensor_list in tensor_lists for t in tensor_list]
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def multi_tensor_scale_on_device(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for megatron-core's `local_multi_tensor_scale` (the amp_C.multi_tensor_scale
    signature; chunk_size and noop_flag unused there too): dst = src * scale for every pair of
    tensor_lists = [src, dst], in dst's dtype, as foreach calls."""
    src, dst = tensor_lists
    if all(s is d for s, d in zip(src, dst)):  # clipping: every gradient scaled in place
        torch._foreach_mul_(dst, scale)
    elif scale == 1.0:  # the masters copied into the parameters
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def install_device_multi_tensor_ops() -> None:
    """Make megatron-core use `multi_tensor_l2_norm_on_device` and `multi_tensor_scale_on_device`
    where it would use its per-tensor fallbacks (no Apex, no Transformer Engine); Apex's or TE's
    fused kernels stay when present. Idempotent."""
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads, optimizer as mcore_optimizer

    if clip_grads.l2_norm_impl is mcore_utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = multi_tensor_l2_norm_on_device
    for module in (clip_grads, mcore_optimizer):
        if module.multi_tensor_scale_impl is mcore_utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = multi_tensor_scale_on_device


def _parts(optimizer) -> list:
    """The megatron-core optimizers `optimizer` is made of: itself, or the parts of a chain."""
    return getattr(optimizer, "chained_optimizers", [optimizer])


def _distributed_parts(optimizer) -> list[DistributedOptimizer]:
    """The megatron-core DistributedOptimizers in `optimizer`."""
    return [p for p in _parts(optimizer) if isinstance(p, DistributedOptimizer)]


def prepare_for_loading(optimizer) -> None:
    """Give a distributed optimizer that has not stepped yet its state tensors, so that its load
    template can be built.

    Without Apex or Transformer Engine, megatron-core 0.19.2's DistributedOptimizer.state_dict()
    reads each parameter's Adam "step", which torch's Adam creates on the first step; building the
    load template of a fresh run's optimizer (every resume) failed on `assert len(steps) == 1`.
    megatron-core's own remedy (used by its FSDP path) is one zero-gradient step on the main
    parameters; every value it writes (main parameters, moments, step) is then overwritten by
    the checkpoint.
    """
    for inner in _distributed_parts(optimizer):
        if not inner.optimizer.state:
            inner._init_optimizer_states_with_dummy_values()


def load_adam_steps_per_parameter(optimizer: DistributedOptimizer) -> None:
    """Make the distributed optimizer load torch Adam's per-parameter "step" correctly.

    Without Apex or Transformer Engine the inner optimizer is torch's Adam, which keeps "step" as
    a tensor in every parameter's state. megatron-core 0.19.2's load_state_dict restores it from
    the param groups, with two defects:
    - it puts one tensor object into every parameter's state; Adam increments each parameter's
      step in place, so after a resume the shared step grew by the number of parameters per
      update and the bias corrections were wrong (the losses left the uninterrupted run's at the
      second step after the resume). Each parameter gets its own copy after the load.
    - it then copies each parameter's checkpointed tensors over every tensor of that parameter's
      state, "step" included, which the checkpoint's per-parameter tensors never hold: every
      resume failed with KeyError 'step'. The missing key is passed as None, which megatron-core's
      copy skips.
    """
    set_states = optimizer._set_main_param_and_optimizer_states
    load_state_dict = optimizer.load_state_dict

    def set_states_without_step(model_param, tensors):
        set_states(model_param, {"step": None, **tensors})

    def load_with_own_steps(state_dict):
        load_state_dict(state_dict)
        fused = any(group.get("fused") for group in optimizer.optimizer.param_groups)
        for param, state in optimizer.optimizer.state.items():
            if torch.is_tensor(state.get("step")):
                # the fused kernel reads each step on its parameter's device, as fp32
                step = state["step"]
                state["step"] = step.to(param.device, torch.float32, copy=True) if fused else step.clone()

    optimizer._set_main_param_and_optimizer_states = set_states_without_step
    optimizer.load_state_dict = load_with_own_steps


def align_state_index(optimizer: DistributedOptimizer) -> None:
    """Point the distributed optimizer's (group, position) index of each model parameter at that
    parameter's main shard in the inner optimizer's param_groups.

    megatron-core 0.19.2 numbers a group's parameters in grad-buffer order (the bf16 buffer, then
    the fp32 one) but fills the group as [fp32 shards, then fp32 copies of the bf16 shards]. The
    two orders agree only when a group holds one dtype, as in Megatron-LM where every parameter is
    bf16. Ours keeps KDA's A_log, dt_bias and output-norm weight in fp32, so the checkpoint path
    (which reads optimizer state through the index) fetched another parameter's state: saving
    failed on a size mismatch, and loading would have put state on the wrong parameters. The
    optimizer step itself does not use the index and was right.
    """
    index = {}
    for group, (fp32_params, float16_params) in enumerate(
        zip(optimizer.model_fp32_groups, optimizer.model_float16_groups)
    ):
        main_params = optimizer.optimizer.param_groups[group]["params"]
        for position, param in enumerate([*fp32_params, *float16_params]):
            shard = optimizer._get_model_param_range_map(param)["param"]
            if main_params[position].numel() != shard.size:
                raise RuntimeError(
                    f"distributed optimizer: group {group} position {position} holds "
                    f"{main_params[position].numel()} values, the parameter's shard {shard.size}; "
                    "megatron-core's param-group layout changed, update align_state_index"
                )
            index[param] = (group, position)
    optimizer.model_param_group_index_map = index


def build_scheduler(optimizer, cfg: OptimConfig, total_steps: int) -> OptimizerParamScheduler:
    """Learning-rate schedule in optimizer steps."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    style = {"cosine": "cosine", "wsd": "WSD", "constant": "constant"}[cfg.schedule]
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else cfg.lr,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=total_steps,
        lr_decay_style=style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=total_steps,
        wd_incr_style="constant",
        wsd_decay_steps=max(1, round(cfg.wsd_decay_fraction * total_steps)) if style == "WSD" else None,
        lr_wsd_decay_style=cfg.wsd_decay_style if style == "WSD" else None,
    )
    # Step k (1-based) uses the rate the schedule gives at k: the first warmup rate rather than
    # 0 for the first update, and min_lr for the last.
    scheduler.step(increment=1)
    return scheduler
