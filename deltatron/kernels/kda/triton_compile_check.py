"""Compile the Triton KDA kernels for an NVIDIA architecture without launching them (no GPU needed):
the recurrence's and those of the layers around it (short convolutions, gates, the MLPs' SwiGLU).

For the block sizes and warps the launchers use, this checks that every kernel builds for the
target and fits its shared memory, and reports ptxas's register and spill counts: the part of
"does it run on an H100" that a machine without one can answer.

    python -m deltatron.kernels.kda.triton_compile_check --arch 90 --head-dim 128 [--chunk 64]

Exit status 1 if a kernel fails to compile or asks for more shared memory than the target has.
TRITON_INTERPRET must be unset when this module is first imported (interpreted kernels do not
compile).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from deltatron.kernels.kda.triton_common import SUB, dot_precision, operand_dtype, pair_config
from deltatron.kernels.kda.triton_grad import (
    _chunk_reverse_cumsum_kernel, _grad_chunk_kernel, _grad_pairwise_kernel, cumsum_config,
    grad_config,
)
from deltatron.kernels.kda.triton_chunk import SUPPORTED_CHUNK_SIZES
from deltatron.kernels.kda.triton_intra import _intra_factors_kernel, _scores_kernel, intra_config
from deltatron.kernels.kda.triton_recurrent import _recurrent_fwd_kernel, recurrent_config
from deltatron.kernels.kda.triton_state import _state_bwd_kernel, _state_fwd_kernel, state_config

# Largest dynamic shared memory per block (opt-in), bytes.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}

# Pointer arguments in the caller's dtype (q, k, v, the output and their gradients), those in the
# operand dtype (triton_common.operand_dtype: the products' operands handed between kernels); the
# other pointers are fp32 (g and beta as the model passes them, the other intermediates), the
# tables int32.
_INPUT_DTYPE_ARGS = {"q", "k", "v", "o", "do", "dq", "dk", "dv"}
_OPERAND_DTYPE_ARGS = {"aqk", "w", "u", "qg", "kg", "h", "vnew", "dh", "dvnew"}
_INT32_ARGS = {"chunks", "seq_offsets", "seq_chunks"}
_TRITON_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def kernel_configs(K: int, V: int, C: int, dtype: torch.dtype) -> list[tuple[str, object, dict]]:
    """(label, kernel, constexprs and launch options) of every kernel launch a call makes."""
    prec = dot_precision(dtype, dtype, dtype)
    shapes = dict(K=K, V=V, C=C, PREC=prec)
    grad = grad_config(K, V, C)
    no_v = {key: val for key, val in shapes.items() if key != "V"}
    return [
        ("scores (forward)", _scores_kernel,
         dict(no_v, BC=SUB, **pair_config(K, whole_head=True))),
        ("inverse and factors (forward)", _intra_factors_kernel,
         dict(shapes, BC=SUB, INVERT=True, **intra_config(K, V, C))),
        ("intra factors (backward)", _intra_factors_kernel,
         dict(shapes, BC=SUB, INVERT=False, **intra_config(K, V, C))),
        ("state forward, output", _state_fwd_kernel,
         dict(shapes, HAS_H0=True, STORE_FINAL=True, STORE_O=True, STORE_H=False,
              **state_config(K, V))),
        ("state forward, states", _state_fwd_kernel,
         dict(shapes, HAS_H0=True, STORE_FINAL=False, STORE_O=False, STORE_H=True,
              **state_config(K, V))),
        ("state backward", _state_bwd_kernel,
         dict(shapes, HAS_DHT=True, STORE_DH0=True, **state_config(K, V))),
        ("grad chunk", _grad_chunk_kernel, dict(shapes, BC=SUB, **grad)),
        ("grad pairwise", _grad_pairwise_kernel,
         dict(no_v, BC=SUB, **pair_config(K, whole_head=False))),
        ("chunk reverse cumsum", _chunk_reverse_cumsum_kernel, dict(K=K, C=C, **cumsum_config(K))),
    ]


def recurrent_kernel_config(K: int, V: int) -> tuple[str, object, dict]:
    """The token-by-token backend's one launch, which no chunk size changes."""
    return ("recurrent forward", _recurrent_fwd_kernel,
            dict(K=K, V=V, HAS_H0=True, STORE_FINAL=True, **recurrent_config(K, V)))


def layer_kernel_configs(head_dim: int, dtype: torch.dtype) -> list[tuple[str, object, dict, dict]]:
    """(label, kernel, constexprs and launch options, argument types) of the KDA layer's fused
    kernels around the recurrence (deltatron.kernels.short_conv, deltatron.kernels.kda_gating)
    and of the norms and the MLPs' SwiGLU (deltatron.kernels.rms_norm, deltatron.kernels.swiglu)
    as their launchers call them, activations in `dtype`, head dim `head_dim`."""
    from deltatron.kernels import kda_gating, short_conv

    act = "*" + _TRITON_DTYPE[dtype]
    scalars = dict(T="i32", C="i32", H="i32", B="i32", sxb="i64", sxt="i64", sdb="i64", sdt="i64",
                   sfb="i64", sft="i64", sgb="i64", sgt="i64", eps="fp32")
    conv = dict(X=act, Wt=act, POS="*i64", OUT=act, DOUT=act, DA="*fp32", DWP="*fp32", DX=act, **scalars)
    gate = dict(F_=act, A="*fp32", DTB="*fp32", G="*fp32", DG="*fp32", DF=act, DBIAS="*fp32",
                DALOG="*fp32", **scalars)
    norm = dict(O=act, GT=act, W="*fp32", OUT=act, DOUT=act, DO=act, DGT=act, DW="*fp32", **scalars)
    tiles = dict(BT=short_conv._BLOCK_T, num_warps=short_conv.NUM_WARPS, num_stages=1)
    out = []
    for norm_heads in (True, False):  # q, k (L2-normalised heads, packed documents) and v
        consts = dict(tiles, W=4, HAS_POS=norm_heads, NORM=norm_heads,
                      BC=head_dim if norm_heads else short_conv._BLOCK_C)
        tag = "q/k" if norm_heads else "v"
        out += [
            (f"short conv {tag} fwd", short_conv._conv_fwd_kernel, consts, conv),
            (f"short conv {tag} bwd a", short_conv._conv_bwd_act_kernel, consts, conv),
            (f"short conv {tag} bwd x", short_conv._conv_bwd_input_kernel, consts, conv),
        ]
    gating = dict(BT=kda_gating._BLOCK_T, num_warps=kda_gating.NUM_WARPS, num_stages=1)
    out += [
        ("decay gate fwd", kda_gating._gate_fwd_kernel, dict(gating, K=head_dim), gate),
        ("decay gate bwd", kda_gating._gate_bwd_kernel, dict(gating, K=head_dim), gate),
        ("gated norm fwd", kda_gating._norm_fwd_kernel, dict(gating, V=head_dim), norm),
        ("gated norm bwd", kda_gating._norm_bwd_kernel, dict(gating, V=head_dim), norm),
    ]
    from deltatron.kernels import rms_norm

    rn = dict(X=act, W=act, Y=act, RSTD="*fp32", DY=act, DX=act, DW="*fp32", D="i32", rows="i32",
              eps="fp32")
    for hidden in (head_dim * 16, 2304):  # the proxy's and the 48B model's hidden sizes at D 128
        tiles = dict(rms_norm._block(hidden), num_stages=1)
        out += [
            (f"rms norm {hidden} fwd", rms_norm._rms_norm_fwd_kernel, tiles, rn),
            (f"rms norm {hidden} bwd", rms_norm._rms_norm_bwd_kernel,
             dict(tiles, ROWS=rms_norm.ROWS_PER_PROGRAM), rn),
        ]
    from deltatron.kernels import swiglu

    glu = dict(X=act, P="*fp32", Y=act, DY=act, DX=act, DP="*fp32", NF="i32", TILES="i32")
    for scaled in (False, True):  # the dense MLP's and the MoE experts' (routing weight per row)
        consts = dict(HAS_SCALE=scaled, BF=swiglu.BLOCK_F, num_warps=swiglu.NUM_WARPS, num_stages=1)
        tag = "expert " if scaled else ""
        out += [
            (f"{tag}swiglu fwd", swiglu._swiglu_fwd_kernel, consts, glu),
            (f"{tag}swiglu bwd", swiglu._swiglu_bwd_kernel, consts, glu),
        ]
    return out


def _kda_signature(kernel, constexprs: dict, dtype: torch.dtype) -> dict:
    """Argument types of the recurrence's kernels, from their argument names."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _INT32_ARGS:
            signature[name] = "*i32"
        elif name == "H":
            signature[name] = "i32"
        elif name == "scale":
            signature[name] = "fp32"
        elif name in _INPUT_DTYPE_ARGS:
            signature[name] = "*" + _TRITON_DTYPE[dtype]
        elif name in _OPERAND_DTYPE_ARGS:
            signature[name] = "*" + _TRITON_DTYPE[operand_dtype(dtype, dtype, dtype)]
        else:
            signature[name] = "*fp32"
    return signature


def compile_kernel(kernel, params: dict, dtype: torch.dtype, arch: int, types: dict | None = None) -> dict:
    """Compile one kernel for sm_<arch>; returns shared memory (bytes) and, where ptxas runs,
    registers and spill-store bytes per thread. types: argument name -> Triton type for the
    non-constexpr arguments (default: the recurrence kernels' naming rule)."""
    options = {key: params[key] for key in ("num_warps", "num_stages")}
    constexprs = {key: val for key, val in params.items() if key not in options}
    if types is None:
        signature = _kda_signature(kernel, constexprs, dtype)
    else:
        signature = {
            name: "constexpr" if name in constexprs else types[name] for name in kernel.arg_names
        }
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
        target=GPUTarget("cuda", arch, 32), options=options,
    )
    report = {"shared": compiled.metadata.shared}
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        suffix = "a" if arch >= 90 else ""
        info = subprocess.run(
            [ptxas, f"-arch=sm_{arch}{suffix}", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True,
        ).stderr
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores", info)
    if regs and spill:
        report.update(registers=int(regs.group(1)), spill_bytes=int(spill.group(1)))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument("--head-dim", type=int, default=128, help="K = V")
    parser.add_argument("--chunk", type=int, action="append",
                        help="chunk size (repeatable; default every size the backend takes)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), action="append",
                        help="input dtype (repeatable; default bf16 and fp32)")
    args = parser.parse_args(argv)
    if type(_scores_kernel).__name__ == "InterpretedFunction":
        print("TRITON_INTERPRET is set: the kernels are interpreted, not compiled", file=sys.stderr)
        return 2
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    chunks = args.chunk or list(SUPPORTED_CHUNK_SIZES)
    unsupported = [c for c in chunks if c not in SUPPORTED_CHUNK_SIZES]
    if unsupported:
        parser.error(f"--chunk {unsupported[0]}: the Triton KDA backend takes chunk sizes "
                     f"{', '.join(map(str, SUPPORTED_CHUNK_SIZES))}")
    limit = SHARED_LIMIT.get(args.arch)
    ok = True
    for name in args.dtype or ["bf16", "fp32"]:
        dtype = dtypes[name]
        configs = [
            (f"{label} C{chunk}" if len(chunks) > 1 else label, kernel, params, None)
            for chunk in chunks
            for label, kernel, params in kernel_configs(args.head_dim, args.head_dim, chunk, dtype)
        ]
        configs.append((*recurrent_kernel_config(args.head_dim, args.head_dim), None))
        configs += layer_kernel_configs(args.head_dim, dtype)
        for label, kernel, params, types in configs:
            try:
                report = compile_kernel(kernel, params, dtype, args.arch, types)
            except Exception as exc:  # a compile error is this tool's finding, not its failure
                print(f"{name:5s} {label:28s} FAILED: {type(exc).__name__}: {exc}")
                ok = False
                continue
            fits = limit is None or report["shared"] <= limit
            ok &= fits
            regs = (
                f" registers={report['registers']} spill={report['spill_bytes']}B"
                if "registers" in report else ""
            )
            print(
                f"{name:5s} {label:28s} shared={report['shared'] // 1024}KiB"
                f"{'' if fits else ' (OVER THE LIMIT)'}{regs} warps={params['num_warps']}"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
