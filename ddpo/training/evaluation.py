"""Held-out evaluation: the fixed prompt list every run is evaluated on, and the paired change between evaluations."""

from __future__ import annotations

import torch

from .prompts import derive_seed

# Stream identifiers for derive_seed (shared with the trainer's: each random stream of a run gets its own).
EVAL_PROMPTS_STREAM, EVAL_NOISE_STREAM = 4, 5


def paired_change(before: list[float] | None, after: list[float] | None) -> tuple[float, float] | None:
    """Mean and standard error of ``after - before`` over paired per-image rewards (two evaluations of the same
    inputs); None when either is missing, their lengths differ or there are fewer than 2 pairs."""
    if not before or not after or len(before) != len(after) or len(before) < 2:
        return None
    diff = torch.tensor(after, dtype=torch.float64) - torch.tensor(before, dtype=torch.float64)
    return diff.mean().item(), (diff.std() / len(diff) ** 0.5).item()


def eval_prompt_list(prompts: list[str], count: int) -> list[str]:
    """``count`` prompts of a held-out set in a fixed shuffled order (cycled when ``count`` exceeds the set), the same
    for every run and seed, so evaluations of different runs are comparable."""
    generator = torch.Generator().manual_seed(derive_seed(0, EVAL_PROMPTS_STREAM))
    order = torch.randperm(len(prompts), generator=generator).tolist()
    return [prompts[order[i % len(order)]] for i in range(count)]
