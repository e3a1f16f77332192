"""Preference estimators: Diffusion-DPO (Wallace et al., CVPR 2024) on offline pairs (``train.algorithm=dpo``) and on
the policy's own samples paired by their reward (``train.algorithm=online_dpo``). :mod:`ddpo.policy.dpo` holds the
maths; re-noising and the denoiser's predictions are those of every estimator on clean latents
(:class:`~.forward_process.ReNoisingEstimator`).

Both re-noise a pair's two clean latents at one timestep with one noise (a timestep of the run's sampling schedule:
``sample.scheduler`` with ``sample.num_steps`` steps, evenly spaced over the training range for DDIM, so that
Diffusion-DPO's uniform draw over the 1,000 training timesteps is its ``sample.num_steps``-point version) and compare
the trained model's pretraining loss on them with the reference's, the base model: the denoiser with its LoRA adapters
off, or under full fine-tuning a frozen copy kept whatever ``train.kl_coef`` (:meth:`PreferenceEstimator.
frozen_reference`).

* ``online_dpo`` fits the trainer's epoch: clean samples from any sampler, scored; each prompt group (the
  ``sample.samples_per_prompt`` consecutive samples of one prompt draw) gives one pair, its best-rewarded sample
  preferred to its worst, none when its rewards are all equal (:func:`~ddpo.policy.dpo.best_worst_pairs`). The
  trainer's (sample, step) minibatches train the pair of each preferred sample they hold, at that step.
* ``dpo`` owns its epoch (:attr:`~.base.Estimator.owns_epoch`): one shuffled pass over the preference pairs of
  ``train.preference_data`` (:mod:`ddpo.training.preference_data`), ``train.batch_size`` pairs a minibatch, each
  minibatch's images VAE-encoded once, without gradient. It also samples and scores the epoch's prompt draws with the
  weights it starts from (no gradient, nothing trained on them), which every run logs: ``reward_mean`` and the grid.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch

from ...policy.dpo import best_worst_pairs, dpo_loss, pair_roles, per_sample_mse, rejected_partner
from ...policy.forward import matching_target
from ...policy.sampling import encode_images, sampler_timesteps, set_timesteps
from ..streams import Stream, derive_seed
from .base import EpochResult, EpochRun, Estimator, Need, Policy
from .forward_process import ReNoisingEstimator

if TYPE_CHECKING:
    from ...policy.sampling import CleanSamples
    from ..preference_data import PreferencePairs

PAIR_STATISTICS = ("dpo_loss", "dpo_margin", "dpo_accuracy", "model_mse", "reference_mse")
"""The per-pair diagnostics of :func:`~ddpo.policy.dpo.dpo_loss` averaged over an epoch's trained pairs."""


class PreferenceEstimator(ReNoisingEstimator):
    """What both DPO estimators share: the DPO ``beta``, the reference (the base model), the loss of a batch of pairs
    (:meth:`pair_loss`) and its per-pair statistics over the epoch (logged by :meth:`end_epoch`)."""

    own_keys = {"train.dpo_beta": "Diffusion-DPO's beta, how strongly the policy is held to the base model"}

    def __init__(self, policy: Policy):
        super().__init__(policy)
        self.sums = torch.zeros(len(PAIR_STATISTICS) + 1, dtype=torch.float64)  # the statistics' sums, then pairs

    @classmethod
    def validate(cls, config, chosen: type[Estimator], need: Need) -> None:
        super().validate(config, chosen, need)  # the sampler, train.kl_form, train.ratio_form
        t = config.train
        need(t.dpo_beta > 0, f"train.dpo_beta must be > 0; got {t.dpo_beta}")
        need(
            t.kl_coef == 0,
            f"train.algorithm={cls.name} holds the policy to the base model through train.dpo_beta (the DPO loss is "
            f"relative to it); train.kl_coef would add a second pull: set train.kl_coef=0 (got {t.kl_coef})",
        )

    @classmethod
    def frozen_reference(cls, denoiser: torch.nn.Module, config) -> torch.nn.Module | None:
        """The DPO loss always compares with the base model: under full fine-tuning a frozen copy, whatever
        ``train.kl_coef``; with LoRA none (the denoiser with its adapters off is the base model)."""
        if config.model.use_lora:
            return None
        return copy.deepcopy(denoiser).requires_grad_(False)

    def pair_loss(
        self, x0_w: torch.Tensor, x0_l: torch.Tensor, cond: Any, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Diffusion-DPO's loss of ``P`` pairs (:func:`~ddpo.policy.dpo.dpo_loss`): preferred and rejected clean
        latents ``x0_w``, ``x0_l`` ``[P, C, h, w]``, the pairs' conditioning ``cond`` ``[P, ...]`` and timesteps
        ``[P]`` (entries of the run's sampling schedule). Both latents of a pair are re-noised with one noise drawn
        from the inner epoch's generator; one call of the reference without gradient and one of the trained model,
        each on the ``2P`` rows. Returns the loss and ``{"loss": ...}``; the per-pair statistics are summed for
        :meth:`end_epoch`."""
        p = self.policy
        pairs = x0_w.shape[0]
        noise = self.draw_noise(x0_w.shape, x0_w.device)
        both = torch.arange(pairs, device=timesteps.device).repeat(2)  # preferred rows, then rejected rows
        x_t, noise, level = self.renoise(torch.cat([x0_w, x0_l]), timesteps[both], noise[both])
        embeds = cond[both.to(x0_w.device)]
        target = matching_target(torch.cat([x0_w, x0_l]), noise, level, self.prediction_space)
        with torch.no_grad(), p.base_model() as base:
            ref_mse = per_sample_mse(self.denoise(base, x_t, timesteps[both], embeds, level)[1], target)
        mse = per_sample_mse(self.denoise(p.model, x_t, timesteps[both], embeds, level)[1], target)
        loss, info = dpo_loss(mse[:pairs], mse[pairs:], ref_mse[:pairs], ref_mse[pairs:], self.config.train.dpo_beta)
        values = [loss.detach(), *(info[key] for key in PAIR_STATISTICS[1:])]
        self.sums += torch.stack([v.double().cpu() * pairs for v in values] + [torch.tensor(float(pairs))])
        return loss, {"loss": loss.detach()}

    def end_epoch(self, global_step: int) -> dict[str, float]:
        """The epoch's per-pair statistics, averaged over every process's trained pairs: ``dpo_loss``,
        ``dpo_margin``, ``dpo_accuracy`` (the fraction of pairs the policy ranks right relative to the base model),
        ``model_mse``, ``reference_mse``, and ``dpo_pairs_trained`` (pairs times steps trained)."""
        acc = self.policy.accelerator
        sums = acc.reduce(self.sums.to(acc.device), reduction="sum").cpu() if acc.num_processes > 1 else self.sums
        self.sums = torch.zeros_like(self.sums)
        pairs = float(sums[-1])
        metrics = {key: float(sums[k]) / pairs if pairs else 0.0 for k, key in enumerate(PAIR_STATISTICS)}
        return {**metrics, "dpo_pairs_trained": pairs}


class OnlineDPO(PreferenceEstimator):
    """Online DPO: the policy's own samples, paired within each prompt group by the reward (best vs worst), trained
    with Diffusion-DPO's loss at the trainer's (sample, step) minibatches. The per-sample weights are the samples'
    roles (:func:`~ddpo.policy.dpo.pair_roles`: +1 preferred, -1 rejected, 0 in no pair); a minibatch trains the
    pairs of the preferred samples it holds."""

    name = "online_dpo"
    unused_keys = {
        "train.advantage": "each prompt's pair is its best and worst rewarded sample; advantages are not used",
        "train.adv_clip_max": "advantages are not used",
    }

    @classmethod
    def validate(cls, config, chosen: type[Estimator], need: Need) -> None:
        super().validate(config, chosen, need)
        s = config.sample
        need(
            s.samples_per_prompt >= 2,
            f"train.algorithm=online_dpo pairs samples of one prompt: sample.samples_per_prompt must be >= 2 (the best "
            f"and the worst of each prompt's samples make a pair); got {s.samples_per_prompt}",
        )

    def epoch_weights(self, rewards: torch.Tensor, prompts: list[str], advantages: torch.Tensor) -> torch.Tensor:
        """The samples' roles ``[N]`` (every process's, in process order): each process's prompt groups paired by
        :func:`~ddpo.policy.dpo.best_worst_pairs` (the advantages are not used). Also remembers the epoch's number of
        pairs and their mean reward gap for :meth:`prepare_epoch`."""
        group = self.config.sample.samples_per_prompt
        per_process = rewards.reshape(self.policy.accelerator.num_processes, -1)
        roles, gaps = [], []
        for p, process_rewards in enumerate(per_process):
            preferred, rejected = best_worst_pairs(process_rewards, group)
            first = p * per_process.shape[1]
            for best, worst in zip((preferred + first).tolist(), (rejected + first).tolist(), strict=True):
                if prompts[best] != prompts[worst]:  # the sampling layout guarantees it; a change must not go unseen
                    raise RuntimeError(
                        f"online DPO paired samples of two prompts: {prompts[best]!r} and {prompts[worst]!r}"
                    )
            roles.append(pair_roles(per_process.shape[1], preferred, rejected))
            values = process_rewards.detach().float().cpu()
            gaps.append(values[preferred] - values[rejected])
        gap = torch.cat(gaps)
        self.epoch_pairs = {
            "dpo_pairs": torch.tensor(float(gap.numel())),
            "dpo_pair_reward_gap": gap.mean() if gap.numel() else torch.tensor(0.0),
        }
        return torch.cat(roles).to(rewards.device)

    def prepare_epoch(self, samples: CleanSamples, inner_pairs) -> tuple[CleanSamples, dict[str, torch.Tensor]]:
        """The samples unchanged; the epoch's pairs (``dpo_pairs``, over every process) and their mean reward gap."""
        device = self.policy.accelerator.device
        return samples, {key: value.to(device) for key, value in self.epoch_pairs.items()}

    def loss(
        self, samples: CleanSamples, weights: torch.Tensor, i: torch.Tensor, j: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The DPO loss of the pairs whose preferred sample is among the minibatch's samples ``i`` (at their steps
        ``j``; ``weights``: the roles). A minibatch without one still calls the model on one row with weight 0, so that
        every process takes part in the gradient's all-reduce."""
        preferred = weights[i] > 0
        if not bool(preferred.any()):
            x_t, _, level = self.renoise(samples.latents[i[:1]], samples.timesteps[j[:1]])
            raw = self.denoise(self.policy.model, x_t, samples.timesteps[j[:1]], samples.cond[i[:1]], level)[1]
            loss = 0.0 * raw.sum()
            return loss, {"loss": loss.detach()}
        w, steps = i[preferred], j[preferred]
        l = rejected_partner(w, weights, self.config.sample.samples_per_prompt)  # noqa: E741 (the paper's x_l)
        return self.pair_loss(samples.latents[w], samples.latents[l], samples.cond[w], samples.timesteps[steps])


class DiffusionDPO(PreferenceEstimator):
    """Diffusion-DPO on offline preference pairs (``train.preference_data``): an epoch is one shuffled pass over the
    pairs, from the stream ``(seed, Stream.PREFERENCE_ORDER, epoch)``; a minibatch's timesteps and noise come from
    ``(seed, Stream.FORWARD_NOISE, epoch, 0, process)``."""

    name = "dpo"
    owns_epoch = True
    own_keys = {"train.preference_data": "Diffusion-DPO's offline preference pairs"}

    @classmethod
    def validate(cls, config, chosen: type[Estimator], need: Need) -> None:
        super().validate(config, chosen, need)
        t, s = config.train, config.sample
        need(
            bool(t.preference_data),
            "train.algorithm=dpo trains on offline preference pairs: set train.preference_data to a .parquet file in "
            "Pick-a-Pic's layout or a folder with metadata.jsonl (e.g. train.preference_data=tests/data/world_prefs)",
        )
        need(
            s.resolution is not None,
            "train.algorithm=dpo crops and resizes its images to sample.resolution: set it (e.g. sample.resolution=512 "
            "for Stable Diffusion 1.5, 64 for the world)",
        )

    @classmethod
    def describe_minibatches(cls, config) -> str:
        return (
            f"train.batch_size {config.train.batch_size} preference pairs of train.preference_data (an epoch is one "
            "shuffled pass over them)"
        )

    @classmethod
    def read_inputs(cls, config, num_processes: int, main_process: bool) -> PreferencePairs:
        """The preference pairs, read and checked in full (:func:`~ddpo.training.preference_data.
        load_preference_data`); refused when they fill no optimiser step."""
        from ..preference_data import PreferenceDataError, load_preference_data

        t = config.train
        data = load_preference_data(t.preference_data, config.sample.resolution)
        per_step = t.batch_size * t.gradient_accumulation_steps * num_processes
        if len(data) < per_step:
            processes = f"{num_processes} process{'es' if num_processes > 1 else ''}"
            raise PreferenceDataError(
                f"train.preference_data: {data.source!r} holds {len(data)} pairs, fewer than one optimiser step takes "
                f"({per_step} = train.batch_size {t.batch_size} x train.gradient_accumulation_steps "
                f"{t.gradient_accumulation_steps} x {processes}); lower them or add pairs"
            )
        if main_process:
            steps = len(data) // per_step
            print(
                f"ddpo: preference data {data.source}: {len(data)} pairs ({data.ties} ties with label_0=0.5 left out, "
                f"as Diffusion-DPO does); an epoch is one shuffled pass: {steps} optimiser steps of {per_step} pairs"
                + (
                    f", the last {len(data) - steps * per_step} pairs of each pass left out"
                    if len(data) % per_step
                    else ""
                ),
                flush=True,
            )
        return data

    @property
    def data(self) -> PreferencePairs:
        return self.policy.inputs

    def pairs_per_epoch(self) -> int:
        """Pairs trained an epoch, over every process: whole optimiser steps of the shuffled pass."""
        t, processes = self.config.train, self.policy.accelerator.num_processes
        per_step = t.batch_size * t.gradient_accumulation_steps * processes
        return len(self.data) // per_step * per_step

    def samples_per_epoch(self, sampled: int) -> int:
        """The ``samples`` metric counts the preference pairs trained on."""
        return self.pairs_per_epoch()

    def train_epoch(self, run: EpochRun) -> EpochResult:
        """Sample and score the epoch's prompt draws with the weights the epoch starts from (logged), then one
        shuffled pass over the preference pairs, ``train.batch_size`` pairs a minibatch through ``run.step``."""
        c, p, acc = self.config, self.policy, self.policy.accelerator
        samples, rewards, reward_info, timings = run.sample_and_score()
        self.begin_inner_epoch(run.epoch, 0)  # the minibatches' timesteps and noise
        set_timesteps(p.scheduler, p.settings, acc.device)
        timesteps = sampler_timesteps(p.scheduler).to(acc.device)
        order = torch.randperm(
            len(self.data),
            generator=torch.Generator().manual_seed(derive_seed(c.seed, Stream.PREFERENCE_ORDER, run.epoch)),
        )[: self.pairs_per_epoch()]
        size = c.train.batch_size
        for start in range(0, order.numel(), size * acc.num_processes):
            index = order[start + acc.process_index * size : start + (acc.process_index + 1) * size].tolist()
            preferred, rejected = self.data.images(index, c.sample.resolution)
            with torch.no_grad():  # once per minibatch: both images of every pair in one VAE call
                x0 = encode_images(run.vae, torch.cat([preferred, rejected]).to(acc.device), c.mixed_precision)
            cond = run.encode([self.data.captions[k] for k in index])
            t = timesteps[torch.randint(len(timesteps), (len(index),), generator=self.noise).to(acc.device)]
            x0_w, x0_l = x0.chunk(2)
            run.step(lambda x0_w=x0_w, x0_l=x0_l, cond=cond, t=t: self.pair_loss(x0_w, x0_l, cond, t))
        extra = {"dpo_pairs": torch.tensor(float(order.numel()), device=acc.device)}
        return EpochResult(samples.prompts, samples.images, rewards, reward_info, timings, extra)
