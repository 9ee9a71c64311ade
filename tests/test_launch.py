"""launch/slurm.sbatch under a fake slurm (stub srun/scontrol on PATH), launch/deepspeed.sh under a
stub deepspeed: rendezvous, ranks, argument passing and the requeue path, for real on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO, subprocess_env

# srun stand-in: checks its options like srun would (an unknown one fails), records its argv and
# starts nodes x tasks-per-node local processes with slurm's per-task variables, returning the
# highest exit code like srun does.
FAKE_SRUN = r'''
import json, os, subprocess, sys, threading
args = sys.argv[1:]
opts, known = {}, {"--nodes", "--ntasks-per-node", "--ntasks", "--kill-on-bad-exit", "--label",
                   "--export", "--cpus-per-task"}
while args and args[0].startswith("-"):
    key, _, value = args.pop(0).partition("=")
    if key not in known:
        sys.exit(f"fake srun: unknown option {key}")
    opts[key] = value
with open(os.environ["FAKE_SLURM_LOG"], "a") as f:
    f.write(json.dumps({"srun": sys.argv[1:]}) + "\n")
nodes, per_node = int(opts["--nodes"]), int(opts["--ntasks-per-node"])
assert int(opts["--ntasks"]) == nodes * per_node, opts
procs = []
for node in range(nodes):
    for local in range(per_node):
        env = dict(os.environ, SLURM_PROCID=str(node * per_node + local), SLURM_LOCALID=str(local),
                   SLURM_NODEID=str(node), SLURM_NTASKS=str(nodes * per_node),
                   SLURM_STEP_NUM_TASKS=str(nodes * per_node))
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
def relay(rank, p):
    for line in p.stdout:
        sys.stdout.write((f"{rank}: " if "--label" in opts else "") + line)
threads = [threading.Thread(target=relay, args=(r, p)) for r, p in enumerate(procs)]
for t in threads: t.start()
codes = [p.wait() for p in procs]
for t in threads: t.join()
sys.exit(max(codes))
'''

# scontrol stand-in: `show hostnames` expands prefix[a-b] lists, `requeue` is recorded.
FAKE_SCONTROL = r'''
import json, os, re, sys
args = sys.argv[1:]
with open(os.environ["FAKE_SLURM_LOG"], "a") as f:
    f.write(json.dumps({"scontrol": args}) + "\n")
if args[:2] == ["show", "hostnames"]:
    for entry in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", args[2]):
        m = re.fullmatch(r"(.*)\[(\d+)-(\d+)\]", entry)
        print("\n".join(f"{m[1]}{i}" for i in range(int(m[2]), int(m[3]) + 1)) if m else entry)
elif args[:1] == ["requeue"]:
    pass
else:
    sys.exit(f"fake scontrol: unsupported {args}")
'''


def _executable(path, source: str) -> str:
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(source))
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def fake_slurm(tmp_path):
    """Environment of a 2-node x 2-task job with stub srun/scontrol first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "srun", FAKE_SRUN)
    _executable(bin_dir / "scontrol", FAKE_SCONTROL)
    log = tmp_path / "slurm_calls.jsonl"
    env = subprocess_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_SLURM_LOG=str(log),
        SLURM_JOB_ID="4242", SLURM_JOB_NAME="fake", SLURM_JOB_NODELIST="127.0.0.[1-2]",
        SLURM_JOB_NUM_NODES="2", SLURM_NNODES="2", SLURM_NTASKS_PER_NODE="2",
        SLURM_SUBMIT_DIR=REPO, DELTATRON_LOG_DIR=str(tmp_path / "logs"), PYTHON=sys.executable,
        WANDB_MODE="disabled",
    )
    for key in ("SLURM_RESTART_COUNT", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "SLURM_CPUS_PER_TASK"):
        env.pop(key, None)
    return env, log


def _calls(log) -> list[dict]:
    return [json.loads(line) for line in open(log)] if os.path.exists(log) else []


def _run(cmd, env, timeout=900) -> subprocess.CompletedProcess:
    """Run a launcher in its own process group; on timeout end the whole group (the launcher
    and every process it started), so nothing outlives the test."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd[:2]} did not finish in {timeout} s:\n{out[-2000:]}\n{err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _sbatch(env, *overrides):
    return _run(["bash", os.path.join(REPO, "launch", "slurm.sbatch"), *overrides], env)


def test_slurm_two_nodes_two_tasks_each_train_with_gloo(fake_slurm, tmp_path):
    """4 real trainer processes (TP2 inside each fake node, DP2 across them) train 2 steps."""
    env, log = fake_slurm
    run_dir = tmp_path / "run"
    out = _sbatch(
        env, "parallel=tp2", "train.steps=2", "data.seq_length=64", "train.micro_batch_size=2",
        "train.global_batch_size=4", "data.mock=true", "train.eval_interval=0", "train.save_interval=0",
        "logging.log_interval=1", "logging.wandb=false", f"train.run_dir={run_dir}",
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "rendezvous 127.0.0.1:24242" in out.stdout  # first host of the list; 20000 + 4242
    assert "0: layout: tp=2 pp=1 ep=1 cp=1 dp=2 sp (world 4)" in out.stdout
    assert "deltatron slurm: finished" in out.stdout
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["train/loss"] > 0 for r in records)
    srun = [c["srun"] for c in _calls(log) if "srun" in c]
    assert len(srun) == 1 and "--nodes=2" in srun[0] and "--ntasks-per-node=2" in srun[0]
    assert srun[0][-1] == f"train.run_dir={run_dir}"  # the user's run_dir, no default added
    codes = tmp_path / "logs" / "fake-4242" / "attempt0" / "exit_codes"
    assert sorted(os.listdir(codes)) == ["rank0", "rank1", "rank2", "rank3"]
    assert {open(codes / f).read().strip() for f in os.listdir(codes)} == {"0"}
    assert not [c for c in _calls(log) if c.get("scontrol", [""])[0] == "requeue"]


# Trainer stand-in for the requeue test: records its rank environment, waits for the preemption
# signal slurm sends (SIGUSR1), then exits 75 as deltatron.train does after saving.
FAKE_TRAINER = r'''
import json, os, signal, sys, time
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append("USR1"))
record = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                         "MASTER_ADDR", "MASTER_PORT", "CUDA_DEVICE_MAX_CONNECTIONS")}
record.update(argv=sys.argv[1:], pid=os.getpid(), wrapper=os.getppid())
path = os.path.join(os.environ["FAKE_TRAINER_DIR"], f"rank{record['RANK']}.json")
with open(path + ".tmp", "w") as f:
    json.dump(record, f)
os.replace(path + ".tmp", path)
fail_rank = os.environ.get("FAKE_TRAINER_FAIL_RANK")
if fail_rank is not None:
    sys.exit(1 if record["RANK"] == fail_rank else 0)
deadline = time.time() + 60
while not got and time.time() < deadline:
    time.sleep(0.05)
sys.exit(75 if got else 3)
'''


def _fake_trainer_env(env, tmp_path, **extra):
    out = tmp_path / "trainer"
    out.mkdir()
    python = _executable(tmp_path / "fake_python", FAKE_TRAINER)
    return dict(env, PYTHON=python, FAKE_TRAINER_DIR=str(out), **extra), out


def test_slurm_requeues_when_trainers_exit_75_after_the_preemption_signal(fake_slurm, tmp_path):
    env, log = fake_slurm
    env, records_dir = _fake_trainer_env(env, tmp_path)
    proc = subprocess.Popen(
        ["bash", os.path.join(REPO, "launch", "slurm.sbatch"), "model=tiny", "train.steps=5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/", env=env, start_new_session=True,
    )
    deadline = time.time() + 60
    while len(os.listdir(records_dir)) < 4 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    records = {}
    for name in sorted(os.listdir(records_dir)):
        records[name] = json.load(open(records_dir / name))
    if len(records) < 4:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"only {len(records)} of 4 trainers started: {proc.communicate()}")
    # slurm signals every process of the step; here only the task wrappers are signalled, so the
    # trainer exits 75 only if the wrapper forwards the signal to it
    for r in records.values():
        os.kill(r["wrapper"], signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stdout + stderr
    assert "preempted (exit 75 on 4 ranks" in stdout
    assert {"scontrol": ["requeue", "4242"]} in _calls(log)
    ranks = {int(r["RANK"]): r for r in records.values()}
    assert [(r["LOCAL_RANK"], r["WORLD_SIZE"], r["LOCAL_WORLD_SIZE"]) for _, r in sorted(ranks.items())] == [
        ("0", "4", "2"), ("1", "4", "2"), ("0", "4", "2"), ("1", "4", "2")
    ]
    assert {(r["MASTER_ADDR"], r["MASTER_PORT"], r["CUDA_DEVICE_MAX_CONNECTIONS"]) for r in ranks.values()} == {
        ("127.0.0.1", "24242", "1")
    }
    # overrides in order, then the job's run directory so that the requeued attempt resumes
    assert ranks[0]["argv"] == ["-m", "deltatron.train", "model=tiny", "train.steps=5", "train.run_dir=runs/fake-4242"]


def test_slurm_failure_is_not_requeued_and_names_the_rank(fake_slurm, tmp_path):
    env, log = fake_slurm
    env, _ = _fake_trainer_env(env, tmp_path, FAKE_TRAINER_FAIL_RANK="3", SLURM_RESTART_COUNT="2")
    out = _sbatch(env, "train.steps=5")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "ranks with a nonzero exit: rank3" in out.stderr
    assert "attempt 2" in out.stdout
    assert not [c for c in _calls(log) if c.get("scontrol", [""])[0] == "requeue"]


def test_slurm_rejects_options_among_overrides(fake_slurm):
    env, _ = fake_slurm
    out = _sbatch(env, "--nodes=4", "train.steps=5")
    assert out.returncode == 2
    assert "'--nodes=4' is not a Hydra override" in out.stderr


@pytest.mark.parametrize(
    "nodelist, first",
    [("gpu-[003-010,012],cpu1", "gpu-003"), ("a1,b2", "a1"), ("rack[1-2]-n[5-6]", "rack1-n5"),
     ("node7", "node7"), ("n[08-09]-ib", "n08-ib")],
)
def test_first_host_parses_node_lists_without_scontrol(nodelist, first):
    out = subprocess.run(
        ["bash", "-c", 'source launch/slurm_lib.sh && first_host "$1"', "_", nodelist],
        capture_output=True, text=True, cwd=REPO, env={"PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == first


# deepspeed stand-in: parses its options with the same names and order rules as DeepSpeed's
# runner (options, then the script or module, then its arguments), records argv and the exported
# environment file, and runs the worker for one process the way deepspeed.launcher.launch does:
# `python -u -m <module> <args>` plus `--local_rank=0` unless --no_local_rank, with RANK,
# LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set.
FAKE_DEEPSPEED = r'''
import argparse, json, os, subprocess, sys
p = argparse.ArgumentParser(allow_abbrev=False)
p.add_argument("-H", "--hostfile")
p.add_argument("--num_nodes", type=int, default=-1)
p.add_argument("--num_gpus", type=int, default=-1)
p.add_argument("--master_addr", default="")
p.add_argument("--master_port", type=int, default=29500)
p.add_argument("--launcher", default="pdsh")
p.add_argument("--module", action="store_true")
p.add_argument("--no_python", action="store_true")
p.add_argument("--no_local_rank", action="store_true")
p.add_argument("user_script")
p.add_argument("user_args", nargs=argparse.REMAINDER)
a = p.parse_args()
env_file = os.environ.get("DS_ENV_FILE")
exported = dict(line.rstrip("\n").split("=", 1) for line in open(env_file)) if env_file else {}
with open(os.environ["FAKE_DEEPSPEED_LOG"], "w") as f:
    json.dump({"argv": sys.argv[1:], "exported": exported}, f)
cmd = [sys.executable, "-u"] + (["-m"] if a.module else []) + [a.user_script] + a.user_args
if not a.no_local_rank:
    cmd.append("--local_rank=0")
env = dict(os.environ, **exported, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
           MASTER_ADDR=a.master_addr or "127.0.0.1", MASTER_PORT=str(a.master_port))
sys.exit(subprocess.call(cmd, env=env))
'''


def test_deepspeed_script_builds_the_launcher_command_and_trains(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "deepspeed", FAKE_DEEPSPEED)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# one machine\nlocalhost slots=1\n")
    log = tmp_path / "deepspeed.json"
    run_dir = tmp_path / "run"
    env = subprocess_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}", DEEPSPEED="deepspeed", HOSTFILE=str(hostfile),
        NUM_NODES="1", NUM_GPUS="1", MASTER_PORT="29611", FAKE_DEEPSPEED_LOG=str(log),
        WANDB_MODE="disabled",
    )
    overrides = [
        "train.steps=2", "data.seq_length=64", "data.mock=true", "train.micro_batch_size=2",
        "train.global_batch_size=2", "train.eval_interval=0", "logging.log_interval=1",
        "logging.wandb=false", f"train.run_dir={run_dir}",
    ]
    out = _run([os.path.join(REPO, "launch", "deepspeed.sh"), *overrides], env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    record = json.load(open(log))
    assert record["argv"] == [
        "--hostfile", str(hostfile), "--launcher", "pdsh", "--num_nodes", "1", "--num_gpus", "1",
        "--master_port", "29611", "--no_local_rank", "--module", "deltatron.train", *overrides,
    ]
    assert record["exported"]["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert record["exported"]["WANDB_MODE"] == "disabled"
    assert [json.loads(line)["step"] for line in open(run_dir / "metrics.jsonl")] == [1, 2]


@pytest.mark.parametrize(
    "hostfile_text, env_extra, message",
    [
        (None, {}, "does not exist"),
        ("node1 8\n", {}, "are not '<host> slots=<GPUs>'"),
        ("node1 slots=8\n", {"NUM_GPUS": "eight"}, "NUM_GPUS=eight must be a positive integer"),
    ],
)
def test_deepspeed_script_rejects_bad_hostfiles_and_counts(tmp_path, hostfile_text, env_extra, message):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "deepspeed", "import sys; sys.exit('must not be reached')")
    hostfile = tmp_path / "hostfile"
    if hostfile_text is not None:
        hostfile.write_text(hostfile_text)
    env = subprocess_env(PATH=f"{bin_dir}:{os.environ['PATH']}", DEEPSPEED="deepspeed",
                         HOSTFILE=str(hostfile), **env_extra)
    out = subprocess.run([os.path.join(REPO, "launch", "deepspeed.sh"), "train.steps=1"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_deepspeed_script_without_deepspeed_names_the_extra(tmp_path):
    env = subprocess_env(DEEPSPEED=str(tmp_path / "missing-deepspeed"))
    out = subprocess.run([os.path.join(REPO, "launch", "deepspeed.sh"), "train.steps=1"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 2 and "pip install -e '.[deepspeed]'" in out.stderr
