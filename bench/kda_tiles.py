"""Tile sizes of the per-sub-block KDA kernels: each launch configuration timed on one GPU.

    python bench/kda_tiles.py                   # B=8, T=4096, H=32, D=128, chunk 64, bf16

Times triton_intra._scores_kernel (the forward's decayed scores) and
triton_grad._grad_pairwise_kernel (the backward's score gradients) with CUDA events, median of
--iters launches, for every candidate (BK, warps), on inputs shaped as the model feeds them
(q, k unit-norm bf16, g fp32 <= 0, score gradients fp32). The launchers' choice is
triton_common.pair_config; this measures whether another configuration beats it. Results go to
bench/results/kda_tiles_<gpu>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import device_name, device_tag, environment  # noqa: E402
from kda_op import cuda_time_ms, make_inputs  # noqa: E402
from deltatron.kernels.kda.triton_common import SUB, chunk_layout, pair_config  # noqa: E402
from deltatron.kernels.kda.triton_grad import _grad_pairwise_kernel  # noqa: E402
from deltatron.kernels.kda.triton_intra import _scores_kernel  # noqa: E402

CHUNK = 64
CANDIDATES = {
    "scores": [(128, 4), (128, 8)],
    "grad_pairwise": [(32, 4), (32, 8), (64, 4), (64, 8), (128, 8)],
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    B, T, H, K = args.batch, args.seq_len, args.heads, args.head_dim
    q, k, _, g, beta = (x.detach().reshape(B * T, *x.shape[2:]).contiguous()
                        for x in make_inputs(B, T, H, K))
    layout = chunk_layout([b * T for b in range(B + 1)], CHUNK, q.device)
    grid = (layout.num_chunks, H, CHUNK // SUB)
    f32 = dict(dtype=torch.float32, device=q.device)
    aqk, akk = torch.empty((B * T, H, CHUNK), **f32), torch.empty((B * T, H, CHUNK), **f32)
    daqk, dakk = (torch.randn((B * T, H, CHUNK), **f32).tril() for _ in range(2))
    parts = [torch.randn_like(q, dtype=torch.float32) for _ in range(3)]
    dbeta_part = torch.randn_like(beta)
    dq, dk, dbeta = torch.empty_like(q), torch.empty_like(k), torch.empty_like(beta)
    scale = K ** -0.5

    def launch(name, BK, warps):
        opts = dict(K=K, C=CHUNK, BC=SUB, PREC="tf32", BK=BK, num_warps=warps, num_stages=1)
        if name == "scores":
            return lambda: _scores_kernel[grid](q, k, g, beta, aqk, akk, layout.chunks, scale, H,
                                                **opts)
        return lambda: _grad_pairwise_kernel[grid](
            q, k, g, beta, daqk, dakk, *parts, dbeta_part, dq, dk, dbeta, layout.chunks, scale, H,
            **opts)

    rows = []
    for name, candidates in CANDIDATES.items():
        chosen = pair_config(K, whole_head=(name == "scores"))
        for BK, warps in candidates:
            if BK < K and name == "scores":
                continue
            ms = cuda_time_ms(launch(name, BK, warps), warmup=3, iters=args.iters)
            row = dict(kernel=name, BK=BK, num_warps=warps, ms=ms,
                       chosen=(BK, warps) == (chosen["BK"], chosen["num_warps"]))
            print(json.dumps(row), flush=True)
            rows.append(row)
    gpu = device_name()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"kda_tiles_{device_tag(gpu)}.json")
    with open(out, "w") as f:
        json.dump(dict(gpu=gpu, **environment(), shapes=dict(B=B, T=T, H=H, D=K, chunk=CHUNK),
                       rows=rows), f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
