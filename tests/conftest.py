"""Shared fixtures: a tiny real Stable Diffusion pipeline saved to disk and loaded through the real loading code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddpo.models import build_tiny_pipeline

# Tiny models run fastest on one thread, and one thread cannot be slowed by oversubscribed cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 16-px tiny pipeline (8x8 latents), saved with save_pretrained; tests load it as model.pretrained=<dir>."""
    path = tmp_path_factory.mktemp("tiny_model") / "pipe"
    build_tiny_pipeline(seed=0, sample_size=8).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def fast_settings(tiny_model_dir) -> dict[str, object]:
    """Config overrides, as a mapping (grid files take them so), that make a tiny-pipeline run take about a second
    an epoch on 2 CPU cores."""
    return {
        "model.pretrained": str(tiny_model_dir),
        "sample.num_steps": 4,
        "sample.batch_size": 2,
        "sample.num_batches_per_epoch": 2,
        "train.batch_size": 4,
        "train.gradient_accumulation_steps": 1,
        "train.learning_rate": 0.01,
        "train.advantage": "batch",
    }


def cli_overrides(settings: dict[str, object], output_dir: Path, run_name: str = "run") -> list[str]:
    """``settings`` (:func:`fast_settings`) as CLI overrides, into ``output_dir/run_name``, training every step,
    writing grids."""
    extra = [f"output_dir={output_dir}", f"run_name={run_name}", "train.timestep_fraction=1.0", "log_images=true"]
    return [f"{key}={value}" for key, value in settings.items()] + extra


@pytest.fixture
def fast_overrides(fast_settings, tmp_path) -> list[str]:
    """:func:`fast_settings` as CLI overrides, into ``tmp_path/runs/run``, training every step, writing grids."""
    return cli_overrides(fast_settings, tmp_path / "runs")


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide state whose mixed precision cannot change: tests that switch it reset it
    before and after."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def record_epoch_weights(monkeypatch) -> list:
    """Watch ``Trainer.compute_weights`` without changing it: the returned list gets one ``(rewards, prompts,
    weights)`` a call (every process's rewards and prompts, this process's weights), detached copies."""
    from ddpo.training.trainer import Trainer

    epochs: list = []
    weights = Trainer.compute_weights

    def compute_weights(trainer, rewards, prompts, components=None):
        out = weights(trainer, rewards, prompts, components)
        epochs.append((rewards.detach().clone(), list(prompts), out.detach().clone()))
        return out

    monkeypatch.setattr(Trainer, "compute_weights", compute_weights)
    return epochs


def launch_two_processes(args: list[str], cwd: Path, env: dict[str, str] | None = None):
    """``python -m ddpo.cli ARGS`` in two processes on the CPU (DDP over gloo), started by torchrun."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ddpo.cli", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def ddp_tiny_run(fast_settings, tmp_path_factory) -> Path:
    """A finished 2-epoch run of the tiny pipeline in two processes (DDP, torchrun), with :func:`fast_settings` and a
    checkpoint per epoch: ``ROOT/runs/run``. Read-only: a test that resumes it works on a copy
    (tests/test_distributed.py resumes it; tests/test_sharded.py compares a sharded run with it)."""
    root = tmp_path_factory.mktemp("ddp_tiny_run")
    done = launch_two_processes(
        ["train", "--preset", "tiny", "num_epochs=2", *cli_overrides(fast_settings, root / "runs")], root
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "runs" / "run"


def record_pipeline_loads(monkeypatch) -> list:
    """Watch ``StableDiffusionPipeline.from_pretrained`` without changing it: the returned list gets each call's
    positional arguments, so a test can check that no pipeline was read before an error."""
    from diffusers import StableDiffusionPipeline

    loads: list = []
    original = StableDiffusionPipeline.from_pretrained.__func__
    monkeypatch.setattr(
        StableDiffusionPipeline,
        "from_pretrained",
        classmethod(lambda cls, *a, **k: loads.append(a) or original(cls, *a, **k)),
    )
    return loads
