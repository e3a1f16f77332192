"""The registry, user rewards by import path, and the weighted combination (sum, logging, per-component checks)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

import rewards
from rewards import base

EXPECTED_NAMES = {
    "aesthetic",
    "brightness",
    "clip_score",
    "colorfulness",
    "contrast",
    "discriminator",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "saturation",
    "target_color",
    "weighted",
}


def _images(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _register_temporarily(monkeypatch, name: str, fn) -> None:
    """Register the reward function ``fn`` (through a factory, as the registry holds factories) for one test."""
    monkeypatch.setitem(base._REGISTRY, name, lambda: fn)


def test_every_reward_is_registered():
    assert EXPECTED_NAMES <= set(rewards.available())


def test_unknown_name_suggests_close_match():
    with pytest.raises(ValueError, match="Did you mean 'brightness'"):
        rewards.get_reward("brightnes")


def test_user_reward_by_import_path(monkeypatch):
    module = types.ModuleType("my_user_rewards")

    @rewards.reward_function
    def redness(images, prompts):
        return images[:, 0].mean(dim=(1, 2))

    @rewards.reward_factory
    def scaled_redness(scale: float):
        return lambda images, prompts: scale * images[:, 0].mean(dim=(1, 2))

    module.redness, module.scaled_redness = redness, scaled_redness
    monkeypatch.setitem(sys.modules, "my_user_rewards", module)
    reward = rewards.get_reward("my_user_rewards:redness")
    images = _images()
    torch.testing.assert_close(reward(images, [""] * 4), images[:, 0].mean(dim=(1, 2)))
    scaled = rewards.get_reward("my_user_rewards:scaled_redness", scale=2.0)
    torch.testing.assert_close(scaled(images, [""] * 4), 2 * images[:, 0].mean(dim=(1, 2)))
    with pytest.raises(ValueError, match="has no option .factor.. Its options: scale"):
        rewards.get_reward("my_user_rewards:scaled_redness", factor=2.0)
    with pytest.raises(ValueError, match="is a reward function and takes no options"):
        rewards.get_reward("my_user_rewards:redness", scale=2.0)
    # A Reward class by import path takes options.
    brightness = rewards.get_reward("rewards.rules:Brightness", target=0.5)
    assert brightness.target == 0.5


def test_import_path_accepts_only_declared_rewards(monkeypatch, tmp_path):
    """`reward.name=os:system` (with an option string) ran a shell command: only a Reward subclass or a function
    declared with @rewards.reward_function / @rewards.reward_factory / @rewards.register is accepted, and the error
    says how to declare one. Nothing is called before the check."""
    marker = tmp_path / "ran"
    module = types.ModuleType("my_plain_module")
    module.plain = lambda images, prompts: marker.write_text("called") or images[:, 0].mean(dim=(1, 2))
    module.not_callable = 3
    monkeypatch.setitem(sys.modules, "my_plain_module", module)
    how = r"derive a class from rewards.Reward, or decorate a function with @rewards.reward_function"
    for spec, options in (("os:system", {"command": "true"}), ("my_plain_module:plain", {}), ("builtins:dict", {})):
        with pytest.raises(ValueError, match=rf"reward '{spec}' is of type \w+, not a declared reward.*{how}"):
            rewards.get_reward(spec, **options)
    with pytest.raises(ValueError, match="is of type int, not a declared reward"):
        rewards.get_reward("my_plain_module:not_callable")
    assert not marker.exists()


def test_weighted_sum_and_component_logging():
    reward = rewards.get_reward(
        "weighted",
        components={
            "jpeg_compressibility": 1.0,
            "brightness": 0.5,
            "target_color": {"weight": -2.0, "options": {"color": "blue"}},
        },
    )
    images = _images()
    prompts = [""] * 4
    jpeg = rewards.get_reward("jpeg_compressibility")(images, prompts)
    bright = images.mul(torch.tensor([0.2126, 0.7152, 0.0722]).view(1, 3, 1, 1)).sum(1).mean(dim=(1, 2))
    blue = -(images - torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1)).square().sum(1).mean(dim=(1, 2))
    out = reward(images, prompts)
    torch.testing.assert_close(out, jpeg + 0.5 * bright - 2.0 * blue)
    info = reward.last_info()
    assert set(info) == {"reward/jpeg_compressibility_mean", "reward/brightness_mean", "reward/target_color_mean"}
    assert info["reward/brightness_mean"] == pytest.approx(bright.mean().item(), rel=1e-5)
    assert info["reward/jpeg_compressibility_mean"] == pytest.approx(jpeg.mean().item(), rel=1e-5)
    assert all(isinstance(v, float) for v in info.values())


def test_weighted_is_differentiable_through_differentiable_components():
    reward = rewards.get_reward("weighted", components={"brightness": 1.0, "saturation": 2.0})
    images = _images().requires_grad_()
    reward(images, [""] * 4).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda images, prompts: torch.tensor([0.0, float("nan"), 1.0, float("inf")]), r"sample indices \[1, 3\]"),
        (lambda images, prompts: torch.zeros(3), r"shape \(3,\); expected \(4,\)"),
        (lambda images, prompts: torch.zeros(4, dtype=torch.float64), "dtype torch.float64"),
        (lambda images, prompts: [0.0] * 4, "must return a torch.Tensor"),
    ],
)
def test_weighted_checks_each_component_by_name(monkeypatch, bad, match):
    _register_temporarily(monkeypatch, "test_bad_component", bad)
    reward = rewards.get_reward("weighted", components={"brightness": 1.0, "test_bad_component": 1.0})
    with pytest.raises(rewards.RewardError, match=match) as info:
        reward(_images(), [""] * 4)
    assert "weighted/test_bad_component" in str(info.value)


def test_weighted_forwards_update_and_state_to_components():
    reference = torch.full((4, 3, 16, 16), 0.8)
    options = {"reference_images": reference, "image_size": 16, "channels": 4, "depth": 2, "steps_per_epoch": 2}
    make = lambda: rewards.get_reward(  # noqa: E731
        "weighted", components={"brightness": 1.0, "discriminator": {"weight": 0.1, "options": options}}
    )
    reward = make()
    info = reward.update(_images(), [""] * 4)
    assert info["reward/discriminator_updates"] == 2.0
    state = reward.state_dict()
    assert set(state) == {"discriminator"}  # stateless components add nothing
    other = make()
    other.load_state_dict(state)
    torch.testing.assert_close(other(_images(seed=1), [""] * 4), reward(_images(seed=1), [""] * 4))
    with pytest.raises(ValueError, match="unknown components"):
        other.load_state_dict({"nope": {}})


def test_weighted_rejects_bad_specs():
    with pytest.raises(ValueError, match="non-empty"):
        rewards.get_reward("weighted", components={})
    with pytest.raises(ValueError, match="weight"):
        rewards.get_reward("weighted", components={"brightness": {"options": {}}})
    with pytest.raises(ValueError, match="unknown reward"):
        rewards.get_reward("weighted", components={"no_such_reward": 1.0})


def test_metadata_reaches_components_that_take_it(monkeypatch):
    seen = []

    def uses_metadata(images, prompts, metadata=None):
        seen.append(metadata)
        return torch.tensor([float(m["score"]) for m in metadata])

    _register_temporarily(monkeypatch, "test_metadata_reward", uses_metadata)
    reward = rewards.get_reward("weighted", components={"test_metadata_reward": 2.0, "jpeg_compressibility": 0.0})
    metadata = [{"score": i} for i in range(4)]
    out = reward(_images(), [""] * 4, metadata=metadata)  # jpeg_compressibility does not take metadata
    torch.testing.assert_close(out, torch.tensor([0.0, 2.0, 4.0, 6.0]))
    assert seen == [metadata]
