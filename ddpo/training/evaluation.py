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
    return mean_and_se(torch.tensor(after, dtype=torch.float64) - torch.tensor(before, dtype=torch.float64))


def eval_prompt_list(prompts: list[str], count: int) -> list[str]:
    """``count`` prompts of a held-out set in a fixed shuffled order (cycled when ``count`` exceeds the set), the same
    for every run and seed, so evaluations of different runs are comparable."""
    generator = torch.Generator().manual_seed(derive_seed(0, EVAL_PROMPTS_STREAM))
    order = torch.randperm(len(prompts), generator=generator).tolist()
    return [prompts[order[i % len(order)]] for i in range(count)]


def pass_at_k(passed: torch.Tensor, k: int) -> torch.Tensor:
    """Unbiased pass@k per prompt (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1):
    the probability that at least one of ``k`` samples drawn without replacement from a prompt's ``n`` samples passes,
    ``1 - C(n - c, k) / C(n, k)`` with ``c`` passing samples, computed as ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)``.

    Args:
        passed: bool or 0/1 ``[P, n]``: sample ``j`` of prompt ``p`` passed.
        k: samples per attempt, ``1 <= k <= n``.

    Returns:
        float64 ``[P]``; pass@1 is the prompt's pass rate ``c / n``.
    """
    if passed.dim() != 2:
        raise ValueError(f"pass_at_k: passed must be [prompts, samples]; got shape {tuple(passed.shape)}")
    n = passed.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs at least {k} samples per prompt; got {n} (give more --seeds)")
    c = passed.to(torch.int64).sum(1)
    out = torch.empty(passed.shape[0], dtype=torch.float64)
    for p, correct in enumerate(c.tolist()):
        if n - correct < k:
            out[p] = 1.0
        else:
            i = torch.arange(n - correct + 1, n + 1, dtype=torch.float64)
            out[p] = 1.0 - torch.prod(1.0 - k / i).item()
    return out


def mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n); 0 for one value) of a 1-D tensor, in float64."""
    values = values.to(torch.float64)
    se = (values.std() / len(values) ** 0.5).item() if len(values) > 1 else 0.0
    return values.mean().item(), se
