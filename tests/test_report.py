"""ddpo.report.reward_spread against hand computations."""

from __future__ import annotations

import pytest

from ddpo.report import reward_spread


def test_reward_spread_by_hand():
    # Prompt 0 always fails, prompt 1 always passes, prompt 2 passes half the time.
    grid = [[0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0]]
    spread = reward_spread(grid)
    # mean 6/12; total variance 0.25 (values 0/1, half each); within: (0 + 0 + 0.25) / 3.
    assert spread["mean"] == pytest.approx(0.5)
    assert spread["within_share"] == pytest.approx((0.25 / 3) / 0.25)
    assert spread["tied"] == pytest.approx(2 / 3)
    assert spread["never"] == pytest.approx(1 / 3)
    assert spread["always"] == pytest.approx(1 / 3)


def test_reward_spread_all_within_and_all_between():
    assert reward_spread([[0.2, 0.8], [0.2, 0.8]])["within_share"] == pytest.approx(1.0)
    between = reward_spread([[0.2, 0.2], [0.8, 0.8]])
    assert between["within_share"] == 0.0 and between["tied"] == 1.0 and between["never"] == 0.0
    assert reward_spread([[0.5, 0.5]])["within_share"] == 0.0  # constant: no variance at all


def test_reward_spread_rejects_a_flat_list():
    with pytest.raises(ValueError, match="prompts, seeds"):
        reward_spread([0.1, 0.2, 0.3])
