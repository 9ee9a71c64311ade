"""Train the same model on the same batch under a parallel layout, for parity tests.

Every layout starts from one dist_checkpointing checkpoint (saved by a single process), trains a
few optimizer steps on a fixed global batch, records the loss of each step and saves its final
weights, which the test loads back into one process to compare with the single-process run.
"""

from __future__ import annotations

import dataclasses

import torch

from deltatron.data.config import DataConfig
from deltatron.model.config import ModelConfig
from deltatron.parallel.layout import ParallelConfig
from deltatron.train.config import LoggingConfig, OptimConfig, RunConfig, TrainConfig

MODEL = dict(
    vocab_size=256, hidden_size=64, num_layers=4, kda_num_heads=2, kda_head_dim=16,
    mla_num_heads=2, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    dense_ffn_hidden_size=128, num_experts=4, moe_ffn_hidden_size=32, moe_topk=2,
)
SEQ, GLOBAL_BATCH, MICRO_BATCH, STEPS = 32, 8, 2, 3


def run_config(layout: dict, run_dir: str, model_overrides: dict | None = None,
               optim_overrides: dict | None = None) -> RunConfig:
    """optim_overrides: OptimConfig fields over the parity defaults (e.g. name="muonclip")."""
    return RunConfig(
        model=ModelConfig(**{**MODEL, **(model_overrides or {})}),
        parallel=ParallelConfig(**layout),
        # eps well above the gradients' rounding noise, so Adam does not amplify it
        optim=OptimConfig(**{**dict(lr=1e-3, min_lr=1e-3, warmup_steps=0, schedule="constant", eps=1e-6),
                             **(optim_overrides or {})}),
        data=DataConfig(seq_length=SEQ, document_boundaries=True),
        train=TrainConfig(
            steps=STEPS, micro_batch_size=MICRO_BATCH, global_batch_size=GLOBAL_BATCH,
            precision="fp32", eval_interval=0, run_dir=run_dir,
        ),
        logging=LoggingConfig(wandb=False),
    )


def global_batch() -> list[dict]:
    """GLOBAL_BATCH samples with document boundaries at sample-specific places."""
    g = torch.Generator().manual_seed(2024)
    tokens = torch.randint(0, MODEL["vocab_size"], (GLOBAL_BATCH, SEQ + 1), generator=g)
    return [
        {"tokens": tokens[i, :-1], "labels": tokens[i, 1:], "doc_starts": [0, 3 + 3 * i]}
        for i in range(GLOBAL_BATCH)
    ]


def collate(samples: list[dict]) -> dict:
    starts = []
    for j, s in enumerate(samples):
        starts += [j * SEQ + d for d in s["doc_starts"]]
    cu = torch.tensor(starts + [len(samples) * SEQ], dtype=torch.int32)
    return {
        "tokens": torch.stack([s["tokens"] for s in samples]),
        "labels": torch.stack([s["labels"] for s in samples]),
        "loss_mask": torch.ones(len(samples), SEQ),
        "cu_seqlens": cu,
        "max_seqlen": int((cu[1:] - cu[:-1]).max()),
    }


class FixedBatches:
    """This data-parallel rank's micro-batches of the same global batch, every step."""

    def __init__(self, dp_rank: int, dp_size: int):
        samples = global_batch()
        per_rank = GLOBAL_BATCH // dp_size
        mine = samples[dp_rank * per_rank : (dp_rank + 1) * per_rank]
        self.micro = [collate(mine[i : i + MICRO_BATCH]) for i in range(0, per_rank, MICRO_BATCH)]

    def train_batches(self):
        while True:
            yield from self.micro

    def val_batches(self, n):
        return self.micro[:n]

    def describe(self):
        return "fixed test batch"


def make_trainer(cfg: RunConfig, batches=None):
    """A Trainer for cfg fed by `batches` (a class built from the data-parallel rank and size;
    FixedBatches by default), which only the trainer's process groups can tell."""
    from megatron.core import parallel_state

    from deltatron.train.trainer import Trainer

    class _Deferred:  # the trainer asks for data before the process groups tell us our dp rank
        pass

    trainer = Trainer(cfg, dataclasses.asdict(cfg), data=_Deferred())
    trainer.data = (batches or FixedBatches)(
        parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    )
    return trainer


def train_steps(trainer, steps: int) -> list[float]:
    """The losses of `steps` optimizer steps on the trainer's batches."""
    it = trainer.data.train_batches()
    return [trainer.train_step([next(it) for _ in range(trainer.num_microbatches)])["loss"] for _ in range(steps)]


def float_state(trainer) -> dict[str, torch.Tensor]:
    """Copies of every floating-point entry of the model chunks' state dicts (parameters and
    buffers such as the router's expert bias)."""
    return {n: t.detach().clone() for m in trainer.model for n, t in m.state_dict().items()
            if torch.is_tensor(t) and t.is_floating_point()}


def compare_runs(a, b) -> tuple[float, float]:
    """(max relative loss difference, max absolute state difference) of two (losses, float_state)
    results; the runs must have trained (losses that change) the same entries."""
    (losses_a, state_a), (losses_b, state_b) = a, b
    assert state_a.keys() == state_b.keys() and losses_a != [losses_a[0]] * len(losses_a)
    loss = max(abs(x - y) / abs(x) for x, y in zip(losses_a, losses_b))
    return loss, max((state_a[k] - state_b[k]).abs().max().item() for k in state_a)


def on_off_job(rank: int, world_size: int, train, layouts: dict, values: tuple, out_dir: str) -> dict:
    """A tests/distributed.py job: for each named (layout, model_overrides), compare_runs of
    train(run_dir, layout, value, model_overrides) with the option off and on (`values`)."""
    return {
        name: compare_runs(*[train(f"{out_dir}/{name}-{v}", layout, v, overrides) for v in values])
        for name, (layout, overrides) in layouts.items()
    }


def train_layout(layout: dict, init_ckpt: str, final_ckpt: str | None, run_dir: str,
                 model_overrides: dict | None = None, optim_overrides: dict | None = None) -> list[float]:
    """Losses of STEPS optimizer steps under `layout`, starting from `init_ckpt`."""
    from deltatron.train.checkpoint import load_model, save_model

    trainer = make_trainer(run_config(layout, run_dir, model_overrides, optim_overrides))
    load_model(trainer.model, init_ckpt)
    losses = train_steps(trainer, STEPS)
    if final_ckpt:
        save_model(trainer.model, final_ckpt)
    return losses


def layouts_job(rank: int, world_size: int, layouts: dict, init_ckpt: str, out_dir: str,
                model_overrides: dict | None = None, optim_overrides: dict | None = None) -> dict:
    """Train every named layout in turn on this set of processes (one launch for all of them)."""
    results = {}
    for name, layout in layouts.items():
        results[name] = train_layout(
            layout, init_ckpt, f"{out_dir}/{name}", f"{out_dir}/run-{name}", model_overrides,
            optim_overrides,
        )
    return results
