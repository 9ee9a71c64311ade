"""The training loop: megatron-core model chunks, DDP, optimizer and forward/backward schedule.

One `Trainer` per process. Every rank reads the same micro-batches from the data path for its
data-parallel replica (TP/PP/EP ranks of one replica see the same batch); megatron-core's schedule
decides which stage consumes what.
"""

from __future__ import annotations

import math
import os
import resource
import time
from functools import partial
from typing import Iterator

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from deltatron.model.attnres import collect_depth_metrics, start_depth_metrics
from deltatron.model.grouped_experts import wait_for_expert_param_gather
from deltatron.model.model import build_model, packed_seq_params
from deltatron.model.te import describe_transformer_impl
from deltatron.parallel.cp_slice import cp_packed_seq_params, slice_batch
from deltatron.parallel.setup import init_process_groups
from deltatron.train.checkpoint import gather_params, load_model
from deltatron.train.config import RunConfig
from deltatron.train.flops import peak_tflops, training_flops_per_token
from deltatron.train.metrics import ModelProbes, StepTimer, grad_norms_by_group, rank_stats
from deltatron.train.monitor import Monitor, format_duration, is_rank0
from deltatron.train.optim import build_optimizer, build_scheduler
from deltatron.train.preemption import PREEMPTED_EXIT_CODE, PreemptionSignal
from deltatron.train.resume import CheckpointSaver, Progress, load_checkpoint, resolve_resume


def resolve_precision(requested: str) -> str:
    if requested == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    if requested == "bf16" and not torch.cuda.is_available():
        raise ValueError(
            "train.precision=bf16 needs a GPU: megatron-core's bf16 optimizer only runs on CUDA "
            "tensors; use train.precision=fp32 (or auto) on CPU"
        )
    return requested


def keep_fp32_parameters(model: torch.nn.Module) -> None:
    """Return parameters marked `keep_fp32` (KDA's A_log, dt_bias, output-norm weight) to fp32
    after Float16Module cast the model to bf16; megatron-core's optimizer handles mixed dtypes."""
    for p in model.parameters():
        if getattr(p, "keep_fp32", False) and p.dtype != torch.float32:
            p.data = p.data.float()


def reduce_experts_over_expert_groups(model: torch.nn.Module) -> None:
    """Mark routed-expert weights as megatron-core marks them under expert parallelism
    (`allreduce=False`: gradients reduced over the expert data-parallel group, a separate
    optimizer) also when ep=1, where that group is the data-parallel group and nothing numerical
    changes. Without it the optimizer's structure (one chained optimizer or two) depends on ep,
    and an EP2 checkpoint's optimizer state does not load under EP1."""
    for name, param in model.named_parameters():
        if ".experts." in name and getattr(param, "allreduce", True):
            param.allreduce = False


def stage_pattern(pattern: str, stages: int, layers_per_stage: list[int] | None = None) -> str:
    """Split a hybrid pattern (two symbols per layer) into `stages` pipeline segments with '|'.

    layers_per_stage: Kimi layers of each stage, in pipeline order (virtual stages: chunk 0 of
    every rank, then chunk 1, ...); by default as even as possible, earlier stages taking extras.
    """
    layers = [pattern[i : i + 2] for i in range(0, len(pattern), 2)]
    if layers_per_stage is None:
        base, extra = divmod(len(layers), stages)
        layers_per_stage = [base + (1 if s < extra else 0) for s in range(stages)]
    if len(layers_per_stage) != stages or sum(layers_per_stage) != len(layers) or min(layers_per_stage) < 1:
        raise ValueError(
            f"parallel.pipeline_layers={list(layers_per_stage)} must list {stages} stages (pp*vpp) "
            f"of at least one layer each, summing to the model's {len(layers)} layers"
        )
    out, start = [], 0
    for n in layers_per_stage:
        out.append("".join(layers[start : start + n]))
        start += n
    return "|".join(out)


class Trainer:
    def __init__(self, cfg: RunConfig, resolved: dict, data=None):
        """data: the batch source (deltatron.data.loader's interface); built from cfg.data if None."""
        self.cfg = cfg
        self.resolved = resolved
        par, train = cfg.parallel, cfg.train
        init_process_groups(
            tp=par.tp, pp=par.pp, ep=par.ep, etp=par.etp, vpp=par.vpp, cp=par.cp, seed=train.seed,
            timeout_minutes=par.timeout_minutes,
            # the run directory is agreed on over the process group, so not known yet by default
            trace_dir=os.path.join(train.run_dir or "runs", "nccl_trace"),
        )
        self.world_size = dist.get_world_size()
        par.validate(self.world_size, cfg.model)
        par.validate_sequence(cfg.data.seq_length, train.micro_batch_size, cfg.model)
        # megatron-core's recomputation fields; choices this model cannot take fail here, early
        self.recompute_fields = train.recompute_config(cfg.model)
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        per_step = train.micro_batch_size * self.dp_size
        if train.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size={train.global_batch_size} must be a multiple of "
                f"micro_batch_size*dp = {train.micro_batch_size}*{self.dp_size}"
            )
        self.num_microbatches = train.global_batch_size // per_step
        self.precision = resolve_precision(train.precision)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.seq_length = cfg.data.seq_length
        self.tokens_per_step = train.global_batch_size * self.seq_length
        self.run_dir = self._make_run_dir()

        if data is None:
            from deltatron.data.loader import build_data

            data = build_data(
                cfg.data, micro_batch_size=train.micro_batch_size, dp_rank=self.dp_rank,
                dp_size=self.dp_size, vocab_size=cfg.model.vocab_size,
            )
        self.data = data
        # AdamW on GPUs: megatron-core's distributed optimizer (ZeRO-1; with one data-parallel
        # rank it holds the same state as the plain one, so every GPU run takes one path). It
        # refuses CPU tensors. MuonClip shards its own state over whole matrices: DDP
        # reduce-scatters its gradients on an owner-aligned layout (OwnerLayoutPlanner), on any device.
        self.distributed_optimizer = torch.cuda.is_available() and cfg.optim.name == "adamw"
        # each rank holds reduced gradients only on its shards of DDP's buckets
        self.sharded_grads = self.distributed_optimizer or cfg.optim.name == "muonclip"
        self.owner_layout = None  # MuonClip's OwnerLayoutPlanner, made with the first chunk
        self.model = self._build_model_chunks()
        self.optimizer = build_optimizer(
            self.model, cfg.optim, bf16=self.precision == "bf16", distributed=self.distributed_optimizer,
        )
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, train.steps)
        tc = self.model[0].config
        tc.no_sync_func = [m.no_sync for m in self.model] if len(self.model) > 1 else self.model[0].no_sync
        tc.finalize_model_grads_func = finalize_model_grads
        tc.grad_scale_func = self.optimizer.scale_loss
        self.forward_backward = get_forward_backward_func()
        # AttnRes stages hand on a varying number of block representations (attnres_pipeline)
        self.attnres_pipeline = cfg.model.residual != "standard" and par.pp > 1
        self.schedule_kwargs = {}
        if self.attnres_pipeline:
            from deltatron.parallel.attnres_pipeline import schedule_kwargs

            self.schedule_kwargs = schedule_kwargs(tc)
        self.flops_per_token = training_flops_per_token(cfg.model, self.seq_length)
        device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        self.peak_tflops, self.peak_source = peak_tflops(device_name, cfg.logging.peak_tflops)
        self.step = 0
        self.good_losses: list[float] = []  # the last good steps' losses (loss-spike guard)
        # observability (deltatron.train.metrics): probes and per-dataset losses run on log steps only
        self.probes = ModelProbes(self.model, cfg.model.num_layers, cfg.model.num_experts)
        self.timer = StepTimer()
        names = getattr(self.data, "dataset_names", None)
        self.dataset_names: list[str] = names() if names is not None else []
        self._log_step = False  # set by fit() around a log step's train_step

    # ------------------------------------------------------------------ set-up
    def _make_run_dir(self) -> str:
        run_dir = self.cfg.train.run_dir
        if run_dir is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            run_dir = os.path.join("runs", f"{self.cfg.model.name}-{stamp}")
        holder = [os.path.abspath(run_dir)]
        dist.broadcast_object_list(holder, src=0)  # one directory for all ranks
        if is_rank0():
            os.makedirs(holder[0], exist_ok=True)
        return holder[0]

    def _build_model_chunks(self) -> list:
        par = self.cfg.parallel
        stages = par.pp * (par.vpp or 1)
        pattern = stage_pattern(self.cfg.model.layer_pattern(), stages, par.pipeline_layers)
        bf16 = self.precision == "bf16"
        tc_overrides = dict(
            tensor_model_parallel_size=par.tp,
            pipeline_model_parallel_size=par.pp,
            virtual_pipeline_model_parallel_size=par.vpp,
            expert_model_parallel_size=par.ep,
            expert_tensor_parallel_size=par.etp,
            context_parallel_size=par.cp,
            sequence_parallel=par.sequence_parallel,
            bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
            variable_seq_lengths=False,
            # Batched p2p (batch_isend_irecv) posts send_prev before send_next; with two pipeline
            # ranks both go to the same peer, whose receives are posted the other way round, so
            # under interleaving an activation and a gradient of equal shape can swap. The
            # unbatched path orders the two directions consistently (found by the VPP parity test).
            batch_p2p_comm=False,
            # MuonClip's QK-clip needs each MLA head's max attention logit from the core attention
            qk_clip=self.cfg.optim.name == "muonclip" and self.cfg.optim.qk_clip_tau is not None,
            qk_clip_threshold=self.cfg.optim.qk_clip_tau or 100.0,
            # activation recomputation (train.recompute_*), megatron-core's own
            **self.recompute_fields,
            # the output layer's loss by blocks of tokens (train.cross_entropy_chunk_size)
            cross_entropy_chunk_size=self.cfg.train.cross_entropy_chunk_size,
        )
        chunks = []
        for vp_stage in range(par.vpp or 1):
            vp = vp_stage if par.vpp else None
            model = build_model(
                self.cfg.model,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
                vp_stage=vp,
                layer_pattern=pattern,
                **tc_overrides,
            )
            model.to(self.device)
            reduce_experts_over_expert_groups(model)
            if bf16:
                model = Float16Module(model.config, model)
                keep_fp32_parameters(model)
            ddp_config = DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                overlap_grad_reduce=par.overlap_grad_reduce,
                overlap_param_gather=par.overlap_param_gather and self.sharded_grads,
                use_distributed_optimizer=self.sharded_grads,
            )
            ddp = DistributedDataParallel(
                config=model.config, ddp_config=ddp_config, module=model,
                disable_bucketing=vp_stage > 0, full_param_layout=self._muon_layout(model, ddp_config, vp_stage),
            )
            wait_for_expert_param_gather(ddp)
            chunks.append(ddp)
        return chunks

    def _muon_layout(self, model: torch.nn.Module, ddp_config, vp_stage: int):
        """MuonClip: the owner-aligned DDP layout of this chunk (None for AdamW: megatron-core's
        own). DDP makes one bucket on pipeline stages after the first and chunks after the first."""
        if self.cfg.optim.name != "muonclip":
            return None
        from deltatron.parallel.muon_sharding import dense_grid, expert_grid
        from deltatron.train.muon_params import FusedLayout
        from deltatron.train.muonclip import OwnerLayoutPlanner

        if self.owner_layout is None:
            self.owner_layout = OwnerLayoutPlanner(
                self.cfg.optim, FusedLayout.from_config(model.config), dense_grid(), expert_grid()
            )
        single_bucket = vp_stage > 0 or parallel_state.get_pipeline_model_parallel_rank() > 0
        return self.owner_layout.full_param_layout(model, ddp_config, single_bucket)

    # ------------------------------------------------------------------ one step
    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        cp_group, psp = None, None
        if self.cfg.parallel.cp > 1:
            # Context parallelism: the micro-batch folded into one packed row, this CP rank's
            # contiguous slice of it (deltatron/parallel/cp_slice.py); KDA and MLA exchange what
            # crosses the slice edges.
            cp_group = parallel_state.get_context_parallel_group()
            part, cp = slice_batch(
                batch, parallel_state.get_context_parallel_rank(), self.cfg.parallel.cp, cp_group,
                device=self.device,
            )
            batch = {**batch, **part}
            psp = cp_packed_seq_params(cp)
        tokens = batch["tokens"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        loss_mask = batch["loss_mask"].to(self.device, non_blocking=True)
        if cp_group is None and self.cfg.data.document_boundaries:
            # Documents packed into one row (megatron-core's THD layout): KDA resets its state at
            # each boundary, MLA attends within each document.
            tokens, labels, loss_mask = (x.reshape(1, -1) for x in (tokens, labels, loss_mask))
            psp = packed_seq_params(batch["cu_seqlens"].to(self.device), int(batch["max_seqlen"]))
        output = model(tokens, None, None, labels=labels, packed_seq_params=psp)
        # per-dataset loss of a blend: only on log steps, from the rows' (under CP: the tokens')
        # blend entries
        dataset = batch.get("dataset") if self._log_step and len(self.dataset_names) > 1 else None
        return output, partial(self._loss, loss_mask, dataset, len(self.dataset_names), cp_group)

    @staticmethod
    def _loss(loss_mask: torch.Tensor, dataset, num_datasets: int, cp_group, per_token_loss: torch.Tensor):
        mask = loss_mask.reshape(-1).float()
        loss_sum = (per_token_loss.reshape(-1).float() * mask).sum()
        num_tokens = mask.sum().to(torch.int)
        report = {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}
        if cp_group is not None:
            # megatron-core's schedule divides by num_tokens and DDP averages gradients over the
            # dp x cp ranks: with cp x this slice's loss sum over the CP group's token count, the
            # CP ranks add up to sum(loss) / tokens of the whole sequence, as one process has it
            total = mask.sum().detach()
            dist.all_reduce(total, group=cp_group)
            loss_sum, num_tokens = loss_sum * cp_group.size(), total.to(torch.int)
        if dataset is not None:
            # rows are whole samples of one entry (packed THD rows are the same rows, concatenated;
            # under CP `dataset` names each token's entry, a row per token)
            rows = dataset.numel()
            masked = per_token_loss.detach().reshape(rows, -1).float() * mask.view(rows, -1)
            per_ds = torch.zeros(num_datasets, 2, dtype=torch.float64, device=mask.device)
            idx = dataset.to(mask.device)
            per_ds[:, 0].index_add_(0, idx, masked.sum(1).double())
            per_ds[:, 1].index_add_(0, idx, mask.view(rows, -1).sum(1).double())
            report["dataset loss"] = per_ds.flatten()
        return loss_sum, num_tokens, report

    def _run_schedule(self, batches: list, forward_only: bool) -> list:
        if self.cfg.data.document_boundaries or self.cfg.parallel.cp > 1:
            seq_length, mbs = self.cfg.train.micro_batch_size * self.seq_length, 1
        else:
            seq_length, mbs = self.seq_length, self.cfg.train.micro_batch_size
        iterators = [iter(batches) for _ in self.model]
        run = partial(
            self.forward_backward,
            forward_step_func=self._forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=len(batches),
            seq_length=seq_length,
            micro_batch_size=mbs,
            forward_only=forward_only,
            **self.schedule_kwargs,
        )
        if not self.attnres_pipeline:
            return run()
        from deltatron.model.attnres import attnres_stacks
        from deltatron.parallel.attnres_pipeline import schedule_scope

        par, comm = self.cfg.parallel, self.schedule_kwargs["p2p_communicator"]
        local_seq = seq_length // par.cp // (par.tp if par.sequence_parallel else 1)
        with schedule_scope(forward_only):
            comm.start([s.stage_plan for s in attnres_stacks(self.model)], len(batches), forward_only, local_seq, mbs)
            result = run()
            comm.finish()
            return result

    def _mean_loss(self, loss_dicts: list) -> float:
        """Token-weighted mean loss over micro-batches, data- and context-parallel ranks and onto
        rank 0."""
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for d in loss_dicts:
            total += d["lm loss"].to(total)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        return (total[0] / total[1].clamp(min=1)).item()

    def train_step(self, batches: list) -> dict:
        """One optimizer step over these micro-batches. A step whose loss or gradients are not
        finite (or whose loss spikes, with train.loss_spike_factor) updates nothing. On a log step
        (fit sets `_log_step`) it also returns per-group gradient norms, per-dataset losses and
        the optimizer's metrics; other steps read nothing back for metrics."""
        t0 = time.perf_counter()
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step's update uses
        loss_dicts = self._run_schedule(batches, forward_only=False)
        loss = self._mean_loss(loss_dicts)  # reads the loss back: the phase ends on the device too
        t1 = time.perf_counter()
        self.timer.add("forward_backward", t1 - t0)
        step_metrics = self._log_step_metrics(loss_dicts) if self._log_step else {}
        bad = self._bad_step_reason(loss)
        if bad:
            update_ok, grad_norm = False, None
        else:
            update_ok, grad_norm, _ = self.optimizer.step()
            self.good_losses = (self.good_losses + [loss])[-20:]
        if update_ok:
            self.scheduler.step(increment=1)
        self.timer.add("optimizer", time.perf_counter() - t1)
        return {
            "loss": loss,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "update_ok": bool(update_ok),
            "skipped": bad,
            "lr": lr,
            "optim_metrics": self._optimizer_metrics() if self._log_step else {},
            "step_metrics": step_metrics,
        }

    def _optimizer_metrics(self) -> dict:
        """The optimizer's own log-step metrics (MuonClip: QK-clip's max logits and clipped heads),
        read after its step; megatron-core's optimizers have none."""
        read = getattr(self.optimizer, "log_step_metrics", None)
        return read() if read is not None else {}

    def _log_step_metrics(self, loss_dicts: list) -> dict:
        """optim/grad_norm/{group} (reduced gradients, before clipping) and data/loss/{dataset}."""
        # under the distributed optimizer and MuonClip ranks hold only their shard of the reduced gradients
        out = grad_norms_by_group(self.model, sharded=self.sharded_grads)
        if len(self.dataset_names) > 1:
            n = len(self.dataset_names)
            per_ds = torch.zeros(n * 2, dtype=torch.float64, device=self.device)
            for d in loss_dicts:
                if "dataset loss" in d:
                    per_ds += d["dataset loss"].to(per_ds)
            if parallel_state.get_pipeline_model_parallel_world_size() > 1:
                dist.all_reduce(per_ds, group=parallel_state.get_pipeline_model_parallel_group())
            dist.all_reduce(per_ds, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
            per_ds = per_ds.view(n, 2).cpu()
            for name, (total, count) in zip(self.dataset_names, per_ds.tolist()):
                if count > 0:
                    out[f"data/loss/{name}"] = total / count
                    out[f"data/tokens/{name}"] = count
        return out

    def _handoff_bytes(self) -> float:
        """Bytes the last step's stages handed on per micro-batch (one tensor-parallel rank's share:
        this rank's pipeline group, summed over its stages)."""
        from deltatron.parallel.attnres_pipeline import rank_cache

        sent = rank_cache().bytes_sent
        total = torch.tensor([float(sum(sent.values()))], dtype=torch.float64, device=self.device)
        dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
        return total.item() / max(self.num_microbatches, 1)

    def _bad_step_reason(self, loss: float) -> str | None:
        """Why this step's update must be skipped, the same answer on every rank (the loss is
        already reduced over all ranks; gradients are checked on each rank and the verdict
        all-reduced), or None."""
        if not math.isfinite(loss):
            return f"loss is {loss}"
        spike = self.cfg.train.loss_spike_factor
        if spike and len(self.good_losses) >= 5 and loss > spike * (sum(self.good_losses) / len(self.good_losses)):
            return f"loss {loss:.4f} > {spike:g} x the recent mean {sum(self.good_losses) / len(self.good_losses):.4f}"
        # one device-side verdict over every gradient buffer and one host read after the
        # all-reduce (not a read per buffer)
        flag = torch.zeros(1, device=self.device)
        for m in self.model:
            for buf in m.buffers + m.expert_parallel_buffers:
                flag = torch.maximum(flag, (~torch.isfinite(buf.grad_data).all()).float())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return "gradients are not finite" if flag.item() else None

    @torch.no_grad()
    def evaluate(self) -> float:
        gather_params(self.model)  # every replica's weights current, not only the owners'
        for m in self.model:
            m.eval()
        losses = self._run_schedule(self.data.val_batches(self.cfg.train.eval_batches), forward_only=True)
        for m in self.model:
            m.train()
        return self._mean_loss(losses)

    # ------------------------------------------------------------------ loop
    def banner(self, monitor: Monitor) -> None:
        counts = self.cfg.model.parameter_counts()
        local = sum(p.numel() for m in self.model for p in m.parameters())
        monitor.print(
            "\n".join(
                [
                    f"deltatron | model {self.cfg.model.name}: {counts['total'] / 1e6:.2f}M parameters, "
                    f"{counts['active'] / 1e6:.2f}M active per token "
                    f"({counts['active_no_embedding'] / 1e6:.2f}M without embeddings); "
                    f"{local / 1e6:.2f}M on this rank",
                    f"layout: {self.cfg.parallel.describe(self.world_size)}, precision {self.precision}, "
                    f"device {self.device.type}, layers {self.cfg.model.layer_pattern()} on "
                    f"{describe_transformer_impl(self.cfg.model.transformer_impl)}, optimizer "
                    f"{self.cfg.optim.name}{' (megatron-core distributed optimizer)' if self.distributed_optimizer else ''}, "
                    f"recompute {self.cfg.train.describe_recompute()}, loss "
                    + (f"by blocks of {self.cfg.train.cross_entropy_chunk_size} tokens"
                       if self.cfg.train.cross_entropy_chunk_size else "on whole logits"),
                    f"batch: {self.cfg.train.global_batch_size} x {self.seq_length} = "
                    f"{self.tokens_per_step} tokens per step, {self.num_microbatches} micro-batches of "
                    f"{self.cfg.train.micro_batch_size}, documents "
                    f"{'packed with boundaries' if self.cfg.data.document_boundaries else 'concatenated'}",
                    f"data: {self.data.describe()}",
                    f"MFU peak: {self.peak_source}",
                    f"run directory: {self.run_dir} (resolved config: {os.path.join(self.run_dir, 'config.yaml')})",
                    *(self.optimizer.describe() if hasattr(self.optimizer, "describe") else []),
                    *(self.owner_layout.report if self.owner_layout is not None else []),
                ]
            )
        )

    def _memory_gb(self) -> float:
        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 1e9
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB -> GB (Linux)

    def fit(self) -> dict:
        """Train to train.steps (resuming per train.resume), saving checkpoints per
        train.save_interval. Returns the history; history["preempted"] says the run stopped
        early on SIGTERM/SIGUSR1 after saving (the CLI then exits with PREEMPTED_EXIT_CODE)."""
        cfg, train = self.cfg, self.cfg.train
        if is_rank0():
            OmegaConf.save(OmegaConf.create(self.resolved), os.path.join(self.run_dir, "config.yaml"))
        monitor = Monitor(self.run_dir, cfg.logging, self.resolved)
        self.banner(monitor)
        save_dir = os.path.abspath(train.save_dir or os.path.join(self.run_dir, "checkpoints"))
        progress = Progress()
        last_checkpoint = resolve_resume(train.resume, save_dir)
        if last_checkpoint:
            progress = load_checkpoint(
                last_checkpoint, self.model, self.optimizer, self.scheduler, self.data, cfg.model
            )
            monitor.print(
                f"resumed from {last_checkpoint} at step {progress.step} ({progress.consumed_tokens:,} tokens)"
            )
        elif train.init_from:
            load_model(self.model, train.init_from)
            if hasattr(self.optimizer, "reload_model_params"):  # fp32 master copies of bf16 weights
                self.optimizer.reload_model_params()
            monitor.print(f"initialised the model from {train.init_from} (optimizer and data start fresh)")
        saver = CheckpointSaver(save_dir, train.keep_last, train.async_save)
        saver.latest = last_checkpoint
        first_step = progress.step + 1
        train_iter: Iterator = self.data.train_batches()
        history = {"loss": [], "val_loss": [], "skipped_steps": [], "first_step": first_step, "preempted": False}
        start = time.time()
        window_start, window_tokens = time.time(), 0
        self.timer = StepTimer()
        bad_in_a_row = 0
        monitor.start_progress(train.steps, first_step)
        with PreemptionSignal(self.device) as preemption:
            for self.step in range(first_step, train.steps + 1):
                t_data = time.perf_counter()
                batches = [next(train_iter) for _ in range(self.num_microbatches)]
                self.timer.add("data_wait", time.perf_counter() - t_data)
                logging_step = (
                    self.step % cfg.logging.log_interval == 0 or self.step == train.steps or self.step == first_step
                )
                if logging_step:  # sub-layer output RMS (+ AttnRes depth weights), MoE and KDA probes
                    start_depth_metrics(self.model)
                    self.probes.start()
                self._log_step = logging_step
                try:
                    out = self.train_step(batches)
                finally:
                    self._log_step = False
                self.timer.steps += 1
                depth_metrics = {}
                if logging_step:
                    depth_metrics = collect_depth_metrics(self.model)
                    depth_metrics.update(self.probes.collect())
                if logging_step and self.attnres_pipeline:
                    depth_metrics["attnres/pipeline_bytes_per_microbatch"] = self._handoff_bytes()
                progress.step, progress.consumed_tokens = self.step, progress.consumed_tokens + self.tokens_per_step
                history["loss"].append(out["loss"])
                window_tokens += self.tokens_per_step
                if out["skipped"]:
                    history["skipped_steps"].append(self.step)
                    bad_in_a_row += 1
                    monitor.log(self.step, {"train/skipped_steps": len(history["skipped_steps"])})
                    monitor.print(f"step {self.step}: update skipped ({out['skipped']})")
                    if bad_in_a_row >= train.max_bad_steps:
                        raise RuntimeError(
                            f"{bad_in_a_row} bad steps in a row up to step {self.step} (last: {out['skipped']}); "
                            f"the last good checkpoint is {saver.latest or 'none: nothing was saved yet'}. "
                            "Lower optim.lr or inspect the data, then resume from it (train.resume=<dir>)"
                        )
                else:
                    bad_in_a_row = 0
                if logging_step:
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    elapsed = time.time() - window_start
                    tokens_per_sec = window_tokens / max(elapsed, 1e-9)
                    # model FLOPs per second per GPU, the number Megatron-LM logs as "TFLOP/s/GPU"
                    tflops = tokens_per_sec * self.flops_per_token / self.world_size / 1e12
                    mfu = tflops / self.peak_tflops if self.peak_tflops else None
                    eta = (time.time() - start) / (self.step - first_step + 1) * (train.steps - self.step)
                    lr = out["lr"]
                    timing = self.timer.read()
                    metrics = {
                        "train/loss": out["loss"], "train/lr": lr, "train/grad_norm": out["grad_norm"],
                        "train/tokens": progress.consumed_tokens,
                        "perf/tokens_per_sec": tokens_per_sec, "perf/tflops_per_device": tflops,
                        **timing,
                        **rank_stats(timing["perf/step_time_s"], self.device),
                    }
                    if mfu is not None:
                        metrics["perf/mfu"] = mfu
                    metrics.update(out["step_metrics"])
                    metrics.update(out["optim_metrics"])
                    metrics.update(depth_metrics)
                    monitor.log(self.step, metrics)
                    monitor.print(
                        f"step {self.step}/{train.steps} | loss {out['loss']:.4f} | lr {lr:.3e} | "
                        f"grad norm {out['grad_norm']:.3f} | {tokens_per_sec:,.0f} tokens/s | "
                        f"MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | "
                        f"mem {self._memory_gb():.2f} GB | ETA {format_duration(eta)} "
                        f"({100 * self.step / train.steps:.0f}% done)"
                    )
                    monitor.step_done(f"loss {out['loss']:.4f}")
                    window_start, window_tokens = time.time(), 0
                else:
                    monitor.step_done()
                if train.eval_interval and (self.step % train.eval_interval == 0 or self.step == train.steps):
                    t_eval = time.time()
                    val = self.evaluate()
                    history["val_loss"].append((self.step, val))
                    monitor.log(self.step, {"train/val_loss": val})
                    monitor.print(
                        f"eval at step {self.step} | val loss {val:.4f} | "
                        f"{self.cfg.train.eval_batches} batches in {time.time() - t_eval:.1f}s"
                    )
                    # evaluation is not training time: keep it out of tokens/s and the step time
                    window_start += time.time() - t_eval
                    self.timer.window_start += time.time() - t_eval
                preempted = preemption.requested()
                if preempted or (
                    train.save_interval and (self.step % train.save_interval == 0 or self.step == train.steps)
                ):
                    t_save = time.time()
                    path = saver.save(self.model, self.optimizer, self.scheduler, self.data, progress, cfg.model)
                    monitor.print(
                        f"saving {path} in the background" if train.async_save
                        else f"saved {path} (step {self.step}, {time.time() - t_save:.1f}s)"
                    )
                    # checkpoint time is not training time either
                    window_start += time.time() - t_save
                    self.timer.window_start += time.time() - t_save
                published = saver.wait() if preempted else saver.poll()
                if published:
                    monitor.print(f"saved {published}")
                if preempted:
                    history["preempted"] = True
                    monitor.print(
                        f"preempted ({preemption.received or 'signal on another rank'}): saved step "
                        f"{self.step}; exiting with code {PREEMPTED_EXIT_CODE} so the job is requeued"
                    )
                    break
        published = saver.wait()
        if published:
            monitor.print(f"saved {published}")
        monitor.print(f"done: {progress.step} steps in {format_duration(time.time() - start)}")
        history["seconds"] = time.time() - start
        history["last_checkpoint"] = saver.latest
        monitor.close()
        return history


def describe_dry_run(cfg: RunConfig, resolved: dict) -> str:
    """What `train.dry_run=true` prints: the resolved config and the model's size."""
    counts = cfg.model.parameter_counts()
    cfg.train.recompute_config(cfg.model)  # raises for recomputation this model cannot take
    return (
        OmegaConf.to_yaml(OmegaConf.create(resolved))
        + f"\nmodel {cfg.model.name}: {counts['total']:,} parameters, {counts['active']:,} active per token "
        f"({counts['active_no_embedding']:,} without embeddings and output layer)\n"
        f"layers: {cfg.model.layer_pattern()}\n"
        f"recompute: {cfg.train.describe_recompute()}\n"
        "dry run: configuration is valid; no training was done"
    )
