"""Diffusion-DPO's maths (:mod:`ddpo.policy.dpo`): the loss against hand computations in the epsilon form of a UNet
and the velocity form of a flow model, its value and gradient when the policy is the reference, and online DPO's
best-vs-worst pairing rule against a hand example."""

from __future__ import annotations

import math

import pytest
import torch

from ddpo.policy.dpo import best_worst_pairs, dpo_loss, pair_roles, per_sample_mse, rejected_partner
from ddpo.policy.forward import add_noise, flow_add_noise, matching_target


def test_dpo_loss_by_hand():
    mse_w, mse_l = torch.tensor([0.3, 0.1]), torch.tensor([0.2, 0.5])
    ref_w, ref_l = torch.tensor([0.25, 0.2]), torch.tensor([0.25, 0.4])
    loss, info = dpo_loss(mse_w, mse_l, ref_w, ref_l, beta=10.0)
    # model_diff = (0.1, -0.4), ref_diff = (0, -0.2): margin = -10 / 2 * (0.1, -0.2) = (-0.5, 1.0)
    by_hand = (math.log(1 + math.exp(0.5)) + math.log(1 + math.exp(-1.0))) / 2
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    assert info["dpo_margin"].item() == pytest.approx(0.25)
    assert info["dpo_accuracy"].item() == 0.5
    assert info["model_mse"].item() == pytest.approx((0.3 + 0.1 + 0.2 + 0.5) / 4)
    assert info["reference_mse"].item() == pytest.approx((0.25 + 0.2 + 0.25 + 0.4) / 4)
    with pytest.raises(ValueError, match="dpo_beta must be > 0"):
        dpo_loss(mse_w, mse_l, ref_w, ref_l, beta=0.0)


def _pairs(form: str):
    """Two pairs re-noised with one noise per pair: ``(x0 [4, ...] preferred then rejected, noise, level, space)``."""
    torch.manual_seed(0)
    x0 = torch.randn(4, 2, 3, 3)
    noise = torch.randn(2, 2, 3, 3).repeat(2, 1, 1, 1)  # the same noise for a pair's two samples
    if form == "epsilon":
        level = torch.tensor([0.9, 0.3]).repeat(2)  # alpha_bar_t, the same timestep for both samples
        return x0, noise, level, add_noise(x0, noise, level)
    level = torch.tensor([0.2, 0.8]).repeat(2)  # sigma
    return x0, noise, level, flow_add_noise(x0, noise, level)


@pytest.mark.parametrize("form", ["epsilon", "flow"])
def test_dpo_loss_in_the_models_pretraining_space_by_hand(form):
    """A UNet's errors are on the noise, a flow model's on the velocity ``noise - x0``; written out element by
    element here."""
    x0, noise, level, _ = _pairs(form)
    prediction = torch.randn(4, 2, 3, 3)
    reference = torch.randn(4, 2, 3, 3)
    target = matching_target(x0, noise, level, form)
    mse, ref = per_sample_mse(prediction, target), per_sample_mse(reference, target)
    loss, _ = dpo_loss(mse[:2], mse[2:], ref[:2], ref[2:], beta=3.0)
    expected = 0.0
    for k in range(2):
        errors = []
        for row in (k, k + 2):  # preferred, rejected
            true = noise[row] if form == "epsilon" else noise[row] - x0[row]
            errors.append(
                (
                    sum(float(v) ** 2 for v in (prediction[row] - true).flatten()) / 18,
                    sum(float(v) ** 2 for v in (reference[row] - true).flatten()) / 18,
                )
            )
        (m_w, r_w), (m_l, r_l) = errors
        margin = -3.0 / 2 * ((m_w - m_l) - (r_w - r_l))
        expected += math.log(1 + math.exp(-margin)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("form", ["epsilon", "flow"])
def test_policy_equal_to_reference_gives_log2_and_the_first_gradient_by_hand(form):
    """At theta = ref every margin is 0: the loss is log 2 for any pairs. Its gradient is not zero: d loss / d margin
    = -sigmoid(-0) = -1/2 for each pair, so ``d loss / d mse_w = beta / 4 / P`` and ``d loss / d mse_l = -beta / 4 /
    P``: the first update lowers the preferred sample's error and raises the rejected one's. The reference gets no
    gradient."""
    x0, noise, level, _ = _pairs(form)
    target = matching_target(x0, noise, level, form)
    prediction = (target + 0.3 * torch.randn(4, 2, 3, 3)).requires_grad_(True)
    mse = per_sample_mse(prediction, target)
    ref = per_sample_mse(prediction.detach(), target).requires_grad_(True)
    mse.retain_grad()
    beta = 5000.0
    loss, info = dpo_loss(mse[:2], mse[2:], ref[:2], ref[2:], beta)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert info["dpo_margin"].item() == 0.0
    loss.backward()
    torch.testing.assert_close(mse.grad, torch.tensor([beta / 8, beta / 8, -beta / 8, -beta / 8]))
    assert ref.grad is None
    margin = torch.zeros(2, requires_grad=True)  # the loss as a function of the margin alone
    (grad,) = torch.autograd.grad(-torch.nn.functional.logsigmoid(margin).mean(), margin)
    torch.testing.assert_close(grad, torch.tensor([-0.25, -0.25]))  # -1/2 per pair, averaged over 2


def test_best_worst_pairs_by_hand():
    """Groups of 3: (0.1, 0.9, 0.5) -> 1 over 0; (0.4, 0.4, 0.4) -> no pair; (0.7, 0.2, 0.2) -> 3 over 4 (the first
    of the equal lowest); (1, 1, 0) -> 9 over 11 (the first of the equal highest)."""
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.4, 0.4, 0.4, 0.7, 0.2, 0.2, 1.0, 1.0, 0.0])
    preferred, rejected = best_worst_pairs(rewards, 3)
    assert preferred.tolist() == [1, 6, 9] and rejected.tolist() == [0, 7, 11]
    roles = pair_roles(12, preferred, rejected)
    assert roles.tolist() == [-1, 1, 0, 0, 0, 0, 1, -1, 0, 1, 0, -1]
    assert rejected_partner(torch.tensor([9, 1, 6]), roles, 3).tolist() == [11, 0, 7]
    assert [t.tolist() for t in best_worst_pairs(torch.tensor([2.0, 2.0]), 2)] == [[], []]  # a tie: no pair
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        best_worst_pairs(rewards, 1)
    with pytest.raises(ValueError, match="multiple of 5"):
        best_worst_pairs(rewards, 5)
