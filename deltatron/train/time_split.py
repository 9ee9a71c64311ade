"""Device time of chosen module kinds, forward and backward, from hooks a benchmark installs.

`ModuleTimes(model, {"kda": (KimiDeltaAttention,), ...})` hooks every module of those classes:
a forward pre-hook and a forward hook bracket the forward; identity autograd nodes on the
module's first input and first output that need a gradient bracket its backward (the output's
node runs when the gradient reaches the module, the input's when the module has produced its
input gradient). On CUDA the brackets are CUDA events on the current stream, so the times are
the device's, not the host's queueing; on CPU (synchronous) they are host clock reads. Nested
kinds (routed experts inside the MoE layer) are each timed whole.

Nothing is installed in the model code: a model without a `ModuleTimes` runs no hook at all.
With `ranges=True` the forward brackets also open and close `torch.profiler.record_function`
ranges named after the kind, so a profiler trace groups forward ops by kind.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Iterable, Optional

import torch


class _Clock:
    """A point in time: a recorded CUDA event, or the host clock on CPU."""

    def __init__(self, cuda: bool):
        if cuda:
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record()
            self.host = None
        else:
            self.event, self.host = None, time.perf_counter()

    def seconds_until(self, later: "_Clock") -> float:
        if self.event is not None:
            return self.event.elapsed_time(later.event) / 1e3
        return later.host - self.host


class _Mark(torch.autograd.Function):
    """Identity; its backward calls `on_backward` (when the gradient passes this point)."""

    @staticmethod
    def forward(ctx, x, on_backward):
        ctx.on_backward = on_backward
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.on_backward()
        return grad, None


def _first_grad_tensor(values: Iterable) -> Optional[int]:
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor) and v.requires_grad:
            return i
    return None


class ModuleTimes:
    """Seconds per kind (forward + backward) since the last `read`; see the module docstring."""

    def __init__(self, model: torch.nn.Module | list, kinds: dict[str, tuple[type, ...]], ranges: bool = False):
        self.cuda = torch.cuda.is_available()
        self.ranges = ranges
        self._spans: dict[str, list[tuple[_Clock, _Clock]]] = defaultdict(list)
        self._handles = []
        self.counts: dict[str, int] = {name: 0 for name in kinds}
        chunks = model if isinstance(model, list) else [model]
        for chunk in chunks:
            for module in chunk.modules():
                for name, classes in kinds.items():
                    if isinstance(module, classes):
                        self._hook(module, name)
                        self.counts[name] += 1

    def _hook(self, module: torch.nn.Module, name: str) -> None:
        state: dict = {}

        def pre(mod, args, kwargs):
            state["start"] = _Clock(self.cuda)
            if self.ranges:
                state["range"] = torch.profiler.record_function(f"{name}.forward")
                state["range"].__enter__()
            if not torch.is_grad_enabled():
                return None
            bwd = {}
            close = lambda: self._close(name, bwd)  # noqa: E731
            i = _first_grad_tensor(args)
            if i is not None:
                args = list(args)
                args[i] = _Mark.apply(args[i], close)
                state["bwd"] = bwd
                return tuple(args), kwargs
            key = next((k for k, v in kwargs.items() if _first_grad_tensor([v]) is not None), None)
            if key is None:  # no input needs a gradient
                return None
            kwargs = dict(kwargs, **{key: _Mark.apply(kwargs[key], close)})
            state["bwd"] = bwd
            return args, kwargs

        def post(mod, args, kwargs, output):
            self._spans[name].append((state.pop("start"), _Clock(self.cuda)))
            if self.ranges and "range" in state:
                state.pop("range").__exit__(None, None, None)
            bwd = state.pop("bwd", None)
            if bwd is None:
                return None
            outs = output if isinstance(output, tuple) else (output,)
            i = _first_grad_tensor(outs)
            if i is None:
                return None

            def opened():
                bwd["start"] = _Clock(self.cuda)

            outs = list(outs)
            outs[i] = _Mark.apply(outs[i], opened)
            return tuple(outs) if isinstance(output, tuple) else outs[0]

        self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self._handles.append(module.register_forward_hook(post, with_kwargs=True))

    def _close(self, name: str, bwd: dict) -> None:
        if "start" in bwd:
            self._spans[name].append((bwd.pop("start"), _Clock(self.cuda)))

    def read(self) -> dict[str, float]:
        """Seconds per kind since the last read (synchronises the device), then a new window."""
        if self.cuda:
            torch.cuda.synchronize()
        out = {name: 0.0 for name in self.counts}
        for name, spans in self._spans.items():
            out[name] = sum(a.seconds_until(b) for a, b in spans)
        self._spans = defaultdict(list)
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
