"""Building what a run trains: the accelerator (:func:`make_accelerator`), then the model family's pipeline, the
trained denoiser (LoRA or full), its dtypes and devices, the estimator's frozen reference, the optimiser, all prepared
by ``accelerate``, and the :class:`~ddpo.training.estimators.Policy` estimators see (:func:`build_models`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from ..models import add_lora, latent_size, load_model
from ..policy.sampling import AUTOCAST_DTYPES, SamplerSettings, check_schedule, uses_cfg
from .config import RunConfig, model_options, sampler_settings
from .estimators import Estimator, Policy, estimator_for
from .optim import get_optimizer_class
from .processes import launched_on_cpu
from .reporting import experiment_trackers
from .strategy import carry_out, check_requested


@dataclass
class Models:
    """What :func:`build_models` returns. ``denoiser`` and ``optimizer`` are accelerate-prepared (``denoiser``
    may be DDP-wrapped: :meth:`Accelerator.unwrap_model` gives the module); ``params`` are the trained tensors, in
    the optimiser's order, named ``trainable_names``; ``policy`` holds them for the estimator; ``negative_cond``
    is the negative prompt's conditioning for classifier-free guidance (None without CFG or with a guidance-embedded
    model)."""

    pipe: Any
    family: Any
    latent_size: int
    settings: SamplerSettings
    estimator_class: type[Estimator]
    denoiser: torch.nn.Module
    reference_denoiser: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    trainable_names: list[str]
    policy: Policy
    negative_cond: Any


def make_accelerator(config: RunConfig, run_dir: Path) -> Accelerator:
    """The run's accelerator: its precision, gradient accumulation, experiment trackers (logging under ``run_dir``),
    the collectives' timeout, gloo on a CPU when several processes were launched, and the distribution strategy the
    launch asked for (DDP, or FSDP2: :mod:`~ddpo.training.strategy`), which it carries out or refuses before the
    model loads."""
    check_requested()
    accelerator = Accelerator(
        cpu=launched_on_cpu(),
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        log_with=experiment_trackers(config, run_dir) or None,
        project_dir=str(run_dir),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=config.process_timeout_seconds))],
    )
    carry_out(accelerator)
    return accelerator


def build_models(config: RunConfig, accelerator: Accelerator, estimator_inputs: Any = None) -> Models:
    """Load the model of ``config``, make its denoiser (the UNet or the transformer) trainable (LoRA adapters or
    all weights), cast the frozen parts to the run's precision, place everything on the accelerator's device and
    build the optimiser over the trained parameters; ``estimator_inputs`` (what the estimator read before, see
    :meth:`~ddpo.training.estimators.Estimator.read_inputs`) goes to the policy. A bad ``train.optimizer`` fails
    before the model loads."""
    c, s, t = config, config.sample, config.train
    device = accelerator.device
    optimizer_class = get_optimizer_class(t.optimizer)
    pipe, family = load_model(c.model.pretrained, c.model.revision, s.scheduler, c.model.family, model_options(c))
    size = latent_size(family, s.resolution)
    # The run's sampler settings with this family's latent shape and schedule arguments (computed once).
    settings = sampler_settings(
        c,
        latent_size=size,
        latent_channels=family.latent_channels(),
        schedule_kwargs=tuple(family.schedule_kwargs(s.num_steps, size).items()),
    )
    estimator_class = estimator_for(c)
    if estimator_class.uses_log_probs:  # awm / nft and the like take clean samples from any sampler
        check_schedule(pipe.scheduler, settings)
    pipe.vae.requires_grad_(False)
    for encoder in family.text_encoders():
        encoder.requires_grad_(False)
    denoiser = family.denoiser()
    if c.model.use_lora:
        add_lora(denoiser, c.model.lora_rank, c.model.lora_alpha, c.model.lora_target_modules)
    else:
        denoiser.requires_grad_(True)
    if t.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if c.model.channels_last:
        denoiser.to(memory_format=torch.channels_last)
    # The estimator's frozen copy of the base denoiser, if it keeps one (the KL reference of full fine-tuning),
    # taken before anything trains or casts the denoiser.
    reference = estimator_class.frozen_reference(denoiser, c)
    if reference is not None:
        reference.to(device)
    autocast_dtype = AUTOCAST_DTYPES[c.mixed_precision]
    if autocast_dtype is not None and c.model.use_lora:
        # Frozen weights are only ever used under autocast, which casts them to this dtype anyway: storing them
        # in it is numerically identical and halves their memory. Trainable (LoRA) weights stay float32.
        from diffusers.training_utils import cast_training_params

        denoiser.to(dtype=autocast_dtype)
        cast_training_params(denoiser, dtype=torch.float32)
        if not family.vae_force_upcast:  # SDXL's VAE overflows in fp16: it stays float32
            pipe.vae.to(dtype=autocast_dtype)
    if autocast_dtype is not None and c.model.text_encoder_precision == "auto":
        # The frozen text encoders run once per prompt, outside the policy: in the run's half precision (as
        # diffusers' pipelines run them) they take half the memory (T5-XXL: 8.9 instead of 17.7 GiB). The
        # conditioning is stored in float32 and reused as is in training, so the PPO ratio is unaffected.
        for encoder in family.text_encoders():
            encoder.to(dtype=autocast_dtype)
    pipe.vae.to(device)
    for encoder in family.text_encoders():
        encoder.to(device)
    denoiser.to(device)
    trainable_names = [n for n, p in denoiser.named_parameters() if p.requires_grad]
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = optimizer_class(
        params,
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        weight_decay=t.adam_weight_decay,
        eps=t.adam_epsilon,
    )
    if c.model.compile:
        denoiser.compile()  # in place: parameter names (checkpoints, LoRA export) are unchanged
    if accelerator.is_fsdp2 and c.model.use_lora:
        # Each process seeds its own RNG (set_seed(device_specific=True)), so LoRA's random initialisation differs
        # between processes. DDP broadcasts process 0's weights when it wraps the model; FSDP2 keeps each process's
        # slice of its own (unless accelerate's fsdp_cpu_ram_efficient_loading loads process 0's): broadcast first.
        for param in params:
            torch.distributed.broadcast(param.data, src=0)
    denoiser, optimizer = accelerator.prepare(denoiser, optimizer)
    if accelerator.is_fsdp2 and reference is not None:
        # The frozen reference is as large as the trained denoiser: sharded the same way (its calls run on every
        # process in step with the policy's), so that sharding saves memory on it too.
        reference = accelerator.prepare(reference)
    # The trained tensors as the prepared model holds them: FSDP2 replaces each parameter by its shard (a DTensor).
    named = dict(accelerator.unwrap_model(denoiser).named_parameters())
    params = [named[name] for name in trainable_names]
    policy = Policy(
        config=c,
        family=family,
        scheduler=pipe.scheduler,
        settings=settings,
        accelerator=accelerator,
        model=denoiser,
        params=params,
        trainable_names=trainable_names,
        reference=reference,
        inputs=estimator_inputs,
    )
    negative_cond = None
    if uses_cfg(s.guidance_scale) and not family.guidance_embedded:
        negative_cond = family.encode([s.negative_prompt], device, size)
    return Models(
        pipe=pipe,
        family=family,
        latent_size=size,
        settings=settings,
        estimator_class=estimator_class,
        denoiser=denoiser,
        reference_denoiser=reference,
        optimizer=optimizer,
        params=params,
        trainable_names=trainable_names,
        policy=policy,
        negative_cond=negative_cond,
    )
