"""Forward-process estimators: a weighted denoising loss on the policy's own clean samples, no per-step log-probs.

A sample's clean latent ``x0`` (from any sampler, deterministic allowed) is re-noised at a timestep ``t`` of a
DDPM-style schedule with fresh noise ``eps ~ N(0, I)``::

    x_t = alpha_t x0 + sigma_t eps,        alpha_t = sqrt(abar_t),  sigma_t = sqrt(1 - abar_t)

and the denoiser's output at ``(x_t, t, c)`` is mapped to a prediction of ``x0`` and of ``eps`` whatever the model
predicts (:func:`ddpo.policy.schedulers.predict_x0_eps`):

* epsilon prediction ``e``: ``eps_hat = e``, ``x0_hat = (x_t - sigma_t e) / alpha_t``;
* v prediction ``v`` (``v = alpha_t eps - sigma_t x0``): ``x0_hat = alpha_t x_t - sigma_t v``,
  ``eps_hat = sigma_t x_t + alpha_t v``;
* sample prediction ``s``: ``x0_hat = s``, ``eps_hat = (x_t - alpha_t s) / sigma_t``.

For a fixed ``x_t`` these maps are affine and invertible, so two models that make the same ``x0`` prediction make
the same ``eps`` prediction and every loss below is the same for epsilon- and v-prediction models that are
equivalent. (For flow matching, ``x_t = (1 - t) x0 + t eps`` and ``x0_hat = x_t - t v_hat``, the papers' setting.)

Flow matching (a ``FlowMatchEulerDiscreteScheduler`` model predicting the velocity ``v = eps - x0``) has its own
pure functions: :func:`flow_sigmas` (``sigma`` of each schedule timestep), :func:`flow_add_noise`
(``x_t = (1 - sigma) x0 + sigma eps``) and :func:`flow_predictions` (``x0_hat = x_t - sigma v``,
``eps_hat = x_t + (1 - sigma) v``); the losses below take their ``x0_hat`` / ``eps_hat`` unchanged.

Losses (each returns ``(loss, info)`` with detached diagnostics; per-sample tensors are ``[N]``, latents
``[N, C, h, w]``, means are over the latent dimensions as for the log-probs):

* :func:`awm_loss`, Advantage Weighted Matching (Xue et al. 2025, arXiv 2509.25050): the model's own pretraining loss
  weighted by the advantage, ``mean_i A_i |pred_i - target_i|^2``, in the space the model was pretrained in
  (:func:`matching_target`): the velocity ``eps - x0`` of a flow-matching model (the paper's flow-matching loss;
  in epsilon space it would be weighted by ``(1 - sigma)^2`` and vanish at ``sigma = 1``), the noise of an
  epsilon-prediction UNet (DDPM's ``L_simple``), ``v`` of a v-prediction UNet, ``x0`` of a sample-prediction one. It
  is the paper's surrogate at ratio 1 (one update per batch of pairs). Its stabiliser is an optional proximal term to
  the old (EMA) policy, ``train.awm_ema_kl * mean |pred - pred_old|^2`` in the same space (Flow-Factory's
  ``ema_kl_beta``): with ``awm_ema_kl >= adv_clip_max`` every pair's loss ``A |pred - target|^2 + c |pred -
  pred_old|^2`` is a convex quadratic in the prediction (``A + c > 0``), so a negative advantage can no longer push
  the prediction away without bound.
* :func:`nft_loss`, DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117): implicit positive and negative policies
  ``x0+ = b x0_theta + (1 - b) x0_old`` and ``x0- = (1 + b) x0_old - b x0_theta`` (the old policy an EMA of the
  trained weights, which also collects the samples, as in the reference implementation),
  ``r = clip(A, -A_max, A_max) / (2 A_max) + 1/2``, adaptive weights ``w = mean|x0_hat - x0|`` (detached), loss
  ``A_max * mean_i [r |x0+ - x0|^2 / w+ + (1 - r) |x0- - x0|^2 / w-] / b``.
* :func:`prediction_kl`: ``mean |pred - pred_ref|^2`` in the model's pretraining space (velocity for flow matching,
  noise for an epsilon UNet), the KL to the base model as DiffusionNFT regularises it (up to a per-timestep constant).
"""

from __future__ import annotations

import torch

from .flow import flow_step_index
from .schedulers import predict_x0_eps


def alpha_bar(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """``abar_t`` ``[N]`` float32 for integer ``timesteps`` ``[N]`` of a DDPM-style schedule."""
    return alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps.long()]


def add_noise(x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """``x_t = sqrt(abar) x0 + sqrt(1 - abar) noise`` ``[N, C, h, w]`` float32 (a DDPM-style schedule): ``x0`` and
    ``noise`` ``[N, C, h, w]``, ``abar`` ``[N]`` the ``alpha_bar_t`` of each row (:func:`alpha_bar`); a flow-matching
    model re-noises with :func:`flow_add_noise` instead."""
    a = abar.float().view(-1, *([1] * (x0.ndim - 1)))
    return a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()


def predictions(
    model_output: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0_hat, eps_hat)`` float32 ``[N, C, h, w]`` each from a DDPM-style denoiser's output ``[N, C, h, w]`` of any
    prediction type (see the module docstring) at ``x_t`` ``[N, C, h, w]``; ``abar`` ``[N]`` is ``alpha_bar_t``
    (:func:`alpha_bar`). A flow-matching model's velocity goes through :func:`flow_predictions` instead."""
    return predict_x0_eps(model_output, x_t, abar, prediction_type)


def flow_sigmas(scheduler, timesteps: torch.Tensor, check: bool = True) -> torch.Tensor:
    """``sigma`` ``[N]`` float32 of each timestep of a flow-matching schedule.

    Args:
        scheduler: a ``FlowMatchEulerDiscreteScheduler`` after ``set_timesteps``.
        timesteps: float ``[N]``, entries of ``scheduler.timesteps`` (looked up by exact equality).
        check: raise ``ValueError`` if a value is not in the schedule (a host-device sync).
    Returns:
        ``scheduler.sigmas[index]`` ``[N]`` float32 on ``timesteps``' device.
    """
    index = flow_step_index(scheduler, timesteps, check=check)
    return scheduler.sigmas.to(device=timesteps.device, dtype=torch.float32)[index]


def flow_add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - sigma) x0 + sigma noise``: ``[N, C, h, w]``, ``[N, C, h, w]``, ``[N]`` -> float32."""
    s = sigma.float().view(-1, *([1] * (x0.ndim - 1)))
    return (1 - s) * x0.float() + s * noise.float()


def flow_predictions(v: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0_hat, eps_hat)`` float32 from a velocity prediction ``v = eps - x0``.

    Args:
        v: ``[N, C, h, w]``, the model output (any dtype).
        x_t: ``[N, C, h, w]``, ``(1 - sigma) x0 + sigma eps``.
        sigma: ``[N]``.
    Returns:
        ``x0_hat = x_t - sigma v`` and ``eps_hat = x_t + (1 - sigma) v``, each ``[N, C, h, w]``.
    """
    s = sigma.float().view(-1, *([1] * (x_t.ndim - 1)))
    v, x_t = v.float(), x_t.float()
    return x_t - s * v, x_t + (1 - s) * v


def _mean_over_latents(values: torch.Tensor) -> torch.Tensor:
    return values.mean(dim=tuple(range(1, values.ndim)))


def matching_target(x0: torch.Tensor, noise: torch.Tensor, noise_level: torch.Tensor, space: str) -> torch.Tensor:
    """The regression target ``[N, C, h, w]`` float32 of a model's pretraining loss at ``x_t`` made from ``x0`` and
    ``noise``.

    Args:
        x0: clean latents ``[N, C, h, w]``.
        noise: the noise that made ``x_t`` ``[N, C, h, w]``.
        noise_level: ``[N]``, the level ``x_t`` was noised at, whatever the family: ``alpha_bar_t`` of a DDPM-style
            schedule (:func:`add_noise`), or ``sigma`` of a flow-matching one (:func:`flow_add_noise`). Only
            ``v_prediction`` reads it (as ``alpha_bar_t``); the other targets do not depend on it.
        space: ``flow`` (target ``noise - x0``, the velocity), ``epsilon`` (``noise``), ``v_prediction``
            (``sqrt(abar) noise - sqrt(1 - abar) x0`` with ``abar = noise_level``) or ``sample`` (``x0``): the model's
            prediction type.
    """
    x0, noise = x0.float(), noise.float()
    if space == "flow":
        return noise - x0
    if space == "epsilon":
        return noise
    if space == "sample":
        return x0
    if space == "v_prediction":
        abar = noise_level.float().view(-1, *([1] * (x0.ndim - 1)))  # a DDPM-style schedule's alpha_bar_t
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0
    raise ValueError(f"unknown prediction space {space!r}: expected flow, epsilon, v_prediction or sample")


def awm_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    advantages: torch.Tensor,
    prediction_old: torch.Tensor | None = None,
    ema_kl: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Advantage Weighted Matching: ``mean_i A_i * mean_latents (pred_i - target_i)^2``, plus the proximal term
    ``ema_kl * mean_i mean_latents (pred_i - pred_old_i)^2`` when ``ema_kl > 0``.

    Args:
        prediction: the policy's raw output ``[N, C, h, w]`` (differentiable): velocity, noise, v or x0.
        target: its pretraining target at the same ``x_t`` (:func:`matching_target`) ``[N, C, h, w]``.
        advantages: ``[N]``, the (clipped) advantage of each pair's sample.
        prediction_old: the old (EMA) policy's output at the same input (no gradient taken); needed when
            ``ema_kl > 0``.
        ema_kl: weight of the proximal term (``train.awm_ema_kl``; 0 disables it).
    """
    prediction = prediction.float()
    mse = _mean_over_latents((prediction - target.float()) ** 2)
    loss = (advantages.float() * mse).mean()
    info = {"denoising_mse": mse.detach().mean(), "weight_mean": advantages.detach().float().mean()}
    if ema_kl > 0:
        if prediction_old is None:
            raise ValueError("awm_loss: ema_kl > 0 needs the old policy's prediction (prediction_old)")
        proximal = _mean_over_latents((prediction - prediction_old.detach().float()) ** 2).mean()
        loss = loss + ema_kl * proximal
        info["ema_kl"] = proximal.detach()
    return loss, info


def nft_loss(
    x0_pred: torch.Tensor,
    x0_old: torch.Tensor,
    x0: torch.Tensor,
    advantages: torch.Tensor,
    beta: float,
    adv_clip_max: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DiffusionNFT's loss on ``N`` pairs (see the module docstring).

    Args:
        x0_pred: the trained policy's ``x0`` prediction ``[N, C, h, w]`` (differentiable).
        x0_old: the old (EMA) policy's ``x0`` prediction at the same ``(x_t, t, c)`` (no gradient taken).
        x0: the clean sample ``[N, C, h, w]``.
        advantages: ``[N]``; clipped to ``[-adv_clip_max, adv_clip_max]`` and mapped to ``r`` in ``[0, 1]``.
        beta: ``b > 0``, how far the implicit policies sit from the old one.
        adv_clip_max: ``A_max``; the loss is scaled by it, as in the reference implementation.
    """
    if beta <= 0:
        raise ValueError(f"train.nft_beta must be > 0; got {beta}")
    x0_pred, x0_old, x0 = x0_pred.float(), x0_old.detach().float(), x0.float()
    r = (advantages.float().clamp(-adv_clip_max, adv_clip_max) / adv_clip_max / 2 + 0.5).clamp(0, 1)
    positive = beta * x0_pred + (1 - beta) * x0_old
    negative = (1 + beta) * x0_old - beta * x0_pred

    def adaptive_mse(prediction: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            weight = _mean_over_latents((prediction.double() - x0.double()).abs()).clamp(min=1e-5).float()
        return _mean_over_latents((prediction - x0) ** 2) / weight

    per_pair = (r * adaptive_mse(positive) + (1 - r) * adaptive_mse(negative)) / beta
    loss = adv_clip_max * per_pair.mean()
    old_deviation = _mean_over_latents((x0_pred.detach() - x0_old) ** 2).mean()
    return loss, {"nft_r_mean": r.mean().detach(), "old_deviation": old_deviation}


def prediction_kl(prediction: torch.Tensor, prediction_ref: torch.Tensor) -> torch.Tensor:
    """``[N]``: ``mean_latents (pred - pred_ref)^2``, the squared distance of the policy's raw output to the base
    model's at the same input, in the model's pretraining space (velocity for flow matching, noise for an epsilon
    UNet): DiffusionNFT's KL term up to a per-timestep constant."""
    return _mean_over_latents((prediction.float() - prediction_ref.detach().float()) ** 2)


def old_policy_decay(step: int, flat: int, uprate: float, uphold: float) -> float:
    """DiffusionNFT's schedule of the old policy's EMA decay after ``step`` optimiser steps: 0 for the first ``flat``
    steps (the old policy is the current one), then ``min((step - flat) * uprate, uphold)``. The old weights are
    updated once per epoch as ``old = d * old + (1 - d) * current``."""
    if step < flat:
        return 0.0
    return min((step - flat) * uprate, uphold)


@torch.no_grad()
def ema_update(old: list[torch.Tensor], current: list[torch.Tensor], decay: float) -> None:
    """In place: ``old = decay * old + (1 - decay) * current`` for each pair of tensors."""
    for target, source in zip(old, current, strict=True):
        target.mul_(decay).add_(source.detach().to(target.dtype), alpha=1 - decay)
