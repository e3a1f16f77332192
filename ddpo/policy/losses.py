"""Policy-gradient losses over (trajectory, timestep) pairs, as pure functions of tensors.

Every loss takes per-pair tensors of shape ``[N]`` (N = number of (trajectory, timestep) pairs in the minibatch):
``log_prob`` (current policy, differentiable), ``old_log_prob`` (the sampling policy, recorded during sampling) and
a per-pair weight: the advantage ``A_i`` of the pair's trajectory for DDPO, or the RWR weight ``w_i``. Log-probs
are averaged over latent dimensions (see :mod:`ddpo.policy.schedulers`). Each returns ``(loss, info)`` where ``info``
holds detached diagnostic tensors (``approx_kl``, ``clipfrac``, ``ratio_mean``, ``ratio_max``).
"""

from __future__ import annotations

import torch


def _ratio_info(log_prob: torch.Tensor, old_log_prob: torch.Tensor, clip_range: float) -> dict[str, torch.Tensor]:
    """Diagnostics of the importance ratio: approx KL = mean((log ratio)^2) / 2, clip fraction, ratio mean/max."""
    with torch.no_grad():
        log_ratio = (log_prob - old_log_prob).float()
        ratio = log_ratio.exp()
        return {
            "approx_kl": 0.5 * (log_ratio**2).mean(),
            "clipfrac": ((ratio - 1).abs() > clip_range).float().mean(),
            "ratio_mean": ratio.mean(),
            "ratio_max": ratio.max(),
        }


def ddpo_is_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DDPO-IS: the PPO clipped surrogate. ``ratio = exp(log_prob - old_log_prob)``;
    ``loss = mean(max(-A * ratio, -A * clip(ratio, 1 - clip_range, 1 + clip_range)))``."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), _ratio_info(log_prob, old_log_prob, clip_range)


def ddpo_sf_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float = 0.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DDPO-SF (REINFORCE): ``loss = -mean(A * log_prob)``. Only on-policy data is unbiased (one inner epoch)."""
    return -(advantages * log_prob).mean(), _ratio_info(log_prob, old_log_prob, clip_range)


def weighted_regression_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, weights: torch.Tensor, clip_range: float = 0.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RWR and sparse RWR: ``loss = -mean(w * log_prob)`` with the weights of :func:`rwr_weights` /
    :func:`sparse_rwr_weights` (weighted maximum likelihood on the sampled actions)."""
    return -(weights * log_prob).mean(), _ratio_info(log_prob, old_log_prob, clip_range)


def rwr_weights(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Exponentiated weights ``w = N * softmax(scores / temperature)`` over the batch (mean 1), ``[N] -> [N]``."""
    if temperature <= 0:
        raise ValueError(f"train.rwr_temperature must be > 0; got {temperature}")
    return scores.numel() * torch.softmax(scores.float() / temperature, dim=0)


def sparse_rwr_weights(scores: torch.Tensor, quantile: float) -> torch.Tensor:
    """Sparse RWR: ``w = 1[score >= quantile_q(scores)]`` (the top ``1 - q`` of the batch), ``[N] -> [N]``."""
    if not 0.0 <= quantile < 1.0:
        raise ValueError(f"train.rwr_quantile must be in [0, 1); got {quantile}")
    threshold = torch.quantile(scores.float(), quantile)
    return (scores >= threshold).float()


def kl_to_reference(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-pair KL between equal-variance Gaussians ``KL(N(mean, s^2) || N(ref_mean, s^2)) = |mean - ref|^2 / (2 s^2)``,
    averaged over latent dims (the same reduction as the log-probs). ``[N, C, H, W], [N, C, H, W], [N] -> [N]``."""
    diff = (mean.float() - ref_mean.float()) ** 2
    return (diff / (2 * std.float().view(-1, 1, 1, 1) ** 2)).mean(dim=(1, 2, 3))
