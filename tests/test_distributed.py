"""Two processes (DDP over gloo on the CPU, launched by torchrun, set up by accelerate): a run and its resume
finish without hanging, gather every process's samples, and write one rng file per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _launch(args: list[str], cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ddpo.cli", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_process_run_and_resume(fast_overrides, tmp_path):
    done = _launch(["train", "--preset", "tiny", "num_epochs=2", *fast_overrides], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # 2 processes x 2 batches x 2 samples: the rewards of both processes were gathered; one line per epoch.
    assert [m["samples"] for m in metrics] == [8, 16]
    newest = run / "checkpoints" / "checkpoint_000002"
    assert (newest / "rng_0.json").is_file() and (newest / "rng_1.json").is_file()
    resumed = _launch(["train", "--resume", str(run), "num_epochs=3"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [0, 1, 2] and metrics[2]["global_step"] == 3 * metrics[0]["global_step"]


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
