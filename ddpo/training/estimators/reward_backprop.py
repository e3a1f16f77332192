"""Reward-backpropagation estimators: DRaFT (DRaFT-K, DRaFT-LV) and AlignProp train by the gradient of a
differentiable reward back through the VAE and the last sampling steps (:mod:`ddpo.policy.reward_backprop` holds
their maths). They own their epoch (:attr:`~.base.Estimator.owns_epoch`): each of the trainer's prompt batches is
sampled with gradients, decoded, rewarded and back-propagated as one minibatch (``EpochRun.step``); there are no
advantages and no (sample, step) pairs.

Random draws: the chain's ``x_T`` and step noise from the batch's sampling-noise seed (the trainer's own draws),
AlignProp's ``K`` from ``(seed, Stream.TRUNCATION, epoch, batch)`` and DRaFT-LV's re-noising from
``(seed, Stream.REWARD_NOISE, epoch, batch, process)``, so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from ...policy.reward_backprop import (
    DIFFERENTIABLE_SAMPLERS,
    alignprop_first_gradient_step,
    draft_first_gradient_step,
    last_step_with_gradient,
    reward_backprop_loss,
    sample_with_reward_gradient,
)
from ...policy.sampling import autocast, decode_latents, guided_model_output, vae_decode
from ..scoring import combine_scores
from ..streams import Stream, derive_seed
from .base import EpochResult, EpochRun, Estimator, Need, PromptBatch, not_differentiable_message


class RewardBackpropagation(Estimator):
    """The family: a differentiable sampler, a differentiable reward, one minibatch per prompt batch; a subclass says
    where the gradient steps start (:meth:`first_gradient_step`)."""

    owns_epoch = True
    needs_differentiable_reward = True
    own_keys = {"train.reward_clip_max": "reward backpropagation's clamp of each sample's reward"}
    unused_keys = {
        "train.batch_size": "each prompt batch, sample.batch_size, is one minibatch",
        "train.advantage": "there are no advantages: the reward's gradient trains the model",
        "train.adv_clip_max": "there are no advantages",
        "train.clip_range": "there is no probability ratio",
        "train.timestep_fraction": "the back-propagated steps are the last K of each chain",
        "train.timestep_window": "the back-propagated steps are the last K of each chain",
        "train.old_log_probs": "there are no log-probs",
    }

    @classmethod
    def validate(cls, config, chosen: type[Estimator], need: Need) -> None:
        s, t = config.sample, config.train
        if chosen is cls:
            need(
                s.scheduler in DIFFERENTIABLE_SAMPLERS,
                f"train.algorithm={cls.name} back-propagates through the sampler's steps: sample.scheduler must be one "
                f"of {', '.join(DIFFERENTIABLE_SAMPLERS)} (a differentiable step); got {s.scheduler!r}",
            )
            need(
                s.num_batches_per_epoch % t.gradient_accumulation_steps == 0,
                f"train.algorithm={cls.name} trains on each prompt batch as one minibatch: sample.num_batches_per_epoch "
                f"({s.num_batches_per_epoch}) must be a multiple of train.gradient_accumulation_steps "
                f"({t.gradient_accumulation_steps}) so that every optimiser step is full",
            )
            need(
                t.num_inner_epochs == 1,
                f"train.algorithm={cls.name} trains once on each batch as it samples it: train.num_inner_epochs must "
                f"be 1; got {t.num_inner_epochs}",
            )
            need(
                t.kl_form == "gaussian",
                f"train.kl_form=flow_grpo is the KL of a log-prob step; train.algorithm={cls.name} has its own KL in "
                "the model's prediction space (use train.kl_form=gaussian)",
            )
            name = config.reward.name
            if ":" not in name:  # an import path is known only once imported (refused at reward load)
                from rewards import available, differentiability

                need(
                    name not in available() or differentiability(name) != "no",
                    not_differentiable_message(name, cls.name),
                )
            super().validate(config, chosen, need)  # train.ratio_form
        clip = t.reward_clip_max
        need(
            clip is None or math.isfinite(clip),
            f"train.reward_clip_max must be a finite number or null (no clamp); got {clip}",
        )

    @classmethod
    def describe_minibatches(cls, config) -> str:
        s = config.sample
        return (
            f"each minibatch is one prompt batch (sample.batch_size {s.batch_size}) sampled with reward gradients, "
            f"sample.num_batches_per_epoch {s.num_batches_per_epoch} of them an epoch per process"
        )

    # ------------------------------------------------------------------ one epoch

    def first_gradient_step(self, epoch: int, batch: PromptBatch) -> int:
        """The index of the first sampling step whose denoiser call carries gradients for this batch."""
        raise NotImplementedError

    def train_epoch(self, run: EpochRun) -> EpochResult:
        """One minibatch per prompt batch (:meth:`batch_loss` through ``run.step``); the epoch's images are the
        chains' own (DRaFT-LV: the clean samples), scored without gradient for the log."""
        images, prompts, scores = [], [], []
        for batch in run.batches:
            kept: dict[str, torch.Tensor] = {}
            run.step(lambda batch=batch, kept=kept: self.batch_loss(run, batch, kept))
            scores.append(run.score(kept["images"], batch.prompts, batch.where))
            images.append(kept["images"])
            prompts += batch.prompts
        rewards, reward_info, timings, _ = combine_scores(scores, False, 0.0)
        timings = {"scoring_seconds": timings["scoring_seconds"]}
        return EpochResult(prompts, torch.cat(images), rewards, reward_info, timings)

    def batch_loss(
        self, run: EpochRun, batch: PromptBatch, kept: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one prompt batch: its chain sampled with gradients in the last steps, decoded, rewarded
        (``-mean`` of the clamped reward, :func:`~ddpo.policy.reward_backprop.reward_backprop_loss`) plus
        ``train.kl_coef`` times the KL at the gradient steps. ``kept["images"]``: the batch's images ``[B, 3, H, W]``
        (detached) for the log."""
        p, t = self.policy, self.config.train
        cond = run.encode(batch.prompts)
        device = p.accelerator.device
        generator = torch.Generator(device=device).manual_seed(batch.noise_seed)
        settings = self.sampler_settings()
        denoiser = p.family.bind(p.model, settings.guidance_scale)
        reference = self.reference_output(run, settings) if t.kl_coef > 0 else None
        first = self.first_gradient_step(run.epoch, batch)
        chain = sample_with_reward_gradient(
            denoiser, p.scheduler, cond, run.negative_cond, batch.prompts, generator, settings, first,
            t.gradient_checkpointing, reference,
        )  # fmt: skip
        final, kl = chain.latents, chain.kl
        if first == settings.num_steps:  # DRaFT-LV: the last step from re-noised clean samples
            kept["images"] = decode_latents(run.vae, final, settings.mixed_precision, settings.decode_chunk_size)
            final, kl = self.low_variance_samples(run, batch, final, cond, settings, denoiser, reference)
        images = self.decode(run.vae, final)
        if "images" not in kept:
            kept["images"] = images.detach()[: len(batch.prompts)]
        rewards = run.reward(images, batch.prompts * (len(images) // len(batch.prompts)))
        loss = reward_backprop_loss(rewards, t.reward_clip_max)
        info = {"reward_backprop_steps": torch.tensor(float(max(chain.gradient_steps, 1)))}
        if kl is not None:
            kl = kl.mean()
            loss = loss + t.kl_coef * kl
            info["kl"] = kl.detach()
        info["loss"] = loss.detach()
        return loss, info

    def low_variance_samples(self, run, batch, x0, cond, settings, denoiser, reference):
        """DRaFT-LV: ``n`` re-noisings of the clean ``x0`` with the last step taken from each with gradient, stacked
        ``[n * B, C, h, w]`` (their rewards averaged by the loss's mean), and their mean KL."""
        raise NotImplementedError(f"train.algorithm={self.name} has no low-variance estimate")

    def sampler_settings(self):
        """The run's sampler settings for a training batch (``sample.share_initial_noise`` as the trainer samples)."""
        import dataclasses

        share = self.config.sample.share_initial_noise
        return dataclasses.replace(self.policy.settings, share_initial_noise=share)

    def reference_output(self, run: EpochRun, settings):
        """The base model's guided output at ``(latents, t, cond)``, no gradient (the KL reference)."""
        p = self.policy

        def output(latents: torch.Tensor, t, cond) -> torch.Tensor:
            with torch.no_grad(), p.base_model() as base, autocast(latents.device, settings.mixed_precision):
                bound = p.family.bind(base, settings.guidance_scale)
                return guided_model_output(bound, latents, t, cond, run.negative_cond, settings.guidance_scale)

        return output

    def decode(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` differentiable w.r.t. ``latents``, ``sample.decode_chunk_size`` at a time; with
        ``train.gradient_checkpointing`` each chunk's decode runs under ``torch.utils.checkpoint``, so the backward
        pass holds one chunk's VAE activations at a time."""
        s = self.policy.settings

        def decode(x: torch.Tensor) -> torch.Tensor:
            return vae_decode(vae, x, s.mixed_precision, s.decode_chunk_size)

        if not self.config.train.gradient_checkpointing:
            return decode(latents)
        chunks = latents.split(s.decode_chunk_size)
        return torch.cat([activation_checkpoint(decode, chunk, use_reentrant=False) for chunk in chunks])


class DRaFT(RewardBackpropagation):
    """DRaFT-K: gradients through the last ``train.draft_k`` steps; DRaFT-LV (``train.draft_lv``, ``K = 1``): the
    last step from ``train.draft_lv_samples`` re-noisings of the clean sample."""

    name = "draft"
    own_keys = {
        "train.draft_k": "DRaFT's number K of last sampling steps back-propagated through",
        "train.draft_lv": "DRaFT-LV's switch",
        "train.draft_lv_samples": "DRaFT-LV's number n of re-noisings",
    }

    @classmethod
    def validate(cls, config, chosen: type[Estimator], need: Need) -> None:
        super().validate(config, chosen, need)
        s, t = config.sample, config.train
        need(
            1 <= t.draft_k <= s.num_steps,
            f"train.draft_k must be in [1, sample.num_steps={s.num_steps}] (the last K sampling steps carry "
            f"gradients; K = num_steps is full DRaFT); got {t.draft_k}",
        )
        need(
            not t.draft_lv or t.draft_k == 1,
            f"train.draft_lv=true is DRaFT-LV, a low-variance DRaFT-1: it needs train.draft_k=1; got {t.draft_k}",
        )
        need(t.draft_lv_samples >= 1, f"train.draft_lv_samples must be >= 1; got {t.draft_lv_samples}")
        need(
            t.draft_lv or t.draft_lv_samples == 2,
            "train.draft_lv_samples is DRaFT-LV's number of re-noisings and does nothing without train.draft_lv=true: "
            "set train.draft_lv=true or leave train.draft_lv_samples at 2",
        )

    def first_gradient_step(self, epoch: int, batch: PromptBatch) -> int:
        t, steps = self.config.train, self.policy.settings.num_steps
        return steps if t.draft_lv else draft_first_gradient_step(steps, t.draft_k)

    def low_variance_samples(self, run, batch, x0, cond, settings, denoiser, reference):
        p, t = self.policy, self.config.train
        seed = derive_seed(self.config.seed, Stream.REWARD_NOISE, run.epoch, batch.index, p.accelerator.process_index)
        generator = torch.Generator(device=x0.device).manual_seed(seed)
        samples, kls = [], []
        for _ in range(t.draft_lv_samples):
            x0_hat, kl = last_step_with_gradient(
                denoiser, p.scheduler, x0, cond, run.negative_cond, settings, generator, p.family.flow_matching,
                t.gradient_checkpointing, reference,
            )  # fmt: skip
            samples.append(x0_hat)
            if kl is not None:
                kls.append(kl)
        return torch.cat(samples), torch.stack(kls).mean(dim=0) if kls else None


class AlignProp(RewardBackpropagation):
    """AlignProp: gradients through the last ``K`` steps, ``K`` drawn uniformly from ``[train.alignprop_k_min,
    train.alignprop_k_max]`` for each batch (randomised truncated backpropagation)."""

    name = "alignprop"
    own_keys = {
        "train.alignprop_k_min": "AlignProp's smallest number K of back-propagated steps",
        "train.alignprop_k_max": "AlignProp's largest number K of back-propagated steps",
    }

    @classmethod
    def validate(cls, config, chosen: type[Estimator], need: Need) -> None:
        super().validate(config, chosen, need)
        s, t = config.sample, config.train
        k_max = s.num_steps if t.alignprop_k_max is None else t.alignprop_k_max
        need(
            1 <= t.alignprop_k_min <= k_max <= s.num_steps,
            f"train.alignprop_k_min and train.alignprop_k_max must satisfy 1 <= k_min <= k_max <= sample.num_steps="
            f"{s.num_steps} (K, the steps back-propagated through, is drawn from [k_min, k_max]; k_max null: "
            f"num_steps); got [{t.alignprop_k_min}, {k_max}]",
        )

    def first_gradient_step(self, epoch: int, batch: PromptBatch) -> int:
        t = self.config.train
        # One K per batch, the same on every process (their minibatches stay alike in cost).
        generator = torch.Generator().manual_seed(derive_seed(self.config.seed, Stream.TRUNCATION, epoch, batch.index))
        steps = self.policy.settings.num_steps
        k_max = steps if t.alignprop_k_max is None else t.alignprop_k_max
        return alignprop_first_gradient_step(steps, t.alignprop_k_min, k_max, generator)
