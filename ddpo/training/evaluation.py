"""Held-out evaluation: the fixed prompt list every run is evaluated on, and the paired change between evaluations."""

from __future__ import annotations

import zlib

import torch

from .streams import Stream, derive_seed


def image_noise_seed(seed: int, prompt: str, repeat: int = 0) -> int:
    """The generator seed of the image of ``prompt`` under noise seed ``seed`` in ``ddpo eval`` (``repeat``: how many
    times the same (prompt, seed) came earlier in the list, as when ``--count`` cycles a prompt set).

    A function of these only (not of the prompt's position, the count or the model), so that every prompt gets its
    own noise: with one ``x_T`` per seed shared by all prompts, the images of a seed are correlated across prompts (on
    the world model the mean reward of 64 prompts was 0.92 under one shared seed and 0.65 under another), and a
    standard error that treats them as independent is several times too small."""
    return derive_seed(seed, Stream.EVAL_IMAGE_NOISE, zlib.crc32(prompt.encode("utf-8")), repeat)


def paired_change(before: list[float] | None, after: list[float] | None) -> tuple[float, float] | None:
    """Mean and standard error of ``after - before`` over paired per-image rewards (two evaluations of the same
    inputs); None when either is missing, their lengths differ or there are fewer than 2 pairs."""
    if not before or not after or len(before) != len(after) or len(before) < 2:
        return None
    return mean_and_se(torch.tensor(after, dtype=torch.float64) - torch.tensor(before, dtype=torch.float64))


def clustered_change(before: list[float], after: list[float], clusters: list[str]) -> tuple[float, float] | None:
    """Mean and standard error of ``after - before`` with the images of one prompt (``clusters[i]``) as one unit: the
    change is averaged per prompt, then the mean and standard error are over prompts. The samples of one prompt share
    its difficulty, so they are not independent draws; prompts are. None with fewer than 2 prompts."""
    if len(before) != len(after) or len(before) != len(clusters):
        raise ValueError(f"clustered_change: {len(before)} before, {len(after)} after and {len(clusters)} clusters")
    groups: dict[str, list[float]] = {}
    for b, a, key in zip(before, after, clusters):
        groups.setdefault(key, []).append(a - b)
    if len(groups) < 2:
        return None
    return mean_and_se(torch.tensor([sum(v) / len(v) for v in groups.values()], dtype=torch.float64))


def eval_prompt_list(prompts: list[str], count: int) -> list[str]:
    """``count`` prompts of a held-out set in a fixed shuffled order (cycled when ``count`` exceeds the set), the same
    for every run and seed, so evaluations of different runs are comparable."""
    generator = torch.Generator().manual_seed(derive_seed(0, Stream.EVAL_PROMPTS))
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
