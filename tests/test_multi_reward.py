"""Per-component advantages of a weighted reward (``train.advantage=per_component``), against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from ddpo.cli import main
from ddpo.policy.advantages import build_advantage, component_advantage_stats, per_component_advantages
from ddpo.training.config import ConfigError, build_config
from ddpo.training.runlog import read_jsonl
from ddpo.training.trainer import Trainer
from rewards import get_reward


def _normalise(values: list[float]) -> list[float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return [(v - mean) / (std + 1e-6) for v in values]


def test_each_component_is_normalised_in_its_group_then_weighted_then_batch_normalised():
    """Two prompts of two samples plus a lone sample: the hand computation in plain Python floats."""
    prompts = ["a", "a", "b", "b", "c"]
    big = [10.0, 0.0, 4.0, 6.0, 3.0]  # spread 10 within group a
    small = [0.01, 0.02, 0.5, 0.4, 1.0]  # spread 0.01 within group a, opposite order
    advantages, parts = per_component_advantages(
        {"big": torch.tensor(big), "small": torch.tensor(small)}, {"big": 1.0, "small": 0.5}, prompts
    )
    hand_big = [*_normalise(big[:2]), *_normalise(big[2:4]), 0.0]
    hand_small = [*_normalise(small[:2]), *_normalise(small[2:4]), 0.0]
    hand = _normalise([b + 0.5 * s for b, s in zip(hand_big, hand_small)])
    assert parts["big"].tolist() == pytest.approx(hand_big, abs=1e-5)
    assert parts["small"].tolist() == pytest.approx(hand_small, abs=1e-5)
    assert advantages.tolist() == pytest.approx(hand, abs=1e-5)
    # The small component keeps its say in group a: a plain weighted sum would rank sample 0 first by 9.995.
    assert advantages[0] > advantages[1]
    assert (hand_big[0] + 0.5 * hand_small[0]) == pytest.approx(0.5, abs=1e-4)


def test_mismatched_names_are_refused():
    with pytest.raises(ValueError, match="components \\['x'\\] but weights \\['y'\\]"):
        per_component_advantages({"x": torch.zeros(2)}, {"y": 1.0}, ["p", "p"])


def test_component_stats_by_hand():
    """``abs_mean`` is mean |A_k|; ``corr`` is the Pearson correlation of A_k with the final advantages."""
    final = torch.tensor([1.0, -1.0, 2.0, -2.0])
    parts = {"same": torch.tensor([0.5, -0.5, 1.0, -1.0]), "none": torch.zeros(4), "flip": -final}
    stats = component_advantage_stats(final, parts)
    assert stats["advantage/same_abs_mean"] == pytest.approx(0.75)
    assert stats["advantage/same_corr"] == pytest.approx(1.0)
    assert stats["advantage/none_abs_mean"] == 0.0 and stats["advantage/none_corr"] == 0.0
    assert stats["advantage/flip_corr"] == pytest.approx(-1.0)


def test_per_component_scheme_needs_the_components():
    scheme = build_advantage("per_component", 16, 16, {"a": 1.0})
    with pytest.raises(ValueError, match="needs each sample's component values"):
        scheme(torch.zeros(2), ["p", "p"])
    with pytest.raises(ValueError, match="needs reward.name=weighted"):
        build_advantage("per_component", 16, 16, None)


WEIGHTED = "reward.options={components: {brightness: 1.0, contrast: 0.5}}"


def test_trainer_per_component_weights_are_the_hand_computation_of_each_rewards_values(fast_overrides, tmp_path):
    """On the tiny pipeline: the trainer's weights of an epoch equal the hand computation from ``brightness`` and
    ``contrast`` scored independently on the epoch's images; the logged diagnostics match them."""
    overrides = [
        *fast_overrides,
        "overlap_scoring=false",
        "sample.samples_per_prompt=2",
        "train.advantage=per_component",
    ]
    overrides += ["reward.name=weighted", WEIGHTED]
    trainer = Trainer.from_config(build_config(preset="tiny", overrides=overrides), tmp_path / "run")
    samples, rewards, _, _ = trainer.sample_and_score(0)
    weights = trainer.compute_weights(rewards, samples.prompts, trainer.reward_components)
    images, prompts = samples.images.float(), samples.prompts
    bright, contrast = get_reward("brightness")(images, prompts), get_reward("contrast")(images, prompts)
    groups: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(index)
    assert all(len(g) == 2 for g in groups.values())

    def in_groups(values: torch.Tensor) -> list[float]:
        out = [0.0] * len(prompts)
        for index in groups.values():
            for i, v in zip(index, _normalise([values[i].item() for i in index]), strict=True):
                out[i] = v
        return out

    hand_b, hand_c = in_groups(bright), in_groups(contrast)
    hand = _normalise([b + 0.5 * c for b, c in zip(hand_b, hand_c, strict=True)])
    hand = [max(-5.0, min(5.0, a)) for a in hand]  # train.adv_clip_max
    assert weights.tolist() == pytest.approx(hand, abs=1e-4)
    torch.testing.assert_close(rewards, bright + 0.5 * contrast)
    stats = trainer.advantage.last_info()
    assert stats["advantage/contrast_abs_mean"] == pytest.approx(sum(map(abs, hand_c)) / len(hand_c), abs=1e-4)
    assert set(stats) == {f"advantage/{n}_{s}" for n in ("brightness", "contrast") for s in ("abs_mean", "corr")}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["sample.samples_per_prompt=2", "reward.name=brightness"],
            "per_component normalises each component of a weighted reward",
        ),
        (["sample.samples_per_prompt=1", "reward.name=weighted", WEIGHTED], "needs sample.samples_per_prompt > 1"),
    ],
)
def test_per_component_config_is_refused_without_a_weighted_reward_or_groups(fast_overrides, extra, message):
    with pytest.raises(ConfigError, match=message):
        build_config(preset="tiny", overrides=[*fast_overrides, "train.advantage=per_component", *extra])


def test_per_component_trains_from_the_cli_and_logs_each_components_say(fast_overrides, tmp_path):
    overrides = [*fast_overrides, "num_epochs=2", "sample.samples_per_prompt=2", "train.advantage=per_component"]
    assert main(["train", "--preset", "tiny", *overrides, "reward.name=weighted", WEIGHTED]) == 0
    metrics = read_jsonl(tmp_path / "runs" / "run" / "metrics.jsonl")
    assert len(metrics) == 2
    for line in metrics:
        for name in ("brightness", "contrast"):
            assert 0 < line[f"advantage/{name}_abs_mean"] < 5 and -1 <= line[f"advantage/{name}_corr"] <= 1
