"""Output a person reads: batch sizes at start, one bar (or one plain line per epoch) with a time left from training
epochs only, image grids in TensorBoard, `log_with`, whole preset descriptions."""

from __future__ import annotations

import io
from importlib import resources

import numpy as np
import pytest
from PIL import Image

from ddpo.cli import main
from ddpo.training.config import build_config, preset_names
from ddpo.training.progress import EpochProgress, batch_sizes


def test_batch_sizes_by_hand():
    config = build_config(
        preset="tiny",
        overrides=[
            "sample.batch_size=3",
            "sample.num_batches_per_epoch=4",
            "sample.num_steps=10",
            "train.timestep_fraction=0.5",
            "train.num_inner_epochs=2",
            "train.batch_size=5",
            "train.gradient_accumulation_steps=2",
        ],
    )
    b = batch_sizes(config, num_processes=3)
    # 12 samples a process; DDIM with eta > 0: 10 stochastic steps, half of them trained, 2 inner epochs.
    assert b["samples_per_epoch_per_process"] == 12 and b["samples_per_epoch"] == 36
    assert b["pairs_per_epoch_per_process"] == 12 * 5 * 2
    assert b["pairs_per_step_per_process"] == 10 and b["pairs_per_step"] == 30
    assert b["optimiser_steps_per_epoch"] == 12


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_time_left_counts_training_epochs_only():
    clock, out = FakeClock(), io.StringIO()
    progress = EpochProgress(0, 5, interactive=False, stream=out, clock=clock)
    assert progress.eta_seconds() is None
    clock.now += 500.0  # a held-out evaluation before the first epoch: not a training epoch
    for epoch, seconds in enumerate((10.0, 20.0)):
        progress.begin_epoch()
        clock.now += seconds
        progress.end_epoch(epoch, {"reward_mean": 0.5, "reward_std": 0.1})
        clock.now += 300.0  # an evaluation between epochs
    assert progress.eta_seconds() == pytest.approx(15.0 * 3)
    lines = out.getvalue().splitlines()
    assert lines == [
        "epoch 1/5: reward 0.5 (std 0.1); 10.0 s (); left ~0m40s",
        "epoch 2/5: reward 0.5 (std 0.1); 20.0 s (); left ~0m45s",
    ]


def test_a_terminal_gets_one_bar_with_phase_reward_and_time_left():
    clock, out = FakeClock(), io.StringIO()
    progress = EpochProgress(0, 3, interactive=True, stream=out, clock=clock)
    progress.phase("evaluation")
    progress.begin_epoch()
    progress.phase("sampling")
    clock.now += 30.0
    progress.end_epoch(0, {"reward_mean": 0.25, "reward_std": 0.1})
    progress.close()
    text = out.getvalue()
    assert "\r" in text and "epochs:" in text
    assert "evaluation, left: after the first epoch" in text
    assert "1/3" in text and "reward 0.25, left ~1m00s" in text


def test_run_prints_batch_sizes_and_one_line_per_epoch_and_logs_images(fast_overrides, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["train", "--preset", "tiny", "num_epochs=2", *fast_overrides]) == 0
    out = capsys.readouterr().out
    assert "\r" not in out  # captured stdout is not a terminal: no bar redraws
    # fast settings: 2 x 2 samples, 4 steps all trained (timestep_fraction 1), train.batch_size 4, no accumulation
    assert (
        "ddpo: 1 process; per epoch 4 samples (4 per process = sample.batch_size 2 x sample.num_batches_per_epoch 2)"
        in out
    )
    assert "per optimiser step 4 (trajectory, timestep) pairs" in out and "16 pairs and 4 optimiser steps" in out
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epoch_lines] == ["epoch 1/2", "epoch 2/2"]
    # The logged grids are in TensorBoard too, pixel for pixel.
    run = tmp_path / "runs" / "run"
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "samples" in events.Tags()["images"]
    logged = events.Images("samples")
    assert [image.step for image in logged] == [0, 1]
    decoded = np.asarray(Image.open(io.BytesIO(logged[1].encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(decoded, np.asarray(Image.open(run / "samples" / "epoch_0001.png").convert("RGB")))


def test_log_with_names_the_problem(fast_overrides, monkeypatch, capsys):
    assert main(["train", "--preset", "tiny", "log_with=mlflow", *fast_overrides]) == 2
    assert "log_with must be tensorboard, wandb, 'tensorboard,wandb' or none" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # as if wandb were not installed
    assert main(["train", "--preset", "tiny", "log_with=tensorboard,wandb", *fast_overrides]) == 2
    assert "pip install 'ddpo[wandb]'" in capsys.readouterr().err


def test_presets_prints_whole_descriptions(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    printed = " ".join(out.split())
    for name in preset_names():
        text = resources.files("ddpo.presets").joinpath(f"{name}.yaml").read_text()
        comment = []
        for line in text.splitlines():
            if not line.startswith("#"):
                break
            comment.append(line.lstrip("#"))
        words = " ".join(" ".join(comment).split())
        assert f"{name} {words}" in printed, name


def test_reward_against_samples_merges_evaluations_into_their_epochs():
    from ddpo.training.runlog import reward_against_samples

    metrics = [{"epoch": e, "samples": 64 * (e + 1), "reward_mean": 0.1 * e} for e in range(3)]
    evals = [{"epoch": 0, "reward_mean": 0.30}, {"epoch": 2, "reward_mean": 0.35}, {"epoch": 3, "reward_mean": 0.4}]
    rows = reward_against_samples(metrics, evals)
    assert [(r["samples_seen"], r["epoch"], r["train_reward"], r["heldout_reward"]) for r in rows] == [
        (0, 0, None, 0.30),
        (64, 1, 0.0, None),
        (128, 2, 0.1, 0.35),
        (192, 3, 0.2, 0.4),
    ]
    assert reward_against_samples([], []) == []
