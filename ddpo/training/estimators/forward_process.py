"""Forward-process estimators: AWM and DiffusionNFT train on the policy's own clean samples (any sampler, no per-step
log-probs), re-noised at the pairs' timesteps (:mod:`ddpo.policy.forward` holds their maths). What they share with
every estimator on re-noised clean latents (the preference estimators too) is :class:`ReNoisingEstimator`.

Both may keep an old policy, an EMA of the trained weights updated once per epoch (DiffusionNFT always; AWM with its
proximal term ``train.awm_ema_kl > 0``), saved in checkpoints as ``old_policy.<trainable name>``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from ...policy.forward import (
    add_noise,
    alpha_bar,
    awm_loss,
    ema_update,
    flow_add_noise,
    flow_predictions,
    flow_sigmas,
    matching_target,
    nft_loss,
    old_policy_decay,
    prediction_kl,
    predictions,
)
from ...policy.sampling import autocast
from ..sharding import copy_full_
from ..streams import Stream, derive_seed
from .base import Estimator, Need, Policy

if TYPE_CHECKING:
    from ...policy.sampling import CleanSamples


class ReNoisingEstimator(Estimator):
    """What every estimator that trains on re-noised clean latents shares (the forward-process estimators below, the
    preference estimators of :mod:`.preference`): clean samples from any sampler, the re-noising of clean latents at
    given timesteps, and the denoiser's ``x0`` and raw predictions.

    Each inner epoch re-noises, in minibatch order, with noise from the run's stream
    ``(seed, Stream.FORWARD_NOISE, epoch, inner, process)``."""

    uses_log_probs = False

    def __init__(self, policy: Policy):
        super().__init__(policy)
        self.noise: torch.Generator | None = None

    @classmethod
    def validate(cls, config, chosen: type[Estimator], need: Need) -> None:
        if chosen is not cls:
            return
        from ...models.schedulers import SCHEDULERS, is_known_scheduler

        s, t = config.sample, config.train
        need(
            is_known_scheduler(s.scheduler),
            f"sample.scheduler={s.scheduler!r} is not a sampler: use one of {', '.join(SCHEDULERS)} or a diffusers "
            "scheduler class name (e.g. DPMSolverMultistepScheduler)",
        )
        need(
            t.kl_form == "gaussian",
            f"train.kl_form=flow_grpo is the KL of a log-prob step; train.algorithm={cls.name} has its own KL in "
            "the model's prediction space (use train.kl_form=gaussian)",
        )
        super().validate(config, chosen, need)  # train.ratio_form

    # ------------------------------------------------------------------ re-noising and predictions

    def begin_inner_epoch(self, epoch: int, inner: int) -> None:
        acc = self.policy.accelerator
        seed = derive_seed(self.config.seed, Stream.FORWARD_NOISE, epoch, inner, acc.process_index)
        self.noise = torch.Generator().manual_seed(seed)

    def draw_noise(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """Standard normal noise of ``shape``, float32 on ``device``, from the inner epoch's generator."""
        return torch.randn(shape, generator=self.noise, dtype=torch.float32).to(device)

    def renoise(
        self, x0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, noise, level)``: the clean latents ``x0`` ``[N, C, h, w]`` re-noised at ``timesteps`` ``[N]`` with
        ``noise`` ``[N, C, h, w]`` (drawn from the inner epoch's generator when None); the noise ``level`` ``[N]`` is
        ``alpha_bar_t``, or ``sigma`` for a flow-matching model."""
        scheduler = self.policy.scheduler
        if noise is None:
            noise = self.draw_noise(x0.shape, x0.device)
        if self.policy.family.flow_matching:  # x_t = (1 - sigma) x0 + sigma eps
            sigma = flow_sigmas(scheduler, timesteps)
            return flow_add_noise(x0, noise, sigma), noise, sigma
        abar = alpha_bar(scheduler.alphas_cumprod, timesteps)  # x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
        return add_noise(x0, noise, abar), noise, abar

    @property
    def prediction_space(self) -> str:
        """The space of the model's pretraining loss (:func:`~ddpo.policy.forward.matching_target`): ``flow`` for a
        flow-matching model, else the scheduler's ``prediction_type``."""
        return "flow" if self.policy.family.flow_matching else self.policy.scheduler.config.prediction_type

    def denoise(
        self, model, x_t: torch.Tensor, timesteps: torch.Tensor, embeds, level: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0_hat, output)`` float32 ``[N, C, h, w]`` each, of ``model`` at ``(x_t, t, c)`` (the conditional model,
        no CFG), under the run's autocast: its ``x0`` prediction whatever the model's prediction type, and its raw
        output (the velocity of a flow-matching model, else noise, v or x0 as the scheduler's ``prediction_type``
        says; the noise ``level`` ``[N]``: ``alpha_bar_t``, or ``sigma`` for a flow-matching model)."""
        p = self.policy
        denoiser = p.family.bind(model, p.settings.guidance_scale)
        with autocast(x_t.device, self.config.mixed_precision):
            output = denoiser(x_t, timesteps, embeds)
        if p.family.flow_matching:
            return flow_predictions(output, x_t, level)[0], output.float()
        return predictions(output, x_t, level, p.scheduler.config.prediction_type)[0], output.float()


class ForwardProcessEstimator(ReNoisingEstimator):
    """The forward-process family: the re-noised pairs' loss of a family member (:meth:`estimator_loss`) and the old
    policy."""

    own_keys = {
        "train.old_policy_flat": "the old (EMA) policy's schedule",
        "train.old_policy_uprate": "the old (EMA) policy's schedule",
        "train.old_policy_uphold": "the old (EMA) policy's schedule",
    }

    def __init__(self, policy: Policy):
        super().__init__(policy)
        # The old policy (DiffusionNFT's, and that of AWM's proximal term): an EMA of the trained weights, updated
        # once per epoch (saved in checkpoints).
        self.old_params: list[torch.Tensor] | None = (
            [p.detach().clone() for p in policy.params] if self.uses_old_policy() else None
        )

    def uses_old_policy(self) -> bool:
        """Whether this run keeps an old (EMA) policy."""
        return False

    @classmethod
    def validate(cls, config, chosen: type[Estimator], need: Need) -> None:
        super().validate(config, chosen, need)  # the sampler, train.kl_form, train.ratio_form
        t = config.train
        need(t.old_policy_flat >= 0, f"train.old_policy_flat must be >= 0; got {t.old_policy_flat}")
        need(t.old_policy_uprate >= 0, f"train.old_policy_uprate must be >= 0; got {t.old_policy_uprate}")
        need(0 <= t.old_policy_uphold < 1, f"train.old_policy_uphold must be in [0, 1); got {t.old_policy_uphold}")

    # ------------------------------------------------------------------ the old policy

    @contextlib.contextmanager
    def old_policy_weights(self) -> Iterator[None]:
        """Within the context the trained weights hold the old policy's, restored on exit."""
        params = self.policy.params
        with torch.no_grad():
            current = [p.detach().clone() for p in params]
            for param, old in zip(params, self.old_params, strict=True):
                param.copy_(old)
        self.policy.weights_changed()
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(params, current, strict=True):
                    param.copy_(value)
            self.policy.weights_changed()

    def end_epoch(self, global_step: int) -> dict[str, float]:
        """The old policy's once-per-epoch update ``old = d * old + (1 - d) * current`` with ``d`` from the global step
        (:func:`~ddpo.policy.forward.old_policy_decay`), logged as ``old_policy_decay``."""
        if self.old_params is None:
            return {}
        t = self.config.train
        decay = old_policy_decay(global_step, t.old_policy_flat, t.old_policy_uprate, t.old_policy_uphold)
        ema_update(self.old_params, self.policy.params, decay)
        return {"old_policy_decay": decay}

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """The old policy's weights by trainable-parameter name (``old_policy.<name>``), or None."""
        if self.old_params is None:
            return None
        return {f"old_policy.{name}": p for name, p in zip(self.policy.trainable_names, self.old_params, strict=True)}

    def load_state_dict(self, state: dict[str, torch.Tensor] | None, source: str) -> None:
        if self.old_params is None:
            return
        old = state or {}
        names = self.policy.trainable_names
        missing = [name for name in names if f"old_policy.{name}" not in old]
        if missing:
            raise ValueError(
                f"{source} has no old-policy weights for {missing[:3]}; was it a run of train.algorithm=nft, or awm "
                "with train.awm_ema_kl > 0?"
            )
        for name, param in zip(names, self.old_params, strict=True):
            copy_full_(param, old[f"old_policy.{name}"])  # a sharded run's old policy keeps its own slice

    def loss(
        self, samples: CleanSamples, weights: torch.Tensor, i: torch.Tensor, j: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of ``N`` pairs (sample ``i``, sampler step ``j``, ``[N]`` each): the clean latents re-noised at
        the step's timestep, one denoiser call (plus one without gradient for the old policy or the KL reference)."""
        t, model = self.config.train, self.policy.model
        x0 = samples.latents[i]
        timesteps = samples.timesteps[j]
        x_t, noise, level = self.renoise(x0, timesteps)
        embeds = samples.cond[i]
        old = None
        if self.old_params is not None:  # before the policy's call: swapping weights after it would corrupt its graph
            with torch.no_grad(), self.old_policy_weights():
                old = self.denoise(model, x_t, timesteps, embeds, level)
        x0_pred, raw = self.denoise(model, x_t, timesteps, embeds, level)
        loss, info = self.estimator_loss(x0, noise, level, x0_pred, raw, old, weights[i])
        if t.kl_coef > 0:
            with torch.no_grad(), self.policy.base_model() as base:
                _, raw_ref = self.denoise(base, x_t, timesteps, embeds, level)
            kl = prediction_kl(raw, raw_ref).mean()
            loss = loss + t.kl_coef * kl
            info["kl"] = kl.detach()
        info["loss"] = loss.detach()
        return loss, info

    def estimator_loss(
        self,
        x0: torch.Tensor,
        noise: torch.Tensor,
        level: torch.Tensor,
        x0_pred: torch.Tensor,
        raw: torch.Tensor,
        old: tuple[torch.Tensor, torch.Tensor] | None,
        weights: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The family member's loss of ``N`` re-noised pairs: clean latents ``x0``, their ``noise`` (``[N, C, h, w]``),
        the noise ``level`` ``[N]`` (``alpha_bar_t`` or ``sigma``), the policy's ``x0`` prediction and raw output
        (``[N, C, h, w]``, differentiable), the old policy's ``(x0_hat, output)`` (no gradient) or None, and the pairs'
        weights ``[N]``."""
        raise NotImplementedError


class AdvantageWeightedMatching(ForwardProcessEstimator):
    """AWM: the advantage-weighted pretraining loss, with an optional proximal term to the old policy
    (:func:`~ddpo.policy.forward.awm_loss`)."""

    name = "awm"
    own_keys = {"train.awm_ema_kl": "AWM's stabiliser"}

    def uses_old_policy(self) -> bool:
        return self.config.train.awm_ema_kl > 0

    @classmethod
    def validate(cls, config, chosen: type[Estimator], need: Need) -> None:
        super().validate(config, chosen, need)
        t = config.train
        need(t.awm_ema_kl >= 0, f"train.awm_ema_kl must be >= 0; got {t.awm_ema_kl}")
        if t.awm_ema_kl == 0:  # no proximal term: no old policy whose schedule these keys would set
            defaults = {f.name: f.default for f in dataclasses.fields(t)}
            for key in ("old_policy_flat", "old_policy_uprate", "old_policy_uphold"):
                need(
                    getattr(t, key) == defaults[key],
                    f"train.{key} schedules the old (EMA) policy, which train.algorithm=awm keeps only for its "
                    f"proximal term: set train.awm_ema_kl > 0, or train.{key} back to {defaults[key]:g}",
                )

    def estimator_loss(self, x0, noise, level, x0_pred, raw, old, weights):
        target = matching_target(x0, noise, level, self.prediction_space)
        return awm_loss(raw, target, weights, old[1] if old is not None else None, self.config.train.awm_ema_kl)


class DiffusionNFT(ForwardProcessEstimator):
    """DiffusionNFT: implicit positive and negative policies around the old policy
    (:func:`~ddpo.policy.forward.nft_loss`); training batches are sampled with the old policy unless
    ``train.nft_sample_policy=current``."""

    name = "nft"
    own_keys = {
        "train.nft_beta": "DiffusionNFT's distance b of its implicit policies",
        "train.nft_sample_policy": "DiffusionNFT's choice of sampling weights",
    }

    def uses_old_policy(self) -> bool:
        return True

    @classmethod
    def validate(cls, config, chosen: type[Estimator], need: Need) -> None:
        super().validate(config, chosen, need)
        t = config.train
        need(t.nft_beta > 0, f"train.nft_beta must be > 0; got {t.nft_beta}")
        need(
            t.nft_sample_policy in ("old", "current"),
            f"train.nft_sample_policy must be old or current; got {t.nft_sample_policy!r}",
        )

    @property
    def samples_with_old_policy(self) -> bool:
        """Whether training batches are sampled with the old policy's weights (as DiffusionNFT's reference does)."""
        return self.config.train.nft_sample_policy == "old"

    def sampling_weights(self) -> contextlib.AbstractContextManager:
        return self.old_policy_weights() if self.samples_with_old_policy else contextlib.nullcontext()

    def estimator_loss(self, x0, noise, level, x0_pred, raw, old, weights):
        t = self.config.train
        return nft_loss(x0_pred, old[0], x0, weights, t.nft_beta, t.adv_clip_max)
