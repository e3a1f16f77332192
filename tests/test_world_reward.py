"""The verifiable ``world`` reward against rendered ground truth: accurate on held-out renders (also noisy and
blurred ones), low on renders that contradict their caption, and correct connected components."""

from collections import deque

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

import world
from rewards import get_reward
from rewards.world import WorldReward, connected_components

N = 160  # held-out captions per check


@pytest.fixture(scope="module")
def heldout_captions() -> list[str]:
    _, heldout = world.split_captions()
    rng = np.random.default_rng(2024)
    return [heldout[i] for i in rng.integers(len(heldout), size=N)]


def degrade(images: torch.Tensor, noise: float, blur: float, seed: int = 0) -> torch.Tensor:
    if blur:
        images = TF.gaussian_blur(images, 5, blur)
    generator = torch.Generator().manual_seed(seed)
    return (images + noise * torch.randn(images.shape, generator=generator)).clamp(0, 1)


def test_registered_with_options():
    reward = get_reward("world", tolerance=0.25, min_area=10)
    assert isinstance(reward, WorldReward) and reward.name == "world"
    assert (reward.tolerance, reward.min_area) == (0.25, 10)
    with pytest.raises(ValueError):
        get_reward("world", tolerance=2.0)
    with pytest.raises(ValueError):
        get_reward("world", colour_space="lab")


@pytest.mark.parametrize("noise,blur", [(0.0, 0.0), (0.06, 0.0), (0.0, 1.2), (0.05, 1.0)])
def test_accurate_on_heldout_renders(heldout_captions, noise, blur):
    images, _ = world.render_captions(heldout_captions, seed=11)
    reward = WorldReward()
    scores = reward(degrade(images, noise, blur), heldout_captions)
    exact = (scores == 1).float().mean().item()
    info = reward.last_info()
    assert exact >= 0.95, info
    assert scores.mean() >= 0.98, info
    assert info["reward/world_colour_mean"] >= 0.99 and info["reward/world_count_mean"] >= 0.99


def _corrupt(text: str, how: str, rng: np.random.Generator) -> str:
    """A caption that differs from ``text`` in exactly one attribute kind."""
    objects, background = world.parse_caption(text)
    colours, shapes, backgrounds = list(world.COLOURS), list(world.SHAPES), list(world.BACKGROUNDS)
    i = int(rng.integers(len(objects)))
    if how == "colour":
        used = {c for c, _ in objects}
        objects[i] = (str(rng.choice([c for c in colours if c not in used])), objects[i][1])
    elif how == "shape":
        objects[i] = (objects[i][0], str(rng.choice([s for s in shapes if s != objects[i][1]])))
    elif how == "count":
        if len(objects) == 2:
            objects = [objects[i]]
        else:
            extra = str(rng.choice([c for c in colours if c != objects[0][0]]))
            objects = objects + [(extra, str(rng.choice(shapes)))]
    elif how == "background":
        background = str(rng.choice([b for b in backgrounds if b != background]))
    named = " and ".join(f"a {c} {s}" for c, s in objects)
    return f"{named} on a {background} background"


@pytest.mark.parametrize("how", ["colour", "shape", "count", "background"])
def test_wrong_renders_score_low(heldout_captions, how):
    rng = np.random.default_rng(5)
    wrong = [_corrupt(c, how, rng) for c in heldout_captions]
    images, _ = world.render_captions(wrong, seed=12)
    reward = WorldReward()
    details = reward.details(degrade(images, 0.03, 0.8), heldout_captions)
    check = {"colour": "colour", "shape": "shape", "count": "count", "background": "background"}[how]
    assert (details[check] < 1).float().mean() >= 0.95
    assert (details["total"] < 1).float().mean() >= 0.95
    # Ground truth against its own caption still scores (almost) perfectly: the low scores come from the mismatch.
    assert reward(degrade(images, 0.03, 0.8), wrong).mean() >= 0.98


def test_checks_subset_is_the_fraction_of_those_checks(heldout_captions):
    """Ground-truth renders scored against their caption with another background: every check passes except
    background, so the reward over a subset of checks is that subset's share of passed checks, counted by hand."""
    rng = np.random.default_rng(3)
    captions = heldout_captions[:32]
    images, _ = world.render_captions(captions, seed=13)
    wrong = [_corrupt(c, "background", rng) for c in captions]
    objects = torch.tensor([len(world.parse_caption(c)[0]) for c in captions], dtype=torch.float32)
    expected = {
        ("background",): torch.zeros(32),
        ("colour", "background"): objects / (objects + 1),  # colour once per object, background once
        ("count", "shape"): torch.ones(32),
    }
    for checks, want in expected.items():
        reward = WorldReward(checks=checks)
        torch.testing.assert_close(reward(images, wrong), want)
        info = reward.last_info()
        # Every check and the total over all of them are still reported; exact means all checks pass.
        assert info["reward/world_background_mean"] == 0 and info["reward/world_colour_mean"] == 1
        assert info["reward/world_all_mean"] == pytest.approx(((2 * objects + 1) / (2 * objects + 2)).mean().item())
        assert info["reward/world_exact_mean"] == 0
    for bad in ([], "colour", ["colour", "colour"], ["size"]):
        with pytest.raises(ValueError, match="checks"):
            WorldReward(checks=bad)


def test_noise_images_score_low_and_contract(heldout_captions):
    reward = WorldReward()
    noise = torch.rand(16, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    scores = reward(noise, heldout_captions[:16])
    assert scores.dtype == torch.float32 and scores.shape == (16,)
    assert scores.max() <= 0.5
    info = reward.last_info()
    for key in ("colour", "shape", "count", "background", "total", "exact"):
        assert f"reward/world_{key}_mean" in info
    # Captions outside the grammar score 0 and are counted; other sizes are resampled to 64 px.
    images, _ = world.render_captions(heldout_captions[:4], seed=1)
    big = torch.nn.functional.interpolate(images, scale_factor=2, mode="nearest")
    scores = reward(big, heldout_captions[:3] + ["a photo of a cat"])
    assert scores[:3].tolist() == [1.0, 1.0, 1.0] and scores[3] == 0
    assert reward.last_info()["reward/world_invalid_prompts"] == 1
    with pytest.raises(ValueError):
        reward(images, heldout_captions[:3])


def _flood_fill_count(mask: np.ndarray) -> tuple[int, int]:
    """Reference: number of 8-connected components and the largest one's size, by breadth-first search."""
    seen = np.zeros_like(mask, dtype=bool)
    sizes = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, size = deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                        seen[yy, xx] = True
                        queue.append((yy, xx))
        sizes.append(size)
    return len(sizes), max(sizes, default=0)


def test_connected_components_match_flood_fill():
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(12, 32, 32, generator=generator) < torch.linspace(0.2, 0.6, 12).view(12, 1, 1)
    labels = connected_components(masks)
    for mask, label in zip(masks.numpy(), labels):
        count, largest = _flood_fill_count(mask)
        values, sizes = label[label > 0].unique(return_counts=True)
        assert len(values) == count
        assert (sizes.max().item() if len(sizes) else 0) == largest
    assert torch.equal(labels > 0, masks)


def test_scores_do_not_depend_on_the_batch(heldout_captions):
    """Each image is scored on its own (speed is measured by ``scripts/bench_world.py``, not here)."""
    captions = heldout_captions[:24]
    images = degrade(world.render_captions(captions, seed=3)[0], 0.05, 1.0)
    reward = WorldReward()
    together = reward(images, captions)
    apart = torch.cat([reward(images[i : i + 5], captions[i : i + 5]) for i in range(0, 24, 5)])
    torch.testing.assert_close(together, apart, rtol=0, atol=0)
