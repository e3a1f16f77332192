"""Reward backpropagation: the gradient of a differentiable reward of the decoded image, back through the VAE and the
last sampling steps into the denoiser's weights (DRaFT, AlignProp).

The chain is the policy's own sampler (:func:`sample_with_reward_gradient`): the same CFG call, the same step
functions (:data:`~ddpo.policy.schedulers.STEP_FUNCTIONS`; ``flow_euler`` is the flow SDE step with noise level 0),
the same random draws from one generator, so with the same seed its ``x_0`` is the one
:func:`~ddpo.policy.sampling.sample_trajectories` samples. Only the denoiser calls of the gradient steps (the last
``K``) build a graph; earlier steps run without gradient, so the earlier latents do not depend on the weights and the
gradient is exactly that of the truncated chain:

* DRaFT-K (Clark et al., "Directly Fine-Tuning Diffusion Models on Differentiable Rewards", ICLR 2024): the last
  ``K`` steps (:func:`draft_first_gradient_step`); ``K`` = all steps is full DRaFT.
* AlignProp (Prabhudesai et al. 2023, "Aligning Text-to-Image Diffusion Models with Reward Backpropagation",
  arXiv 2310.03739): randomised truncation, ``K`` drawn uniformly from ``[k_min, k_max]`` for each batch
  (:func:`alignprop_first_gradient_step`). (The reference code draws the threshold anew at every step of the loop,
  ``random.randint`` inside ``for i, t in enumerate(timesteps)``; the paper describes one ``K`` per update, which is
  what this module does.)
* DRaFT-LV (the same DRaFT paper, ``K = 1``): the clean sample ``x_0`` is sampled without gradient, re-noised
  ``n`` times to the noise level of the last step (:func:`renoise_to_last_step`, ``n = 2`` in the paper), and the
  last step is taken from each with gradient; the reward gradient is averaged over the ``n`` results.

Each gradient step's denoiser call can run under ``torch.utils.checkpoint`` (``checkpoint=True``): only its input
latents are kept and its activations are recomputed in the backward pass, so memory grows by one latent per step,
not one denoiser's activations per step.

Over-optimisation: :func:`reward_backprop_loss` clamps each sample's reward at ``clip_max`` before the mean (a sample
above it gives no gradient), and the chain returns the squared distance of the policy's guided output to the base
model's at each gradient step (:func:`~ddpo.policy.forward.prediction_kl`, averaged over the gradient steps), for a KL
penalty ``train.kl_coef``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from .conditioning import Conditioning
from .forward import add_noise, alpha_bar, flow_add_noise, flow_sigmas, prediction_kl
from .sampling import SamplerSettings, as_denoiser, autocast, guided_model_output, initial_noise, set_timesteps
from .schedulers import STEP_FUNCTIONS

DIFFERENTIABLE_SAMPLERS = ("ddim", "ddpm", "flow_sde", "flow_cps", "flow_euler")
"""Samplers whose step is a differentiable function of the model output and the latents: the log-prob steps and
``flow_euler`` (the flow SDE step with noise level 0, the probability-flow ODE's Euler step)."""

ReferenceOutput = Callable[[torch.Tensor, float | int, Conditioning | torch.Tensor], torch.Tensor]
"""``reference(latents [B, C, h, w], t, cond) -> guided output [B, C, h, w]`` of the frozen base model, no gradient."""


def draft_first_gradient_step(num_steps: int, k: int) -> int:
    """DRaFT-K: the index of the first of the last ``k`` steps of ``num_steps`` (``1 <= k <= num_steps``), the first
    step whose denoiser call carries gradients."""
    if not 1 <= k <= num_steps:
        raise ValueError(f"K must be in [1, {num_steps}] (the sampling steps); got {k}")
    return num_steps - k


def alignprop_first_gradient_step(num_steps: int, k_min: int, k_max: int, generator: torch.Generator) -> int:
    """AlignProp's randomised truncation: ``K`` uniform on ``{k_min, ..., k_max}`` (one draw of ``generator``), the
    index of the first of the last ``K`` steps (:func:`draft_first_gradient_step`)."""
    if not 1 <= k_min <= k_max <= num_steps:
        raise ValueError(f"need 1 <= k_min <= k_max <= {num_steps} (the sampling steps); got [{k_min}, {k_max}]")
    k = int(torch.randint(k_min, k_max + 1, (1,), generator=generator).item())
    return draft_first_gradient_step(num_steps, k)


def reward_backprop_loss(rewards: torch.Tensor, clip_max: float | None = None) -> torch.Tensor:
    """``-mean_i min(r_i, clip_max)``: the loss whose gradient ascends the mean reward ``rewards`` ``[B]``; with
    ``clip_max``, a sample whose reward is above it gives no gradient (None: no clamp)."""
    if clip_max is not None:
        rewards = rewards.clamp(max=clip_max)
    return -rewards.float().mean()


def chain_step(sampler: str) -> tuple[Callable, bool]:
    """``(step function, deterministic)`` of a differentiable sampler (:data:`DIFFERENTIABLE_SAMPLERS`):
    ``flow_euler`` is the flow SDE step with noise level 0."""
    if sampler == "flow_euler":
        return STEP_FUNCTIONS["flow_sde"], True
    if sampler not in STEP_FUNCTIONS:
        raise ValueError(
            f"sampler {sampler!r} has no differentiable step; use one of {', '.join(DIFFERENTIABLE_SAMPLERS)}"
        )
    return STEP_FUNCTIONS[sampler], False


def denoise_step(
    denoiser,
    scheduler,
    latents: torch.Tensor,
    t: float | int,
    index: int,
    cond: Conditioning | torch.Tensor,
    negative_cond: Conditioning | torch.Tensor | None,
    settings: SamplerSettings,
    generator: torch.Generator,
    grad: bool,
    checkpoint: bool = False,
    reference: ReferenceOutput | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step of the chain from ``x_t`` ``latents`` ``[B, C, h, w]`` at timestep ``t`` (step ``index`` of the
    schedule): ``(x_{t-1} [B, C, h, w] float32, kl [B] or None)``.

    With ``grad`` the guided denoiser call builds a graph (under ``torch.utils.checkpoint`` with ``checkpoint``), and
    with a ``reference`` the squared distance of the guided output to the base model's (:func:`prediction_kl`) is
    returned; without, the call runs under ``no_grad``. The step's noise comes from ``generator`` as in sampling."""
    step, deterministic = chain_step(settings.scheduler)
    eta = 0.0 if deterministic else settings.step_eta(index)
    device = latents.device

    def guided(x: torch.Tensor) -> torch.Tensor:
        with autocast(device, settings.mixed_precision):
            return guided_model_output(denoiser, x, t, cond, negative_cond, settings.guidance_scale)

    kl = None
    if not grad:
        with torch.no_grad():
            output = guided(latents)
    else:
        if reference is not None:  # before the policy's call: the base model may be the policy with adapters off
            with torch.no_grad():
                output_ref = reference(latents, t, cond)
        output = activation_checkpoint(guided, latents, use_reentrant=False) if checkpoint else guided(latents)
        if reference is not None:
            kl = prediction_kl(output, output_ref)
    out = step(scheduler, output, t, latents, eta=eta, generator=generator, check=False)
    return out.prev_sample, kl


@dataclass
class ChainOutput:
    """The end of a chain with reward gradients.

    Attributes:
        latents: ``x_0`` ``[B, C, h, w]`` float32, differentiable w.r.t. the weights through the gradient steps.
        kl: ``[B]`` the mean over the gradient steps of :func:`~ddpo.policy.forward.prediction_kl` of the guided
            output to the base model's (None without a reference).
        gradient_steps: how many steps carried gradients (``K``).
    """

    latents: torch.Tensor
    kl: torch.Tensor | None
    gradient_steps: int


def sample_with_reward_gradient(
    denoiser,
    scheduler,
    cond: Conditioning | torch.Tensor,
    negative_cond: Conditioning | torch.Tensor | None,
    prompts: list[str],
    generator: torch.Generator,
    settings: SamplerSettings,
    first_gradient_step: int,
    checkpoint: bool = False,
    reference: ReferenceOutput | None = None,
) -> ChainOutput:
    """Sample ``B = len(prompts)`` clean latents from ``x_T ~ N(0, I)`` (``generator``: ``x_T`` and every step's
    noise, drawn as :func:`~ddpo.policy.sampling.sample_trajectories` draws them), the steps from
    ``first_gradient_step`` on with gradients (:func:`denoise_step`).

    Args:
        denoiser: a :data:`~ddpo.policy.sampling.Denoiser` bound by its family (the trained model), or a bare SD UNet.
        cond: the prompts' conditioning ``[B, ...]``; negative_cond: the negative prompt's ``[1, ...]`` (None: no CFG).
        settings: the run's sampler settings (a :data:`DIFFERENTIABLE_SAMPLERS` sampler, CFG, eta, autocast).
        first_gradient_step: ``0 <= first_gradient_step <= num_steps`` (``num_steps``: no gradient at all, e.g. the
            clean sample of DRaFT-LV).
        checkpoint: recompute each gradient step's denoiser activations in the backward pass.
        reference: the base model's guided output (no gradient), for the KL at the gradient steps.
    """
    if not 0 <= first_gradient_step <= settings.num_steps:
        raise ValueError(f"first_gradient_step must be in [0, {settings.num_steps}]; got {first_gradient_step}")
    device = cond.device
    set_timesteps(scheduler, settings)
    module = denoiser if isinstance(denoiser, torch.nn.Module) else None
    latents = initial_noise(module, scheduler, prompts, generator, settings, device)
    denoiser = as_denoiser(denoiser)
    kls = []
    for index, t in enumerate(scheduler.timesteps.tolist()):
        grad = index >= first_gradient_step
        latents, kl = denoise_step(
            denoiser,
            scheduler,
            latents,
            t,
            index,
            cond,
            negative_cond,
            settings,
            generator,
            grad,
            checkpoint,
            reference,
        )
        if kl is not None:
            kls.append(kl)
    kl = torch.stack(kls).mean(dim=0) if kls else None
    return ChainOutput(latents, kl, settings.num_steps - first_gradient_step)


def renoise_to_last_step(
    scheduler, x0: torch.Tensor, noise: torch.Tensor, flow_matching: bool
) -> tuple[torch.Tensor, float | int]:
    """DRaFT-LV: the clean latents ``x0`` ``[B, C, h, w]`` re-noised with ``noise`` (same shape) to the noise level of
    the sampler's last step (``scheduler.timesteps[-1]``, after ``set_timesteps``): ``x_t = sqrt(abar_t) x0 +
    sqrt(1 - abar_t) noise`` (:func:`~ddpo.policy.forward.add_noise`), or ``(1 - sigma) x0 + sigma noise`` for flow
    matching (:func:`~ddpo.policy.forward.flow_add_noise`). Returns ``(x_t, t)``, ``t`` as a Python number."""
    t = scheduler.timesteps[-1]
    rows = torch.full((x0.shape[0],), float(t), device=x0.device)
    if flow_matching:
        return flow_add_noise(x0, noise, flow_sigmas(scheduler, rows.to(scheduler.timesteps.dtype))), float(t)
    return add_noise(x0, noise, alpha_bar(scheduler.alphas_cumprod, rows.long())), int(t)


def last_step_with_gradient(
    denoiser,
    scheduler,
    x0: torch.Tensor,
    cond: Conditioning | torch.Tensor,
    negative_cond: Conditioning | torch.Tensor | None,
    settings: SamplerSettings,
    generator: torch.Generator,
    flow_matching: bool,
    checkpoint: bool = False,
    reference: ReferenceOutput | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DRaFT-LV's inner sample: ``x0`` ``[B, C, h, w]`` (no gradient) re-noised to the last step's level with noise
    from ``generator`` (:func:`renoise_to_last_step`), then the last step with gradient (:func:`denoise_step`, its own
    noise also from ``generator``). Returns ``(x0_hat [B, C, h, w], kl [B] or None)``; call ``set_timesteps`` first
    (:func:`sample_with_reward_gradient` does)."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
    x_t, t = renoise_to_last_step(scheduler, x0.detach(), noise, flow_matching)
    denoiser = as_denoiser(denoiser)
    index = settings.num_steps - 1
    return denoise_step(
        denoiser, scheduler, x_t, t, index, cond, negative_cond, settings, generator, True, checkpoint, reference
    )
