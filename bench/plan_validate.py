"""Check deltatron-plan's memory model against real peaks on one GPU.

Trains a few steps of (a) model=proxy and (b) Kimi-Linear-48B-A3B cut to 3 layers (KDA + dense,
KDA + MoE, MLA + MoE; all 256 experts, EP=1) in bf16 on mock data, each in its own process, and
compares torch.cuda.max_memory_allocated with the planner's peak for the same configuration on
one GPU (deltatron.parallel.planner.build_plan: its peak before the fragmentation and reserved
allowances is what the allocator reports). It also splits the comparison: the static part (the
memory still allocated after the steps: weights, fp32 gradient buffers, optimizer state) against
the planner's weights + gradients + optimizer, and the bytes autograd saved for the backward in
one step (saved-tensor hooks, parameters excluded) against the planner's activations.

On the GPU machine (one H100 or H200; about 2 minutes, mostly start-up):

    .venv/bin/python bench/plan_validate.py
    # -> bench/results/plan_validate_<gpu>.json, e.g. plan_validate_h200.json

Options: --steps (default 3), --seq-length (4096), --micro-batch-size (1), --a3b-layers (3: the
cut must fit one GPU with AdamW's full state, 18 B/param: the planner predicts 88 GiB for 3
layers, 54 GiB for 2 (KDA + dense, MLA + MoE), so use 2 on an 80 GB H100), --out.

On CPU, `--dry-run` runs the same pipeline on the tiny model (fp32, sequence 128, 2 steps) with
CPU-side measurements (tensor sizes instead of the CUDA allocator) to check the script end to
end; it prints the JSON and writes it only with --out. CPU activations are not a validation: the
pure-PyTorch KDA and SDPA math paths save different tensors than the GPU kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, compose, device_name, device_tag, environment  # noqa: E402

GiB = 1024**3


def cases(args) -> dict[str, list[str]]:
    """Name -> Hydra overrides of each configuration measured."""
    common = [
        "data.mock=true", f"data.seq_length={args.seq_length}",
        f"train.micro_batch_size={args.micro_batch_size}", f"train.global_batch_size={args.micro_batch_size}",
        f"train.steps={args.steps}", "train.eval_interval=0", "train.save_interval=0",
        "logging.wandb=false", "logging.log_interval=1", "parallel=single",
    ]
    if args.dry_run:
        return {"tiny": ["model=tiny", "train.precision=fp32"] + common}
    layers = args.a3b_layers
    return {
        "proxy": ["model=proxy"] + common,
        f"kimi_linear_48b_a3b_{layers}_layers": [
            "model=kimi_linear_48b_a3b", f"model.num_layers={layers}", f"model.mla_layers=[{layers}]",
        ] + common,
    }


def predicted(overrides: list[str]) -> dict:
    """The planner's numbers for this configuration on one GPU of this kind."""
    from deltatron.parallel.planner import GPUS, GPUSpec, build_plan

    run, _ = compose(overrides)
    cuda = torch.cuda.is_available()
    name = device_name()
    gpu = next((g for key, g in GPUS.items() if key.upper() in name.upper()), None)
    if gpu is None:  # an unknown GPU or the CPU: its memory, rates do not matter here
        memory = torch.cuda.get_device_properties(0).total_memory if cuda else 1 << 50
        gpu = GPUSpec(name, memory, 989.0, 3350.0)
    precision = "bf16" if cuda and run.train.precision in ("auto", "bf16") else "fp32"
    plan = build_plan(
        run.model, run.parallel, world=1, gpu=gpu, seq_length=run.data.seq_length,
        micro_batch_size=run.train.micro_batch_size, global_batch_size=run.train.global_batch_size,
        optimizer=run.optim.name, precision=precision, documents=run.data.document_boundaries,
    )
    r = plan.ranks[0]
    return {
        "peak_gib": r.peak / GiB,
        "static_gib": (r.weights + r.gradients + r.optimizer) / GiB,
        "activations_gib": r.activations / GiB,
        "breakdown_gib": {
            "weights": r.weights / GiB, "gradients": r.gradients / GiB, "optimizer": r.optimizer / GiB,
            "activations": r.activations / GiB, r.transient_kind: r.transient / GiB,
        },
        "parameters": r.params,
        "fits_with_allowances": plan.fits,
    }


class SavedBytes:
    """Bytes autograd saves for the backward (unique storages, parameters excluded)."""

    def __init__(self, params):
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in self.param_ptrs and s.device.type != "meta":
            self.storages[s.data_ptr()] = s.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def measure(name: str, overrides: list[str]) -> dict:
    """Train this configuration in this process and measure it (run via --case)."""
    from deltatron.train.trainer import Trainer

    run_dir = tempfile.mkdtemp(prefix=f"plan_validate_{name}_")
    run, resolved = compose(overrides + [f"train.run_dir={run_dir}"])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(run, resolved)
    params = [p for m in trainer.model for p in m.parameters()]
    saved = SavedBytes(params)
    train_step = trainer.train_step

    def hooked_step(batches):  # one micro-batch per step: its saved tensors are the activations
        saved.storages.clear()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            out = train_step(batches)
        hooked_step.saved_max = max(hooked_step.saved_max, saved.total)
        return out

    hooked_step.saved_max = 0
    trainer.train_step = hooked_step
    history = trainer.fit()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        static = torch.cuda.memory_allocated()
        source = "torch.cuda.max_memory_allocated / memory_allocated after the steps"
    else:
        # CPU: the static part from tensor sizes; no allocator peak exists
        static = sum(p.numel() * p.element_size() for p in params)
        static += sum(b.grad_data.numel() * b.grad_data.element_size() for m in trainer.model for b in m.buffers + m.expert_parallel_buffers)
        opt = trainer.optimizer
        inner = getattr(opt, "optimizer", opt)
        for state in getattr(inner, "state", {}).values():
            static += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
        peak = static + hooked_step.saved_max
        source = "CPU: tensor sizes of parameters, gradient buffers and optimizer state, plus saved activations"
    return {
        "measured": {
            "peak_gib": peak / GiB, "static_gib": static / GiB, "saved_activations_gib": hooked_step.saved_max / GiB,
            "source": source, "losses": history["loss"],
        },
        "shapes": {
            "model": run.model.name, "layers": run.model.num_layers, "layer_pattern": run.model.layer_pattern(),
            "hidden_size": run.model.hidden_size, "num_experts": run.model.num_experts,
            "seq_length": run.data.seq_length, "micro_batch_size": run.train.micro_batch_size,
            "precision": trainer.precision, "optimizer": run.optim.name,
            "distributed_optimizer": trainer.distributed_optimizer,
            "parameters": sum(p.numel() for p in params),
        },
    }


def _rel(pred: float, meas: float) -> float | None:
    return (pred - meas) / meas if meas else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--a3b-layers", type=int, default=3)
    parser.add_argument("--dry-run", action="store_true", help="tiny model on CPU, to check the script runs")
    parser.add_argument("--out", help="JSON path (default bench/results/plan_validate_<gpu>.json; dry run: none)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: measure one case in this process
    args = parser.parse_args()
    if args.dry_run:
        args.seq_length, args.steps = min(args.seq_length, 128), min(args.steps, 2)
    if args.a3b_layers < 2:
        parser.error("--a3b-layers must be >= 2: the cut keeps a KDA+dense layer and ends with an MLA+MoE layer")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no GPU: run on one GPU, or check the script on CPU with --dry-run")
    all_cases = cases(args)

    if args.case:  # child process: measure, print one JSON line
        print("PLAN_VALIDATE " + json.dumps(measure(args.case, all_cases[args.case])))
        return 0

    results = []
    for name, overrides in all_cases.items():
        cmd = [sys.executable, os.path.abspath(__file__), "--case", name, "--steps", str(args.steps),
               "--seq-length", str(args.seq_length), "--micro-batch-size", str(args.micro_batch_size),
               "--a3b-layers", str(args.a3b_layers)] + (["--dry-run"] if args.dry_run else [])
        env = dict(os.environ, WANDB_MODE="disabled",
                   PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("PLAN_VALIDATE ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout[-3000:] + proc.stderr[-5000:], file=sys.stderr)
            print(f"plan_validate: case {name} failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        got = json.loads(line[len("PLAN_VALIDATE "):])
        pred = predicted(overrides)
        entry = {
            "case": name, "overrides": overrides, "shapes": got["shapes"], "measured": got["measured"],
            "predicted": pred,
            "relative_error": {
                "peak": _rel(pred["peak_gib"], got["measured"]["peak_gib"]),
                "static": _rel(pred["static_gib"], got["measured"]["static_gib"]),
                "activations": _rel(pred["activations_gib"], got["measured"]["saved_activations_gib"]),
            },
        }
        results.append(entry)
        err = entry["relative_error"]
        print(
            f"{name}: measured peak {got['measured']['peak_gib']:.2f} GiB, predicted {pred['peak_gib']:.2f} "
            f"({100 * err['peak']:+.1f}%); static {got['measured']['static_gib']:.2f} vs {pred['static_gib']:.2f} "
            f"({100 * err['static']:+.1f}%); saved activations {got['measured']['saved_activations_gib']:.3f} vs "
            f"{pred['activations_gib']:.3f} ({100 * err['activations']:+.1f}%)"
        )
    report = {"benchmark": "plan_validate", **environment(), "dry_run": args.dry_run, "cases": results}
    out = args.out
    if out is None and not args.dry_run:
        out = os.path.join(REPO, "bench", "results", f"plan_validate_{device_tag(device_name())}.json")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {out}")
    else:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
