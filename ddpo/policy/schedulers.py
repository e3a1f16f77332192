"""One reverse-diffusion step with the log-probability of the action it takes.

The policy at state ``(c, t, x_t)`` is the Gaussian ``N(mu_theta(x_t, t, c), sigma_t^2 I)`` over ``x_{t-1}``.
These functions compute ``mu`` and ``sigma`` exactly as diffusers' ``DDIMScheduler.step`` (with ``eta``) and
``DDPMScheduler.step`` do, sample ``x_{t-1}`` (or take a given one) and return its log-density in float32.

Log-probabilities are **averaged over the latent dimensions** (``C * H * W``), not summed, as in the DDPO paper's
code: the PPO clip range (1e-4 in the paper) and the learning rate then do not depend on the latent size. A
summed log-prob is ``log_prob * C * H * W``; the ratio would change by the same factor in the exponent.

Every timestep argument may be a Python int or a ``LongTensor [B]`` (one timestep per sample), so that one denoiser
call can train on (trajectory, timestep) pairs of different timesteps.

The Gaussian primitives (:class:`StepOutput`, :func:`gaussian_log_prob`, the sample-or-score rule) live in
:mod:`.gaussian` and the flow-matching steps (Flow-GRPO's SDE and CPS steps) in :mod:`.flow`; they are re-exported
here, and :data:`STEP_FUNCTIONS` lists every step by its ``sample.scheduler`` name.
"""

from __future__ import annotations

import torch

from .flow import flow_cps_step_with_logprob, flow_sde_step_with_logprob
from .gaussian import StepOutput, finish_step, gaussian_log_prob, host_schedule_index, schedule_index

__all__ = [
    "STEP_FUNCTIONS",
    "StepOutput",
    "ddim_step_with_logprob",
    "ddpm_step_with_logprob",
    "flow_cps_step_with_logprob",
    "flow_sde_step_with_logprob",
    "gaussian_log_prob",
    "predict_x0_eps",
    "previous_timestep",
    "trainable_steps",
]


def _per_sample(values: torch.Tensor, index: torch.Tensor, batch: int) -> torch.Tensor:
    """Gather ``values[index]`` as a float32 ``[B]`` tensor (index a 0-d or ``[B]`` tensor on values' device)."""
    if index.ndim == 0:
        index = index.expand(batch)
    return values[index].to(torch.float32)


def _schedule(scheduler, timestep, batch: int, device: torch.device):
    """``(alphas_cumprod, t, prev_t)`` on ``device``; ``prev_t = t - num_train_timesteps // num_inference_steps``."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    timestep = torch.as_tensor(timestep, device=device).long()
    prev_timestep = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    return alphas_cumprod, timestep, prev_timestep


def previous_timestep(scheduler, timestep: torch.Tensor, check: bool = True) -> torch.Tensor:
    """The timestep after ``timestep`` (0-d or ``[B]`` long) in ``scheduler.timesteps``, -1 after the last one.

    This is ``DDPMScheduler.previous_timestep``: the next entry of the schedule, which equals
    ``t - num_train_timesteps // num_inference_steps`` only for "leading" spacing (trailing and linspace schedules
    are not evenly spaced by that stride). With ``check``, a timestep not in the schedule raises ``ValueError``
    (a host-device sync; training-time recomputation skips it, its timesteps come from the schedule).
    """
    schedule = scheduler.timesteps.to(device=timestep.device, dtype=torch.long)
    following = torch.cat([schedule[1:], schedule.new_full((1,), -1)])
    return following[schedule_index(schedule, timestep, check)]


def _alphas(scheduler, timestep, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``alpha_bar_t`` and ``alpha_bar_prev`` as ``[B]`` float32, with diffusers' DDIM definition of the previous step."""
    alphas_cumprod, timestep, prev_timestep = _schedule(scheduler, timestep, batch, device)
    alpha_t = _per_sample(alphas_cumprod, timestep, batch)
    alpha_prev = _per_sample(alphas_cumprod, prev_timestep.clamp(min=0), batch)
    final = float(scheduler.final_alpha_cumprod)
    is_last = prev_timestep < 0
    if is_last.ndim == 0:
        is_last = is_last.expand(batch)
    alpha_prev = torch.where(is_last, torch.full_like(alpha_prev, final), alpha_prev)
    return alpha_t, alpha_prev


def predict_x0_eps(
    model_output: torch.Tensor, sample: torch.Tensor, alpha_t: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted ``x_0`` and ``epsilon`` (float32, ``[B, C, H, W]`` each) from the model output ``[B, C, H, W]`` at
    ``sample`` ``x_t`` ``[B, C, H, W]``, for epsilon, v and sample prediction; ``alpha_t`` ``[B]`` (or a scalar) is
    the schedule's cumulative ``alpha_bar_t`` (``alphas_cumprod``), as in the DDIM paper's notation."""
    a = alpha_t.view(-1, 1, 1, 1)
    model_output, sample = model_output.float(), sample.float()
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - (1 - a).sqrt() * eps) / a.sqrt()
    elif prediction_type == "v_prediction":
        x0 = a.sqrt() * sample - (1 - a).sqrt() * model_output
        eps = a.sqrt() * model_output + (1 - a).sqrt() * sample
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - a.sqrt() * x0) / (1 - a).sqrt()
    else:
        raise ValueError(f"prediction_type must be epsilon, v_prediction or sample; got {prediction_type!r}")
    return x0, eps


def _check_scheduler(scheduler) -> None:
    if getattr(scheduler.config, "thresholding", False):
        raise ValueError("dynamic thresholding is not supported by the log-prob step; set scheduler thresholding=False")
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before stepping")


def ddim_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    check: bool = True,
) -> StepOutput:
    """DDIM step (Song et al. 2021, eq. 12) with ``eta > 0``, as ``DDIMScheduler.step`` but returning the log-prob.

    Args:
        scheduler: a ``diffusers.DDIMScheduler`` after ``set_timesteps``.
        model_output: the (guided) denoiser output ``[B, C, H, W]`` (any dtype; cast to float32).
        timestep: int or ``LongTensor [B]``.
        sample: ``x_t`` ``[B, C, H, W]``.
        eta: 1.0 gives the DDPM posterior variance.
        prev_sample: ``x_{t-1}`` to score instead of sampling one (training-time recomputation).
        noise: the standard normal noise to use when sampling (``[B, C, H, W]``); else drawn from ``generator``.
        check: raise on a zero-variance step (costs a host-device sync; the sampler checks the schedule once).
    Returns:
        :class:`StepOutput`; ``mean = sqrt(abar_prev) * x0 + sqrt(1 - abar_prev - sigma^2) * eps``,
        ``std = eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))``.
    """
    _check_scheduler(scheduler)
    batch = sample.shape[0]
    alpha_t, alpha_prev = _alphas(scheduler, timestep, batch, sample.device)
    x0, eps = predict_x0_eps(model_output, sample, alpha_t, scheduler.config.prediction_type)
    if scheduler.config.clip_sample:  # as DDIMScheduler.step: eps stays the model's (use_clipped_model_output=False)
        limit = scheduler.config.clip_sample_range
        x0 = x0.clamp(-limit, limit)
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance.clamp(min=0).sqrt()
    direction = (1 - alpha_prev - std**2).clamp(min=0).sqrt().view(-1, 1, 1, 1) * eps
    mean = alpha_prev.sqrt().view(-1, 1, 1, 1) * x0 + direction
    return finish_step(mean, std, prev_sample, noise, generator, check=check)


def ddpm_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    check: bool = True,
) -> StepOutput:
    """DDPM ancestral step (Ho et al. 2020) as ``DDPMScheduler.step`` with ``variance_type="fixed_small"``.

    ``mean = c0 * x0 + ct * x_t`` with the posterior coefficients, ``std = sqrt(beta_tilde)`` where
    ``beta_tilde = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)`` (for strided sampling the
    "beta" is ``1 - abar_t / abar_prev``). ``eta`` is accepted for a uniform signature and must be 1.
    """
    _check_scheduler(scheduler)
    if eta != 1.0:
        raise ValueError(f"the DDPM step has a fixed variance; sample.eta must be 1.0 with scheduler ddpm, got {eta}")
    variance_type = scheduler.config.variance_type
    if variance_type not in ("fixed_small", "fixed_small_log"):
        raise ValueError(f"DDPM variance_type {variance_type!r} is not supported; use fixed_small")
    batch = sample.shape[0]
    alphas_cumprod = scheduler.alphas_cumprod.to(device=sample.device, dtype=torch.float32)
    timestep_t = torch.as_tensor(timestep, device=sample.device).long()
    if isinstance(timestep, int):  # the sampling loop: looked up on the host, no device sync
        schedule = scheduler.timesteps.tolist()
        index = host_schedule_index(schedule, timestep)
        prev_t = torch.tensor(schedule[index + 1] if index + 1 < len(schedule) else -1, device=sample.device)
    else:
        prev_t = previous_timestep(scheduler, timestep_t, check=check)
    alpha_t = _per_sample(alphas_cumprod, timestep_t, batch)
    alpha_prev = _per_sample(alphas_cumprod, prev_t.clamp(min=0), batch)
    is_last = prev_t < 0
    if is_last.ndim == 0:
        is_last = is_last.expand(batch)
    alpha_prev = torch.where(is_last, torch.ones_like(alpha_prev), alpha_prev)
    x0, _ = predict_x0_eps(model_output, sample, alpha_t, scheduler.config.prediction_type)
    if scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        x0 = x0.clamp(-limit, limit)
    beta_t = 1 - alpha_t / alpha_prev
    c0 = alpha_prev.sqrt() * beta_t / (1 - alpha_t)
    ct = (1 - beta_t).sqrt() * (1 - alpha_prev) / (1 - alpha_t)
    mean = c0.view(-1, 1, 1, 1) * x0 + ct.view(-1, 1, 1, 1) * sample.float()
    std = ((1 - alpha_prev) / (1 - alpha_t) * beta_t).clamp(min=0).sqrt()
    # The final DDPM step (to abar = 1) has zero variance: it is deterministic, scored 0 and never trained on.
    return finish_step(mean, std, prev_sample, noise, generator, deterministic=is_last, check=check)


def trainable_steps(scheduler_name: str, num_steps: int) -> int:
    """How many of the ``num_steps`` steps are stochastic (policy) steps.

    All for DDIM and for the flow SDE step (its last step, to ``sigma' = 0``, has ``std = eta sqrt(sigma / (1 -
    sigma)) sqrt(sigma) > 0``); all but the last for DDPM (to ``abar = 1``) and for the flow CPS step (``std =
    sigma' sin(eta pi / 2) = 0`` at ``sigma' = 0``), whose last step is deterministic.
    """
    return num_steps - 1 if scheduler_name in ("ddpm", "flow_cps") else num_steps


STEP_FUNCTIONS = {
    "ddim": ddim_step_with_logprob,
    "ddpm": ddpm_step_with_logprob,
    "flow_sde": flow_sde_step_with_logprob,
    "flow_cps": flow_cps_step_with_logprob,
}
"""Every log-prob step by its ``sample.scheduler`` name; all share ``ddim_step_with_logprob``'s signature."""
