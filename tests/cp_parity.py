"""Train the tiny parity model on one long packed sequence per micro-batch under context
parallelism, for tests/test_context_parallel.py.

Same recipe as tests/parity.py (one initial checkpoint, a fixed global batch, a few optimizer
steps, final weights saved for comparison in one process), with micro-batches of one row of SEQ tokens so that CP slices cut through documents. The global
batch holds two micro-batches:

* one document over the whole row: the state (and the keys) cross every slice edge, through
  several ranks under CP4;
* documents starting exactly at slice edges (16 and 32 under CP4, 32 under CP2), crossing one
  (40-61 over 48 under CP4, with a boundary after it inside the same slice) and several inside
  one slice.
"""

from __future__ import annotations

import dataclasses

import torch

import parity

SEQ, STEPS = 64, 2
# Document starts of each micro-batch's row (slice edges: 32 under CP2; 16, 32, 48 under CP4).
DOC_STARTS = [[0], [0, 10, 16, 20, 32, 40, 61]]
GLOBAL_BATCH = len(DOC_STARTS)


def run_config(layout: dict, run_dir: str, model: dict | None = None):
    """model: ModelConfig fields over the parity model (e.g. residual="block_attnres")."""
    cfg = parity.run_config(layout, run_dir, model)
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, seq_length=SEQ),
        train=dataclasses.replace(cfg.train, steps=STEPS, micro_batch_size=1, global_batch_size=GLOBAL_BATCH),
    )


class LongBatches(parity.FixedBatches):
    """This data-parallel rank's micro-batches (one row of SEQ tokens each), every step."""

    def __init__(self, dp_rank: int, dp_size: int):
        g = torch.Generator().manual_seed(7)
        tokens = torch.randint(0, parity.MODEL["vocab_size"], (GLOBAL_BATCH, SEQ + 1), generator=g)
        rows = []
        for i, starts in enumerate(DOC_STARTS):
            cu = torch.tensor(starts + [SEQ], dtype=torch.int32)
            rows.append({
                "tokens": tokens[i : i + 1, :-1], "labels": tokens[i : i + 1, 1:],
                "loss_mask": torch.ones(1, SEQ), "cu_seqlens": cu,
                "max_seqlen": int((cu[1:] - cu[:-1]).max()),
            })
        per_rank = GLOBAL_BATCH // dp_size
        self.micro = rows[dp_rank * per_rank : (dp_rank + 1) * per_rank]

    def describe(self):
        return "fixed long-sequence test batch"


def train(layout: dict, init_ckpt: str, final_ckpt: str, run_dir: str, save_init: bool = False,
          model: dict | None = None) -> dict:
    """Losses and gradient norms of STEPS optimizer steps under `layout` from `init_ckpt` (with
    save_init: save the freshly initialised weights there first, for the other layouts)."""
    from megatron.core import parallel_state

    from deltatron.train.checkpoint import load_model, save_model

    trainer = parity.make_trainer(run_config(layout, run_dir, model), LongBatches)
    if save_init:
        save_model(trainer.model, init_ckpt)
    else:
        load_model(trainer.model, init_ckpt)
    it = trainer.data.train_batches()
    losses, grad_norms = [], []
    for _ in range(STEPS):
        out = trainer.train_step([next(it) for _ in range(trainer.num_microbatches)])
        losses.append(out["loss"])
        grad_norms.append(out["grad_norm"])
    save_model(trainer.model, final_ckpt)
    sizes = {  # the layout the run really had, for the test to check
        "cp": parallel_state.get_context_parallel_world_size(),
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "ep": parallel_state.get_expert_model_parallel_world_size(),
    }
    return {"loss": losses, "grad_norm": grad_norms, "sizes": sizes}


def layouts_job(rank: int, world_size: int, layouts: dict, init_ckpt: str, out_dir: str,
                model: dict | None = None) -> dict:
    """Every named layout in turn on this set of processes."""
    return {
        name: train(layout, init_ckpt, f"{out_dir}/{name}", f"{out_dir}/run-{name}", model=model)
        for name, layout in layouts.items()
    }
