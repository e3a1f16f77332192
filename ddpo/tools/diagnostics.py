"""Diagnostics of why a reward does or does not move, in one place.

* :func:`reward_spread`: how much of a reward's variance lies within a prompt's samples (what group advantages
  learn from);
* :func:`gradient_noise_scale`: how many samples the policy gradient needs (McCandlish et al. 2018), from the
  per-sample terms of :func:`log_prob_gradients`;
* :func:`score_scales`: how strongly each denoising step's log-prob responds to the model output;
* :func:`paired_change`: the mean and standard error of a paired before/after difference (the end-of-run summary's).

The scripts in ``scripts/diagnostics/`` print tables of these on a run's configuration.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..policy.sampling import SamplerSettings, Trajectories, recompute_pairs
from ..policy.schedulers import STEP_FUNCTIONS
from ..training.evaluation import paired_change

__all__ = ["gradient_noise_scale", "log_prob_gradients", "paired_change", "reward_spread", "score_scales"]


def reward_spread(values: Any) -> dict[str, float]:
    """How a reward (or one of its checks) varies over a grid of samples: ``[P, S]`` values, ``P`` prompts x ``S``
    noise seeds each.

    Group advantages (``group``, ``group_center``) learn only from the spread *within* a prompt's samples, so a
    reward whose variance is mostly between prompts, or a check that a prompt always or never passes, gives DDPO little
    to work with. Returns ``mean``; ``within_var`` (mean over prompts of the population variance across seeds);
    ``within_share`` (``within_var`` over the population variance of all values; 0 when all values are equal);
    ``tied`` (fraction of prompts whose ``S`` values are all equal); ``never`` and ``always`` (fraction of prompts
    whose values are all 0 / all 1, for pass-fail checks in ``[0, 1]``).
    """
    grid = np.asarray(values, dtype=np.float64)
    if grid.ndim != 2 or grid.shape[1] < 2:
        raise ValueError(f"reward_spread needs a [prompts, seeds] grid with at least 2 seeds; got shape {grid.shape}")
    total = grid.var()
    return {
        "mean": float(grid.mean()),
        "within_var": float(grid.var(axis=1).mean()),
        "within_share": float(grid.var(axis=1).mean() / total) if total > 0 else 0.0,
        "tied": float((grid.max(axis=1) == grid.min(axis=1)).mean()),
        "never": float((grid == 0).all(axis=1).mean()),
        "always": float((grid == 1).all(axis=1).mean()),
    }


def gradient_noise_scale(terms: Any, draws: int = 0, seed: int = 0) -> dict[str, float]:
    """The gradient noise scale of a stochastic gradient from ``[N, P]`` per-sample terms ``v_i`` whose mean is the
    gradient estimate (McCandlish et al. 2018, "An empirical model of large-batch training").

    Returns ``g2``, the unbiased squared norm of the true gradient, ``|mean v|^2 - trace / N``; ``trace``, the total
    variance of one term, ``sum_p var(v_p)`` (ddof 1); ``b_noise = trace / g2``, the batch at which the estimate's
    noise equals its signal (``inf`` when ``g2 <= 0``: no signal detected at this ``N``). With ``draws > 0`` also
    ``g2_upper``, the 95th percentile of ``g2`` over ``draws`` bootstrap resamples of the ``N`` terms, and
    ``b_noise_lower = trace / g2_upper``: with ~95 % confidence the true noise scale is at least this (``inf`` when
    even ``g2_upper <= 0``).
    """
    terms = torch.as_tensor(terms, dtype=torch.float64)
    if terms.ndim != 2 or terms.shape[0] < 2:
        raise ValueError(f"gradient_noise_scale needs [N, P] terms with N >= 2; got shape {tuple(terms.shape)}")
    n = terms.shape[0]
    square_norms = (terms**2).sum(1)

    def estimate(weights: torch.Tensor) -> tuple[float, float]:
        """``(g2, trace)`` of the sample that holds term ``i`` ``weights[i]`` times (``sum(weights) = n``)."""
        mean = weights @ terms / n
        trace = ((weights * square_norms).sum() - n * (mean**2).sum()).item() / (n - 1)
        return (mean**2).sum().item() - trace / n, trace

    g2, trace = estimate(torch.ones(n, dtype=torch.float64))
    out = {"g2": g2, "trace": trace, "b_noise": trace / g2 if g2 > 0 else math.inf}
    if draws > 0:
        generator = torch.Generator().manual_seed(seed)
        boot = []
        for _ in range(draws):
            index = torch.randint(n, (n,), generator=generator)
            boot.append(estimate(torch.bincount(index, minlength=n).double())[0])
        upper = float(np.quantile(boot, 0.95))
        out["g2_upper"] = upper
        out["b_noise_lower"] = trace / upper if upper > 0 else math.inf
    return out


def score_scales(scheduler, scheduler_name: str, num_steps: int, eta: float = 1.0) -> torch.Tensor:
    """How strongly each step's log-prob responds to the model output: ``|d mean / d model_output| / std`` per step,
    ``[num_steps]`` float32 in sampling order (0 for a deterministic step).

    The score of a step is ``d log pi / d theta = (x_{t-1} - mean) / std^2 * d mean / d theta``, with
    ``x_{t-1} - mean = std * noise``: its size is this scale times the model's Jacobian, so a step whose scale is
    large (a small ``std`` but a mean that still moves with the model output, such as the second-last step of a
    10-step DDIM schedule that starts at ``t = 901``) dominates the policy gradient's norm and its variance.
    ``train.timestep_window`` leaves the last steps out. Calls ``scheduler.set_timesteps(num_steps)``.
    """
    step = STEP_FUNCTIONS[scheduler_name]
    scheduler.set_timesteps(num_steps)
    scales = []
    for t in scheduler.timesteps.tolist():
        output = torch.zeros(1, 1, 1, 1, requires_grad=True)
        zeros = torch.zeros(1, 1, 1, 1)
        out = step(scheduler, output, t, zeros, eta=eta, prev_sample=zeros, check=False)
        (slope,) = torch.autograd.grad(out.mean.sum(), output)
        std = out.std.detach()
        scales.append(torch.where(std > 0, slope.abs().flatten() / std.clamp(min=1e-30), torch.zeros_like(std)))
    return torch.cat(scales)


def log_prob_gradients(
    denoiser,
    scheduler,
    trajectories: Trajectories,
    params: list[torch.Tensor],
    settings: SamplerSettings,
) -> torch.Tensor:
    """``[B, T, P]``: the gradient of each sample's log-prob at each step with respect to the ``P`` weights ``params``
    (one ``denoiser`` call per (sample, step), through :func:`~ddpo.policy.sampling.recompute_pairs`: a bound
    :data:`~ddpo.policy.sampling.Denoiser` or a bare Stable Diffusion UNet): the per-sample terms of
    :func:`gradient_noise_scale`."""
    batch, steps = trajectories.log_probs.shape
    grads = torch.zeros(batch, steps, sum(p.numel() for p in params))
    for i in range(batch):
        for j in range(steps):
            out = recompute_pairs(denoiser, scheduler, trajectories, torch.tensor([i]), torch.tensor([j]), settings)
            grads[i, j] = torch.cat([g.flatten() for g in torch.autograd.grad(out.log_prob.sum(), params)])
    return grads
