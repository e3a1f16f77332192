"""The owned-epoch hook (``Estimator.owns_epoch`` / ``train_epoch``): an estimator that runs its epoch itself gets the
trainer's own prompt draws and noise seeds, the rewards and the optimiser step, and the trainer still logs, evaluates
and checkpoints it, so that it trains and resumes exactly through the CLI with no edit to the trainer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ddpo.cli import main
from ddpo.training.estimators import EpochResult, EpochRun, Estimator, register_estimator, unregister_estimator
from ddpo.training.prompts import draw_prompts
from ddpo.training.streams import Stream, derive_seed

SEEN: list[EpochRun] = []


class ToyOwnedEpoch(Estimator):
    """Per prompt batch: ``x0`` drawn from the batch's noise seed, re-noised at t=500, the denoiser's mean squared
    error to the noise through ``run.step``; the epoch's images and rewards from ``run.sample_and_score``, plus a
    with-gradient reward call whose gradient w.r.t. the images is logged."""

    owns_epoch = True

    def train_epoch(self, run: EpochRun) -> EpochResult:
        SEEN.append(run)
        p = self.policy
        samples, rewards, reward_info, timings = run.sample_and_score()
        images = samples.images[:1].clone().requires_grad_(True)
        run.reward(images, samples.prompts[:1]).sum().backward()
        for batch in run.batches:
            generator = torch.Generator().manual_seed(batch.noise_seed)
            cond = run.encode(batch.prompts)
            x0 = torch.randn(len(batch.prompts), 4, 8, 8, generator=generator)
            noise = torch.randn(x0.shape, generator=generator)
            x_t = 0.5**0.5 * x0 + 0.5**0.5 * noise

            def loss_fn(x_t=x_t, noise=noise, cond=cond):
                mse = ((p.family.bind(p.model)(x_t, 500, cond).float() - noise) ** 2).mean()
                return mse, {"toy_mse": mse.detach()}

            run.step(loss_fn)
        extra = {"toy_image_grad": images.grad.abs().sum()}
        return EpochResult(samples.prompts, samples.images, rewards, reward_info, timings, extra)


@pytest.fixture
def toy_owned():
    register_estimator("toy_owned", ToyOwnedEpoch)
    SEEN.clear()
    yield "toy_owned"
    unregister_estimator("toy_owned")


def _train(fast_overrides, tmp_path, name: str, *extra: str, resume: bool = False) -> int:
    if resume:
        return main(["train", "--resume", str(tmp_path / "runs" / name), *extra])
    overrides = [o.replace("run_name=run", f"run_name={name}") for o in fast_overrides]
    return main(
        ["train", "--preset", "tiny", *overrides, "train.algorithm=toy_owned", "reward.name=brightness", *extra]
    )


def test_an_estimator_that_owns_its_epoch_trains_logs_and_resumes_exactly(fast_overrides, tmp_path, toy_owned):
    """Its batches are the trainer's own draws (prompts and noise seeds from the run's streams); every minibatch
    steps the optimiser (gradient accumulation 1); metrics.jsonl has the trainer's keys and the estimator's
    diagnostics, the grid is written; two epochs straight equal one epoch and a resumed one, bit for bit."""
    assert _train(fast_overrides, tmp_path, "straight", "num_epochs=2") == 0
    for epoch, run in enumerate(SEEN):
        assert run.epoch == epoch and [b.index for b in run.batches] == [0, 1]
        for b, batch in enumerate(run.batches):
            assert batch.prompts == draw_prompts(_prompt_set(), 2, 1, 0, epoch, b, 0)
            assert batch.noise_seed == derive_seed(0, Stream.SAMPLING_NOISE, epoch, b, 0)
    assert _train(fast_overrides, tmp_path, "resumed", "num_epochs=1") == 0
    assert _train(fast_overrides, tmp_path, "resumed", "num_epochs=2", resume=True) == 0
    runs = tmp_path / "runs"
    straight, resumed = (
        load_file(str(runs / r / "checkpoints" / "checkpoint_000002" / "trainable.safetensors"))
        for r in ("straight", "resumed")
    )
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert any(v.abs().sum() > 0 for k, v in straight.items() if "lora_B" in k)  # the toy loss moved the adapter

    def metrics(run):
        rows = [json.loads(line) for line in (runs / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in row.items() if not k.endswith("_seconds")} for row in rows]

    rows = metrics("straight")
    assert rows == metrics("resumed")
    assert [row["global_step"] for row in rows] == [2, 4] and [row["samples"] for row in rows] == [4, 8]
    for row in rows:
        assert {"reward_mean", "reward_std", "grad_norm", "toy_mse", "toy_image_grad"} <= row.keys()
        assert row["toy_image_grad"] > 0  # the with-gradient reward carried a gradient to the pixels
    line = json.loads((runs / "straight" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"epoch_seconds", "training_seconds", "sampling_seconds"} <= line.keys()
    assert (runs / "straight" / "samples" / "epoch_0001.png").is_file()


def _prompt_set() -> list[str]:
    from ddpo.training.prompts import load_prompts

    return load_prompts("simple_animals")
