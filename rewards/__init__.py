"""Rewards for ddpo: ``reward(images [B,3,H,W] in [0,1], prompts) -> float32 Tensor[B]``.

Use :func:`get_reward` to build one by name and :func:`available` to list the names.
"""

from . import (  # noqa: F401  (register rewards)
    aesthetic,
    clip_score,
    compression,
    discriminator,
    diversity,
    preference,
    remote,
    rules,
    weighted,
    world,
)
from .base import (
    FunctionReward,
    Reward,
    RewardError,
    accepts_metadata,
    available,
    check_reward_output,
    differentiability,
    get_reward,
    is_differentiable,
    listing,
    register,
    reward_factory,
    reward_function,
)

__all__ = [
    "FunctionReward",
    "Reward",
    "RewardError",
    "accepts_metadata",
    "available",
    "check_reward_output",
    "differentiability",
    "get_reward",
    "is_differentiable",
    "listing",
    "register",
    "reward_factory",
    "reward_function",
]
