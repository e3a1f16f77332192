"""Rule rewards against hand computations (numpy / colorsys), plus differentiability and the registry."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch

import rewards
from rewards.rules import parse_color

RULES = ["brightness", "contrast", "saturation", "colorfulness", "target_color"]


def _images(batch: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _constant(*rgb: float, size: int = 4) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, size, size).clone()


def test_rules_are_registered():
    assert set(RULES) <= set(rewards.available())
    for name in RULES:
        assert rewards.get_reward(name).name == name


def test_brightness_is_mean_rec709_luma():
    images = _images()
    array = images.numpy()
    expected = (0.2126 * array[:, 0] + 0.7152 * array[:, 1] + 0.0722 * array[:, 2]).mean(axis=(1, 2))
    out = rewards.get_reward("brightness")(images, [""] * 3)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5)
    assert out.dtype == torch.float32
    assert rewards.get_reward("brightness")(_constant(1, 0, 0), [""]).item() == pytest.approx(0.2126)


def test_brightness_target_prefers_images_closest_to_target():
    reward = rewards.get_reward("brightness", target=0.5)
    images = torch.cat([_constant(0.1, 0.1, 0.1), _constant(0.45, 0.45, 0.45), _constant(0.9, 0.9, 0.9)])
    out = reward(images, [""] * 3)
    np.testing.assert_allclose(out.numpy(), [-0.4, -0.05, -0.4], atol=1e-6)
    with pytest.raises(ValueError, match="target"):
        rewards.get_reward("brightness", target=2.0)


def test_contrast_is_std_of_luma():
    images = _images()
    array = images.numpy()
    luma = 0.2126 * array[:, 0] + 0.7152 * array[:, 1] + 0.0722 * array[:, 2]
    out = rewards.get_reward("contrast")(images, [""] * 3)
    np.testing.assert_allclose(out.numpy(), luma.reshape(3, -1).std(axis=1), rtol=1e-5)


def test_saturation_matches_colorsys_hsv():
    images = _images(batch=2, size=4)
    expected = [
        np.mean([colorsys.rgb_to_hsv(*images[b, :, i, j].tolist())[1] for i in range(4) for j in range(4)])
        for b in range(2)
    ]
    out = rewards.get_reward("saturation")(images, ["", ""])
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4)
    grey_and_red = torch.cat([_constant(0.5, 0.5, 0.5), _constant(1, 0, 0)])
    np.testing.assert_allclose(rewards.get_reward("saturation")(grey_and_red, ["", ""]).numpy(), [0, 1], atol=1e-5)


def test_colorfulness_matches_hasler_susstrunk_formula():
    images = _images(batch=2, size=16)
    array = images.numpy().astype(np.float64) * 255
    expected = []
    for r, g, b in array:
        rg, yb = r - g, 0.5 * (r + g) - b
        sigma = np.sqrt(rg.std() ** 2 + yb.std() ** 2)
        mu = np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
        expected.append(sigma + 0.3 * mu)
    out = rewards.get_reward("colorfulness")(images, ["", ""])
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4)
    assert rewards.get_reward("colorfulness")(_constant(0.3, 0.3, 0.3), [""]).item() == pytest.approx(0, abs=1e-3)


def test_target_color_ranks_by_distance_to_colour():
    reward = rewards.get_reward("target_color", color=[255, 0, 0])
    images = torch.cat([_constant(1, 0, 0), _constant(0.8, 0.2, 0.1), _constant(0, 0, 1)])
    out = reward(images, [""] * 3)
    np.testing.assert_allclose(out.numpy(), [0.0, -(0.04 + 0.04 + 0.01), -2.0], atol=1e-6)
    assert parse_color("#ff8000") == pytest.approx((1.0, 128 / 255, 0.0))
    assert parse_color("Blue") == (0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="unknown colour"):
        parse_color("not-a-colour")
    with pytest.raises(ValueError, match="3 components"):
        parse_color([1, 0])


@pytest.mark.parametrize("name", RULES)
def test_rules_are_differentiable(name):
    options = {"target": 0.3} if name == "brightness" else {}
    images = _images(batch=2).requires_grad_()
    out = rewards.get_reward(name, **options)(images, ["", ""])
    assert out.shape == (2,) and out.dtype == torch.float32
    out.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


@pytest.mark.parametrize("name", RULES)
def test_rules_return_float32_for_half_precision_images(name):
    out = rewards.get_reward(name)(_images(batch=2).to(torch.bfloat16), ["", ""])
    rewards.check_reward_output(out, 2, name)
