"""Launch configurations of the Triton KDA kernels, timed in place: which tiles and warps run the
chunkwise KDA fastest on this GPU.

    python bench/kda_tiles.py                   # B=8, T=4096, H=32, D=128, chunk 64, bf16

For every kernel family and candidate (its tile sizes and warps), the family's config function
(triton_common.pair_config for the per-sub-block kernels, intra_config, state_config,
grad_config) is replaced by the candidate for the duration of the measurement, and the whole
operator, kda(backend="triton"), is timed: forward alone and forward + backward, CUDA events,
median of --iters calls after a warm-up (which includes the candidate's compilation). Each row
states the time against the launchers' current choice measured in the same run ("baseline").
Inputs are shaped as the model feeds them (bench/kda_op.py). Results go to
bench/results/kda_tiles_<gpu>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import device_name, device_tag, environment  # noqa: E402
from kda_op import Impl, cuda_time_ms, make_inputs, ours  # noqa: E402
from deltatron.kernels.kda import triton_grad, triton_intra, triton_state  # noqa: E402

# family -> (module attributes that hold its config function, candidates as launch options).
# Left out: the state kernels with BV 16 or 64 at 8 warps, which crashed with an illegal memory
# access on an H200 (commit 0fa061f; Triton 3.6), taking the CUDA context with them. grad_chunk
# at 4 warps runs at these shapes but crashed the same way at B2 T4k H4 (commit de59dd1;
# compute-sanitizer: an out-of-range shared address at one of its tl.dot): a candidate that runs
# here is not cleared until tests/test_kda_triton.py passes on the GPU.
FAMILIES = {
    "scores": ([(triton_intra, "pair_config")], [
        dict(BK=128, num_warps=2, num_stages=2), dict(BK=128, num_warps=2, num_stages=3),
        dict(BK=128, num_warps=4, num_stages=2)]),
    "grad_pairwise": ([(triton_grad, "pair_config")], [
        dict(BK=32, num_warps=1, num_stages=2), dict(BK=32, num_warps=1, num_stages=3),
        dict(BK=32, num_warps=2, num_stages=2)]),
    "intra_factors": ([(triton_intra, "intra_config")], [
        dict(BK=32, BV=32, num_warps=4, num_stages=2), dict(BK=32, BV=32, num_warps=4, num_stages=3),
        dict(BK=32, BV=32, num_warps=2, num_stages=2), dict(BK=64, BV=64, num_warps=4, num_stages=2)]),
    "state": ([(triton_state, "state_config")], [
        dict(BK=128, BV=32, num_warps=4, num_stages=2), dict(BK=128, BV=32, num_warps=4, num_stages=3)]),
    "grad_chunk": ([(triton_grad, "grad_config")], [
        dict(BK=32, BV=64, num_warps=8, num_stages=2), dict(BK=32, BV=64, num_warps=8, num_stages=3)]),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    B, T, H, D = args.batch, args.seq_len, args.heads, args.head_dim
    impl = Impl(ours(None), make_inputs(B, T, H, D))

    def measure() -> dict:
        impl.forward_backward()  # compiles the candidate
        return dict(fwd_ms=cuda_time_ms(impl.forward, 2, args.iters),
                    fwdbwd_ms=cuda_time_ms(impl.forward_backward, 2, args.iters))

    gpu = device_name()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"kda_tiles_{device_tag(gpu)}.json")
    record = dict(gpu=gpu, **environment(), shapes=dict(B=B, T=T, H=H, D=D, chunk=64),
                  reference="baseline: the launchers' current configs, timed in the same run")
    record["baseline"] = measure()
    record["rows"] = rows = []
    print(json.dumps(dict(baseline=record["baseline"])), flush=True)
    for family in args.families.split(","):
        targets, candidates = FAMILIES[family]
        for cand in candidates:
            opts = dict(dict(num_stages=1), **cand)
            patches = [mock.patch.object(mod, name, lambda *a, **k: dict(opts))
                       for mod, name in targets]
            for p in patches:
                p.start()
            try:
                row = dict(family=family, config=cand, **measure())
            except Exception as exc:  # a candidate that does not compile or run is a finding
                row = dict(family=family, config=cand, error=f"{type(exc).__name__}: {exc}"[:300])
            finally:
                for p in patches:
                    p.stop()
            if "fwdbwd_ms" in row:
                row["fwdbwd_vs_baseline"] = record["baseline"]["fwdbwd_ms"] / row["fwdbwd_ms"]
            print(json.dumps(row), flush=True)
            rows.append(row)
            with open(out, "w") as f:  # after every row: a crashed candidate keeps the others
                json.dump(record, f, indent=1)
            if "illegal memory access" in row.get("error", ""):
                print("the CUDA context is lost after an illegal memory access: stopping",
                      flush=True)
                return
    print("wrote", out)


if __name__ == "__main__":
    main()
