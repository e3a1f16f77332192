"""The online discriminator reward: it learns a toy problem, ranks images, resumes exactly, and never uses the
global RNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import rewards
from rewards.discriminator import DiscriminatorReward

SMALL = {"image_size": 16, "channels": 8, "depth": 2, "learning_rate": 3e-3, "batch_size": 8, "steps_per_epoch": 5}


def _colour(rgb, n: int, noise: float = 0.05, seed: int = 0, size: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    base = torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(n, 3, size, size)
    return (base + noise * torch.rand(n, 3, size, size, generator=generator)).clamp(0, 1)


RED = [0.9, 0.1, 0.1]
BLUE = [0.1, 0.1, 0.9]


def test_discriminator_learns_toy_problem_and_ranks_images():
    reward = rewards.get_reward("discriminator", reference_images=_colour(RED, 32), seed=0, **SMALL)
    samples = _colour(BLUE, 16, seed=1)
    first = reward.update(samples, [""] * 16)
    with torch.no_grad():  # the trainer may call update under no_grad: training must still happen
        for _ in range(5):
            last = reward.update(samples, [""] * 16)
    assert set(last) == {
        "reward/discriminator_loss",
        "reward/discriminator_accuracy",
        "reward/discriminator_updates",
    }
    assert last["reward/discriminator_updates"] == 6 * SMALL["steps_per_epoch"]
    assert last["reward/discriminator_loss"] < first["reward/discriminator_loss"]
    assert last["reward/discriminator_loss"] < 0.1 and last["reward/discriminator_accuracy"] == 1.0

    # Fresh (unseen) images from red to blue: the reward decreases monotonically along the way.
    steps = torch.linspace(0, 1, 5)
    mixes = torch.cat([_colour([0.9 - 0.8 * a, 0.1, 0.1 + 0.8 * a], 1, noise=0.0) for a in steps.tolist()])
    scores = reward(mixes, [""] * 5)
    assert scores.dtype == torch.float32 and scores.shape == (5,)
    assert torch.all(scores[:-1] > scores[1:]), scores
    assert scores[0] > 0 > scores[-1]


def test_log_d_is_logsigmoid_of_logit():
    kwargs = dict(reference_images=_colour(RED, 8), seed=3, **SMALL)
    logit, log_d = DiscriminatorReward(reward="logit", **kwargs), DiscriminatorReward(reward="log_d", **kwargs)
    images = _colour(BLUE, 4, seed=2)
    torch.testing.assert_close(log_d(images, [""] * 4), F.logsigmoid(logit(images, [""] * 4)))
    assert (log_d(images, [""] * 4) <= 0).all()


def test_discriminator_is_differentiable_without_touching_its_weights():
    reward = DiscriminatorReward(reference_images=_colour(RED, 8), **SMALL)
    images = _colour(BLUE, 3, seed=4, size=24).requires_grad_()  # resized to 16 inside, differentiably
    reward(images, [""] * 3).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.model.parameters())


def test_state_dict_round_trip_continues_training_exactly(tmp_path):
    samples = _colour(BLUE, 16, seed=5)
    kwargs = dict(reference_images=_colour(RED, 32), seed=7, **SMALL)
    a = DiscriminatorReward(**kwargs)
    a.update(samples, [""] * 16)
    torch.save(a.state_dict(), tmp_path / "reward.pt")

    b = DiscriminatorReward(**{**kwargs, "seed": 123})  # a different seed: everything must come from the state
    b.load_state_dict(torch.load(tmp_path / "reward.pt", weights_only=True))
    info_a, info_b = a.update(samples, [""] * 16), b.update(samples, [""] * 16)
    assert info_a == info_b
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(pa, pb), name
    images = _colour(BLUE, 2, seed=6)
    assert torch.equal(a(images, ["", ""]), b(images, ["", ""]))

    with pytest.raises(ValueError, match="missing"):
        b.load_state_dict({"model": a.state_dict()["model"]})


def test_seeded_determinism_and_no_global_rng_use():
    samples = _colour(BLUE, 8, seed=8)
    kwargs = dict(reference_images=_colour(RED, 8), **SMALL)
    global_state = torch.get_rng_state()
    a, b, c = (
        DiscriminatorReward(seed=1, **kwargs),
        DiscriminatorReward(seed=1, **kwargs),
        DiscriminatorReward(seed=2, **kwargs),
    )
    for reward in (a, b, c):
        reward(samples, [""] * 8)
        reward.update(samples, [""] * 8)
    assert torch.equal(torch.get_rng_state(), global_state)
    assert torch.equal(a.model.classifier.weight, b.model.classifier.weight)
    assert not torch.equal(a.model.classifier.weight, c.model.classifier.weight)


def test_reference_folder_and_image_sources(tmp_path):
    folder = tmp_path / "refs"
    folder.mkdir()
    for i in range(3):
        array = np.zeros((20, 30, 3), dtype=np.uint8)
        array[..., 0] = 200 + i
        Image.fromarray(array).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    reward = rewards.get_reward("discriminator", reference_dir=str(folder), **SMALL)
    assert reward.reference.shape == (3, 3, 16, 16)
    np.testing.assert_allclose(
        reward.reference[:, 0].mean(dim=(1, 2)).numpy(), [200 / 255, 201 / 255, 202 / 255], atol=1e-5
    )

    from_pil = DiscriminatorReward(reference_images=[Image.fromarray(np.full((16, 16, 3), 9, np.uint8))], **SMALL)
    assert from_pil.reference.shape == (1, 3, 16, 16)

    calls = []

    def source(n: int, generator: torch.Generator) -> torch.Tensor:
        calls.append(n)
        return torch.rand(n, 3, 32, 32, generator=generator)

    streamed = DiscriminatorReward(reference_images=source, **SMALL)
    streamed.update(_colour(BLUE, 4), [""] * 4)
    assert calls == [SMALL["batch_size"]] * SMALL["steps_per_epoch"]

    with pytest.raises(FileNotFoundError, match="not a directory"):
        rewards.get_reward("discriminator", reference_dir=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        rewards.get_reward("discriminator", reference_dir=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="exactly one"):
        rewards.get_reward("discriminator")
