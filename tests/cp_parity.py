"""Train the tiny parity model on one long packed sequence per micro-batch under context
parallelism, for tests/test_context_parallel.py.

Same recipe as tests/parity.py (one initial checkpoint, a fixed global batch, a few optimizer
steps, final weights saved for comparison in one process), with micro-batches of one row of SEQ
tokens so that CP slices cut through documents. Two batch sets:

* "documents": document boundaries crossing the CP2 and CP4 slice edges, lying exactly on them,
  and several inside one slice;
* "one_document": every row one document, so the state crosses every edge.
"""

from __future__ import annotations

import dataclasses

import torch

import parity

SEQ, GLOBAL_BATCH, STEPS = 64, 2, 2
# Document starts of each row (slice edges: 32 under CP2; 16, 32, 48 under CP4).
DOC_STARTS = {
    "documents": [[0, 10, 40], [0, 16, 20, 32, 61]],
    "one_document": [[0], [0]],
}


def run_config(layout: dict, run_dir: str, batches: str):
    cfg = parity.run_config(layout, run_dir)
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, seq_length=SEQ, document_boundaries=batches == "documents"),
        train=dataclasses.replace(cfg.train, steps=STEPS, micro_batch_size=1, global_batch_size=GLOBAL_BATCH),
    )


class LongBatches:
    """This data-parallel rank's micro-batches (one row of SEQ tokens each), every step."""

    def __init__(self, batches: str, dp_rank: int, dp_size: int):
        g = torch.Generator().manual_seed(7)
        tokens = torch.randint(0, parity.MODEL["vocab_size"], (GLOBAL_BATCH, SEQ + 1), generator=g)
        rows = []
        for i, starts in enumerate(DOC_STARTS[batches]):
            cu = torch.tensor(starts + [SEQ], dtype=torch.int32)
            rows.append({
                "tokens": tokens[i : i + 1, :-1], "labels": tokens[i : i + 1, 1:],
                "loss_mask": torch.ones(1, SEQ), "cu_seqlens": cu,
                "max_seqlen": int((cu[1:] - cu[:-1]).max()),
            })
        per_rank = GLOBAL_BATCH // dp_size
        self.micro = rows[dp_rank * per_rank : (dp_rank + 1) * per_rank]

    def train_batches(self):
        while True:
            yield from self.micro

    def val_batches(self, n):
        return self.micro[:n]

    def describe(self):
        return "fixed long-sequence test batch"


def train(layout: dict, batches: str, init_ckpt: str, final_ckpt: str | None, run_dir: str) -> dict:
    """Losses and gradient norms of STEPS optimizer steps under `layout` from `init_ckpt`."""
    from megatron.core import parallel_state

    from deltatron.train.checkpoint import load_model, save_model
    from deltatron.train.trainer import Trainer

    cfg = run_config(layout, run_dir, batches)

    class _Deferred:  # the data-parallel rank is known once the trainer made the process groups
        pass

    trainer = Trainer(cfg, dataclasses.asdict(cfg), data=_Deferred())
    trainer.data = LongBatches(
        batches, parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    )
    load_model(trainer.model, init_ckpt)
    it = trainer.data.train_batches()
    losses, grad_norms = [], []
    for _ in range(STEPS):
        out = trainer.train_step([next(it) for _ in range(trainer.num_microbatches)])
        losses.append(out["loss"])
        grad_norms.append(out["grad_norm"])
    if final_ckpt:
        save_model(trainer.model, final_ckpt)
    return {"loss": losses, "grad_norm": grad_norms}


def layouts_job(rank: int, world_size: int, runs: dict, init_ckpt: str, out_dir: str) -> dict:
    """Every named (layout, batches) run in turn on this set of processes."""
    return {
        name: train(layout, batches, init_ckpt, f"{out_dir}/{name}", f"{out_dir}/run-{name}")
        for name, (layout, batches) in runs.items()
    }
