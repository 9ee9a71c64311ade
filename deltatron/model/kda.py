"""Kimi Delta Attention (KDA) token mixer as a megatron-core module.

Per head h, with state S in R^{dk x dv} (Kimi Linear, arXiv 2510.26692, eq. 1):
    q, k = L2Norm(SiLU(ShortConv(W x)))       v = SiLU(ShortConv(W_v x))
    g    = -exp(A_log[h]) * softplus(f_b(f_a(x)) + dt_bias)      (per-channel log decay)
    beta = sigmoid(b(x))
    S_t  = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T q_t dk^-0.5
    y    = W_o (RMSNorm_head(o) * sigmoid(g_b(g_a(x))))

Tensor parallelism splits heads: the q/k/v/beta and gate up-projections are column-parallel, the
output row-parallel, and the short convolutions, A_log and dt_bias hold the local heads' channels.
The low-rank down-projections f_a and g_a (d -> dk) are small and replicated in effect
(column-parallel with gathered output). Under sequence parallelism the input is gathered once and
the output projection reduce-scatters, as in megatron-core's attention.

The recurrence itself sits behind `deltatron.kernels.kda.kda` (pure PyTorch chunkwise on CPU, the
Triton kernels on CUDA); the short convolutions with their L2 norm (deltatron.kernels.short_conv)
and the decay gate and output norm (deltatron.kernels.kda_gating) are fused Triton kernels on CUDA
and their eager references elsewhere. This module wires them between its projections.

Under context parallelism (packed_seq_params carrying a CP slice, deltatron/parallel/cp_slice.py)
the module sees its rank's contiguous slice of the sequence: the short convolutions take the
previous rank's last rows as their history and the recurrence combines states across ranks
(deltatron/parallel/cp_kda.py).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from deltatron.kernels.kda import kda as kda_op
from deltatron.kernels.kda_gating import gated_rms_norm, kda_decay_gate
from deltatron.kernels.short_conv import short_conv_silu
from deltatron.parallel.cp_kda import conv_halo, kda_context_parallel
from deltatron.parallel.cp_slice import CPSlice, cp_slice_of


@dataclass
class KDASubmodules:
    """Module specs of the KDA mixer's projections (TE or megatron-core local classes)."""

    linear_q: Union[ModuleSpec, type] = IdentityOp  # column-parallel d -> H*dk
    linear_k: Union[ModuleSpec, type] = IdentityOp  # column-parallel d -> H*dk
    linear_v: Union[ModuleSpec, type] = IdentityOp  # column-parallel d -> H*dv
    linear_beta: Union[ModuleSpec, type] = IdentityOp  # column-parallel d -> H
    linear_f_a: Union[ModuleSpec, type] = IdentityOp  # d -> dk, output gathered
    linear_f_b: Union[ModuleSpec, type] = IdentityOp  # column-parallel dk -> H*dk
    linear_g_a: Union[ModuleSpec, type] = IdentityOp  # d -> dv, output gathered
    linear_g_b: Union[ModuleSpec, type] = IdentityOp  # column-parallel dv -> H*dv
    linear_proj: Union[ModuleSpec, type] = IdentityOp  # row-parallel H*dv -> d


def positions_in_documents(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total] position of each token inside its document, for packed sequences."""
    idx = torch.arange(total, device=cu_seqlens.device)
    doc = torch.searchsorted(cu_seqlens[1:].to(idx.dtype), idx, right=True)
    return idx - cu_seqlens.to(idx.dtype)[doc]


class KimiDeltaAttention(MegatronModule):
    """KDA mixer. Input and output [S, B, D] (S/TP under sequence parallelism)."""

    def __init__(
        self,
        config,
        submodules: KDASubmodules,
        layer_number: int = 1,
        pg_collection: Optional[ProcessGroupCollection] = None,
        **unused,  # cp_comm_type, pp_layer_offset, name: accepted like megatron's attention
    ):
        super().__init__(config=config)
        self.layer_number = layer_number
        assert pg_collection is not None, "KimiDeltaAttention needs pg_collection"
        self.tp_group = pg_collection.tp
        tp = self.tp_group.size()
        self.num_heads = config.linear_num_key_heads
        self.head_k_dim = config.linear_key_head_dim
        self.head_v_dim = config.linear_value_head_dim
        if config.linear_num_value_heads != self.num_heads:
            raise ValueError("KDA uses as many value heads as key heads")
        if self.num_heads % tp:
            raise ValueError(
                f"KDA heads ({self.num_heads}) must be divisible by tensor parallel size ({tp})"
            )
        self.local_heads = self.num_heads // tp
        self.conv_width = config.linear_conv_kernel_dim
        self.chunk_size = config.kda_chunk_size
        self.backend = config.kda_backend
        self.eps = config.layernorm_epsilon
        hk, hv = self.num_heads * self.head_k_dim, self.num_heads * self.head_v_dim

        # Input-side linears see the full sequence: it is gathered once in forward under SP.
        in_config = copy.copy(config)
        in_config.sequence_parallel = False

        def column(spec, n_in, n_out, gather_output=False):
            return build_module(
                spec, n_in, n_out, config=in_config, init_method=config.init_method,
                gather_output=gather_output, bias=False, skip_bias_add=False, is_expert=False,
                tp_comm_buffer_name=None, tp_group=self.tp_group,
            )

        d = config.hidden_size
        self.linear_q = column(submodules.linear_q, d, hk)
        self.linear_k = column(submodules.linear_k, d, hk)
        self.linear_v = column(submodules.linear_v, d, hv)
        self.linear_beta = column(submodules.linear_beta, d, self.num_heads)
        self.linear_f_a = column(submodules.linear_f_a, d, self.head_k_dim, gather_output=True)
        self.linear_f_b = column(submodules.linear_f_b, self.head_k_dim, hk)
        self.linear_g_a = column(submodules.linear_g_a, d, self.head_v_dim, gather_output=True)
        self.linear_g_b = column(submodules.linear_g_b, self.head_v_dim, hv)
        self.linear_proj = build_module(
            submodules.linear_proj, hv, d, config=config,
            init_method=config.output_layer_init_method, bias=False, input_is_parallel=True,
            skip_bias_add=True, is_expert=False, tp_comm_buffer_name=None, tp_group=self.tp_group,
        )

        local_k = self.local_heads * self.head_k_dim
        local_v = self.local_heads * self.head_v_dim
        rank = self.tp_group.rank()
        dev = torch.device("cpu") if config.use_cpu_initialization else torch.cuda.current_device()
        dtype = config.params_dtype

        def tp_param(full: torch.Tensor, local: int, fp32: bool = False) -> nn.Parameter:
            # Initialise the full tensor, keep this rank's heads: identical across TP sizes.
            shard = full[rank * local : (rank + 1) * local].to(torch.float32 if fp32 else dtype)
            p = nn.Parameter(shard.contiguous() if shard.is_meta else shard.to(dev).contiguous())
            set_tensor_model_parallel_attributes(p, is_parallel=True, dim=0, stride=1)
            return p

        bound = 1.0 / math.sqrt(self.conv_width)  # torch's default conv1d init for depthwise
        self.q_conv = tp_param(torch.empty(hk, self.conv_width).uniform_(-bound, bound), local_k)
        self.k_conv = tp_param(torch.empty(hk, self.conv_width).uniform_(-bound, bound), local_k)
        self.v_conv = tp_param(torch.empty(hv, self.conv_width).uniform_(-bound, bound), local_v)
        # A_log and dt_bias: fp32, no weight decay (Kimi Linear / FLA initialisation).
        self.A_log = tp_param(torch.empty(self.num_heads).uniform_(1, 16).log(), self.local_heads, fp32=True)
        dt = torch.empty(hk).uniform_(math.log(1e-3), math.log(0.1)).exp().clamp_min(1e-4)
        self.dt_bias = tp_param(dt + torch.log(-torch.expm1(-dt)), local_k, fp32=True)
        # Kept in fp32 under bf16 training (see deltatron.train.precision.keep_fp32_parameters);
        # being 1-D they get no weight decay under megatron-core's default rule.
        for p in (self.A_log, self.dt_bias):
            p.keep_fp32 = True
        # Output norm weight [dv], shared by all heads and replicated over TP ranks.
        self.o_norm_weight = nn.Parameter(torch.ones(self.head_v_dim, dtype=torch.float32))
        if not self.o_norm_weight.is_meta:
            self.o_norm_weight.data = self.o_norm_weight.data.to(dev)
        self.o_norm_weight.keep_fp32 = True

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask=None,
        packed_seq_params: Optional[PackedSeqParams] = None,
        **unused,
    ):
        """hidden_states: [S, B, D] -> (output [S, B, D], None)."""
        x = hidden_states
        if self.config.sequence_parallel and self.tp_group.size() > 1:
            # The input-side linears (built without SP) all-reduce their input gradient over TP,
            # so the gather's backward only keeps this rank's slice instead of reduce-scattering.
            x = gather_from_sequence_parallel_region(
                x, tensor_parallel_output_grad=False, group=self.tp_group
            )
        seq_len, batch = x.shape[:2]

        cu_seqlens = doc_pos = None
        cp = cp_slice_of(packed_seq_params)
        if packed_seq_params is not None:
            if batch != 1:
                raise ValueError("packed sequences (THD) need the batch folded into one row")
            cu_seqlens = packed_seq_params.cu_seqlens_q
            # under CP: positions in the global documents (the first piece may continue one)
            doc_pos = cp.doc_positions() if cp is not None else positions_in_documents(cu_seqlens, seq_len)

        # The input-side linears run on a [B, S, D] copy of x, so that their outputs and output
        # gradients are the contiguous [B, S, C] tensors the kernels read and write. On [S, B, D]
        # each output is a transposed view, and megatron-core's linear backward copies a
        # transposed gradient twice (in its dgrad matmul and for the wgrad): ten full-size
        # copies per layer instead of x's and its gradient's (H200, dense_1b: 181 copies of
        # [S, B, 2048], 15.5 ms of a 435 ms step).
        xb = x.transpose(0, 1).contiguous()
        q = self.linear_q(xb)[0]
        k = self.linear_k(xb)[0]
        v = self.linear_v(xb)[0]
        # SiLU(short conv), q and k L2-normalised per head in fp32 and handed on in the
        # activations' dtype (as fla's l2norm): with fp32 q, k next to a bf16 v the Triton kernel
        # would see mixed inputs and keep fp32 intermediates with 3xTF32 products
        # (triton_common.operand_dtype, dot_precision).
        if cp is not None:
            q, k, v = self._convolve_with_halo(q, k, v, doc_pos, cp)
        else:
            q, k, v = self._convolve(q, k, v, doc_pos)
        heads = (batch, seq_len, self.local_heads, -1)
        q, k, v = q.view(heads), k.view(heads), v.view(heads)

        f, _ = self.linear_f_a(xb)
        g = kda_decay_gate(self.linear_f_b(f)[0], self.A_log, self.dt_bias)  # [B, S, H, dk] fp32
        beta = torch.sigmoid(self.linear_beta(xb)[0].float())

        if cp is not None:
            o = kda_context_parallel(
                q, k, v, g, beta, cp, backend=self._kernel_backend(), chunk_size=self.chunk_size
            )
        else:
            o, _ = kda_op(
                q, k, v, g, beta, initial_state=None, output_final_state=False,
                cu_seqlens=cu_seqlens, backend=self._kernel_backend(), chunk_size=self.chunk_size,
            )

        go, _ = self.linear_g_a(xb)
        # Each TP rank only sees its own heads, so the shared weight's gradient is summed over
        # TP ranks (identity forward, all-reduce backward).
        norm_weight = (
            copy_to_tensor_model_parallel_region(self.o_norm_weight, group=self.tp_group)
            if self.tp_group.size() > 1
            else self.o_norm_weight
        )
        # RMSNorm per head times sigmoid(output gate), laid out [S, B, H*dv] for the projection
        o = gated_rms_norm(o, self.linear_g_b(go)[0], norm_weight, self.eps)
        return self.linear_proj(o)

    def _convolve(self, q, k, v, doc_pos):
        """SiLU(short conv) of q, k, v [B, T, C] (fused kernels on CUDA), q and k L2-normalised
        per head; doc_pos [T] or None."""
        norm = (self.head_k_dim, self.head_k_dim, 0)
        weights = (self.q_conv, self.k_conv, self.v_conv)
        return tuple(short_conv_silu(t, w, doc_pos, n) for t, w, n in zip((q, k, v), weights, norm))

    def _convolve_with_halo(self, q, k, v, doc_pos: torch.Tensor, cp: CPSlice):
        """`_convolve` on a CP slice, with the previous rank's last W - 1 rows as history (one
        exchange for q, k and v). q, k, v: [1, L, C] -> [1, L, C]."""
        rows = self.conv_width - 1
        widths = [q.shape[-1], k.shape[-1], v.shape[-1]]
        qkv = torch.cat([q, k, v], dim=-1)
        extended = torch.cat([conv_halo(qkv, rows, cp), qkv], dim=1)  # [1, rows + L, C]
        pos = torch.cat([doc_pos.new_zeros(rows), doc_pos])  # the halo rows' own outputs are dropped
        parts = torch.split(extended, widths, dim=-1)
        return tuple(out[:, rows:] for out in self._convolve(*parts, pos))

    def _kernel_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        from deltatron.kernels.kda import available_backends

        return "triton" if "triton" in available_backends() and torch.cuda.is_available() else "torch"

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None
    ) -> ShardedStateDict:
        sharded = {}
        own = {}
        for name, param in self.named_parameters(recurse=False):
            own[name] = param
        axis_map = {name: 0 for name in ("q_conv", "k_conv", "v_conv", "A_log", "dt_bias")}
        sharded.update(
            make_sharded_tensors_for_checkpoint(own, prefix, axis_map, sharded_offsets)
        )
        for name, module in self.named_children():
            sharded.update(module.sharded_state_dict(f"{prefix}{name}.", sharded_offsets, metadata))
        return sharded
