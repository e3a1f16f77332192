"""The learning-rate warm-up (``train.lr_warmup_steps``): the schedule by hand, and the size of the trainer's first
Adam update, which is ``lr * sign(g)`` in every coordinate with a gradient (bias-corrected moments ``g``, ``g^2``)."""

from __future__ import annotations

import pytest
import torch

from ddpo.training.config import ConfigError, build_config
from ddpo.training.optim import learning_rate_at
from ddpo.training.trainer import Trainer


def test_linear_warm_up_then_constant():
    assert [learning_rate_at(s, 1.0, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [learning_rate_at(s, 3e-3, 0) for s in range(3)] == [3e-3] * 3


def test_negative_warm_up_is_refused(fast_overrides):
    with pytest.raises(ConfigError, match="lr_warmup_steps must be >= 0"):
        build_config(preset="tiny", overrides=[*fast_overrides, "train.lr_warmup_steps=-1"])


@pytest.mark.parametrize("warmup", [0, 4])
def test_the_first_adam_update_is_the_warmed_up_learning_rate(fast_overrides, tmp_path, warmup):
    overrides = [
        *fast_overrides,
        "train.gradient_accumulation_steps=4",  # 4 samples x 4 steps = 16 pairs = one optimiser step of 4 x 4
        "train.adam_weight_decay=0",
        "train.adam_epsilon=1e-30",  # so that |update| = lr exactly, even where the gradient is tiny
        f"train.lr_warmup_steps={warmup}",
        "train.max_grad_norm=0",
    ]
    trainer = Trainer.from_config(build_config(preset="tiny", overrides=overrides), tmp_path / "run")
    before = [p.detach().clone() for p in trainer.params]
    samples, rewards, _, _ = trainer.sample_and_score(0)
    trainer.optimise(0, samples, trainer.compute_weights(rewards, samples.prompts))
    assert trainer.global_step == 1
    moves = torch.cat([(p.detach() - b).abs().flatten() for p, b in zip(trainer.params, before)])
    moved = moves[moves > 0]
    assert moved.numel() > 0
    expected = 0.01 / max(warmup, 1)  # fast_overrides' lr 0.01
    torch.testing.assert_close(moved, torch.full_like(moved, expected), rtol=1e-3, atol=0)
