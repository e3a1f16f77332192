"""Stopping rules over held-out evaluations: a falling guard, a passed KL limit, a target that stops rising."""

from __future__ import annotations

import pytest

from ddpo.training.guards import StopRules, guard_means


def _record(epoch, reward, **guards):
    return {"epoch": epoch, "reward_mean": reward, **{f"guard/{k}_mean": v for k, v in guards.items()}}


def test_a_guard_that_falls_past_the_threshold_stops_at_that_evaluation():
    """The guard is compared with its first (base) evaluation, relative to its size: from 2.0 a fall of 0.08 (4%)
    passes, one of 0.12 (6%) stops."""
    rules = StopRules(guard_drop=0.05)
    history = [_record(0, 0.5, aes=2.00), _record(16, 0.6, aes=1.92), _record(32, 0.7, aes=1.88)]
    assert [rules.observe(r) for r in history[:2]] == [None, None]
    message = rules.observe(history[2])
    assert message.startswith("stopping early after epoch 32: guard aes fell from 2 to 1.88 (by 6.00% of its base")
    assert rules.best_epoch == 32  # the stopping evaluation can still be the best


def test_patience_counts_evaluations_without_a_new_best():
    """With patience 2, the second evaluation in a row below the best (0.7 at epoch 16) stops the run."""
    rules = StopRules(patience=2)
    rewards = [0.5, 0.7, 0.69, 0.7, 0.8]
    out = [rules.observe(_record(16 * i, r)) for i, r in enumerate(rewards[:4])]
    assert out[:3] == [None, None, None] and "for 2 evaluations" in out[3]
    assert (rules.best_epoch, rules.best_value) == (16, 0.7)


def test_kl_limit_and_rules_switched_off():
    """kl_to_base over the limit stops; with every threshold 0 nothing ever stops."""
    assert "kl_to_base 0.3 > stop.kl_limit=0.2" in StopRules(kl_limit=0.2).observe(
        {**_record(8, 0.1), "kl_to_base": 0.3}
    )
    rules = StopRules()
    assert all(rules.observe(_record(i, -i, g=-10.0 * i)) is None for i in range(10))


def test_state_round_trip_resumes_the_same_decisions():
    """A rules object restored from another's state after two evaluations decides the rest as the original does."""
    history = [_record(i, r, g=g) for i, (r, g) in enumerate([(0.1, 1.0), (0.3, 0.99), (0.2, 0.98), (0.25, 0.9)])]
    straight = StopRules(guard_drop=0.05, patience=3)
    expected = [straight.observe(r) for r in history]
    first = StopRules(guard_drop=0.05, patience=3)
    for r in history[:2]:
        first.observe(r)
    resumed = StopRules(guard_drop=0.05, patience=3)
    resumed.load_state_dict(first.state_dict())
    assert [resumed.observe(r) for r in history[2:]] == expected[2:]
    assert expected[3] is not None and resumed.best_epoch == straight.best_epoch == 1


def test_unknown_metric_is_named():
    with pytest.raises(KeyError, match="best_metric='guard/x_mean' is not a key"):
        StopRules(metric="guard/x_mean").observe(_record(0, 0.1))
    assert guard_means(_record(0, 0.1, a=1.0, b=2.0)) == {"a": 1.0, "b": 2.0}
