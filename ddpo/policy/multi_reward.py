"""Advantages of a reward with several components, each normalised on its own before they are weighted.

A plain weighted sum ``r = sum_k w_k r_k`` lets the component with the largest spread decide every comparison: a
component that varies little within a prompt's group (a guard that is nearly constant, or a 0/1 check on which the
group agrees) barely moves the advantage, so the policy may trade it away for small gains of the others. Normalising
each component within its group first gives every component the same say per group, in proportion to its weight
(GDPO's decoupled normalisation; the multi-reward setups of Flow-GRPO normalise per reward and per prompt too):

    A_k[i] = (r_k[i] - mean_g(k)) / (std_g(k) + eps)       (g: the prompt group of sample i; population std)
    A[i]   = sum_k w_k A_k[i]
    A      = (A - mean(A)) / (std(A) + eps)                  (over the batch)

A group of one sample gets ``A_k = 0`` (nothing to compare with), as in :func:`~ddpo.policy.advantages.group_normalize`.
"""

from __future__ import annotations

import torch

from .advantages import batch_normalize, group_normalize


def per_component_advantages(
    components: dict[str, torch.Tensor], weights: dict[str, float], prompts: list[str]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted, per-group-normalised advantages of a multi-component reward.

    Args:
        components: ``{name: float [N]}``, each component's reward of every sample (all processes, one epoch).
        weights: ``{name: w_k}``, the same names.
        prompts: ``N`` prompts; samples of one prompt form a group.

    Returns:
        ``(advantages float32 [N], {name: A_k float32 [N]})``.
    """
    if set(components) != set(weights):
        raise ValueError(f"per-component advantages: components {sorted(components)} but weights {sorted(weights)}")
    if not components:
        raise ValueError("per-component advantages need at least one component")
    parts = {name: group_normalize(values, prompts) for name, values in components.items()}
    total = sum(weights[name] * part for name, part in parts.items())
    return batch_normalize(total), parts
