"""The Gaussian policy of one denoising step: its result, its log-density, the sample-or-score rule, and the lookup
of a step in its schedule.

Every log-prob step (:mod:`.schedulers` for DDIM/DDPM, :mod:`.flow` for flow matching) computes a mean and a
standard deviation and hands them to :func:`finish_step`, which samples ``x_{t-1}`` (or takes a given one) and
scores it with :func:`gaussian_log_prob`. This module is the bottom of :mod:`ddpo.policy`: both step modules import
it and neither imports the other, so the registry of steps (:data:`ddpo.policy.schedulers.STEP_FUNCTIONS`) can list
them all without an import cycle.

Log-probabilities are **averaged over the latent dimensions** (``C * H * W``), not summed, as in the DDPO paper's
code: the PPO clip range (1e-4 in the paper) and the learning rate then do not depend on the latent size. A
summed log-prob is ``log_prob * C * H * W``; the ratio would change by the same factor in the exponent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class StepOutput:
    """Result of one step. All tensors float32; ``prev_sample``/``mean`` ``[B, C, H, W]``; ``std``/``log_prob`` ``[B]``."""

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dims of the log-density of ``N(mean, std^2 I)`` at ``x``, in float32.

    Args:
        x, mean: ``[B, ...]``.
        std: ``[B]`` (one standard deviation per sample), strictly positive.
    Returns:
        ``[B]`` float32.
    """
    x, mean, std = x.float(), mean.float(), std.float()
    std = std.view(-1, *([1] * (x.ndim - 1)))
    log_density = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return log_density.mean(dim=tuple(range(1, x.ndim)))


def finish_step(
    mean: torch.Tensor,
    std: torch.Tensor,
    prev_sample: torch.Tensor | None,
    noise: torch.Tensor | None,
    generator: torch.Generator | None,
    deterministic: torch.Tensor | None = None,
    check: bool = True,
) -> StepOutput:
    """Sample (or take) ``x_{t-1}`` and score it.

    Rows flagged ``deterministic`` (std 0 by construction) return ``prev_sample = mean`` and ``log_prob = 0``: they
    are dynamics, not policy, and are never trained on. ``check=False`` skips the zero-variance check (a host-device
    sync) once the schedule was checked up front.

    Args:
        mean: ``[B, ...]`` float32, the step's mean.
        std: ``[B]`` float32, its standard deviation.
        prev_sample: ``x_{t-1}`` ``[B, ...]`` to score, or ``None`` to sample ``mean + std * noise``.
        noise: standard normal noise ``[B, ...]`` for sampling; else drawn from ``generator``.
        deterministic: ``[B]`` bool, rows without a policy (default: none).
    """
    deterministic = torch.zeros_like(std, dtype=torch.bool) if deterministic is None else deterministic
    if check and bool(((std <= 0) & ~deterministic).any()):
        raise ValueError(
            "a step has zero variance (eta=0, or set_alpha_to_one=True at the last step), so it has no log-probability; "
            "use sample.eta > 0 and a scheduler with set_alpha_to_one=False"
        )
    safe_std = torch.where(deterministic, torch.ones_like(std), std)
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        scale = torch.where(deterministic, torch.zeros_like(std), std)
        prev_sample = mean + scale.view(-1, *([1] * (mean.ndim - 1))) * noise.float()
    prev_sample = prev_sample.float()
    log_prob = gaussian_log_prob(prev_sample, mean, safe_std)
    log_prob = torch.where(deterministic, torch.zeros_like(log_prob), log_prob)
    return StepOutput(prev_sample, log_prob, mean, torch.where(deterministic, torch.zeros_like(std), std))


def schedule_index(schedule: torch.Tensor, timestep: torch.Tensor, check: bool = True) -> torch.Tensor:
    """The index of each timestep in ``schedule`` (``[T]``, a scheduler's ``timesteps`` in the dtype to compare in),
    by exact equality.

    Args:
        timestep: 0-d or ``[B]`` tensor whose values are entries of ``schedule``.
        check: raise ``ValueError`` naming the schedule if a value is not in it (a host-device sync); without it such
            a value silently gets index 0.
    Returns:
        long tensor of ``timestep``'s shape, on its device.
    """
    schedule = schedule.to(device=timestep.device)
    matches = timestep.to(schedule.dtype).reshape(-1, 1) == schedule.reshape(1, -1)
    if check and not bool(matches.any(dim=1).all()):
        raise ValueError(f"timesteps {timestep.tolist()} are not all in the scheduler's schedule {schedule.tolist()}")
    return matches.int().argmax(dim=1).reshape(timestep.shape)


def host_schedule_index(schedule: list, timestep: float) -> int:
    """:func:`schedule_index` of one Python number in ``scheduler.timesteps.tolist()``, on the host (the sampling
    loop's lookup: no device sync). Always checked."""
    if timestep not in schedule:
        raise ValueError(f"timestep {timestep} is not in the scheduler's schedule {schedule}")
    return schedule.index(timestep)
