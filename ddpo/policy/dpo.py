"""Diffusion-DPO (Wallace et al., CVPR 2024, arXiv 2311.12908): the preference loss on pairs of clean latents, and the
rule that pairs the policy's own samples by their reward (online DPO).

A preference pair is two clean latents of one prompt ``c``, the preferred ``x0_w`` and the rejected ``x0_l``. Both are
re-noised at **one** timestep ``t`` with **one** noise ``eps`` (:mod:`ddpo.policy.forward`: ``x_t = sqrt(abar_t) x0 +
sqrt(1 - abar_t) eps`` for a DDPM-style schedule, ``x_t = (1 - sigma) x0 + sigma eps`` for flow matching), and each
model's pretraining loss is taken per sample, in the space the model was pretrained in
(:func:`~ddpo.policy.forward.matching_target`: the noise of an epsilon UNet, the velocity ``eps - x0`` of a
flow-matching model, as Flow-Factory and flow_grpo train flow models)::

    mse_w     = mean_latents |pred_theta(x_t^w, t, c) - target_w|^2        mse_l likewise
    ref_mse_w = mean_latents |pred_ref(x_t^w, t, c)   - target_w|^2        ref_mse_l likewise
    margin    = -beta / 2 * ((mse_w - mse_l) - (ref_mse_w - ref_mse_l))
    loss      = -log sigmoid(margin)                                        (mean over pairs)

``pred_ref`` is the reference, the base model (the denoiser with its LoRA adapters off, or a frozen copy). The scale
is the reference implementation's (SalesforceAIResearch/DiffusionDPO ``train.py``: ``-0.5 * beta_dpo`` times the
difference of per-sample means over the latent dimensions): its ``beta_dpo`` absorbs the paper's ``T * omega(lambda_t)``
and the latent size, so the paper's ``beta = 5000`` for Stable Diffusion 1.5 and SDXL is this ``beta``.

The margin is the implicit reward difference: positive when the policy, relative to the reference, denoises the
preferred sample better than the rejected one. With the policy equal to the reference the margin is 0 and the loss
``log 2`` for every pair; its gradient is then not zero: ``d loss / d margin = -1/2``, so the first update lowers
``mse_w`` and raises ``mse_l`` with weights ``+-beta / 4``.

Online DPO pairs the policy's own samples (:func:`best_worst_pairs`): within each prompt group (the
``samples_per_prompt`` consecutive samples of one prompt draw) the best-rewarded sample is preferred to the
worst-rewarded one; a group whose rewards are all equal gives no pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[N]`` float32: ``mean_latents (prediction - target)^2`` of ``[N, C, h, w]`` tensors (a model's pretraining loss
    per sample, the quantity Diffusion-DPO compares)."""
    error = prediction.float() - target.float()
    return (error**2).mean(dim=tuple(range(1, error.ndim)))


def dpo_loss(
    mse_w: torch.Tensor,
    mse_l: torch.Tensor,
    ref_mse_w: torch.Tensor,
    ref_mse_l: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO's loss of ``P`` pairs (see the module docstring).

    Args:
        mse_w: ``[P]``, the trained model's per-sample pretraining loss on the preferred samples (differentiable).
        mse_l: ``[P]``, the same on the rejected samples (differentiable).
        ref_mse_w: ``[P]``, the reference model's on the preferred samples (no gradient taken).
        ref_mse_l: ``[P]``, the reference model's on the rejected samples (no gradient taken).
        beta: the DPO ``beta`` (``train.dpo_beta``), > 0.
    Returns:
        ``(loss, info)``: the mean of ``-log sigmoid(margin)`` over the pairs, and detached diagnostics: ``dpo_margin``
        (mean margin), ``dpo_accuracy`` (fraction of pairs with margin > 0: the policy prefers the preferred sample
        more than the reference does), ``model_mse`` / ``reference_mse`` (means over both samples of every pair).
    """
    if beta <= 0:
        raise ValueError(f"train.dpo_beta must be > 0; got {beta}")
    model_diff = mse_w.float() - mse_l.float()
    ref_diff = ref_mse_w.detach().float() - ref_mse_l.detach().float()
    margin = -0.5 * beta * (model_diff - ref_diff)
    loss = -F.logsigmoid(margin).mean()
    info = {
        "dpo_margin": margin.detach().mean(),
        "dpo_accuracy": (margin.detach() > 0).float().mean(),
        "model_mse": torch.cat([mse_w, mse_l]).detach().float().mean(),
        "reference_mse": torch.cat([ref_mse_w, ref_mse_l]).detach().float().mean(),
    }
    return loss, info


def best_worst_pairs(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Online DPO's pairs of one process's samples: ``(preferred [P], rejected [P])`` long indices into ``rewards``.

    Args:
        rewards: ``[N]``, the samples' rewards, in sampling order: each run of ``group_size`` consecutive samples is
            one prompt draw (one prompt, :func:`ddpo.training.prompts.draw_prompts`).
        group_size: ``sample.samples_per_prompt`` (>= 2); ``N`` is a multiple of it.
    Returns:
        One pair per group whose rewards are not all equal, in group order: its highest-rewarded sample (the first of
        equal highest) preferred to its lowest-rewarded one (the first of equal lowest). Both always come from the
        same group, hence the same prompt; a group without a strict winner gives no pair.
    """
    if group_size < 2:
        raise ValueError(f"online DPO pairs samples within a prompt group: group_size must be >= 2; got {group_size}")
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [N] with N a multiple of {group_size}; got shape {list(rewards.shape)}")
    groups = rewards.detach().float().cpu().view(-1, group_size)
    best, worst = groups.argmax(dim=1), groups.argmin(dim=1)  # the first index of the extreme value
    has_pair = groups.max(dim=1).values > groups.min(dim=1).values
    first = torch.arange(groups.shape[0]) * group_size
    return (first + best)[has_pair], (first + worst)[has_pair]


def pair_roles(num_samples: int, preferred: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """``[num_samples]`` float32: each sample's role in online DPO's pairs, ``+1`` preferred, ``-1`` rejected, ``0`` in
    no pair (the per-sample weights the online estimator's loss reads)."""
    roles = torch.zeros(num_samples)
    roles[preferred] = 1.0
    roles[rejected] = -1.0
    return roles


def rejected_partner(preferred: torch.Tensor, roles: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[P]`` long: the rejected sample of each ``preferred`` sample's group (``[P]`` indices with role ``+1``), read
    from the ``roles`` ``[N]`` of :func:`pair_roles` (each group holds at most one ``-1``)."""
    groups = roles.view(-1, group_size)
    group = torch.div(preferred, group_size, rounding_mode="floor")
    return group * group_size + groups.argmin(dim=1)[group]
