"""Settings derived from a config: the old log-probs' source, the steps trained per trajectory, the model's load
options and the sampler settings. The policy maths (and torch) are imported inside the functions that need them, so
that reading and validating configs, the CLI's help and the reports stay light."""

from __future__ import annotations

import typing
from typing import Any

if typing.TYPE_CHECKING:
    from ...policy.sampling import SamplerSettings
    from .schema import RunConfig


def recomputes_old_log_probs(config: RunConfig) -> bool:
    """Whether the old log-probs are re-scored in the training shapes (``train.old_log_probs``, ``auto`` resolved;
    never for an estimator without log-probs)."""
    from ..estimators import estimator_for

    return estimator_for(config).recomputes_old_log_probs(config)


def train_steps_per_trajectory(config: RunConfig) -> int:
    """Steps of each trajectory trained on per inner epoch: ``round(timestep_fraction * window steps)``, >= 1."""
    return max(1, round(config.train.timestep_fraction * train_window_steps(config)))


def train_window_steps(config: RunConfig) -> int:
    """The first ``round(timestep_window * stochastic steps)`` (>= 1) denoising steps, the ones training draws from
    (counted from ``sample.sde_window``'s first step when it is set, see :func:`train_step_offset`)."""
    from ...policy.schedulers import trainable_steps

    s = config.sample
    if s.sde_window is not None:
        stochastic = min(s.sde_window[1], trainable_steps(s.scheduler, s.num_steps)) - s.sde_window[0]
    else:
        stochastic = trainable_steps(s.scheduler, s.num_steps)
    return max(1, round(config.train.timestep_window * stochastic))


def train_step_offset(config: RunConfig) -> int:
    """Index of the first step training may draw: ``sample.sde_window``'s first step, else 0."""
    return config.sample.sde_window[0] if config.sample.sde_window is not None else 0


def model_options(config: RunConfig) -> dict[str, Any]:
    """The ``model.*`` settings a model family reads while loading (:func:`ddpo.models.load_model`)."""
    from ...models.family import LOAD_OPTIONS

    return {key: getattr(config.model, key) for key in LOAD_OPTIONS}


def sampler_settings(
    config: RunConfig,
    share_initial_noise: bool | None = None,
    latent_size: int | None = None,
    latent_channels: int | None = None,
    schedule_kwargs: tuple = (),
) -> SamplerSettings:
    """The :class:`~ddpo.policy.sampling.SamplerSettings` of a run (sampling and training-time recomputation).

    ``share_initial_noise`` overrides ``sample.share_initial_noise`` (held-out evaluation never shares ``x_T``);
    ``latent_size`` is ``sample.resolution`` in latent pixels (:func:`ddpo.models.latent_size`; None: the UNet's
    ``sample_size``).
    """
    from ...policy.sampling import SamplerSettings

    s = config.sample
    return SamplerSettings(
        scheduler=s.scheduler,
        num_steps=s.num_steps,
        guidance_scale=s.guidance_scale,
        eta=s.eta,
        mixed_precision=config.mixed_precision,
        decode_chunk_size=s.decode_chunk_size,
        share_initial_noise=s.share_initial_noise if share_initial_noise is None else share_initial_noise,
        latent_size=latent_size,
        latent_channels=latent_channels,
        schedule_kwargs=schedule_kwargs,
        sde_window=tuple(s.sde_window) if s.sde_window is not None else None,
    )
