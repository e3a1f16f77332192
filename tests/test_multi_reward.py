"""Per-component advantages of a weighted reward, against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from ddpo.policy.multi_reward import per_component_advantages


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
