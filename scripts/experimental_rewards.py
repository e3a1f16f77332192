"""Rewards used only in the diagnosis of the default run (README, "Why the reward does not rise"), by import path:

    PYTHONPATH=scripts ddpo train reward.name=experimental_rewards:BackgroundFraction

``BackgroundFraction``: the fraction of the image's pixels that the ``world`` reward labels with the caption's
background colour (its background check passes at 0.5): a continuous form of that check. Every ``world`` check is
still reported in ``last_info()``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ddpo.world import IMAGE_SIZE, parse_caption
from rewards.world import _BACKGROUND_NAMES, _N_COLOURS, _PALETTE, WorldReward, label_colours, mode_filter


class BackgroundFraction(WorldReward):
    """``[B, 3, H, W]`` images, ``B`` world captions -> float32 ``[B]`` in ``[0, 1]``."""

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        super().__call__(images, prompts)  # the world checks, for last_info()
        x = images.detach().float().cpu().clamp(0, 1)
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
        labels = mode_filter(label_colours(x, self.tolerance), len(_PALETTE))  # [B, H, W]
        target = torch.tensor([_N_COLOURS + _BACKGROUND_NAMES.index(parse_caption(p)[1]) for p in prompts])
        fraction = (labels == target.view(-1, 1, 1)).float().mean(dim=(1, 2))
        self._info["reward/background_fraction_mean"] = fraction.mean().item()
        return fraction
