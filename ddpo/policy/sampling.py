"""The denoising loop that records trajectories, and the training-time recomputation of their log-probs.

Both go through :func:`guided_model_output` and the same step function, so a stored trajectory re-scored by the
unchanged model gives ``log_prob == old_log_prob`` (ratio 1): same CFG batching, same autocast, same float32 step.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .conditioning import Conditioning, as_conditioning
from .schedulers import STEP_FUNCTIONS, StepOutput

AUTOCAST_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class SamplerSettings:
    """How the policy samples (and, identically, how its stored steps are re-scored in training).

    Attributes:
        scheduler: the log-prob step, a key of :data:`~ddpo.policy.schedulers.STEP_FUNCTIONS` (``ddim`` | ``ddpm``).
        num_steps: denoising steps per trajectory.
        guidance_scale: classifier-free guidance scale; CFG is on when :func:`uses_cfg` says so (> 1).
        eta: DDIM stochasticity (``sigma_t`` scale); 1 is DDPM-like.
        mixed_precision: autocast of the denoiser/VAE: ``no`` | ``bf16`` | ``fp16`` (log-probs stay float32).
        decode_chunk_size: images per VAE decode call.
        share_initial_noise: a prompt group's samples start from one ``x_T`` (see :func:`sample_trajectories`).
        latent_size: side of the square latents ``h = w`` (None: the denoiser's ``sample_size``).
        latent_channels: latent channels ``C`` (None: the denoiser's ``in_channels``).
        schedule_kwargs: extra ``(key, value)`` pairs for ``scheduler.set_timesteps`` (FLUX: ``sigmas``, ``mu``).
        sde_window: ``(first, end)``: only steps ``first <= k < end`` are stochastic (Flow-GRPO-Fast); the others
            are the deterministic ODE step (noise level 0, log-prob 0, never trained on). None: every step.
    """

    scheduler: str = "ddim"
    num_steps: int = 50
    guidance_scale: float = 5.0
    eta: float = 1.0
    mixed_precision: str = "no"
    decode_chunk_size: int = 8
    share_initial_noise: bool = False
    latent_size: int | None = None
    latent_channels: int | None = None
    schedule_kwargs: tuple = ()
    sde_window: tuple[int, int] | None = None

    def step_eta(self, index: int) -> float:
        """The noise level (DDIM ``eta``, flow noise level ``a``) of step ``index``: 0 outside :attr:`sde_window`."""
        if self.sde_window is None or self.sde_window[0] <= index < self.sde_window[1]:
            return self.eta
        return 0.0


def set_timesteps(scheduler, settings: SamplerSettings, device: torch.device | None = None) -> None:
    """``scheduler.set_timesteps(settings.num_steps)`` with the family's extra schedule arguments."""
    scheduler.set_timesteps(settings.num_steps, device=device, **dict(settings.schedule_kwargs))


Denoiser = Callable[[torch.Tensor, Any, Conditioning], torch.Tensor]
"""``denoiser(latents [B, C, h, w], timesteps (scalar or [B]), cond) -> model output [B, C, h, w]``: a model bound to
its family's calling convention (:meth:`ddpo.models.family.ModelFamily.bind`)."""


def denoiser_call(denoiser, latents: torch.Tensor, timesteps, cond: Conditioning) -> torch.Tensor:
    """Output ``[B, C, h, w]`` of a ``UNet2DConditionModel`` ``denoiser`` (Stable Diffusion 1.x/2.x, SDXL) at
    ``(latents, timesteps, cond)``; SDXL's pooled embedding and time ids go in as ``added_cond_kwargs`` when ``cond``
    has them. (SD3 and FLUX transformers are called by their family's :meth:`~ddpo.models.family.ModelFamily.bind`.)"""
    added = None
    if cond.pooled is not None:
        added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
    return denoiser(latents, timesteps, encoder_hidden_states=cond.embeds, added_cond_kwargs=added).sample


def as_denoiser(model) -> Denoiser:
    """``model`` as a :data:`Denoiser`: a bound denoiser is returned as is, a bare UNet module is called the
    Stable Diffusion way (:func:`denoiser_call`)."""
    if isinstance(model, torch.nn.Module):
        return lambda latents, timesteps, cond: denoiser_call(model, latents, timesteps, cond)
    return model


def uses_cfg(guidance_scale: float) -> bool:
    """The one rule for classifier-free guidance: on when ``guidance_scale > 1`` (1 is the plain conditional model)."""
    return guidance_scale > 1.0


def autocast(device: torch.device, mixed_precision: str):
    """The denoiser/VAE/text-encoder autocast context for ``mixed_precision`` in ``no | bf16 | fp16``."""
    dtype = AUTOCAST_DTYPES[mixed_precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


SHARED_FIELDS = ("negative_cond", "timesteps")
"""Fields every batch of one epoch holds alike: the negative prompt's conditioning and the sampler's timesteps."""


def concatenate_batches(items: list):
    """One batch of the dataclass of ``items`` (:class:`Trajectories` or :class:`CleanSamples`): ``prompts`` joined,
    every tensor concatenated along the batch dimension, the :data:`SHARED_FIELDS` taken from the first batch."""
    values = {}
    for spec in dataclasses.fields(items[0]):
        name = spec.name
        if name in SHARED_FIELDS:
            values[name] = getattr(items[0], name)
        elif name == "prompts":
            values[name] = [p for item in items for p in item.prompts]
        elif isinstance(getattr(items[0], name), Conditioning):
            values[name] = Conditioning.cat([getattr(item, name) for item in items])
        else:
            values[name] = torch.cat([getattr(item, name) for item in items])
    return type(items[0])(**values)


@dataclass
class Trajectories:
    """A batch of ``B`` sampled trajectories of ``T`` steps (all tensors on the sampling device).

    Attributes:
        prompts: ``B`` prompt strings.
        cond: the prompts' :class:`Conditioning` ``[B, ...]`` (float32; a bare ``[B, L, D]`` tensor of text-encoder
            states, Stable Diffusion 1.x/2.x's, is accepted).
        negative_cond: the negative prompt's :class:`Conditioning` ``[1, ...]``, shared by the batch (None without
            CFG).
        latents: ``[B, T + 1, C, h, w]`` float32: ``x_T, ..., x_0``.
        log_probs: ``[B, T]`` float32: ``log pi(x_{t-1} | x_t, c)`` of each step (0 for deterministic steps).
        timesteps: ``[T]``: the scheduler timestep of each step (long; float ``sigma * 1000`` for flow matching).
        images: ``[B, 3, H, W]`` float32 in ``[0, 1]``: the decoded ``x_0``.
    """

    prompts: list[str]
    cond: Conditioning | torch.Tensor
    negative_cond: Conditioning | torch.Tensor | None
    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    images: torch.Tensor

    @staticmethod
    def cat(items: list[Trajectories]) -> Trajectories:
        """Concatenate batches along the batch dimension (they share timesteps and the negative prompt)."""
        return concatenate_batches(items)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], device: torch.device) -> torch.Tensor:
    """CLIP text-encoder hidden states ``[B, L, D]`` (float32) for ``prompts``, padded to the model length (Stable
    Diffusion 1.x/2.x's conditioning; the other families encode with :meth:`~ddpo.models.family.ModelFamily.encode`)."""
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    return text_encoder(ids)[0].float()


def guided_model_output(
    denoiser,
    latents: torch.Tensor,
    timesteps: torch.Tensor | int | float,
    cond: Conditioning | torch.Tensor,
    negative_cond: Conditioning | torch.Tensor | None,
    guidance_scale: float,
) -> torch.Tensor:
    """The denoiser output with classifier-free guidance as **one** batched call. Returns float32 ``[B, C, h, w]``.

    Args:
        denoiser: a :data:`Denoiser` (or a bare Stable Diffusion UNet, see :func:`as_denoiser`).
        latents: ``x_t`` ``[B, C, h, w]`` (float32; autocast, if active, casts inside the model).
        timesteps: a scalar or ``[B]``.
        cond: the prompts' :class:`Conditioning` ``[B, ...]`` (a bare ``[B, L, D]`` tensor is SD 1.x's);
            negative_cond: the negative prompt's, ``[1, ...]`` or ``[B, ...]`` (None: no CFG rows, e.g. FLUX,
            whose guidance is an input of the bound denoiser).
    """
    denoiser = as_denoiser(denoiser)
    cond, negative = as_conditioning(cond), as_conditioning(negative_cond)
    batch = latents.shape[0]
    if negative is None or not uses_cfg(guidance_scale):
        return denoiser(latents, timesteps, cond).float()
    timesteps = torch.as_tensor(timesteps, device=latents.device)
    if timesteps.ndim == 1:
        timesteps = torch.cat([timesteps, timesteps])
    both = Conditioning.cat([negative.expand(batch) if len(negative) == 1 else negative, cond])
    output = denoiser(torch.cat([latents, latents]), timesteps, both).float()
    uncond, guided = output.chunk(2)
    return uncond + guidance_scale * (guided - uncond)


def check_schedule(scheduler, settings: SamplerSettings) -> None:
    """Raise once, before sampling, if a trainable step of the schedule would have zero variance."""
    set_timesteps(scheduler, settings)
    step = STEP_FUNCTIONS[settings.scheduler]
    probe = torch.zeros(1, 1, 1, 1)
    for index, t in enumerate(scheduler.timesteps.tolist()):
        if settings.step_eta(index) > 0:
            step(scheduler, probe, t, probe, eta=settings.step_eta(index), noise=probe)


def consecutive_groups(prompts: list[str]) -> torch.Tensor:
    """Group index ``[B]`` long of each prompt: a new group starts wherever a prompt differs from the one before."""
    starts = [0] + [int(prompts[i] != prompts[i - 1]) for i in range(1, len(prompts))]
    return torch.tensor(starts, dtype=torch.long).cumsum(0)


def initial_noise(
    denoiser: torch.nn.Module | None,
    scheduler,
    prompts: list[str],
    generator: torch.Generator,
    settings: SamplerSettings,
    device: torch.device,
) -> torch.Tensor:
    """``x_T`` ``[B, C, h, w]`` float32 for ``B = len(prompts)``: the first draw of ``generator``, scaled by the
    scheduler's ``init_noise_sigma`` (call ``set_timesteps`` first). The shape comes from ``settings`` (the
    ``denoiser`` module's config where they leave it open; ``denoiser`` may be None when they set both). With
    ``settings.share_initial_noise`` one draw per run of consecutive equal prompts, shared by its samples
    (:func:`consecutive_groups`)."""
    size = settings.latent_size or denoiser.config.sample_size
    channels = settings.latent_channels or denoiser.config.in_channels
    group = consecutive_groups(prompts) if settings.share_initial_noise else torch.arange(len(prompts))
    shape = (int(group.max()) + 1, channels, size, size)
    latents = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)[group.to(device)]
    return latents * getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching: x_1 = eps


@torch.no_grad()
def sample_trajectories(
    denoiser,
    vae,
    scheduler,
    cond: Conditioning | torch.Tensor,
    negative_cond: Conditioning | torch.Tensor | None,
    prompts: list[str],
    generator: torch.Generator,
    settings: SamplerSettings,
    decode: Callable | None = None,
) -> Trajectories:
    """Sample ``B = len(prompts)`` trajectories from ``x_T ~ N(0, I)`` and decode their final latents.

    Args:
        denoiser: a :data:`Denoiser` bound by its family, or a bare Stable Diffusion UNet (:func:`as_denoiser`).
        cond: the prompts' :class:`Conditioning` ``[B, ...]`` float32 (a bare ``[B, L, D]`` tensor is SD 1.x's);
            negative_cond: the negative prompt's, ``[1, ...]`` (None without CFG).
        prompts: the ``B`` prompt strings (recorded; with ``share_initial_noise`` they define the groups).
        generator: the only source of randomness (``x_T`` and every step's noise).
        decode: the VAE decoding of the final latents, called as :func:`decode_latents` (its default) is; a caller
            times or replaces the decoding through it (``ddpo bench`` times it).

    With ``settings.share_initial_noise`` every run of consecutive equal prompts (a prompt's group of samples, as
    :func:`ddpo.prompts.draw_prompts` lays them out) starts from one shared ``x_T``: the samples of a group then differ
    only by the noise of the policy's own steps, so the reward differences that group advantages learn from are not
    diluted by the initial noise, which no action chose (common random numbers).

    No host-device synchronisation happens inside the loop: timesteps are Python ints and log-probs stay on the
    device. Call :func:`check_schedule` once beforehand (the step here skips its zero-variance check).
    """
    device = cond.device
    set_timesteps(scheduler, settings)
    step = STEP_FUNCTIONS[settings.scheduler]
    latents = initial_noise(_module(denoiser), scheduler, prompts, generator, settings, device)
    denoiser = as_denoiser(denoiser)
    all_latents, all_log_probs = [latents], []
    timesteps = scheduler.timesteps.tolist()
    for index, t in enumerate(timesteps):
        with autocast(device, settings.mixed_precision):
            model_output = guided_model_output(denoiser, latents, t, cond, negative_cond, settings.guidance_scale)
        eta = settings.step_eta(index)
        out = step(scheduler, model_output, t, latents, eta=eta, generator=generator, check=False)
        latents = out.prev_sample
        all_latents.append(latents)
        all_log_probs.append(out.log_prob)
    images = (decode or decode_latents)(vae, latents, settings.mixed_precision, settings.decode_chunk_size)
    return Trajectories(
        prompts=list(prompts),
        cond=cond,
        negative_cond=negative_cond,
        latents=torch.stack(all_latents, dim=1),
        log_probs=torch.stack(all_log_probs, dim=1),
        timesteps=torch.tensor(timesteps, dtype=scheduler.timesteps.dtype, device=device),
        images=images,
    )


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, mixed_precision: str = "no", chunk_size: int = 8) -> torch.Tensor:
    """VAE-decode ``[B, C, h, w]`` latents to float32 images ``[B, 3, H, W]`` in ``[0, 1]``, ``chunk_size`` at a time,
    without gradient (:func:`vae_decode` in the caller's gradient mode)."""
    return vae_decode(vae, latents, mixed_precision, chunk_size)


def vae_decode(vae, latents: torch.Tensor, mixed_precision: str = "no", chunk_size: int = 8) -> torch.Tensor:
    """:func:`decode_latents` in the caller's gradient mode: with gradients on, the images are differentiable w.r.t.
    ``latents`` (reward backpropagation; the clamp to ``[0, 1]`` passes no gradient where it clips)."""
    images = []
    for chunk in latents.split(chunk_size):
        with autocast(latents.device, mixed_precision):
            shift = getattr(vae.config, "shift_factor", None) or 0.0  # SD3 / FLUX VAEs shift their latents
            decoded = vae.decode(chunk / vae.config.scaling_factor + shift).sample
        images.append((decoded.float() / 2 + 0.5).clamp(0, 1))
    return torch.cat(images)


def encode_images(vae, images: torch.Tensor, mixed_precision: str = "no") -> torch.Tensor:
    """VAE-encode images ``[B, 3, H, W]`` in ``[0, 1]`` to float32 latents ``[B, C, h, w]`` in the denoiser's space,
    the inverse of :func:`decode_latents`: the mean (mode) of the VAE's latent distribution, shifted and scaled as the
    pipelines scale it (``(z - shift_factor) * scaling_factor``; SD3 / FLUX VAEs have a shift). Deterministic: no
    latent noise is drawn. Called without gradient by the caller."""
    with autocast(images.device, mixed_precision):
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        mode = vae.encode(images.to(vae.dtype) * 2 - 1).latent_dist.mode()
    return (mode.float() - shift) * vae.config.scaling_factor


def recompute_step(
    denoiser,
    scheduler,
    latents: torch.Tensor,
    next_latents: torch.Tensor,
    timesteps: torch.Tensor,
    cond: Conditioning | torch.Tensor,
    negative_cond: Conditioning | torch.Tensor | None,
    settings: SamplerSettings,
) -> StepOutput:
    """Log-prob of stored actions under the current denoiser, for ``N`` (trajectory, timestep) pairs in one denoiser
    call.

    Args:
        denoiser: a :data:`Denoiser` bound by its family, or a bare Stable Diffusion UNet (:func:`as_denoiser`).
        latents: ``x_t`` ``[N, C, h, w]``; next_latents: the stored ``x_{t-1}`` ``[N, C, h, w]``.
        timesteps: ``[N]``, one per pair (long; float ``sigma * 1000`` for flow matching).
        cond: the pairs' :class:`Conditioning` ``[N, ...]`` (a bare ``[N, L, D]`` tensor is SD 1.x's);
            negative_cond: the negative prompt's ``[1, ...]`` (None without CFG).
        settings: the sampling settings the pairs were drawn with (scheduler, CFG, eta, autocast).
    Returns:
        :class:`~ddpo.policy.schedulers.StepOutput` with differentiable ``log_prob [N]`` and ``mean``.
    """
    with autocast(latents.device, settings.mixed_precision):
        model_output = guided_model_output(denoiser, latents, timesteps, cond, negative_cond, settings.guidance_scale)
    return STEP_FUNCTIONS[settings.scheduler](
        scheduler, model_output, timesteps, latents, eta=settings.eta, prev_sample=next_latents, check=False
    )


def recompute_pairs(
    denoiser,
    scheduler,
    trajectories: Trajectories,
    i: torch.Tensor,
    j: torch.Tensor,
    settings: SamplerSettings,
) -> StepOutput:
    """:func:`recompute_step` at the stored pairs ``(trajectory i[k], step j[k])`` of ``trajectories`` (``i``, ``j``:
    long ``[N]``), with the trajectories' own negative prompt: the policy step exactly as it was sampled."""
    return recompute_step(
        denoiser,
        scheduler,
        trajectories.latents[i, j],
        trajectories.latents[i, j + 1],
        trajectories.timesteps[j],
        trajectories.cond[i],
        trajectories.negative_cond,
        settings,
    )


@dataclass
class CleanSamples:
    """A batch of ``B`` samples for the forward-process estimators: only what their loss needs.

    Attributes:
        prompts: ``B`` prompt strings.
        cond: the prompts' :class:`Conditioning` ``[B, ...]`` float32 (a bare ``[B, L, D]`` tensor of text-encoder
            states, Stable Diffusion 1.x/2.x's, is accepted).
        negative_cond: the negative prompt's :class:`Conditioning` ``[1, ...]`` (None without CFG).
        latents: ``[B, C, h, w]`` float32: the clean ``x_0`` the sampler ended at.
        timesteps: ``[T]``: the sampler's timesteps (the forward-process loss re-noises at these): long for a
            DDPM-style schedule, float ``sigma * 1000`` for flow matching.
        images: ``[B, 3, H, W]`` float32 in ``[0, 1]``.
    """

    prompts: list[str]
    cond: Conditioning | torch.Tensor
    negative_cond: Conditioning | torch.Tensor | None
    latents: torch.Tensor
    timesteps: torch.Tensor
    images: torch.Tensor

    @staticmethod
    def cat(items: list[CleanSamples]) -> CleanSamples:
        """Concatenate batches along the batch dimension (they share timesteps and the negative prompt)."""
        return concatenate_batches(items)


def _module(model):
    """The module behind ``model`` for :func:`initial_noise`'s config fallback (None for a bound denoiser)."""
    return model if isinstance(model, torch.nn.Module) else None


def sampler_timesteps(scheduler) -> torch.Tensor:
    """A sampler's timesteps ``[T]`` (after ``set_timesteps``) as :class:`CleanSamples` keeps them: indices into
    ``alphas_cumprod`` for a DDPM-style schedule (rounded, long), a flow-matching schedule's float
    ``sigma * num_train_timesteps`` as they are."""
    if hasattr(scheduler, "alphas_cumprod"):
        return scheduler.timesteps.round().long()
    return scheduler.timesteps.float()


def _step_kwargs(scheduler, eta: float, generator: torch.Generator) -> dict:
    """The optional arguments this diffusers scheduler's ``step`` accepts (``eta`` for DDIM, ``generator`` for the
    stochastic ones), as diffusers' pipelines pass them."""
    import inspect

    accepted = inspect.signature(scheduler.step).parameters
    return {k: v for k, v in (("eta", eta), ("generator", generator)) if k in accepted}


@torch.no_grad()
def sample_clean(
    denoiser,
    vae,
    scheduler,
    cond: Conditioning | torch.Tensor,
    negative_cond: Conditioning | torch.Tensor | None,
    prompts: list[str],
    generator: torch.Generator,
    settings: SamplerSettings,
    decode: Callable | None = None,
) -> CleanSamples:
    """Sample ``B = len(prompts)`` images with **any** diffusers scheduler and keep only their clean latents.

    The loop of diffusers' pipelines (``scale_model_input``, one batched CFG call, ``scheduler.step``), with every
    random draw from ``generator``: ``x_T`` first, then whatever the scheduler's step draws (none for DDIM with
    ``eta = 0``, DPM-Solver++ or Euler). ``settings.share_initial_noise`` shares ``x_T`` within prompt groups.
    ``denoiser``, ``cond``, ``negative_cond`` and ``decode`` as in :func:`sample_trajectories`.
    """
    device = cond.device
    set_timesteps(scheduler, settings, device)
    latents = initial_noise(_module(denoiser), scheduler, prompts, generator, settings, device)
    denoiser = as_denoiser(denoiser)
    extra = _step_kwargs(scheduler, settings.eta, generator)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        with autocast(device, settings.mixed_precision):
            output = guided_model_output(denoiser, model_input, t, cond, negative_cond, settings.guidance_scale)
        latents = scheduler.step(output, t, latents, **extra, return_dict=False)[0].float()
    images = (decode or decode_latents)(vae, latents, settings.mixed_precision, settings.decode_chunk_size)
    return CleanSamples(
        prompts=list(prompts),
        cond=cond,
        negative_cond=negative_cond,
        latents=latents,
        timesteps=sampler_timesteps(scheduler).to(device),
        images=images,
    )
