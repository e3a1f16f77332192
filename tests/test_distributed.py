"""Two processes (DDP over gloo on the CPU, launched by torchrun, set up by accelerate): a run and its resume
finish without hanging, gather every process's samples, write one rng file per process and keep bit-identical
weights; a lost process stops the other within process_timeout_seconds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import launch_two_processes
from safetensors.torch import load_file

from ddpo.training import checkpoint
from ddpo.training.trainer import weights_sha256


@pytest.mark.slow
def test_two_process_run_and_resume(ddp_tiny_run, fast_overrides, tmp_path):
    run = tmp_path / "runs" / "run"
    shutil.copytree(ddp_tiny_run, run)  # the shared 2-epoch run (conftest.py), resumed here on a copy
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # 2 processes x 2 batches x 2 samples: the rewards of both processes were gathered; one line per epoch.
    assert [m["samples"] for m in metrics] == [8, 16]
    newest = run / "checkpoints" / "checkpoint_000002"
    assert (newest / "rng_0.json").is_file() and (newest / "rng_1.json").is_file()
    resumed = launch_two_processes(["train", "--resume", str(run), "num_epochs=3"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1, 2] and metrics[2]["global_step"] == 3 * metrics[0]["global_step"]
    # The processes' trainable weights are bit-identical after every epoch (each process hashes its own copy), and
    # the hash is that of the weights the checkpoint of that epoch holds.
    hashes = [m["weights_sha256"] for m in metrics]
    assert all(len(h) == 2 and h[0] == h[1] for h in hashes), hashes
    assert len({h[0] for h in hashes}) == 3  # training changed them every epoch
    for epoch, h in enumerate(hashes):
        saved = load_file(run / "checkpoints" / f"checkpoint_{epoch + 1:06d}" / "trainable.safetensors")
        assert weights_sha256(saved) == h[0]
    # The resumed run matches one that ran its 3 epochs uninterrupted: the same weights and metrics (timings apart).
    whole = launch_two_processes(
        ["train", "--preset", "tiny", "num_epochs=3", *fast_overrides, "run_name=whole"], tmp_path
    )
    assert whole.returncode == 0, whole.stderr[-3000:]
    for name in ("final/pytorch_lora_weights.safetensors", "checkpoints/checkpoint_000003/trainable.safetensors"):
        resumed_weights, whole_weights = load_file(run / name), load_file(tmp_path / "runs" / "whole" / name)
        assert weights_sha256(resumed_weights) == weights_sha256(whole_weights), name
    assert _timeless_metrics(run) == _timeless_metrics(tmp_path / "runs" / "whole")


@pytest.mark.slow
def test_accelerate_launch_on_the_cpu_runs_the_requested_processes(fast_overrides, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a machine without CUDA: accelerate exports
    ACCELERATE_USE_CPU=False and gave each process a one-process state (two lone runs into one folder); ddpo now makes
    it multi-CPU over gloo, and the start-up line says so. (`accelerate launch --cpu` starts one process unless
    accelerate is given an mpirun hostfile: docs/multi-gpu.md.)"""
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    accelerate += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    command = [*accelerate, "-m", "ddpo.cli", "train", "--preset", "tiny", "num_epochs=1", *fast_overrides]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("ddpo: 2 processes on cpu (MULTI_CPU, gloo)") == 1, done.stdout[-2000:]
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["samples"] for m in metrics] == [8]


def _timeless_metrics(run) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("_seconds")} for line in lines]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_ranks(args: list[str], cwd, extra_env: dict[str, str]) -> list[tuple[subprocess.Popen, object, object]]:
    """The two processes of a run started as a launcher would (RANK, WORLD_SIZE, MASTER_*), but without one:
    torchrun's agent itself stops the other workers when one fails, which would hide what ddpo does."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", **extra_env)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    ranks = []
    for rank in (0, 1):
        out, err = open(cwd / f"rank{rank}.out", "w+"), open(cwd / f"rank{rank}.err", "w+")
        rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank))
        command = [sys.executable, "-m", "ddpo.cli", *args]
        ranks.append((subprocess.Popen(command, cwd=cwd, env=rank_env, stdout=out, stderr=err), out, err))
    return ranks


@pytest.mark.slow
@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_lost_process_stops_the_other_within_the_timeout(how, fast_overrides, tmp_path):
    """Process 1 is SIGKILLed at its 3rd sampling batch (DDPO_KILL_AT, epoch 2), or stopped (SIGSTOP: alive, never
    answering) once epoch 2 began: process 0 exits with code 2 and one ``ddpo: error:`` line within
    process_timeout_seconds (+ margin), never hangs; the checkpoint of epoch 1 is intact."""
    timeout = 10
    args = ["train", "--preset", "tiny", "num_epochs=50", f"process_timeout_seconds={timeout}", *fast_overrides]
    ranks = _start_ranks(args, tmp_path, {"DDPO_KILL_AT": "sample:3@1"} if how == "killed" else {})
    (first, first_out, first_err), (second, _, _) = ranks
    try:
        if how == "killed":
            assert second.wait(timeout=120) == -signal.SIGKILL
        else:
            deadline = time.monotonic() + 120
            while "epoch 2/50" not in (tmp_path / "rank0.out").read_text():
                assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "rank0.err").read_text()
                time.sleep(0.1)
            second.send_signal(signal.SIGSTOP)
        lost = time.monotonic()
        code = first.wait(timeout=timeout + 20)  # a hang fails here (TimeoutExpired)
        waited = time.monotonic() - lost
    finally:
        for process, out, err in ranks:
            if process.poll() is None:
                process.kill()
                process.wait()
            out.close()
            err.close()
    stderr = (tmp_path / "rank0.err").read_text()
    assert code == 2, stderr[-3000:]
    message = stderr.strip().splitlines()[-1]
    assert message.startswith("ddpo: error: another of the 2 processes died or stopped answering"), stderr[-3000:]
    assert f"process_timeout_seconds={timeout} s" in message
    assert "Traceback" not in stderr
    if how == "hung":  # a dead process's connections close at once; a hung one is given up after the timeout
        assert timeout - 1 < waited < timeout + 20, waited
    newest, problems = checkpoint.newest_good(tmp_path / "runs" / "run" / "checkpoints")
    assert newest is not None and newest.name in ("checkpoint_000001", "checkpoint_000002") and not problems
    assert f"The last checkpoint, {newest.name}, is intact." in message  # the one that exists
