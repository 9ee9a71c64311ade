"""Run megatron-core on CPU processes (gloo) for tests and CPU training.

megatron-core 0.19.2 assumes CUDA in a handful of places (see ../shared/reference/
megatron-core-0.19.2.md, section 8). `enable()` patches exactly those, and only when CUDA is
absent, so the GPU path is megatron-core's own code (but for the two leak fixes at the end):

1. `torch.cuda.current_device()` (used as a `device=` argument for buffers) answers "cpu".
2. CUDA streams, events and synchronize become no-ops (MoE all-to-all dispatcher, p2p
   communication, checkpoint preloading create or wait on them).
3. Modules that allocate with a literal `device="cuda"` (the pipeline schedules, the optimizer
   wrappers' grad-norm helpers) see a `torch` whose tensor factories map "cuda" to "cpu" and whose
   `autocast("cuda")` is a CPU autocast.
4. MoE's `maybe_move_tensor_to_cpu` only converts CUDA tensors, so on CPU the all-to-all split
   sizes stay tensors and gloo's `all_to_all_single` rejects them; on CPU it converts always.
5. Gradient clipping (`clip_grad_by_total_norm_fp32`) asserts `torch.cuda.FloatTensor` grads; on
   CPU the same scaling (grads *= max_norm / (total_norm + 1e-6) when that is below 1) runs
   without the assert. The norm itself is megatron-core's `get_grad_norm_fp32`, unchanged.
6. The tensor-parallel RNG tracker is created explicitly (its CUDA seeding cannot run), as an
   "inference" tracker whose fork() is a no-op: dropout is 0 in our models, and weights are
   initialised on CPU from the global seed (`use_cpu_initialization`), identical across layouts.
7. Activation recomputation (`tensor_parallel.checkpoint`, behind recompute_granularity=full)
   saves and restores the CUDA RNG state around each recomputed forward; on CPU there is none, so
   reading it answers None and restoring it does nothing. The CPU RNG state, which the CPU ops
   draw from, is saved and restored by the same function unchanged.

Not patchable and therefore avoided on CPU: megatron-core's fp16/bf16 optimizer wrappers and
DistributedOptimizer insist on `torch.cuda.*Tensor` parameters; CPU runs use fp32 and the
non-distributed optimizer.

Two leak fixes are not about CUDA and apply on every device (deltatron.parallel.setup calls
them); without them a dropped Trainer left its process groups alive, each gloo group with its
polling threads (NCCL communicators on GPUs):

- `detach_dispatcher_probs`: megatron-core's all-to-all and all-gather token dispatchers keep the
  last forward's routing probabilities in an attribute (`probs`, `local_probs`; read afterwards
  only for their dtype) together with their autograd graph, which leads to the AccumulateGrad
  nodes of every parameter the router's input came from; those nodes' hooks are closures of the
  DDP wrapper. torch shows Python's garbage collector an autograd node's hooks only while nothing
  on the C++ side (here the kept graph) holds the node too, so the cycle
  DDP -> model -> dispatcher -> graph -> hook -> DDP was never freed: an MoE model, its gradient
  buffers and all its groups outlived the Trainer. The dispatchers now keep the tensor detached
  (same storage and dtype, no graph).
- `forget_destroyed_groups`: megatron-core's destroy_model_parallel leaves two of its globals
  (`_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP` and its gloo twin) set, and the lru_cache on
  `RotaryEmbedding.forward` keeps the last rotary modules (and their `cp_group`) of any model.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types

import torch

_ENABLED = False
_PROBS_DETACHED = False

# Modules whose `torch` global is replaced by the CPU-mapping proxy (patch 3).
_CUDA_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.utils",
    "megatron.core.pipeline_parallel.p2p_communication",
)

_FACTORIES = (
    "zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint",
    "zeros_like", "ones_like", "empty_like", "full_like", "as_tensor",
)


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    d = torch.device(device)
    return torch.device("cpu") if d.type == "cuda" else d


class _CpuTorch(types.ModuleType):
    """A stand-in for the `torch` module that maps device="cuda" to the CPU."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in _FACTORIES:
            def factory(*args, __fn=attr, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _cpu_device(kwargs["device"])
                return __fn(*args, **kwargs)

            return factory
        if name == "autocast":
            def autocast(device_type="cuda", *args, **kwargs):
                return torch.autocast("cpu" if device_type == "cuda" else device_type, *args, **kwargs)

            return autocast
        return attr


class _NoopStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NoopEvent()

    def synchronize(self):
        pass


class _NoopEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def enable() -> bool:
    """Apply the CPU patches when CUDA is unavailable. Idempotent; returns whether active."""
    global _ENABLED
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True

    # 1 + 2
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.Stream = _NoopStream
    torch.cuda.Event = _NoopEvent
    torch.cuda.current_stream = lambda *a, **k: _NoopStream()
    torch.cuda.default_stream = lambda *a, **k: _NoopStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *a, **k: None

    # 3
    proxy = _CpuTorch()
    for name in _CUDA_LITERAL_MODULES:
        module = importlib.import_module(name)
        module.torch = proxy

    # 4
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor):
            tensor = tensor.cpu()
            if as_numpy:
                tensor = tensor.numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu

    # 5
    from megatron.core.optimizer import optimizer as megatron_optimizer

    megatron_optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm

    # 7
    from megatron.core.tensor_parallel import random as tp_random

    tp_random._get_cuda_rng_state = lambda *args, **kwargs: None
    tp_random._set_cuda_rng_state = lambda *args, **kwargs: None

    _ENABLED = True
    return True


@torch.no_grad()
def _clip_grad_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron-core's clip_grad_by_total_norm_fp32 without its CUDA-only assert and kernels."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if isinstance(clip_coeff, torch.Tensor):
        clip_coeff = clip_coeff.clamp_max(1.0)
    elif clip_coeff >= 1.0:
        return
    for g in grads:
        g.mul_(clip_coeff)


def initialize_rng(seed: int) -> None:
    """Seed the global RNG and create megatron-core's tensor-parallel RNG tracker.

    On CUDA this is megatron-core's `model_parallel_cuda_manual_seed`; on CPU (patch 6) a no-op
    tracker, since the CUDA RNG states it manages do not exist.
    """
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def is_enabled() -> bool:
    return _ENABLED


def forget_destroyed_groups() -> None:
    """Drop the references to process groups that megatron-core's destroy_model_parallel leaves
    behind (see the module docstring); call after it. On every device."""
    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    parallel_state._INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP = None
    parallel_state._INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP_GLOO = None
    RotaryEmbedding.forward.cache_clear()  # the cache's keys hold the modules (self)


def detach_dispatcher_probs() -> None:
    """Make megatron-core's token dispatchers keep their routing probabilities without their
    autograd graph (see the module docstring); on every device. Idempotent."""
    global _PROBS_DETACHED
    if _PROBS_DETACHED:
        return
    from megatron.core.transformer.moe import token_dispatcher

    for cls, method, attr in (
        (token_dispatcher.MoEAlltoAllTokenDispatcher, "dispatch_preprocess", "probs"),
        (token_dispatcher.MoEAllGatherTokenDispatcher, "dispatch_postprocess", "local_probs"),
    ):
        setattr(cls, method, _detaching(getattr(cls, method), attr))
    _PROBS_DETACHED = True


def _detaching(method, attr: str):
    """method, after which the instance's `attr` tensor is replaced by its detached self."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        out = method(self, *args, **kwargs)
        kept = getattr(self, attr, None)
        if isinstance(kept, torch.Tensor):
            setattr(self, attr, kept.detach())
        return out

    return wrapper
