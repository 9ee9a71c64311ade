"""Training checkpoints: kill -9 and SIGTERM mid-run, resume, and get the uninterrupted run's losses
bit for bit (CPU, fp32); bad steps are skipped; bad checkpoints stop with their reason."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from deltatron.train.preemption import PREEMPTED_EXIT_CODE

from conftest import REPO, losses_by_step, subprocess_env, train_in_process

STEPS = 8
OVERRIDES = [
    "model=tiny", f"train.steps={STEPS}", "data.seq_length=64", "train.micro_batch_size=2",
    "train.global_batch_size=4", "train.eval_interval=0", "logging.wandb=false",
    "logging.log_interval=1", "optim.warmup_steps=2", "train.save_interval=3",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Runs in this process use one thread, like the subprocesses (OMP_NUM_THREADS=1): parallel
    CPU reductions split by thread count round differently, and the comparisons are bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, process_groups):
    """The reference: the same run without interruption (saving every 3 steps, as the others do)."""
    os.chdir(REPO)  # the data config's paths are relative to the repo
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    history = train_in_process(OVERRIDES, str(run_dir))
    assert len(history["loss"]) == STEPS
    return history, run_dir


def _start(run_dir, *extra) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "deltatron.train", *OVERRIDES, f"train.run_dir={run_dir}", *extra],
        cwd=REPO, env=subprocess_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,  # its own process group: a kill takes its helpers too
    )


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early (code {proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.2)


def test_kill_9_then_resume_reproduces_the_uninterrupted_losses(uninterrupted, tmp_path):
    reference, _ = uninterrupted
    run_dir = tmp_path / "run"
    proc = _start(run_dir)
    step4 = lambda: os.path.exists(run_dir / "metrics.jsonl") and 4 in losses_by_step(run_dir)  # noqa: E731
    _wait_for(step4, proc)  # past the checkpoint of step 3, before the one of step 6
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, as a node loss or scancel would
    proc.wait()
    # the newest complete checkpoint is step 3 (or 6, on a machine so slow that the run got that
    # far first); a save the kill cut short is left as a .tmp directory, never a complete-looking one
    entries = os.listdir(run_dir / "checkpoints")
    complete = sorted(e for e in entries if not e.endswith(".tmp"))
    assert complete[-1] in ("step_0000003", "step_0000006")
    assert all(e.endswith(".tmp") for e in set(entries) - set(complete))
    resumed = _start(run_dir)  # train.resume=auto: the newest complete checkpoint
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    assert "resumed from" in stdout
    assert [losses_by_step(run_dir)[s] for s in range(1, STEPS + 1)] == reference["loss"]  # bit for bit


def test_sigterm_saves_exits_for_requeue_and_resumes(uninterrupted, tmp_path):
    reference, _ = uninterrupted
    run_dir = tmp_path / "run"
    proc = _start(run_dir)
    _wait_for(lambda: os.path.exists(run_dir / "metrics.jsonl") and 1 in losses_by_step(run_dir), proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    stopped = max(losses_by_step(run_dir))
    assert stopped < STEPS and f"preempted (SIGTERM): saved step {stopped}" in stdout
    assert os.path.isdir(run_dir / "checkpoints" / f"step_{stopped:07d}")
    history = train_in_process(OVERRIDES, str(run_dir))  # resume=auto, in this process
    assert history["first_step"] == stopped + 1
    assert [losses_by_step(run_dir)[s] for s in range(1, STEPS + 1)] == reference["loss"]


def test_async_save_writes_the_same_checkpoints_and_resumes_exactly(uninterrupted, tmp_path, process_groups,
                                                                  monkeypatch):
    """train.async_save=true: background writes give checkpoints holding the same tensors as the
    uninterrupted run's synchronous ones, keep_last holds, no .tmp directory is left, and a resume
    from an asynchronously written checkpoint reproduces the uninterrupted losses bit for bit."""
    from megatron.core import dist_checkpointing

    monkeypatch.chdir(REPO)
    reference, reference_dir = uninterrupted
    run_dir = tmp_path / "async"
    history = train_in_process(OVERRIDES + ["train.async_save=true", "train.keep_last=2"], str(run_dir))
    assert history["loss"] == reference["loss"]
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step_0000006", "step_0000008"]
    assert history["last_checkpoint"] == str(run_dir / "checkpoints" / "step_0000008")
    def tensors(checkpoint) -> dict:
        plain = dist_checkpointing.load_plain_tensors(str(checkpoint / "step_0000006"))
        return {tuple(path): value for path, value in _flatten(plain)}

    ours, theirs = tensors(run_dir / "checkpoints"), tensors(reference_dir / "checkpoints")
    assert ours.keys() == theirs.keys() and len(ours) > 10  # model weights and Adam moments
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    resumed = train_in_process(
        OVERRIDES + [f"train.resume={run_dir / 'checkpoints' / 'step_0000006'}"], str(tmp_path / "resumed")
    )
    assert resumed["first_step"] == 7
    assert resumed["loss"] == reference["loss"][6:]


def _flatten(tree, path=()):
    """(key path, tensor) of every tensor in a nested dict."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flatten(value, path + (key,))
    elif isinstance(tree, torch.Tensor):
        yield path, tree


def _poison_gradients_at(steps):
    def patch(trainer):
        run_schedule = trainer._run_schedule

        def poisoned(batches, forward_only):
            out = run_schedule(batches, forward_only)
            if not forward_only and trainer.step in steps:
                trainer.model[0].buffers[0].grad_data.view(-1)[0] = float("nan")
            return out

        trainer._run_schedule = poisoned
    return patch


def test_init_from_loads_the_weights_and_starts_fresh(uninterrupted, tmp_path, process_groups, monkeypatch):
    """train.init_from: the weights of a checkpoint (here the uninterrupted run's last training
    checkpoint), with the optimizer, schedule and data position of a new run."""
    _, reference_dir = uninterrupted
    monkeypatch.chdir(REPO)
    start = {}

    def record(trainer):
        from deltatron.train.checkpoint import unwrap

        step = trainer.train_step

        def recording(batches):  # the weights the first step starts from
            if not start:
                start.update({k: v.clone() for k, v in unwrap(trainer.model[0]).state_dict().items() if torch.is_tensor(v)})
            return step(batches)

        trainer.train_step = recording

    checkpoint = reference_dir / "checkpoints" / "step_0000008"
    history = train_in_process(
        OVERRIDES[:1] + ["train.steps=2", *OVERRIDES[2:], f"train.init_from={checkpoint}"], str(tmp_path / "run"), record
    )
    assert history["first_step"] == 1  # a fresh run: step, schedule and data start over
    from deltatron.model.config import ModelConfig
    from deltatron.model.model import build_model
    from deltatron.train.checkpoint import load_model

    expected = build_model(ModelConfig())
    load_model([expected], str(checkpoint))  # the model part of a training checkpoint
    for name, tensor in expected.state_dict().items():
        if torch.is_tensor(tensor) and not name.endswith("_extra_state"):
            assert torch.equal(start[name], tensor), name


def test_non_finite_gradients_skip_the_update(tmp_path, process_groups, monkeypatch):
    monkeypatch.chdir(REPO)
    weights = {}

    def patch(trainer):
        _poison_gradients_at({2})(trainer)
        step = trainer.train_step

        def recording(batches):
            out = step(batches)
            weights[trainer.step] = [p.detach().clone() for p in trainer.model[0].parameters()]
            return out

        trainer.train_step = recording

    history = train_in_process(OVERRIDES[:1] + ["train.steps=3", *OVERRIDES[2:]], str(tmp_path / "run"), patch)
    assert history["skipped_steps"] == [2]
    assert all(torch.equal(a, b) for a, b in zip(weights[1], weights[2]))  # step 2 changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(weights[2], weights[3]))
    assert all(math.isfinite(x) for x in history["loss"])


def test_consecutive_bad_steps_stop_the_run_naming_the_last_checkpoint(tmp_path, process_groups, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(RuntimeError, match=r"2 bad steps in a row up to step 5 .*step_0000003"):
        train_in_process(OVERRIDES + ["train.max_bad_steps=2"], str(tmp_path / "run"), _poison_gradients_at({4, 5}))


def test_bad_checkpoints_stop_with_their_reason(uninterrupted, tmp_path, process_groups, monkeypatch):
    _, reference_dir = uninterrupted
    monkeypatch.chdir(REPO)
    with pytest.raises(FileNotFoundError, match="train.resume=.*no such directory"):
        train_in_process(OVERRIDES + [f"train.resume={tmp_path / 'missing'}"], str(tmp_path / "a"))
    checkpoint = reference_dir / "checkpoints" / "step_0000006"
    with pytest.raises(ValueError, match="made for another model.*hidden_size"):
        train_in_process(OVERRIDES + ["model.hidden_size=64", f"train.resume={checkpoint}"], str(tmp_path / "b"))
    broken = tmp_path / "step_0000006"
    subprocess.run(["cp", "-r", str(checkpoint), str(broken)], check=True)
    data_files = [f for f in os.listdir(broken) if f.endswith(".distcp")]
    assert data_files
    for name in data_files:  # truncate the tensor data: the metadata still looks complete
        with open(broken / name, "r+b") as f:
            f.truncate(os.path.getsize(broken / name) // 2)
    with pytest.raises(ValueError, match="is corrupt or incomplete: loading it failed"):
        train_in_process(OVERRIDES + [f"train.resume={broken}"], str(tmp_path / "c"))


@pytest.mark.parametrize("preset", ["tp2", "pp2", "ep2"])
def test_two_rank_checkpoint_resumes_in_one_process(preset, tmp_path, process_groups, monkeypatch):
    """Resharding: a training checkpoint (model, optimizer, scheduler, data position) saved at
    step 3 by torchrun's 2 gloo processes under a parallel preset, resumed in one process, gives
    the 2-rank run's own losses for steps 4-8 (EP2 -> EP1 needs the optimizer to have the same
    structure under every EP size: trainer.reduce_experts_over_expert_groups) (within 1e-4 relative: one process sums in another
    order, and Adam with eps 1e-8 turns those roundings into differences of a few 1e-5). The
    2-rank run is the reference because PP and EP initialise some weights from other seeds."""
    monkeypatch.chdir(REPO)
    two_ranks = tmp_path / "two_ranks"
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "deltatron.train", *OVERRIDES, f"parallel={preset}", f"train.run_dir={two_ranks}"],
        cwd=REPO, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    expected = losses_by_step(two_ranks)
    checkpoint = two_ranks / "checkpoints" / "step_0000003"
    history = train_in_process(OVERRIDES + [f"train.resume={checkpoint}"], str(tmp_path / "one"))
    assert history["first_step"] == 4
    assert history["loss"] == pytest.approx([expected[s] for s in range(4, STEPS + 1)], rel=1e-4)
