"""Each estimator's loss and gradient against hand computations on small tensors."""

import math

import pytest
import torch

from ddpo.policy.advantages import PerPromptStatTracker, batch_normalize, clip_advantages, group_center, group_normalize
from ddpo.policy.losses import (
    ddpo_is_loss,
    ddpo_sf_loss,
    kl_to_reference,
    rwr_weights,
    sparse_rwr_weights,
    weighted_regression_loss,
)


def test_ddpo_is_loss_and_gradient_by_hand():
    old = torch.tensor([0.0, 0.0, 0.0, 0.0])
    log_prob = torch.tensor([0.1, -0.1, 0.001, 0.3], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -2.0, -1.0])
    eps = 0.05
    loss, info = ddpo_is_loss(log_prob, old, adv, eps)
    r = [math.exp(0.1), math.exp(-0.1), math.exp(0.001), math.exp(0.3)]
    # per pair: max(-A r, -A clip(r)); which branch is active decides the gradient
    terms = [
        max(-1 * r[0], -1 * min(max(r[0], 1 - eps), 1 + eps)),  # r=1.105 clipped to 1.05: -1.05 > -1.105 -> clipped
        max(-1 * r[1], -1 * min(max(r[1], 1 - eps), 1 + eps)),  # r=0.905: -0.905 > -0.95 -> unclipped
        max(2 * r[2], 2 * min(max(r[2], 1 - eps), 1 + eps)),  # inside the range: equal
        max(1 * r[3], 1 * min(max(r[3], 1 - eps), 1 + eps)),  # r=1.35, A<0: unclipped 1.35 wins
    ]
    assert loss.item() == pytest.approx(sum(terms) / 4, rel=1e-6)
    loss.backward()
    # d/dlogp of (-A r)/4 = -A r / 4 where unclipped; 0 where the clipped branch is active.
    expected_grad = torch.tensor([0.0, -1.0 * r[1] / 4, 2 * r[2] / 4, 1 * r[3] / 4])
    torch.testing.assert_close(log_prob.grad, expected_grad, rtol=1e-5, atol=1e-7)
    assert info["clipfrac"].item() == pytest.approx(3 / 4)  # pairs 0, 1 and 3 are outside 1 +- 0.05
    assert info["approx_kl"].item() == pytest.approx(0.5 * (0.01 + 0.01 + 1e-6 + 0.09) / 4, rel=1e-5)
    assert info["ratio_max"].item() == pytest.approx(r[3], rel=1e-6)


def test_ddpo_is_ratio_one_gives_minus_mean_advantage_gradient():
    log_prob = torch.zeros(3, requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    loss, _ = ddpo_is_loss(log_prob, log_prob.detach(), adv, 1e-4)
    loss.backward()
    assert loss.item() == pytest.approx(-adv.mean().item())
    torch.testing.assert_close(log_prob.grad, -adv / 3)


def test_ddpo_sf_loss_and_gradient():
    log_prob = torch.tensor([-1.0, -2.0, 0.5], requires_grad=True)
    adv = torch.tensor([2.0, -1.0, 0.0])
    loss, _ = ddpo_sf_loss(log_prob, log_prob.detach(), adv)
    assert loss.item() == pytest.approx(-(2 * -1 + -1 * -2 + 0) / 3)
    loss.backward()
    torch.testing.assert_close(log_prob.grad, -adv / 3)


def test_rwr_weights_and_loss():
    scores = torch.tensor([0.0, 1.0, 2.0])
    w = rwr_weights(scores, temperature=0.5)
    e = torch.exp(scores / 0.5)
    torch.testing.assert_close(w, 3 * e / e.sum())
    assert w.mean().item() == pytest.approx(1.0)
    log_prob = torch.tensor([-1.0, -0.5, -0.25], requires_grad=True)
    loss, _ = weighted_regression_loss(log_prob, log_prob.detach(), w)
    assert loss.item() == pytest.approx(-(w * log_prob).mean().item())
    loss.backward()
    torch.testing.assert_close(log_prob.grad, -w / 3)
    with pytest.raises(ValueError, match="rwr_temperature"):
        rwr_weights(scores, 0.0)


def test_sparse_rwr_keeps_the_top_quantile():
    scores = torch.arange(10, dtype=torch.float32)
    w = sparse_rwr_weights(scores, 0.8)  # quantile 0.8 of 0..9 is 7.2 -> keep 8 and 9
    assert w.tolist() == [0.0] * 8 + [1.0, 1.0]


def test_kl_between_equal_variance_gaussians_matches_torch_distributions():
    torch.manual_seed(0)
    mean, ref = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    std = torch.tensor([0.5, 2.0])
    ours = kl_to_reference(mean, ref, std)
    s = std.view(-1, 1, 1, 1).expand_as(mean)
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, s), torch.distributions.Normal(ref, s)
    )
    torch.testing.assert_close(ours, reference.mean(dim=(1, 2, 3)))


def test_batch_and_group_normalisation():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0])
    torch.testing.assert_close(batch_normalize(r), (r - r.mean()) / (r.std(unbiased=False) + 1e-6))
    g = group_normalize(r, ["a", "a", "b", "b"])
    torch.testing.assert_close(g, torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-5, rtol=0)
    assert group_normalize(torch.tensor([5.0]), ["solo"]).item() == 0.0
    # group_center by hand: groups a = (1, 2), b = (3, 10), c = (7,) -> centred (-0.5, 0.5, -3.5, 3.5, 0);
    # population std of those = sqrt((0.25 + 0.25 + 12.25 + 12.25 + 0) / 5) = sqrt(5); a near-tie stays small.
    c = group_center(torch.tensor([1.0, 2.0, 3.0, 10.0, 7.0]), ["a", "a", "b", "b", "c"])
    expected = torch.tensor([-0.5, 0.5, -3.5, 3.5, 0.0]) / (5.0**0.5 + 1e-6)
    torch.testing.assert_close(c, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(clip_advantages(torch.tensor([-9.0, 0.5, 9.0]), 5.0), torch.tensor([-5.0, 0.5, 5.0]))


def test_per_prompt_tracker_uses_batch_stats_until_min_count_then_its_buffer():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    first = tracker.update(["a", "a", "b"], torch.tensor([1.0, 3.0, 5.0]))
    batch = torch.tensor([1.0, 3.0, 5.0])
    torch.testing.assert_close(first, (batch - batch.mean()) / (batch.std(unbiased=False) + 1e-6))
    second = tracker.update(["a", "b"], torch.tensor([2.0, 7.0]))
    buffer_a = torch.tensor([1.0, 3.0, 2.0])  # 'a' now has 3 >= min_count: its own statistics
    expected_a = (2.0 - buffer_a.mean()) / (buffer_a.std(unbiased=False) + 1e-6)
    assert second[0].item() == pytest.approx(expected_a.item(), rel=1e-5)
    batch2 = torch.tensor([2.0, 7.0])  # 'b' has 2 < 3: batch statistics of this update
    assert second[1].item() == pytest.approx(((7.0 - batch2.mean()) / (batch2.std(unbiased=False) + 1e-6)).item())
    tracker.update(["a", "a"], torch.tensor([4.0, 5.0]))
    assert list(tracker.buffers["a"]) == [3.0, 2.0, 4.0, 5.0]  # bounded buffer keeps the newest
    restored = PerPromptStatTracker(1, 1)
    restored.load_state_dict(tracker.state_dict())
    x = torch.tensor([1.5, 6.0])
    torch.testing.assert_close(restored.update(["a", "b"], x), tracker.update(["a", "b"], x))
