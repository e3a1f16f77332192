"""Rewards to advantages: per-prompt running statistics, group and batch normalisation, clipping."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np
import torch

EPS = 1e-6


def batch_normalize(rewards: torch.Tensor) -> torch.Tensor:
    """``(r - mean(r)) / (std(r) + eps)`` over the whole batch (population std). ``[N] -> [N]``."""
    rewards = rewards.float()
    return (rewards - rewards.mean()) / (rewards.std(unbiased=False) + EPS)


def group_normalize(rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Normalise within each group of samples that share a prompt (GRPO-style). ``[N] -> [N]``.

    A group of one sample gets advantage 0 (there is nothing to compare it with).
    """
    rewards = rewards.float()
    out = torch.zeros_like(rewards)
    for prompt in dict.fromkeys(prompts):
        index = torch.tensor([i for i, p in enumerate(prompts) if p == prompt], device=rewards.device)
        group = rewards[index]
        if group.numel() > 1:
            out[index] = (group - group.mean()) / (group.std(unbiased=False) + EPS)
    return out


def group_center(rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Subtract each prompt group's mean, then divide by the std of the centred values over the whole batch.
    ``[N] -> [N]``.

    Unlike :func:`group_normalize`, a group whose samples differ by little keeps small advantages instead of being
    scaled up to unit variance, so near-ties (often reward noise) weigh less than clear wins. A group of one sample
    gets advantage 0.
    """
    rewards = rewards.float()
    centred = torch.zeros_like(rewards)
    for prompt in dict.fromkeys(prompts):
        index = torch.tensor([i for i, p in enumerate(prompts) if p == prompt], device=rewards.device)
        if index.numel() > 1:
            centred[index] = rewards[index] - rewards[index].mean()
    return centred / (centred.std(unbiased=False) + EPS)


FLOW_GRPO_EPS = 1e-4
"""The constant Flow-GRPO adds to its std (``flow_grpo/stat_tracking.py``)."""


def global_std(rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Flow-GRPO's advantages with ``sample.global_std=True`` (its ``PerPromptStatTracker.update`` on one epoch's
    rewards of every process): subtract each prompt's mean, divide by the population std of **all** the raw rewards
    plus ``1e-4``. ``[N] -> [N]``, computed in float64 as the reference's NumPy code, returned as float32.

    Unlike :func:`group_center` (the std of the centred values), the spread between prompts counts in the divisor,
    so a batch of prompts of very different difficulty gets smaller advantages. A group of one sample gets 0.
    """
    values = rewards.detach().double()
    centred = torch.zeros_like(values)
    for prompt in dict.fromkeys(prompts):
        index = torch.tensor([i for i, p in enumerate(prompts) if p == prompt], device=values.device)
        centred[index] = values[index] - values[index].mean()
    return (centred / (values.std(unbiased=False) + FLOW_GRPO_EPS)).float()


class PerPromptStatTracker:
    """Running per-prompt reward statistics (DDPO paper): each prompt keeps a buffer of its last ``buffer_size``
    rewards; a prompt whose buffer holds fewer than ``min_count`` rewards is normalised with the batch statistics.

    The state (every buffer) is saved in checkpoints with :meth:`state_dict` so a resumed run continues exactly.
    """

    def __init__(self, buffer_size: int, min_count: int):
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"per-prompt buffer_size and min_count must be >= 1; got {buffer_size}, {min_count}")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        """Add this epoch's rewards to the buffers and return the advantages. ``rewards [N] -> [N]``."""
        values = rewards.detach().double().cpu().numpy()
        advantages = np.empty_like(values)
        batch_mean, batch_std = values.mean(), values.std() + EPS
        prompt_array = np.array(prompts, dtype=object)
        for prompt in dict.fromkeys(prompts):
            mask = prompt_array == prompt
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(values[mask].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = np.mean(buffer), np.std(buffer) + EPS
            advantages[mask] = (values[mask] - mean) / std
        return torch.as_tensor(advantages, dtype=torch.float32, device=rewards.device)

    def __call__(self, rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """:meth:`update` in the signature of every advantage scheme (see :data:`ADVANTAGES`)."""
        return self.update(prompts, rewards)

    def stats(self) -> dict[str, float]:
        return {"tracker_prompts": float(len(self.buffers))}

    def state_dict(self) -> dict:
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {prompt: list(buffer) for prompt, buffer in self.buffers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size = int(state["buffer_size"])
        self.min_count = int(state["min_count"])
        self.buffers = {p: deque(values, maxlen=self.buffer_size) for p, values in state["buffers"].items()}


def clip_advantages(advantages: torch.Tensor, max_abs: float) -> torch.Tensor:
    """Clip to ``[-max_abs, max_abs]``."""
    return advantages.clamp(-max_abs, max_abs)


AdvantageFn = Callable[[torch.Tensor, list[str]], torch.Tensor]
"""``advantage(rewards [N], prompts) -> advantages [N]`` over every process's samples of one epoch."""


def _batch_scheme(rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return batch_normalize(rewards)


ADVANTAGES: dict[str, Callable[[int, int], AdvantageFn]] = {
    "per_prompt": lambda buffer_size, min_count: PerPromptStatTracker(buffer_size, min_count),
    "group": lambda buffer_size, min_count: group_normalize,
    "group_center": lambda buffer_size, min_count: group_center,
    "global_std": lambda buffer_size, min_count: global_std,
    "batch": lambda buffer_size, min_count: _batch_scheme,
}
"""``train.advantage`` -> factory ``(per_prompt_buffer_size, per_prompt_min_count) -> AdvantageFn``. A stateful
scheme (``per_prompt``) returns an object with ``state_dict`` / ``load_state_dict``, saved in checkpoints."""


def build_advantage(name: str, buffer_size: int, min_count: int) -> AdvantageFn:
    """The advantage scheme ``name`` (a key of :data:`ADVANTAGES`)."""
    if name not in ADVANTAGES:
        raise ValueError(f"train.advantage must be one of {sorted(ADVANTAGES)}; got {name!r}")
    return ADVANTAGES[name](buffer_size, min_count)
