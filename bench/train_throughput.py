"""End-to-end training throughput on one GPU against reference trainers, measured in one run.

    python bench/train_throughput.py [--only JOBS] [--steps 6] [--warmup 4] [--budget 540]
                                     [--profile] [--cpu] [--out FILE] [--profile-out FILE]
                                     [hydra overrides for our jobs ...]

Jobs (each its own subprocess with its own timeout, so an OOM or a crash loses one row; the
results file is rewritten after every job):

| job | what trains | tokens per step |
|---|---|---|
| proxy_4096 | ours: `proxy` preset (12 layers, KDA 3:1 MLA, 32 experts top-8 + shared) | 2 x 4096 |
| dense_1b_4096 | ours: `dense_1b` preset (24 dense layers, Kimi pattern, 1.37B) | 4 x 4096 |
| proxy_16384 | ours: `proxy` | 1 x 16384 |
| gpt_mla_moe_4096 / _16384 | reference for proxy: megatron-core GPTModel from its local spec (`get_gpt_layer_local_spec(multi_latent_attention=True, num_experts=32)`), MLA in every layer, the proxy's width, depth, experts and first dense layer | as proxy |
| fla_kda_1b_4096 | reference for dense_1b: flash-linear-attention's KDAForCausalLM 1.39B (24 KDA layers, hidden 2048, 16 heads of 128) | 4 x 4096 |

Our jobs run `Trainer.train_step` (bf16 with fp32 master weights, megatron-core DDP and its
distributed optimizer, AdamW) on mock tokens without document boundaries, so every trainer does
the same work: full causal attention over the whole sequence. Both references train as their
users would without Transformer Engine: bf16 parameters, `torch.optim.AdamW(fused=True)`,
gradient clipping at 1.0, no recompute. The GPT reference's core attention is deltatron's
SDPACoreAttention, since megatron-core 0.19.2's local DotProductAttention rejects MLA's
k_channels/v_channels; its experts are megatron-core's local SequentialMLP (no grouped GEMM
without TE). fla's Triton kernels autotune on their first step (268 s on an H100 in
../shared/reference/measurements.md), so it runs last and gets what is left of --budget.

Reported per job: median step seconds over --steps timed steps (after --warmup), tokens/s, model
TFLOP/s and MFU, peak memory (torch.cuda.max_memory_allocated), cold start (launch of the job's
process to the end of its first step; the first job of each trainer starts with an empty Triton
cache, as on a fresh machine, later ones reuse it: "triton_cache" says which; with
--autotune-cache DIR each job's cache starts with the autotuning results DIR holds and hands its
own back, so fla's kernels do not autotune again in a later device call, and "triton_cache" says
how many results were carried), and the time split per step.

FLOPs (deltatron/train/flops.py, the same formula for every trainer, so MFU compares like with
like): training FLOPs per token = 3 x forward, forward = 2 x the matrix parameters a token passes
through (activated experts only, the output layer included, the embedding lookup not) + causal
MLA scores and values 2 x heads x (d_qk + d_v) x T / 2 + KDA's chunkwise recurrence per head
6 d^2 + 3 C d + C^2 (Kimi Linear eq. 13/14). MFU = tokens/s x FLOPs per token / peak, with peak
the bf16 dense spec-sheet TFLOP/s of the device (flops.PEAK_TFLOPS_BF16: H100 SXM 989, H200 989,
A100 312, B200 2250).

Time split (deltatron/train/time_split.ModuleTimes: CUDA events around every module of a kind,
forward and backward): kda, mla, moe_experts (routed experts), moe_other (router, token
dispatch/combine, shared expert: the MoE layer minus its experts), dense_mlp, other (embedding,
norms, residuals, output layer and loss, DDP hooks: forward-backward minus the kinds), optimizer
(gradient clipping and the update: step minus forward-backward) and data (fetching the step's
micro-batches on the host).

--profile adds two profiled steps per job after the timed ones (not part of the timing) and
appends a torch.profiler table of the top ops by device time to --profile-out. --cpu runs tiny
shapes of every job on CPU (fp32; fla is skipped: its kernels need CUDA) to check the script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    REPO, compose, copy_autotune_results, device_name, device_tag, environment, sync,
)


@dataclass(frozen=True)
class Job:
    kind: str  # "deltatron", "megatron_gpt" or "fla"
    model: list[str]  # Hydra overrides of the model (the references take their dims from it)
    seq_len: int
    micro_batch: int
    reference: str | None = None  # the job measured as this one's reference
    timeout_s: int = 240
    extra: list[str] = field(default_factory=list)


GPU_JOBS = {
    "proxy_4096": Job("deltatron", ["model=proxy"], 4096, 2, "gpt_mla_moe_4096"),
    "dense_1b_4096": Job("deltatron", ["model=dense_1b"], 4096, 4, "fla_kda_1b_4096"),
    "proxy_16384": Job("deltatron", ["model=proxy"], 16384, 1, "gpt_mla_moe_16384"),
    "gpt_mla_moe_4096": Job("megatron_gpt", ["model=proxy"], 4096, 2),
    "gpt_mla_moe_16384": Job("megatron_gpt", ["model=proxy"], 16384, 1),
    "fla_kda_1b_4096": Job("fla", ["model=dense_1b", "model.mla_layers=[]"], 4096, 4, timeout_s=420),
}
_TINY = ["model=tiny"]
CPU_JOBS = {
    "proxy_4096": Job("deltatron", _TINY, 128, 2, "gpt_mla_moe_4096"),
    "dense_1b_4096": Job("deltatron", [*_TINY, "model.first_k_dense=4"], 128, 2, "fla_kda_1b_4096"),
    "proxy_16384": Job("deltatron", _TINY, 256, 1, "gpt_mla_moe_16384"),
    "gpt_mla_moe_4096": Job("megatron_gpt", _TINY, 128, 2),
    "gpt_mla_moe_16384": Job("megatron_gpt", _TINY, 256, 1),
    "fla_kda_1b_4096": Job("fla", [*_TINY, "model.first_k_dense=4", "model.mla_layers=[]"], 128, 2),
}
# jobs that need this much of the budget left to be worth starting (fla: its autotuning)
MIN_SECONDS_TO_START = {"fla": 300}


# ----------------------------------------------------------------------------------- the workers
def _kinds(job_kind: str) -> dict[str, tuple[type, ...]]:
    """Module classes per time-split kind for a trainer."""
    if job_kind == "fla":
        from fla.layers.kda import KimiDeltaAttention as FlaKDA
        from fla.modules import GatedMLP

        return {"kda": (FlaKDA,), "dense_mlp": (GatedMLP,)}
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    from deltatron.model.kda import KimiDeltaAttention

    return {
        "kda": (KimiDeltaAttention,), "mla": (MLASelfAttention,), "moe": (MoELayer,),
        "moe_experts": (SequentialMLP,), "dense_mlp": (MLPLayer,),
    }


def _split(kind_seconds: dict, forward_backward: float, step: float, data: float) -> dict:
    """Per-step seconds by part (module docstring)."""
    k = {name: kind_seconds.get(name, 0.0) for name in ("kda", "mla", "moe", "moe_experts", "dense_mlp")}
    parts = {
        "kda": k["kda"], "mla": k["mla"], "moe_experts": k["moe_experts"],
        "moe_other": k["moe"] - k["moe_experts"], "dense_mlp": k["dense_mlp"],
    }
    parts["other"] = forward_backward - sum(parts.values())
    parts["optimizer"] = step - forward_backward
    parts["data"] = data
    return parts


class _Deltatron:
    """Our trainer on one job's shapes."""

    def __init__(self, job: Job, cpu: bool, run_dir: str, steps: int, overrides: list[str]):
        from deltatron.train.trainer import Trainer

        overrides = [
            *job.model, f"data.seq_length={job.seq_len}", f"train.micro_batch_size={job.micro_batch}",
            f"train.global_batch_size={job.micro_batch}", "data.mock=true", "data.document_boundaries=false",
            "train.eval_interval=0", "train.save_interval=0", "logging.wandb=false", f"train.steps={steps}",
            f"train.run_dir={run_dir}", "optim.warmup_steps=2", *job.extra,
            *(["train.precision=fp32"] if cpu else []), *overrides,
        ]
        cfg, resolved = compose(overrides)
        self.model_cfg = cfg.model
        self.trainer = Trainer(cfg, resolved)
        self.model = self.trainer.model
        self.batches = self.trainer.data.train_batches()
        self.tokens_per_step = self.trainer.tokens_per_step

    def step(self) -> tuple[float, float]:
        """One optimizer step: (host seconds fetching data, seconds of forward-backward)."""
        t = time.perf_counter()
        batches = [next(self.batches) for _ in range(self.trainer.num_microbatches)]
        data = time.perf_counter() - t
        before = self.trainer.timer.totals["forward_backward"]
        self.trainer.train_step(batches)  # the loss read-back ends forward-backward on the device
        return data, self.trainer.timer.totals["forward_backward"] - before


class _PlainAdamW:
    """A reference model trained as its users would: bf16 parameters, fused AdamW, clipping."""

    def __init__(self, model: torch.nn.Module, job: Job, vocab: int, cpu: bool):
        self.device = torch.device("cpu" if cpu else "cuda")
        self.model = model.to(self.device, dtype=torch.float32 if cpu else torch.bfloat16).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.1, fused=not cpu)
        self.shape = (job.micro_batch, job.seq_len)
        self.vocab = vocab
        self.generator = torch.Generator().manual_seed(1234)
        self.tokens_per_step = job.micro_batch * job.seq_len

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(self) -> tuple[float, float]:
        t = time.perf_counter()
        tokens = torch.randint(0, self.vocab, (self.shape[0], self.shape[1] + 1), generator=self.generator)
        tokens = tokens.to(self.device, non_blocking=True)
        data = time.perf_counter() - t
        sync()
        t = time.perf_counter()
        loss = self.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        sync()
        forward_backward = time.perf_counter() - t
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return data, forward_backward


class _Fla(_PlainAdamW):
    """flash-linear-attention's KDAForCausalLM with the job's dims (its fused loss)."""

    def __init__(self, job: Job, cpu: bool, model_cfg):
        from fla.models import KDAConfig, KDAForCausalLM

        config = KDAConfig(
            hidden_size=model_cfg.hidden_size, num_heads=model_cfg.kda_num_heads,
            head_dim=model_cfg.kda_head_dim, num_hidden_layers=model_cfg.num_layers,
            vocab_size=model_cfg.vocab_size, hidden_ratio=4, tie_word_embeddings=False,
            max_position_embeddings=job.seq_len, use_cache=False,  # as flame trains
        )
        super().__init__(KDAForCausalLM(config), job, model_cfg.vocab_size, cpu)

    def loss(self, tokens, labels):
        # fla's causal-LM loss shifts the labels itself: given the inputs, it predicts the next one
        return self.model(input_ids=tokens, labels=tokens).loss


class _MegatronGPT(_PlainAdamW):
    """megatron-core GPTModel, local spec, MLA everywhere, the job's MoE dims."""

    def __init__(self, job: Job, cpu: bool, model_cfg):
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        from deltatron.model.mla import SDPACoreAttention
        from deltatron.parallel.setup import init_process_groups

        init_process_groups(seed=1234)
        layers = model_cfg.num_layers
        tc = model_cfg.to_transformer_config(
            transformer_impl="local", use_cpu_initialization=cpu, bf16=not cpu,
            params_dtype=torch.float32 if cpu else torch.bfloat16,
            num_layers=layers,
            # Kimi's first-dense layout (megatron-core has no first_k_dense: a per-layer list)
            moe_layer_freq=[0] * model_cfg.first_k_dense + [1] * (layers - model_cfg.first_k_dense),
        )
        spec = get_gpt_layer_local_spec(
            num_experts=model_cfg.num_experts, moe_grouped_gemm=False, qk_layernorm=False,
            multi_latent_attention=True,
        )
        # megatron-core 0.19.2's local DotProductAttention rejects MLA (k_channels/v_channels)
        spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
        model = GPTModel(
            config=tc, transformer_layer_spec=spec, vocab_size=model_cfg.vocab_size,
            max_sequence_length=job.seq_len, position_embedding_type="none",
            share_embeddings_and_output_weights=False,
        )
        super().__init__(model, job, model_cfg.vocab_size, cpu)
        self.position_ids = torch.arange(job.seq_len, device=self.device)[None].expand(job.micro_batch, -1)

    def loss(self, tokens, labels):
        per_token = self.model(tokens, self.position_ids, None, labels=labels)  # [B, S], fp32
        return per_token.float().mean()


def _chunks(model) -> list:
    return model if isinstance(model, list) else [model]


def _profile_table(trainer, steps: int, cpu: bool) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([] if cpu else [ProfilerActivity.CUDA])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.step()
        sync()
    sort = "self_cpu_time_total" if cpu else "self_cuda_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=70)


def worker(args) -> None:
    """Run one job in this process and write its result to args.result."""
    from deltatron.train.flops import peak_tflops, training_flops_per_token
    from deltatron.train.time_split import ModuleTimes

    launched = float(os.environ["TRAIN_THROUGHPUT_LAUNCHED"])
    job = (CPU_JOBS if args.cpu else GPU_JOBS)[args.job]
    if job.kind == "deltatron":
        trainer = _Deltatron(job, args.cpu, os.path.join(args.tmp, f"run-{args.job}"), args.warmup + args.steps,
                             args.overrides)
        model_cfg = trainer.model_cfg
    else:
        model_cfg, _ = compose([*job.model])
        model_cfg = model_cfg.model
        if job.kind == "megatron_gpt":
            # full attention everywhere: every layer MLA (for the FLOPs; the model is all MLA)
            model_cfg.mla_layers = list(range(1, model_cfg.num_layers + 1))
            trainer = _MegatronGPT(job, args.cpu, model_cfg)
        else:
            trainer = _Fla(job, args.cpu, model_cfg)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = ModuleTimes(trainer.model, _kinds(job.kind), ranges=args.profile)
    step_seconds, splits, cold_start = [], [], None
    for i in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        data, forward_backward = trainer.step()
        sync()
        seconds = time.perf_counter() - start
        if cold_start is None:
            cold_start = time.time() - launched
            print(f"[{args.job}] first step done {cold_start:.1f}s after launch", flush=True)
        kinds = times.read()
        if i >= args.warmup:
            step_seconds.append(seconds)
            splits.append(_split(kinds, forward_backward, seconds, data))
    median = statistics.median(step_seconds)
    flops = training_flops_per_token(model_cfg, job.seq_len)
    peak, _ = peak_tflops(device_name())
    tokens_per_sec = trainer.tokens_per_step / median
    result = {
        "job": args.job, "kind": job.kind, "seq_len": job.seq_len, "micro_batch": job.micro_batch,
        "tokens_per_step": trainer.tokens_per_step,
        "parameters": sum(p.numel() for m in _chunks(trainer.model) for p in m.parameters()),
        "step_seconds": step_seconds, "median_step_seconds": median,
        "tokens_per_sec": tokens_per_sec,
        "model_tflops_per_token": flops / 1e12,
        "tflops": tokens_per_sec * flops / 1e12,
        "mfu": tokens_per_sec * flops / 1e12 / peak if peak else None,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None,
        "cold_start_s": cold_start,
        "time_split_s": {k: statistics.median(s[k] for s in splits) for k in splits[0]},
        "modules_timed": times.counts,
    }
    if args.profile:
        times.remove()
        times = ModuleTimes(trainer.model, _kinds(job.kind), ranges=True)
        table = _profile_table(trainer, 2, args.cpu)
        result["profile"] = f"=== {args.job} ({job.kind}, seq {job.seq_len} x {job.micro_batch}) ===\n{table}\n"
    with open(args.result, "w") as f:
        json.dump({"result": result, "environment": environment()}, f)


# ----------------------------------------------------------------------------------- orchestration
def _row(name: str, job: Job, results: dict) -> dict:
    """The results-file row of one of our jobs, with its reference's numbers."""
    ours, ref = results.get(name, {}), results.get(job.reference, {})
    row = {
        "workload": name, "seq_len": job.seq_len, "micro_batch": job.micro_batch,
        "tokens_per_sec": ours.get("tokens_per_sec"), "tflops": ours.get("tflops"), "mfu": ours.get("mfu"),
        "peak_mem_gb": ours.get("peak_mem_gb"), "cold_start_s": ours.get("cold_start_s"),
        "time_split_s": ours.get("time_split_s"), "status": ours.get("status", "not run"),
        "reference": job.reference,
        "reference_tokens_per_sec": ref.get("tokens_per_sec"), "reference_tflops": ref.get("tflops"),
        "reference_mfu": ref.get("mfu"), "reference_peak_mem_gb": ref.get("peak_mem_gb"),
        "triton_cache": ours.get("triton_cache"),
        "reference_cold_start_s": ref.get("cold_start_s"), "reference_triton_cache": ref.get("triton_cache"), "reference_time_split_s": ref.get("time_split_s"),
        "reference_status": ref.get("status", "not run"),
    }
    if row["tokens_per_sec"] and row["reference_tokens_per_sec"]:
        row["speedup_vs_reference"] = row["tokens_per_sec"] / row["reference_tokens_per_sec"]
    return row


def _run_job(name: str, job: Job, args, tmp: str, timeout: float) -> dict:
    """One job in its own process: its result, or why there is none."""
    result_path = os.path.join(tmp, f"{name}.json")
    # one Triton cache per trainer kind: its first job compiles (and autotunes) from nothing, as
    # on a fresh machine; its later jobs reuse the kernels, as a second run on one machine would
    triton_cache = os.path.join(tmp, f"triton-{job.kind}")
    fresh = not os.path.isdir(triton_cache)
    carried = copy_autotune_results(args.autotune_cache, triton_cache) if args.autotune_cache else 0
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--job", name, "--tmp", tmp,
           "--result", result_path, "--steps", str(args.steps), "--warmup", str(args.warmup),
           *(["--cpu"] if args.cpu else []), *(["--profile"] if args.profile else []), *args.overrides]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1", TRITON_CACHE_DIR=triton_cache,
               TRITON_CACHE_AUTOTUNING="1" if args.autotune_cache else "0",
               TRAIN_THROUGHPUT_LAUNCHED=repr(time.time()))
    if args.cpu:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    start = time.time()
    try:
        proc = subprocess.run(cmd, env=env, cwd=REPO, timeout=timeout)
        status = "ok" if proc.returncode == 0 else f"failed: exit code {proc.returncode}"
    except subprocess.TimeoutExpired:
        status = f"timed out after {timeout:.0f}s"
    if args.autotune_cache:
        copy_autotune_results(triton_cache, args.autotune_cache)
    cache_state = "fresh" if fresh else "warm"
    if carried:
        cache_state += f", {carried} autotuning results carried from an earlier run"
    if status == "ok" and os.path.exists(result_path):
        with open(result_path) as f:
            part = json.load(f)
        return {**part["result"], "status": "ok", "wall_s": time.time() - start,
                "triton_cache": cache_state, "environment": part["environment"]}
    return {"status": status, "wall_s": time.time() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help="comma-separated jobs (references are not added)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per job")
    # 4: with 2, the megatron-core GPT reference's first timed steps on an H200 still ran up to
    # 1.7x its later ones (bench/results/train_throughput_h200.json at a3526b7), skewing the median
    parser.add_argument("--warmup", type=int, default=4, help="steps before the timed ones")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for all jobs together")
    parser.add_argument("--profile", action="store_true", help="profiler table of 2 extra steps per job")
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on CPU, fp32 (checks the script)")
    parser.add_argument("--out", default=None, help="default: bench/results/train_throughput_<device>.json")
    parser.add_argument("--profile-out", default=None, help="default: next to --out, .profile.txt")
    parser.add_argument("--autotune-cache", default=None,
                        help="folder of Triton autotuning results carried between runs (read and "
                             "added to; see common.copy_autotune_results)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    args.overrides = overrides  # Hydra overrides for our jobs, e.g. model.moe_grouped_gemm=false
    if args.worker:
        return worker(args)
    jobs = CPU_JOBS if args.cpu else GPU_JOBS
    names = list(jobs)
    if args.only:
        names = args.only.split(",")
        unknown = set(names) - set(jobs)
        if unknown:
            raise SystemExit(f"--only: unknown jobs {sorted(unknown)}; choose from {list(jobs)}")
    if args.cpu:
        names = [n for n in names if jobs[n].kind != "fla"]  # fla's kernels need CUDA
    tag = device_tag(device_name()) if not args.cpu else "cpu"
    out = args.out or os.path.join(REPO, "bench", "results", f"train_throughput_{tag}.json")
    profile_out = args.profile_out or os.path.splitext(out)[0] + ".profile.txt"
    deadline = time.time() + args.budget
    results: dict[str, dict] = {}
    env_record = environment()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            left = deadline - time.time()
            needed = MIN_SECONDS_TO_START.get(jobs[name].kind, 30)
            if left < needed:
                results[name] = {"status": f"skipped: {left:.0f}s of the budget left, {needed}s needed"}
            else:
                print(f"[train_throughput] {name}: up to {min(jobs[name].timeout_s, left):.0f}s", flush=True)
                results[name] = _run_job(name, jobs[name], args, tmp, min(jobs[name].timeout_s, left))
            r = results[name]
            print(f"[train_throughput] {name}: {r['status']}"
                  + (f", {r['tokens_per_sec']:,.0f} tokens/s, MFU "
                     f"{'n/a' if r['mfu'] is None else format(r['mfu'], '.1%')}, "
                     f"cold start {r['cold_start_s']:.0f}s" if r["status"] == "ok" else ""), flush=True)
            if "profile" in r:
                with open(profile_out, "a" if len(results) > 1 else "w") as f:
                    f.write(r.pop("profile"))
            if r.get("environment"):
                env_record = r.pop("environment")
            record = {
                "benchmark": "train_throughput", "gpu": env_record["device"], **env_record,
                "steps": args.steps, "warmup": args.warmup, "budget_s": args.budget, "overrides": args.overrides,
                "rows": [_row(n, j, results) for n, j in jobs.items() if j.reference and n in names],
                "jobs": results,
            }
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            with open(out, "w") as f:  # after every job: a run cut short keeps what it measured
                json.dump(record, f, indent=2)
    print(f"{'workload':<16}{'tokens/s':>10}{'MFU':>7}{'reference':>20}{'ref tokens/s':>14}{'ref MFU':>9}")
    for row in record["rows"]:
        fmt = lambda x, spec: format(x, spec) if x is not None else "-"  # noqa: E731
        print(f"{row['workload']:<16}{fmt(row['tokens_per_sec'], ',.0f'):>10}{fmt(row['mfu'], '.1%'):>7}"
              f"{row['reference']:>20}{fmt(row['reference_tokens_per_sec'], ',.0f'):>14}"
              f"{fmt(row['reference_mfu'], '.1%'):>9}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
