"""Which (trajectory, timestep) pairs an inner epoch trains on: a pure function of a random generator."""

from __future__ import annotations

import torch


def training_pairs(
    num_samples: int, steps_per_trajectory: int, window: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shuffled (trajectory, step) pairs of one inner epoch: two long tensors ``[num_samples * k]``.

    Each of the ``num_samples`` trajectories contributes ``k = steps_per_trajectory`` distinct random steps among
    its first ``window`` steps (``window >= k``); all pairs are then shuffled together, so one minibatch mixes
    trajectories and timesteps. Uses only ``generator`` (CPU), in a fixed order of draws.

    Returns:
        ``(trajectory_index, step_index)``, each ``[num_samples * k]`` long on the CPU.
    """
    if not 1 <= steps_per_trajectory <= window:
        raise ValueError(f"need 1 <= steps_per_trajectory ({steps_per_trajectory}) <= window ({window})")
    k = steps_per_trajectory
    steps = torch.stack([torch.randperm(window, generator=generator)[:k] for _ in range(num_samples)])
    trajs = torch.arange(num_samples).unsqueeze(1).expand(num_samples, k)
    order = torch.randperm(num_samples * k, generator=generator)
    return trajs.flatten()[order], steps.flatten()[order]
