"""Parallel layout: the `parallel` config group and its checks against a model and a world size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ParallelConfig:
    """How the model is split. Data parallelism is what remains of the world size."""

    tp: int = 1  # tensor parallel
    pp: int = 1  # pipeline parallel
    vpp: Optional[int] = None  # virtual pipeline stages per rank (interleaved 1F1B)
    ep: int = 1  # expert parallel
    etp: Optional[int] = None  # expert tensor parallel (None: same as tp)
    cp: int = 1  # context parallel
    sequence_parallel: bool = False
    # Kimi layers per pipeline stage (pp*vpp entries, pipeline order); layers differ in cost, so
    # an explicit split can balance stages. None: as even as possible.
    pipeline_layers: Optional[list[int]] = None
    # overlap the data-parallel gradient reduction with the backward pass (megatron-core DDP
    # buckets); with the distributed optimizer or MuonClip, also overlap the parameter all-gather
    # (left to the next forward's pre-hooks; saving and evaluation force it first)
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = False
    # a collective that takes longer ends the run (with the NCCL flight recorder dumped into
    # <run_dir or runs>/nccl_trace on GPUs) instead of hanging until the job's wall time
    timeout_minutes: int = 30

    def data_parallel_size(self, world_size: int) -> int:
        model_parallel = self.tp * self.pp * self.cp
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp*cp = {self.tp}*{self.pp}*{self.cp}"
            )
        return world_size // model_parallel

    def validate(self, world_size: int, model=None) -> None:
        """Reject impossible layouts with a message naming the mismatch and the fix."""
        errors = []
        for name in ("tp", "pp", "ep", "cp"):
            if getattr(self, name) < 1:
                errors.append(f"parallel.{name}={getattr(self, name)} must be >= 1")
        if errors:
            raise ValueError("invalid parallel layout: " + "; ".join(errors))
        dp = self.data_parallel_size(world_size)
        etp = self.etp or self.tp
        if (world_size // (self.pp * etp)) % self.ep:
            errors.append(
                f"expert parallel ep={self.ep} must divide world_size/(pp*etp) = "
                f"{world_size}/({self.pp}*{etp})"
            )
        if self.sequence_parallel and self.tp == 1:
            errors.append("parallel.sequence_parallel=true needs parallel.tp > 1")
        if self.vpp is not None and self.pp == 1:
            errors.append("parallel.vpp needs parallel.pp > 1")
        if model is not None and self.cp > 1:
            errors += self._context_parallel_errors(model)
        if model is not None:
            if model.kda_num_heads % self.tp:
                errors.append(f"KDA heads ({model.kda_num_heads}) are not divisible by tp={self.tp}")
            if model.mla_num_heads % self.tp:
                errors.append(f"MLA heads ({model.mla_num_heads}) are not divisible by tp={self.tp}")
            if model.first_k_dense < model.num_layers and model.num_experts % self.ep:
                errors.append(f"experts ({model.num_experts}) are not divisible by ep={self.ep}")
            stages = self.pp * (self.vpp or 1)
            if model.num_layers < stages:
                errors.append(
                    f"{model.num_layers} layers cannot fill {stages} pipeline stages (pp*vpp)"
                )
            if self.pipeline_layers is not None and (
                len(self.pipeline_layers) != stages
                or sum(self.pipeline_layers) != model.num_layers
                or min(self.pipeline_layers) < 1
            ):
                errors.append(
                    f"parallel.pipeline_layers={list(self.pipeline_layers)} must list {stages} "
                    f"stages (pp*vpp) of >= 1 layer summing to {model.num_layers}"
                )
        if errors:
            raise ValueError(
                f"invalid parallel layout for world size {world_size} (dp would be {dp}): "
                + "; ".join(errors)
            )

    def _context_parallel_errors(self, model) -> list[str]:
        """What context parallelism (deltatron/parallel/cp_*.py) does not cover."""
        from deltatron.model.te import te_available

        errors = []
        impl = model.transformer_impl
        if impl == "transformer_engine" or (impl == "auto" and te_available()):
            errors.append(
                f"parallel.cp={self.cp} runs MLA through deltatron's all-gather-KV attention on "
                "contiguous slices (KDA needs them), not Transformer Engine's zigzag CP attention: "
                "set model.transformer_impl=local"
            )
        return errors

    def validate_sequence(self, seq_length: int, micro_batch_size: int, model=None) -> None:
        """Under context parallelism a micro-batch (folded into one row of micro_batch_size x
        seq_length tokens) is cut into cp equal slices of even length, each split again over TP
        ranks under sequence parallelism, and each at least as long as the short convolution's
        history."""
        if self.cp == 1:
            return
        row = micro_batch_size * seq_length
        # 2: megatron-core's THD RoPE halves each slice (see cp_slice.cp_packed_seq_params)
        multiple = 2 * self.cp * (self.tp if self.sequence_parallel else 1)
        if row % multiple:
            raise ValueError(
                f"parallel.cp={self.cp}: a micro-batch row of train.micro_batch_size x data.seq_length = "
                f"{micro_batch_size} x {seq_length} tokens must be a multiple of 2 x cp"
                + (" x tp (sequence parallelism)" if self.sequence_parallel else "")
                + f" = {multiple}: change data.seq_length or parallel.cp"
            )
        history = (model.kda_conv_kernel - 1) if model is not None else 0
        if row // self.cp < history:
            raise ValueError(
                f"parallel.cp={self.cp} leaves {row // self.cp} tokens per rank, fewer than KDA's "
                f"short-convolution history of {history}: use a smaller parallel.cp"
            )

    def describe(self, world_size: int) -> str:
        dp = self.data_parallel_size(world_size)
        parts = [f"tp={self.tp}", f"pp={self.pp}"]
        if self.vpp:
            parts.append(f"vpp={self.vpp}")
        parts += [f"ep={self.ep}", f"cp={self.cp}", f"dp={dp}"]
        if self.sequence_parallel:
            parts.append("sp")
        return " ".join(parts) + f" (world {world_size})"
