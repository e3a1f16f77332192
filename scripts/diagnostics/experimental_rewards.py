"""Rewards used only in the diagnosis of the default run (docs/notes/2026-11-25-why-the-reward-does-not-rise.md), by import path:

    PYTHONPATH=scripts/diagnostics ddpo train reward.name=experimental_rewards:BackgroundFraction

``BackgroundFraction``: the fraction of the image's pixels that the ``world`` reward labels with the caption's
background colour (its background check passes at 0.5): a continuous form of that check. Every ``world`` check is
still reported in ``last_info()``.
"""

from __future__ import annotations

from rewards.world import WorldReward


class BackgroundFraction(WorldReward):
    """``[B, 3, H, W]`` images, ``B`` world captions -> float32 ``[B]`` in ``[0, 1]``: ``details()``'s
    ``background_fraction``."""

    score_key = "background_fraction"
