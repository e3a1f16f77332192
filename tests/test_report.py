"""ddpo.report.reward_spread and gradient_noise_scale against hand computations and known distributions."""

from __future__ import annotations

import math

import pytest
import torch

from ddpo.report import gradient_noise_scale, reward_spread


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


def test_gradient_noise_scale_by_hand():
    # mean [2, 0] (|mean|^2 = 4); deviations [-1,0],[1,0],[0,2],[0,-2]: squared norms sum to 10, ddof 1 -> 10 / 3.
    g2, trace, b_noise = gradient_noise_scale([[1.0, 0.0], [3.0, 0.0], [2.0, 2.0], [2.0, -2.0]])
    assert trace == pytest.approx(10 / 3)
    assert g2 == pytest.approx(4 - (10 / 3) / 4)
    assert b_noise == pytest.approx(trace / g2)


def test_gradient_noise_scale_recovers_a_known_distribution():
    # Terms ~ N(mu, sigma^2 I) in P dims: |G|^2 = |mu|^2, tr(Sigma) = P sigma^2, B_noise = P sigma^2 / |mu|^2.
    generator = torch.Generator().manual_seed(0)
    n, p, sigma = 20000, 50, 2.0
    mu = torch.full((p,), 0.3)
    terms = mu + sigma * torch.randn(n, p, generator=generator)
    g2, trace, b_noise = gradient_noise_scale(terms)
    assert trace == pytest.approx(p * sigma**2, rel=0.02)
    assert g2 == pytest.approx(p * 0.09, rel=0.1)
    assert b_noise == pytest.approx(p * sigma**2 / (p * 0.09), rel=0.1)


def test_gradient_noise_scale_without_signal_is_infinite():
    terms = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    terms = terms - terms.mean(0)  # mean exactly 0: the unbiased |G|^2 is negative
    g2, _, b_noise = gradient_noise_scale(terms)
    assert g2 < 0 and math.isinf(b_noise)
    with pytest.raises(ValueError, match="N >= 2"):
        gradient_noise_scale([[1.0, 2.0]])
