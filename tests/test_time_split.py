"""ModuleTimes (deltatron/train/time_split.py): forward and backward brackets per module kind."""

from __future__ import annotations

import time

import torch

from deltatron.train.time_split import ModuleTimes


class _Slow(torch.nn.Module):
    """A linear whose forward and backward each take at least `seconds`."""

    def __init__(self, seconds: float):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.seconds = seconds

    def forward(self, x, scale=1.0):
        time.sleep(self.seconds)
        return _SleepBackward.apply(self.lin(x) * scale, self.seconds), None


class _SleepBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seconds):
        ctx.seconds = seconds
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.seconds)
        return grad, None


class _Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _Slow(0.05)
        self.other = torch.nn.Linear(8, 8)

    def forward(self, x):
        time.sleep(0.02)
        y, _ = self.inner(x, scale=2.0)
        return self.other(y)


def test_forward_and_backward_are_timed_per_kind_and_outputs_unchanged():
    torch.manual_seed(0)
    model = _Outer()
    x = torch.randn(4, 8, requires_grad=True)
    ref = model(x)
    ref.sum().backward()
    ref_grad = x.grad.clone()
    x.grad = None

    times = ModuleTimes(model, {"outer": (_Outer,), "slow": (_Slow,)})
    assert times.counts == {"outer": 1, "slow": 1}
    out = model(x)
    out.sum().backward()
    seconds = times.read()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, ref_grad)
    assert 0.1 <= seconds["slow"] < 0.5  # 0.05 forward + 0.05 backward
    assert seconds["outer"] >= seconds["slow"] + 0.02
    assert times.read() == {"outer": 0.0, "slow": 0.0}  # a new window

    times.remove()
    model(x).sum().backward()
    assert times.read() == {"outer": 0.0, "slow": 0.0}


def test_input_passed_by_keyword_is_bracketed():
    model = _Slow(0.03)
    times = ModuleTimes(model, {"slow": (_Slow,)})
    out, _ = model(x=torch.randn(2, 8, requires_grad=True))
    out.sum().backward()
    assert times.read()["slow"] >= 0.06  # forward and backward


def test_no_backward_bracket_without_gradients():
    model = _Outer()
    times = ModuleTimes(model, {"slow": (_Slow,)})
    with torch.no_grad():
        model(torch.randn(2, 8))
    assert 0.05 <= times.read()["slow"] < 0.1  # forward only
