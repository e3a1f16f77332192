"""Per-step log-prob estimators: DDPO-IS (PPO clip), DDPO-SF (REINFORCE), RWR and sparse RWR.

They share everything but the loss and the trajectory weights: trajectories sampled with a log-prob sampler
(:data:`~ddpo.policy.schedulers.STEP_FUNCTIONS`), each stored ``(x_t, x_{t-1})`` pair re-scored by the trained model
exactly as it was sampled (:func:`~ddpo.policy.sampling.recompute_pairs`), and a loss of
:mod:`ddpo.policy.losses` on the pairs' log-probs (``[N]``), plus an optional KL to the base model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import torch

from ...policy.flow import flow_grpo_kl_scale, flow_grpo_log_ratio_scale
from ...policy.losses import (
    ddpo_is_loss,
    ddpo_sf_loss,
    kl_to_reference,
    rwr_weights,
    sparse_rwr_weights,
    weighted_regression_loss,
)
from ...policy.sampling import recompute_pairs
from ...policy.schedulers import STEP_FUNCTIONS, StepOutput
from ..killpoints import kill_point
from .base import Estimator, Need

if TYPE_CHECKING:
    from ...policy.sampling import Trajectories


class LogProbEstimator(Estimator):
    """The per-step log-prob family; a subclass names its loss (:attr:`loss_function`) and may map the advantages to
    other weights (:meth:`trajectory_weights`)."""

    uses_log_probs = True
    loss_function: ClassVar[Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]]
    """``(log_prob [N], old_log_prob [N], weights [N], clip_range) -> (loss, info)`` of :mod:`ddpo.policy.losses`."""

    @classmethod
    def validate(cls, config, chosen: type[Estimator], need: Need) -> None:
        if chosen is not cls:
            return
        s = config.sample
        need(
            s.scheduler in STEP_FUNCTIONS,
            f"train.algorithm={cls.name} needs a sampler with per-step log-probabilities: sample.scheduler must be "
            f"ddim or ddpm, or flow_sde / flow_cps for flow-matching models (got {s.scheduler!r}); the "
            "forward-process estimators train.algorithm=awm|nft take any sampler",
        )
        need(s.eta > 0, f"sample.eta must be > 0 (eta = 0 is deterministic and has no log-probability); got {s.eta}")
        super().validate(config, chosen, need)  # train.ratio_form

    @classmethod
    def recomputes_old_log_probs(cls, config) -> bool:
        mode = config.train.old_log_probs
        return mode == "recompute" or (mode == "auto" and config.train.batch_size != config.sample.batch_size)

    def prepare_epoch(self, samples: Trajectories, inner_pairs) -> tuple[Trajectories, dict[str, torch.Tensor]]:
        """With ``train.old_log_probs`` recomputing (:meth:`recomputes_old_log_probs`): the samples with their
        log-probs re-scored in the training shapes (:meth:`old_log_probs`) and ``old_log_prob_change_max``."""
        if not self.recomputes_old_log_probs(self.config):
            return samples, {}
        import dataclasses

        pairs = [inner_pairs(inner) for inner in range(self.config.train.num_inner_epochs)]
        recomputed = self.old_log_probs(samples, pairs)
        extra = {"old_log_prob_change_max": (recomputed - samples.log_probs).abs().max()}
        samples = dataclasses.replace(samples, log_probs=recomputed)
        kill_point("old_log_probs")
        return samples, extra

    @torch.no_grad()
    def old_log_probs(
        self, samples: Trajectories, inner_pairs: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """The samples' log-probs ``[B, T]`` with every pair of every inner epoch (``inner_pairs[k]``: inner epoch
        ``k``'s ``(pair_traj, pair_step)``, ``[P]`` each, in training order) re-scored by the current denoiser in the
        training call's exact minibatches (``train.batch_size`` pairs per call, train mode, same autocast): inner
        epoch 0's minibatches, then each minibatch of a later inner epoch that holds pairs not re-scored yet (only
        those are written; with ``timestep_fraction=1`` inner epoch 0 holds them all). Before the first optimiser step
        training recomputes each pair in the same shapes from the same weights, so the PPO ratio is exactly 1 whatever
        the kernels do with batch size, and later inner epochs compare with old log-probs of the same layout."""
        size = self.config.train.batch_size
        model = self.policy.unwrapped()
        log_probs = samples.log_probs.clone()
        done = torch.zeros_like(log_probs, dtype=torch.bool)
        for pair_traj, pair_step in inner_pairs:
            for first in range(0, pair_traj.numel(), size):
                i, j = pair_traj[first : first + size], pair_step[first : first + size]
                new = ~done[i, j]
                if not bool(new.any()):
                    continue
                log_prob = self.recompute(model, samples, i, j).log_prob
                log_probs[i[new], j[new]] = log_prob[new]
                done[i, j] = True
        return log_probs

    def recompute(self, model, samples: Trajectories, i: torch.Tensor, j: torch.Tensor) -> StepOutput:
        """The policy step of ``model`` at stored pairs ``(i, j)`` (``[N]`` each), exactly as sampled (same CFG,
        autocast, eta): mean and std ``[N, C, h, w]`` / ``[N]``, log-prob ``[N]``."""
        p = self.policy
        denoiser = p.family.bind(model, p.settings.guidance_scale)
        return recompute_pairs(denoiser, p.scheduler, samples, i, j, p.settings)

    def loss(
        self, samples: Trajectories, weights: torch.Tensor, i: torch.Tensor, j: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of ``N`` (trajectory ``i``, step ``j``) pairs (``[N]`` each) in **one** denoiser call, with
        diagnostics."""
        t, scheduler_name = self.config.train, self.config.sample.scheduler
        out = self.recompute(self.policy.model, samples, i, j)
        log_prob, old_log_prob = out.log_prob, samples.log_probs[i, j]
        if t.ratio_form == "flow_grpo":  # Flow-GRPO's log-ratio: the true one times a per-step factor
            scale = flow_grpo_log_ratio_scale(scheduler_name, out.std)
            log_prob, old_log_prob = log_prob * scale, old_log_prob * scale
        loss, info = type(self).loss_function(log_prob, old_log_prob, weights[i], t.clip_range)
        if t.kl_coef > 0:
            kl = kl_to_reference(out.mean, self.reference_mean(samples, i, j), out.std)
            if t.kl_form == "flow_grpo":  # Flow-GRPO's KL: the true one times a per-step factor
                kl = kl * flow_grpo_kl_scale(self.policy.scheduler, scheduler_name, samples.timesteps[j])
            kl = kl.mean()
            loss = loss + t.kl_coef * kl
            info["kl"] = kl.detach()
        info["loss"] = loss.detach()
        return loss, info

    @torch.no_grad()
    def reference_mean(self, samples: Trajectories, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Mean ``[N, C, h, w]`` of the frozen base policy at the same pairs."""
        with self.policy.base_model() as base:
            return self.recompute(base, samples, i, j).mean


class DDPOImportanceSampling(LogProbEstimator):
    """DDPO-IS: the PPO clipped surrogate on the per-step ratio (:func:`~ddpo.policy.losses.ddpo_is_loss`)."""

    name = "ddpo_is"
    loss_function = staticmethod(ddpo_is_loss)
    uses_ppo_ratio = True


class DDPOScoreFunction(LogProbEstimator):
    """DDPO-SF: REINFORCE (:func:`~ddpo.policy.losses.ddpo_sf_loss`), unbiased on-policy only."""

    name = "ddpo_sf"
    loss_function = staticmethod(ddpo_sf_loss)

    @classmethod
    def validate(cls, config, chosen: type[Estimator], need: Need) -> None:
        super().validate(config, chosen, need)
        need(
            chosen is not cls or config.train.num_inner_epochs == 1,
            "train.algorithm=ddpo_sf is only unbiased on-policy: set train.num_inner_epochs=1 (or use ddpo_is)",
        )


class RewardWeightedRegression(LogProbEstimator):
    """RWR: weighted maximum likelihood with ``w = N softmax(A / train.rwr_temperature)``."""

    name = "rwr"
    loss_function = staticmethod(weighted_regression_loss)
    own_keys = {"train.rwr_temperature": "RWR's softmax temperature"}

    @classmethod
    def validate(cls, config, chosen: type[Estimator], need: Need) -> None:
        super().validate(config, chosen, need)
        t = config.train
        need(t.rwr_temperature > 0, f"train.rwr_temperature must be > 0; got {t.rwr_temperature}")

    def trajectory_weights(self, advantages: torch.Tensor) -> torch.Tensor:
        return rwr_weights(advantages, self.config.train.rwr_temperature)


class SparseRewardWeightedRegression(LogProbEstimator):
    """Sparse RWR: weight 1 for the advantages at or above the batch quantile ``train.rwr_quantile``, else 0."""

    name = "rwr_sparse"
    loss_function = staticmethod(weighted_regression_loss)
    own_keys = {"train.rwr_quantile": "sparse RWR's quantile"}

    @classmethod
    def validate(cls, config, chosen: type[Estimator], need: Need) -> None:
        super().validate(config, chosen, need)
        t = config.train
        need(0 <= t.rwr_quantile < 1, f"train.rwr_quantile must be in [0, 1); got {t.rwr_quantile}")

    def trajectory_weights(self, advantages: torch.Tensor) -> torch.Tensor:
        return sparse_rwr_weights(advantages, self.config.train.rwr_quantile)
