"""The dense MLP's SwiGLU: deltatron's fused kernel against the eager form megatron-core's MLP runs
without Transformer Engine, timed in one run on one GPU.

    python bench/swiglu.py                      # the dense_1b MLP: 4 x 4096 tokens, 2048 -> 2 x 5632

For each shape, forward + backward (CUDA events, median of --iters after a warm-up) of
  activation   y = silu(x[:, :F]) * x[:, F:] on x [tokens, 2F]: the eager reference
               (deltatron.kernels.swiglu.swiglu_reference, megatron-core's ops) and the fused
               kernel (deltatron.kernels.swiglu.swiglu), bf16
  mlp          the same inside fc2(act(fc1(x))) with bf16 weights (torch linears, no bias),
               to show the share of the MLP the activation is
  expert act   the activation with the MoE routing weight per row (fp32), as the grouped
               experts run it
Results go to bench/results/swiglu_<gpu>.json with the ratio eager / fused of each row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import device_name, device_tag, environment  # noqa: E402
from kda_op import cuda_time_ms  # noqa: E402
from deltatron.kernels.swiglu import swiglu, swiglu_reference  # noqa: E402


def fwd_bwd(fn, inputs, grad):
    def run():
        out = fn(*inputs)
        out.backward(grad)
        for t in inputs:
            t.grad = None
    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4 * 4096)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    N, h, f = args.tokens, args.hidden, args.ffn
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x_act = torch.randn(N, 2 * f, **bf16).requires_grad_()
    probs = torch.rand(N, device="cuda").requires_grad_()
    x = torch.randn(N, h, **bf16).requires_grad_()
    w1 = (torch.randn(2 * f, h, **bf16) / h**0.5).requires_grad_()
    w2 = (torch.randn(h, f, **bf16) / f**0.5).requires_grad_()
    dy_act = torch.randn(N, f, **bf16)
    dy = torch.randn(N, h, **bf16)
    cases = {
        "activation": (lambda act: (lambda a: act(a)), [x_act], dy_act),
        "mlp": (lambda act: (lambda a, b, c: F.linear(act(F.linear(a, b)), c)), [x, w1, w2], dy),
        "expert act": (lambda act: (lambda a, p: act(a, p)), [x_act, probs], dy_act),
    }
    rows = []
    for name, (make, inputs, grad) in cases.items():
        row = dict(case=name, tokens=N, hidden=h, ffn=f)
        for impl, act in (("eager", swiglu_reference), ("fused", swiglu)):
            row[f"{impl}_fwdbwd_ms"] = cuda_time_ms(fwd_bwd(make(act), inputs, grad), 3, args.iters)
        row["eager_over_fused"] = row["eager_fwdbwd_ms"] / row["fused_fwdbwd_ms"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    gpu = device_name()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"swiglu_{device_tag(gpu)}.json")
    with open(out, "w") as fh:
        json.dump(dict(gpu=gpu, **environment(), reference="eager (megatron-core's ops)",
                       rows=rows), fh, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
