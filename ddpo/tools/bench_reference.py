"""The reference mode of ``ddpo bench``: ddpo-pytorch's straightforward Stable Diffusion 1.x/2.x sampling loop,
DDIM step with log-prob, whole-batch decoding and per-sample-minibatch training (:func:`reference_optimise`), written
independently of :mod:`ddpo.policy` so that ``ddpo bench`` (and ``tests/test_bench.py``) can check that ours computes
the same maths faster.

The training side reads only the :class:`~ddpo.training.Trainer`'s public attributes (``config``, ``denoiser``,
``scheduler``, ``negative_cond``, ``estimator``, ``optimizer``, ``params``, ``steps_per_trajectory``) and its
:meth:`~ddpo.training.Trainer.training_pairs`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from ..policy.conditioning import Conditioning
from ..policy.sampling import autocast, uses_cfg


def reference_ddim_step(
    scheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor,
    sample: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM step with log-prob written the ddpo-pytorch way: everything in the dtype of ``model_output``.

    Args:
        model_output: guided UNet output ``[B, C, h, w]`` (its dtype is the compute dtype, as in ddpo-pytorch).
        timestep: 0-d or ``[B]`` long; sample: ``x_t`` ``[B, C, h, w]``; prev_sample: ``x_{t-1}`` to score, or None
            to draw one with ``generator``.
    Returns:
        ``(x_{t-1} [B, C, h, w] float32, log_prob [B])`` with the log-density averaged over latent dimensions.
    """
    dtype, device = model_output.dtype, model_output.device
    shape = (-1,) + (1,) * (sample.ndim - 1)
    timestep = torch.as_tensor(timestep, device=device).long().reshape(-1)
    prev_timestep = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod.to(device)
    alpha_t = alphas[timestep]
    alpha_prev = torch.where(
        prev_timestep >= 0, alphas[prev_timestep.clamp(min=0)], torch.as_tensor(scheduler.final_alpha_cumprod)
    )
    alpha_t = alpha_t.to(dtype).reshape(shape)
    alpha_prev = alpha_prev.to(dtype).reshape(shape)
    sample = sample.to(dtype)
    if scheduler.config.prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - (1 - alpha_t) ** 0.5 * eps) / alpha_t**0.5
    elif scheduler.config.prediction_type == "v_prediction":
        x0 = alpha_t**0.5 * sample - (1 - alpha_t) ** 0.5 * model_output
        eps = alpha_t**0.5 * model_output + (1 - alpha_t) ** 0.5 * sample
    else:
        x0 = model_output
        eps = (sample - alpha_t**0.5 * x0) / (1 - alpha_t) ** 0.5
    if scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        x0 = x0.clamp(-limit, limit)  # epsilon stays the model's, as in DDIMScheduler.step
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance**0.5
    mean = alpha_prev**0.5 * x0 + (1 - alpha_prev - std**2) ** 0.5 * eps
    if prev_sample is None:
        noise = torch.randn(model_output.shape, generator=generator, device=device, dtype=dtype)
        prev_sample = mean + std * noise
    prev_sample = prev_sample.to(dtype)
    log_prob = -((prev_sample.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return prev_sample.float(), log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def reference_guided_output(
    unet,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    embeds: torch.Tensor,
    guidance_scale: float,
    do_cfg: bool,
) -> torch.Tensor:
    """UNet output with CFG as ddpo-pytorch computes it: ``embeds`` is ``cat([negative, prompt])`` ``[2B, L, D]``
    (or ``[B, L, D]`` without CFG), the latents and timesteps are repeated, and the output is split in two."""
    if not do_cfg:
        return unet(latents, timesteps, embeds).sample
    timesteps = torch.cat([timesteps] * 2) if timesteps.ndim == 1 else timesteps
    noise_pred = unet(torch.cat([latents] * 2), timesteps, embeds).sample
    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
    return noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)


def _plain(embeds):
    """The ``[B, L, D]`` text states of a Stable Diffusion 1.x/2.x conditioning (the reference loop's input)."""
    return embeds.embeds if isinstance(embeds, Conditioning) else embeds


@torch.no_grad()
def reference_sample(
    unet,
    scheduler,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    num_steps: int,
    guidance_scale: float,
    eta: float,
    generator: torch.Generator,
    mixed_precision: str = "no",
    latent_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The denoising loop of ddpo-pytorch's ``pipeline_with_logprob``: one UNet call per timestep.

    Draws the same noise as :func:`ddpo.policy.sampling.sample_trajectories` (``x_T`` first, then one draw per step from
    ``generator``), so the same seed gives the same trajectories. ``latent_size``: the side of the latents (the run's
    ``sample.resolution`` over the VAE factor; default the UNet's native ``sample_size``).

    Returns:
        ``latents [B, T + 1, C, h, w]`` float32, ``log_probs [B, T]`` float32, ``timesteps [T]`` long.
    """
    prompt_embeds, negative_embeds = _plain(prompt_embeds), _plain(negative_embeds)
    device, batch = prompt_embeds.device, prompt_embeds.shape[0]
    do_cfg = negative_embeds is not None and uses_cfg(guidance_scale)
    embeds = torch.cat([negative_embeds.expand(batch, -1, -1), prompt_embeds]) if do_cfg else prompt_embeds
    scheduler.set_timesteps(num_steps, device=device)
    size = latent_size or unet.config.sample_size
    shape = (batch, unet.config.in_channels, size, size)
    latents = torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * scheduler.init_noise_sigma
    all_latents, all_log_probs = [latents], []
    for t in scheduler.timesteps:
        latent_model_input = scheduler.scale_model_input(latents, t)
        with autocast(device, mixed_precision):
            noise_pred = reference_guided_output(unet, latent_model_input, t, embeds, guidance_scale, do_cfg)
            latents, log_prob = reference_ddim_step(scheduler, noise_pred, t, latents, eta, generator=generator)
        all_latents.append(latents)
        all_log_probs.append(log_prob.float())
    timesteps = scheduler.timesteps.to(device=device, dtype=torch.long)
    return torch.stack(all_latents, dim=1), torch.stack(all_log_probs, dim=1), timesteps


@torch.no_grad()
def reference_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Decode the whole batch in one VAE call: ``[B, C, h, w]`` -> float32 images ``[B, 3, H, W]`` in ``[0, 1]``."""
    images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


def reference_minibatch_loss(trainer, samples, weights: torch.Tensor, i: torch.Tensor, j: torch.Tensor):
    """Loss and diagnostics of ``N`` pairs (trajectory ``i``, step ``j``, ``[N]`` each) in one UNet call, the
    ddpo-pytorch way: CFG rows from ``cat([negative, prompt])``, and the log-prob in the UNet dtype.
    (No KL-to-base term: :func:`main` refuses ``train.kl_coef > 0`` in the reference mode.)"""
    c, s, t = trainer.config, trainer.config.sample, trainer.config.train
    do_cfg = trainer.negative_cond is not None and uses_cfg(s.guidance_scale)
    embeds = _plain(samples.cond[i])
    if do_cfg:
        embeds = torch.cat([_plain(trainer.negative_cond).expand(len(i), -1, -1), embeds])
    latents, next_latents, timesteps = samples.latents[i, j], samples.latents[i, j + 1], samples.timesteps[j]
    with autocast(latents.device, c.mixed_precision):
        noise_pred = reference_guided_output(trainer.denoiser, latents, timesteps, embeds, s.guidance_scale, do_cfg)
        _, log_prob = reference_ddim_step(trainer.scheduler, noise_pred, timesteps, latents, s.eta, next_latents)
    loss_function = type(trainer.estimator).loss_function  # the run's per-step log-prob loss (ddpo.policy.losses)
    loss, info = loss_function(log_prob.float(), samples.log_probs[i, j], weights[i], t.clip_range)
    info["loss"] = loss.detach()
    return loss, info


def reference_optimise(trainer, epoch: int, samples, weights: torch.Tensor) -> dict[str, float]:
    """Training the straightforward way: the same optimiser steps on the same pairs as ``Trainer.optimise``, but
    each step is computed in UNet calls of ``sample.batch_size`` pairs whose gradients are accumulated.

    Returns the mean loss over optimiser steps, the mean gradient norm and the number of optimiser steps.
    """
    s, t = trainer.config.sample, trainer.config.train
    trainer.denoiser.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # the plain torch optimiser
    num_samples = samples.latents.shape[0]
    pairs = num_samples * trainer.steps_per_trajectory
    step_pairs = t.batch_size * t.gradient_accumulation_steps
    call_pairs = s.batch_size
    max_norm = t.max_grad_norm if t.max_grad_norm > 0 else math.inf
    losses, grad_norms = [], []
    for inner in range(t.num_inner_epochs):
        pair_traj, pair_step = trainer.training_pairs(epoch, inner, num_samples)
        for first in range(0, pairs, step_pairs):
            step_loss = 0.0
            for start in range(first, first + step_pairs, call_pairs):
                stop = min(start + call_pairs, first + step_pairs)
                i, j = pair_traj[start:stop], pair_step[start:stop]
                loss, _ = reference_minibatch_loss(trainer, samples, weights, i, j)
                loss = loss * (stop - start) / step_pairs  # the step's loss is the mean over its pairs
                loss.backward()
                step_loss += loss.item()
            grad_norms.append(float(torch.nn.utils.clip_grad_norm_(trainer.params, max_norm)))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
    return {
        "loss": sum(losses) / len(losses),
        "grad_norm": sum(grad_norms) / len(grad_norms),
        "optimizer_steps": len(losses),
    }


@contextmanager
def plain_denoiser(denoiser):
    """The (unwrapped) UNet as the straightforward way runs it: without ours' ``torch.compile``, channels-last weights
    and gradient checkpointing (restored on exit), so that those options speed up ours only."""
    compiled = getattr(denoiser, "_compiled_call_impl", None)
    channels_last = any(
        p.ndim == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        for p in denoiser.parameters()
    )
    checkpointing = getattr(denoiser, "is_gradient_checkpointing", False)
    denoiser._compiled_call_impl = None
    if channels_last:
        denoiser.to(memory_format=torch.contiguous_format)
    if checkpointing:
        denoiser.disable_gradient_checkpointing()
    try:
        yield denoiser
    finally:
        denoiser._compiled_call_impl = compiled
        if channels_last:
            denoiser.to(memory_format=torch.channels_last)
        if checkpointing:
            denoiser.enable_gradient_checkpointing()
