"""Rewards to advantages: per-prompt running statistics, group and batch normalisation, per-component advantages of
a weighted reward, clipping; the registry of schemes (:data:`ADVANTAGES`, ``train.advantage``)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np
import torch

EPS = 1e-6


def batch_normalize(rewards: torch.Tensor) -> torch.Tensor:
    """``(r - mean(r)) / (std(r) + eps)`` over the whole batch (population std). ``[N] -> [N]``."""
    rewards = rewards.float()
    return (rewards - rewards.mean()) / (rewards.std(unbiased=False) + EPS)


def group_normalize(rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Normalise within each group of samples that share a prompt (GRPO-style). ``[N] -> [N]``.

    A group of one sample gets advantage 0 (there is nothing to compare it with).
    """
    rewards = rewards.float()
    out = torch.zeros_like(rewards)
    for prompt in dict.fromkeys(prompts):
        index = torch.tensor([i for i, p in enumerate(prompts) if p == prompt], device=rewards.device)
        group = rewards[index]
        if group.numel() > 1:
            out[index] = (group - group.mean()) / (group.std(unbiased=False) + EPS)
    return out


def group_center(rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Subtract each prompt group's mean, then divide by the std of the centred values over the whole batch.
    ``[N] -> [N]``.

    Unlike :func:`group_normalize`, a group whose samples differ by little keeps small advantages instead of being
    scaled up to unit variance, so near-ties (often reward noise) weigh less than clear wins. A group of one sample
    gets advantage 0.
    """
    rewards = rewards.float()
    centred = torch.zeros_like(rewards)
    for prompt in dict.fromkeys(prompts):
        index = torch.tensor([i for i, p in enumerate(prompts) if p == prompt], device=rewards.device)
        if index.numel() > 1:
            centred[index] = rewards[index] - rewards[index].mean()
    return centred / (centred.std(unbiased=False) + EPS)


FLOW_GRPO_EPS = 1e-4
"""The constant Flow-GRPO adds to its std (``flow_grpo/stat_tracking.py``)."""


def global_std(rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Flow-GRPO's advantages with ``sample.global_std=True`` (its ``PerPromptStatTracker.update`` on one epoch's
    rewards of every process): subtract each prompt's mean, divide by the population std of **all** the raw rewards
    plus ``1e-4``. ``[N] -> [N]``, computed in float64 as the reference's NumPy code, returned as float32.

    Unlike :func:`group_center` (the std of the centred values), the spread between prompts counts in the divisor,
    so a batch of prompts of very different difficulty gets smaller advantages. A group of one sample gets 0.
    """
    values = rewards.detach().double()
    centred = torch.zeros_like(values)
    for prompt in dict.fromkeys(prompts):
        index = torch.tensor([i for i, p in enumerate(prompts) if p == prompt], device=values.device)
        centred[index] = values[index] - values[index].mean()
    return (centred / (values.std(unbiased=False) + FLOW_GRPO_EPS)).float()


class PerPromptStatTracker:
    """Running per-prompt reward statistics (DDPO paper): each prompt keeps a buffer of its last ``buffer_size``
    rewards; a prompt whose buffer holds fewer than ``min_count`` rewards is normalised with the batch statistics.

    The state (every buffer) is saved in checkpoints with :meth:`state_dict` so a resumed run continues exactly.
    """

    def __init__(self, buffer_size: int, min_count: int):
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"per-prompt buffer_size and min_count must be >= 1; got {buffer_size}, {min_count}")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        """Add this epoch's rewards to the buffers and return the advantages. ``rewards [N] -> [N]``."""
        values = rewards.detach().double().cpu().numpy()
        advantages = np.empty_like(values)
        batch_mean, batch_std = values.mean(), values.std() + EPS
        prompt_array = np.array(prompts, dtype=object)
        for prompt in dict.fromkeys(prompts):
            mask = prompt_array == prompt
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(values[mask].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = np.mean(buffer), np.std(buffer) + EPS
            advantages[mask] = (values[mask] - mean) / std
        return torch.as_tensor(advantages, dtype=torch.float32, device=rewards.device)

    def __call__(self, rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """:meth:`update` in the signature of every advantage scheme (see :data:`ADVANTAGES`)."""
        return self.update(prompts, rewards)

    def stats(self) -> dict[str, float]:
        return {"tracker_prompts": float(len(self.buffers))}

    def state_dict(self) -> dict:
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {prompt: list(buffer) for prompt, buffer in self.buffers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size = int(state["buffer_size"])
        self.min_count = int(state["min_count"])
        self.buffers = {p: deque(values, maxlen=self.buffer_size) for p, values in state["buffers"].items()}


def clip_advantages(advantages: torch.Tensor, max_abs: float) -> torch.Tensor:
    """Clip to ``[-max_abs, max_abs]``."""
    return advantages.clamp(-max_abs, max_abs)


# ---------------------------------------------------------------- several reward components
#
# Advantages of a reward with several components, each normalised on its own before they are weighted.
#
# A plain weighted sum ``r = sum_k w_k r_k`` lets the component with the largest spread decide every comparison: a
# component that varies little within a prompt's group (a guard that is nearly constant, or a 0/1 check on which the
# group agrees) barely moves the advantage, so the policy may trade it away for small gains of the others. Normalising
# each component within its group first gives every component the same say per group, in proportion to its weight
# (GDPO's decoupled normalisation; the multi-reward setups of Flow-GRPO normalise per reward and per prompt too):
#
#     A_k[i] = (r_k[i] - mean_g(k)) / (std_g(k) + eps)       (g: the prompt group of sample i; population std)
#     A[i]   = sum_k w_k A_k[i]
#     A      = (A - mean(A)) / (std(A) + eps)                  (over the batch)
#
# A group of one sample gets ``A_k = 0`` (nothing to compare with), as in :func:`~ddpo.policy.advantages.group_normalize`.


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


def component_advantage_stats(advantages: torch.Tensor, parts: dict[str, torch.Tensor]) -> dict[str, float]:
    """What each component contributed to an epoch's advantages ``[N]``, from its normalised advantages ``A_k``
    ``[N]``: ``advantage/<name>_abs_mean`` (mean ``|A_k|``: 0 when its groups never disagree) and
    ``advantage/<name>_corr`` (Pearson correlation of ``A_k`` with the final advantages: near 1 when it decides
    them, 0 when it has no say; 0 when either is constant)."""
    stats: dict[str, float] = {}
    final = advantages.double() - advantages.double().mean()
    for name, part in parts.items():
        centred = part.double() - part.double().mean()
        scale = (centred.norm() * final.norm()).item()
        stats[f"advantage/{name}_abs_mean"] = part.abs().mean().item()
        stats[f"advantage/{name}_corr"] = (centred @ final).item() / scale if scale > 0 else 0.0
    return stats


class PerComponentAdvantage:
    """``train.advantage=per_component``: :func:`per_component_advantages` of an epoch, as an advantage scheme that
    also takes the ``weighted`` reward's per-sample component values (``components``, ``{name: [N]}``).

    Args:
        weights: the ``weighted`` reward's ``{name: w_k}``.
    """

    def __init__(self, weights: dict[str, float]):
        self.weights = dict(weights)
        self.last_stats: dict[str, float] = {}

    def __call__(
        self, rewards: torch.Tensor, prompts: list[str], components: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``advantages float32 [N]`` (``rewards [N]``, the weighted sum, is not used: each component is normalised
        on its own); :meth:`last_info` then holds :func:`component_advantage_stats` of this epoch."""
        if components is None:
            raise ValueError(
                "train.advantage=per_component needs each sample's component values of the weighted reward; this "
                "caller passed only the summed rewards"
            )
        advantages, parts = per_component_advantages(components, self.weights, prompts)
        self.last_stats = component_advantage_stats(advantages, parts)
        return advantages.to(rewards.device)

    def last_info(self) -> dict[str, float]:
        """The last epoch's per-component diagnostics (logged in ``metrics.jsonl``)."""
        return dict(self.last_stats)


AdvantageFn = Callable[[torch.Tensor, list[str]], torch.Tensor]
"""``advantage(rewards [N], prompts) -> advantages [N]`` over every process's samples of one epoch."""


def _batch_scheme(rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return batch_normalize(rewards)


Weights = dict[str, float] | None
"""A ``weighted`` reward's ``{component name: weight}`` (None for any other reward)."""

ADVANTAGES: dict[str, Callable[[int, int, Weights], AdvantageFn]] = {
    "per_prompt": lambda buffer_size, min_count, weights: PerPromptStatTracker(buffer_size, min_count),
    "group": lambda buffer_size, min_count, weights: group_normalize,
    "group_center": lambda buffer_size, min_count, weights: group_center,
    "global_std": lambda buffer_size, min_count, weights: global_std,
    "batch": lambda buffer_size, min_count, weights: _batch_scheme,
    "per_component": lambda buffer_size, min_count, weights: PerComponentAdvantage(weights),
}
"""``train.advantage`` -> factory ``(per_prompt_buffer_size, per_prompt_min_count, component weights) ->
AdvantageFn``. A stateful scheme (``per_prompt``) returns an object with ``state_dict`` / ``load_state_dict``, saved in
checkpoints; ``per_component`` is also called with the epoch's per-sample component values (``components=``) and
has its diagnostics (``last_info()``) logged each epoch."""

COMPONENT_SCHEMES = ("per_component",)
"""The schemes that need a ``weighted`` reward's per-sample component values."""


def build_advantage(name: str, buffer_size: int, min_count: int, weights: Weights = None) -> AdvantageFn:
    """The advantage scheme ``name`` (a key of :data:`ADVANTAGES`); ``weights``: the ``weighted`` reward's component
    weights, which ``per_component`` needs."""
    if name not in ADVANTAGES:
        raise ValueError(f"train.advantage must be one of {sorted(ADVANTAGES)}; got {name!r}")
    if name in COMPONENT_SCHEMES and not weights:
        raise ValueError(f"train.advantage={name} needs reward.name=weighted (its components' weights)")
    return ADVANTAGES[name](buffer_size, min_count, weights)
