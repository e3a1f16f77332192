"""ddpo.tools.diagnostics.reward_spread and gradient_noise_scale against hand computations and known distributions."""

from __future__ import annotations

import math

import pytest
import torch

from ddpo.tools.diagnostics import gradient_noise_scale, reward_spread


def test_reward_spread_by_hand():
    # Prompt 0 always fails, prompt 1 always passes, prompt 2 passes half the time.
    grid = [[0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0]]
    spread = reward_spread(grid)
    # mean 6/12; total variance 0.25 (values 0/1, half each); within: (0 + 0 + 0.25) / 3.
    assert spread["mean"] == pytest.approx(0.5)
    assert spread["within_var"] == pytest.approx(0.25 / 3)
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
    out = gradient_noise_scale([[1.0, 0.0], [3.0, 0.0], [2.0, 2.0], [2.0, -2.0]])
    assert out["trace"] == pytest.approx(10 / 3)
    assert out["g2"] == pytest.approx(4 - (10 / 3) / 4)
    assert out["b_noise"] == pytest.approx(out["trace"] / out["g2"])
    assert "g2_upper" not in out


def test_gradient_noise_scale_recovers_a_known_distribution():
    # Terms ~ N(mu, sigma^2 I) in P dims: |G|^2 = |mu|^2, tr(Sigma) = P sigma^2, B_noise = P sigma^2 / |mu|^2.
    generator = torch.Generator().manual_seed(0)
    n, p, sigma = 20000, 50, 2.0
    mu = torch.full((p,), 0.3)
    out = gradient_noise_scale(mu + sigma * torch.randn(n, p, generator=generator), draws=200)
    assert out["trace"] == pytest.approx(p * sigma**2, rel=0.02)
    assert out["g2"] == pytest.approx(p * 0.09, rel=0.1)
    assert out["b_noise"] == pytest.approx(p * sigma**2 / (p * 0.09), rel=0.1)
    # The bootstrap bound lies above the estimate, and not absurdly far: the estimate's standard deviation is
    # sqrt(2 P sigma^4 / n^2 + 4 |mu|^2 sigma^2 / n).
    spread = (2 * p * sigma**4 / n**2 + 4 * p * 0.09 * sigma**2 / n) ** 0.5
    assert out["g2"] < out["g2_upper"] < out["g2"] + 5 * spread
    assert out["b_noise_lower"] == pytest.approx(out["trace"] / out["g2_upper"])


def test_gradient_noise_scale_bound_covers_the_truth():
    """Over repeated experiments the 95 % bootstrap upper bound of |G|^2 lies above the true value most of the time,
    so the lower bound of B_noise is at most the true noise scale (at the small N where the point estimate is noise)."""
    p, sigma, n = 20, 1.0, 200
    mu = torch.full((p,), 0.05)  # true |G|^2 = 0.05, B_noise = 400 > n
    covered = 0
    for trial in range(40):
        terms = mu + sigma * torch.randn(n, p, generator=torch.Generator().manual_seed(100 + trial))
        covered += gradient_noise_scale(terms, draws=200, seed=trial)["g2_upper"] >= p * 0.05**2
    assert covered >= 32  # nominal 95 %: 38 of 40


def test_gradient_noise_scale_without_signal_is_infinite():
    terms = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    terms = terms - terms.mean(0)  # mean exactly 0: the unbiased |G|^2 is negative
    out = gradient_noise_scale(terms)
    assert out["g2"] < 0 and math.isinf(out["b_noise"])
    with pytest.raises(ValueError, match="N >= 2"):
        gradient_noise_scale([[1.0, 2.0]])
