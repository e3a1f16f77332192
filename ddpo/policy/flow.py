"""Flow-matching denoising steps as Gaussian policies (Flow-GRPO), with the log-probability of the action taken.

Flow matching (rectified flow, SD3 / Flux) interpolates data and noise linearly::

    x_sigma = (1 - sigma) x0 + sigma eps,        v = eps - x0      (the model predicts the velocity v)

on the decreasing schedule ``sigma_0 = 1 > sigma_1 > ... > sigma_{N-1} > sigma_N = 0`` of a
``diffusers.FlowMatchEulerDiscreteScheduler`` after ``set_timesteps`` (``scheduler.sigmas``, length ``N + 1``;
``scheduler.timesteps = 1000 sigma`` for its first ``N`` entries). One step goes from ``sigma`` (the current
timestep's entry) to ``sigma' = sigmas[index + 1]``; ``dt = sigma' - sigma < 0``. The deterministic sampler is the
Euler step of the probability-flow ODE, ``x' = x + v dt`` (``FlowMatchEulerDiscreteScheduler.step``).

Flow-GRPO (Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL", arXiv 2505.05470; reference
code ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py`` in github.com/yifan123/flow_grpo) turns the ODE into an
SDE with the same marginals, whose Euler-Maruyama step is a Gaussian policy. With noise level ``a`` (``eta``):

:func:`flow_sde_step_with_logprob` (``sde_type="sde"``)::

    s    = a * sqrt(sigma / (1 - sigma))                      (sigma = 1 in the denominator -> sigmas[1], see below)
    mean = x (1 + s^2 dt / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt
    std  = s * sqrt(-dt)

which is ``x + [v + s^2 / (2 sigma) (x + (1 - sigma) v)] dt``: the reverse SDE's drift, the velocity plus the score
term ``s^2 / 2 * grad log p`` with ``grad log p = -(x + (1 - sigma) v) / sigma`` (``-eps_hat / sigma``). ``a = 0``
is the ODE Euler step exactly. At ``sigma = 1`` (the first step) ``s`` divides by zero; Flow-GRPO replaces ``sigma``
by ``sigma_max = sigmas[1]`` (the second entry of the inference schedule, the first below 1) **in the denominator
only**, ``s = a * sqrt(1 / (1 - sigmas[1]))``, and keeps ``sigma = 1`` in the mean; so does this module. The last
step (``sigma' = 0``) has ``std = s * sqrt(sigma) > 0``: every step of the schedule is a policy step.

:func:`flow_cps_step_with_logprob` (coefficients-preserving sampling, ``sde_type="cps"`` in the same file)::

    std    = sigma' * sin(a * pi / 2)
    x0_hat = x - sigma v,       eps_hat = x + (1 - sigma) v
    mean   = (1 - sigma') x0_hat + sqrt(sigma'^2 - std^2) eps_hat

so that ``x'`` has exactly the coefficients ``(1 - sigma')`` on ``x0_hat`` and ``sigma'`` on noise (the fresh noise
fills the part ``std`` of ``sigma'``). ``0 <= a <= 1``. The last step (``sigma' = 0``) has ``std = 0``: it is
deterministic (``prev_sample = x0_hat``, ``log_prob = 0``) and never trained on. The reference code scores CPS
steps by ``-|x' - mean|^2`` (constants and the ``1 / (2 std^2)`` scale dropped); this module uses the true Gaussian
log-density of :func:`~ddpo.policy.gaussian.gaussian_log_prob` for both variants, so importance ratios, clip
ranges and the KL are on the same footing as for DDIM/DDPM (``train.ratio_form=flow_grpo`` gives the reference's
ratio: the log-ratio times ``2 std^2``).

All maths is float32 whatever the model output's dtype; log-probs are averaged over the latent dimensions
(:mod:`ddpo.policy.gaussian`). Rows whose std is 0 by construction (``eta = 0``, or the last CPS step) are
deterministic: ``prev_sample = mean`` and ``log_prob = 0``, as for DDPM's last step.

KL to the base model: at the same state ``(x, sigma)`` the policy and the reference step have the same ``std`` (it
depends only on the schedule and ``a``), so the KL is ``|mean - ref_mean|^2 / (2 std^2)`` averaged over latent
dims: :func:`ddpo.policy.losses.kl_to_reference` applies unchanged. (Flow-GRPO's training script divides by
``2 s^2``, its ``std_dev_t`` without the ``sqrt(-dt)`` factor: the true KL times ``-dt``, a per-step scale, so the
same ``beta`` weighs its KL ``1 / |dt|`` times less; for CPS its ``std_dev_t`` is the step's std.)

Flow-GRPO's own numbers (``train.kl_form=flow_grpo``, ``train.ratio_form=flow_grpo``): :func:`flow_grpo_kl_scale`
and :func:`flow_grpo_log_ratio_scale` give the per-row factors between the true KL / log-ratio and the reference's,
so a published ``beta`` or ``clip_range`` keeps its meaning.

Timesteps are the schedule's own values: a Python float/int (looked up on the host, no device sync) or a float
tensor ``[B]`` (one timestep per row, looked up by equality against ``scheduler.timesteps``).
"""

from __future__ import annotations

import math

import torch

from .gaussian import StepOutput, finish_step, host_schedule_index, schedule_index


def _check_flow_scheduler(scheduler) -> None:
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before stepping")
    if getattr(scheduler.config, "invert_sigmas", False):
        raise ValueError("invert_sigmas=True (sigma increasing towards the data) is not supported by the flow step")


def flow_step_index(scheduler, timestep: torch.Tensor, check: bool = True) -> torch.Tensor:
    """The index of each timestep (float, 0-d or ``[B]``) in a set ``FlowMatchEulerDiscreteScheduler``'s
    ``timesteps``, compared in float32 (:func:`~ddpo.policy.gaussian.schedule_index`)."""
    return schedule_index(scheduler.timesteps.to(torch.float32), timestep, check)


def _flow_sigmas(
    scheduler, timestep: float | int | torch.Tensor, batch: int, device: torch.device, check: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sigma, sigma_next, is_last)``, each ``[B]`` on ``device``: float32, float32, bool."""
    sigmas = scheduler.sigmas.to(device=device, dtype=torch.float32)
    num_steps = len(scheduler.timesteps)
    if isinstance(timestep, (int, float)):  # the sampling loop: looked up on the host, no device sync
        index = host_schedule_index(scheduler.timesteps.tolist(), timestep)
        sigma, sigma_next = sigmas[index].expand(batch), sigmas[index + 1].expand(batch)
        is_last = torch.full((batch,), index + 1 == num_steps, dtype=torch.bool, device=device)
        return sigma, sigma_next, is_last
    timestep = torch.as_tensor(timestep, device=device)
    if timestep.ndim == 0:
        timestep = timestep.expand(batch)
    if timestep.shape != (batch,):
        raise ValueError(f"timestep must be a scalar or have shape [{batch}]; got {tuple(timestep.shape)}")
    index = flow_step_index(scheduler, timestep, check=check)
    return sigmas[index], sigmas[index + 1], index + 1 == num_steps


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B]`` -> ``[B, 1, ..., 1]`` broadcastable against ``like`` ``[B, ...]``."""
    return values.view(-1, *([1] * (like.ndim - 1)))


def _finish_flow(
    mean: torch.Tensor,
    std: torch.Tensor,
    eta: float,
    is_last: torch.Tensor,
    prev_sample: torch.Tensor | None,
    noise: torch.Tensor | None,
    generator: torch.Generator | None,
    check: bool,
) -> StepOutput:
    """Deterministic rows: every row when ``eta == 0``, else the last step's rows whose std is 0 (CPS)."""
    if eta == 0:
        deterministic = torch.ones_like(std, dtype=torch.bool)
    else:
        deterministic = is_last & (std == 0)
    if check and bool(((std <= 0) & ~deterministic).any()):
        raise ValueError(
            f"a flow-matching step with eta={eta} > 0 has zero variance before the last step (a repeated sigma in "
            "the schedule?), so it has no log-probability"
        )
    return finish_step(mean, std, prev_sample, noise, generator, deterministic=deterministic, check=False)


def flow_sde_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: float | int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 0.7,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    check: bool = True,
) -> StepOutput:
    """Flow-GRPO's SDE step (Euler-Maruyama of the reverse SDE; see the module docstring) with its log-prob.

    Args:
        scheduler: a ``diffusers.FlowMatchEulerDiscreteScheduler`` after ``set_timesteps``.
        model_output: the (guided) velocity prediction ``v`` ``[B, C, H, W]`` (any dtype; cast to float32).
        timestep: a Python float/int or a float tensor ``[B]``, entries of ``scheduler.timesteps``.
        sample: ``x_sigma`` ``[B, C, H, W]``.
        eta: the noise level ``a >= 0``; 0 is the deterministic ODE Euler step (``FlowMatchEulerDiscreteScheduler.step``).
        prev_sample: ``x_{sigma'}`` to score instead of sampling one (training-time recomputation).
        noise: the standard normal noise to use when sampling (``[B, C, H, W]``); else drawn from ``generator``.
        check: raise on timesteps not in the schedule and on zero-variance steps (host-device syncs).
    Returns:
        :class:`~ddpo.policy.gaussian.StepOutput`;
        ``mean = x (1 + s^2 dt / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt``, ``std = s sqrt(-dt)`` with
        ``s = eta sqrt(sigma / (1 - sigma))``, ``sigma = 1`` replaced by ``sigmas[1]`` in the denominator as in
        Flow-GRPO. With ``eta = 0`` every row is deterministic (``log_prob = 0``).
    """
    _check_flow_scheduler(scheduler)
    if eta < 0:
        raise ValueError(f"the flow SDE step needs eta >= 0; got {eta}")
    batch = sample.shape[0]
    x, v = sample.float(), model_output.float()
    sigma, sigma_next, is_last = _flow_sigmas(scheduler, timestep, batch, x.device, check)
    sigma_max = scheduler.sigmas.to(device=x.device, dtype=torch.float32)[1]
    dt = sigma_next - sigma
    denominator_sigma = torch.where(sigma == 1, sigma_max, sigma)
    s = eta * torch.sqrt(sigma / (1 - denominator_sigma))
    x_coefficient = 1 + s**2 * dt / (2 * sigma)
    v_coefficient = (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
    mean = x * _per_row(x_coefficient, x) + v * _per_row(v_coefficient, x)
    std = s * torch.sqrt(-dt)
    return _finish_flow(mean, std, eta, is_last, prev_sample, noise, generator, check)


def flow_cps_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: float | int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 0.7,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    check: bool = True,
) -> StepOutput:
    """Flow-GRPO's coefficients-preserving (CPS) step (see the module docstring) with its Gaussian log-prob.

    Args:
        scheduler: a ``diffusers.FlowMatchEulerDiscreteScheduler`` after ``set_timesteps``.
        model_output: the (guided) velocity prediction ``v`` ``[B, C, H, W]`` (any dtype; cast to float32).
        timestep: a Python float/int or a float tensor ``[B]``, entries of ``scheduler.timesteps``.
        sample: ``x_sigma`` ``[B, C, H, W]``.
        eta: the noise level ``0 <= a <= 1``: ``std = sigma' sin(a pi / 2)``.
        prev_sample, noise, generator, check: as for :func:`flow_sde_step_with_logprob`.
    Returns:
        :class:`~ddpo.policy.gaussian.StepOutput`;
        ``mean = (1 - sigma') (x - sigma v) + sqrt(sigma'^2 - std^2) (x + (1 - sigma) v)``. The log-prob is the true
        Gaussian log-density (the reference code's ``-|x' - mean|^2`` drops its scale and constants). The last step
        (``sigma' = 0``, ``std = 0``) and every step with ``eta = 0`` are deterministic (``log_prob = 0``).
    """
    _check_flow_scheduler(scheduler)
    if not 0 <= eta <= 1:
        raise ValueError(f"the flow CPS step needs 0 <= eta <= 1; got {eta}")
    batch = sample.shape[0]
    x, v = sample.float(), model_output.float()
    sigma, sigma_next, is_last = _flow_sigmas(scheduler, timestep, batch, x.device, check)
    std = sigma_next * math.sin(eta * math.pi / 2)
    x0_hat = x - _per_row(sigma, x) * v
    eps_hat = x + _per_row(1 - sigma, x) * v
    noise_coefficient = (sigma_next**2 - std**2).clamp(min=0).sqrt()
    mean = x0_hat * _per_row(1 - sigma_next, x) + eps_hat * _per_row(noise_coefficient, x)
    return _finish_flow(mean, std, eta, is_last, prev_sample, noise, generator, check)


def flow_grpo_kl_scale(scheduler, scheduler_name: str, timestep: torch.Tensor) -> torch.Tensor:
    """Per-row factor that turns the true KL of a flow step (:func:`~ddpo.policy.losses.kl_to_reference`) into
    Flow-GRPO's (``train.kl_form=flow_grpo``), ``[B]`` float32.

    Flow-GRPO's training scripts compute ``|mean - ref_mean|^2 / (2 std_dev_t^2)`` with the ``std_dev_t`` of
    ``sde_step_with_logprob``. For ``flow_sde`` that is ``s``, the step's std without its ``sqrt(-dt)``: the true KL
    times ``-dt = sigma - sigma'``. For ``flow_cps`` it is the step's std itself: the true KL (factor 1).
    """
    if scheduler_name not in ("flow_sde", "flow_cps"):
        raise ValueError(f"Flow-GRPO's KL is defined for flow_sde and flow_cps steps; got {scheduler_name!r}")
    batch = timestep.shape[0]
    sigma, sigma_next, _ = _flow_sigmas(scheduler, timestep, batch, timestep.device, check=False)
    return sigma - sigma_next if scheduler_name == "flow_sde" else torch.ones_like(sigma)


def flow_grpo_log_ratio_scale(scheduler_name: str, std: torch.Tensor) -> torch.Tensor:
    """Per-row factor that turns the true Gaussian log-ratio of a flow step into Flow-GRPO's
    (``train.ratio_form=flow_grpo``), ``[B]`` float32.

    For ``flow_cps`` Flow-GRPO scores ``x'`` by ``-mean |x' - mean|^2`` (constants and ``1 / (2 std^2)`` dropped);
    the policy's and the old policy's step share ``std`` (a function of the schedule), so its log-ratio is the true
    one times ``2 std^2``. For ``flow_sde`` it uses the Gaussian log-density: factor 1.
    """
    if scheduler_name == "flow_cps":
        return 2 * std.float() ** 2
    if scheduler_name == "flow_sde":
        return torch.ones_like(std, dtype=torch.float32)
    raise ValueError(f"Flow-GRPO's ratio is defined for flow_sde and flow_cps steps; got {scheduler_name!r}")
