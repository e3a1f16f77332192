"""``ddpo eval --pass-at K ...``: pass@k of each of a reward's checks, and of all of them together, per model.

Every prompt is sampled once per noise seed (:func:`pass_at_seeds`) through :func:`ddpo.tools.sample.sample_images`,
with the same noise for every model, and the unbiased estimator :func:`ddpo.training.evaluation.pass_at_k` is averaged
over prompts, with its standard error over prompts.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..training.evaluation import image_noise_seed, mean_and_se, pass_at_k
from .sample import Model, SamplerOptions, expand, noise_seeds, sample_images, score

__all__ = ["PASS_AT_SEED_BASE", "PassAtK", "format_pass_at_k", "pass_at_k_eval", "pass_at_seeds", "write_pass_at_k"]

PASS_AT_SEED_BASE = 1000
"""``ddpo eval --pass-at K ...`` draws sample ``j`` of every prompt from noise seed ``PASS_AT_SEED_BASE + j`` unless
``--seeds`` is given: seeds that no preset, test or tuning run of the package uses (the trainer's evaluation draws its
noise from the run's own streams, ``ddpo eval`` defaults to seed 0, and the all-prompt checks use seeds 10 and 11)."""


def pass_at_seeds(ks: list[int], seeds: list[int] | None) -> list[int]:
    """The noise seeds of a pass@k evaluation: ``seeds`` if given (at least ``max(ks)`` distinct ones), else
    ``max(ks)`` seeds from :data:`PASS_AT_SEED_BASE`."""
    if not ks or min(ks) < 1:
        raise ValueError(f"--pass-at takes one or more k >= 1, e.g. --pass-at 1 4 16; got {ks}")
    if seeds is None:
        return list(range(PASS_AT_SEED_BASE, PASS_AT_SEED_BASE + max(ks)))
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct for --pass-at (each is one sample of every prompt); got {seeds}")
    if len(seeds) < max(ks):
        raise ValueError(
            f"--pass-at {max(ks)} needs at least {max(ks)} samples per prompt, but --seeds gives {len(seeds)}: "
            f"give {max(ks)} seeds or leave --seeds out ({max(ks)} seeds from {PASS_AT_SEED_BASE})"
        )
    return list(seeds)


@dataclass
class PassAtK:
    """pass@k of one model over ``prompts`` (distinct), each sampled once per seed.

    ``passed[check]`` is bool ``[P, n]`` (prompt ``p``, seed ``j``) for each check of the reward and ``all``;
    ``rewards`` the reward ``[P, n]``."""

    label: str
    prompts: list[str]
    seeds: list[int]
    ks: list[int]
    passed: dict[str, torch.Tensor]
    rewards: torch.Tensor

    def table(self) -> dict[str, Any]:
        """``{"reward_mean": (mean, se), "checks": {check: {k: (mean, se)}}}``; standard errors over prompts."""
        per_prompt_reward = self.rewards.to(torch.float64).mean(1)
        checks = {
            check: {k: mean_and_se(pass_at_k(passed, k)) for k in self.ks} for check, passed in self.passed.items()
        }
        return {"reward_mean": mean_and_se(per_prompt_reward), "checks": checks}


def pass_at_k_eval(
    model: Model, reward, prompts: list[str], seeds: list[int], ks: list[int], options: SamplerOptions
) -> PassAtK:
    """Sample every prompt with every seed (same noise per seed for every model) and record which checks pass."""
    prompts = list(dict.fromkeys(prompts))  # pass@k is per prompt: each prompt once
    image_prompts, image_seeds = expand(prompts, seeds)
    images = sample_images(model.pipe, image_prompts, noise_seeds(image_prompts, image_seeds), options)
    values, _, _ = score(reward, images, image_prompts, options.batch_size)
    passed: dict[str, list[torch.Tensor]] = {}
    for first in range(0, len(image_prompts), options.batch_size):
        chunk = images[first : first + options.batch_size]
        with torch.no_grad():
            checks = reward.pass_fail(chunk, image_prompts[first : first + options.batch_size])
        for name, value in checks.items():
            passed.setdefault(name, []).append(value.bool().cpu())
    shape = (len(prompts), len(seeds))
    return PassAtK(
        label=model.label,
        prompts=prompts,
        seeds=list(seeds),
        ks=list(ks),
        passed={name: torch.cat(parts).view(shape) for name, parts in passed.items()},
        rewards=torch.tensor(values).view(shape),
    )


def format_pass_at_k(results: list[PassAtK]) -> str:
    """One table per model: pass@k per check and for all checks together, mean ± standard error over prompts."""
    first = results[0]
    lines = [
        f"ddpo eval --pass-at: {len(first.prompts)} prompts x {len(first.seeds)} noise seeds "
        f"({first.seeds[0]}..{first.seeds[-1]}); mean +- standard error over prompts"
    ]
    for result in results:
        table = result.table()
        mean, se = table["reward_mean"]
        lines.append(f"  {result.label}: mean reward {mean:.4f} +- {se:.3f}")
        lines.append("    " + f"{'check':<12}" + "".join(f"{'pass@' + str(k):>18}" for k in result.ks))
        for check, row in table["checks"].items():
            cells = "".join(f"{f'{m:.3f} +- {s:.3f}':>18}" for m, s in row.values())
            lines.append("    " + f"{check:<12}" + cells)
    return "\n".join(lines)


def write_pass_at_k(results: list[PassAtK], out: str | Path) -> Path:
    """``out/pass_at_k.json`` (every model's table, prompts and seeds) and ``out/pass_at_k.csv`` (one row per model,
    prompt and seed: the reward and each check)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    for result in results:
        table = result.table()
        summary.append(
            {
                "model": result.label,
                "prompts": len(result.prompts),
                "seeds": result.seeds,
                "reward_mean": table["reward_mean"][0],
                "reward_mean_se": table["reward_mean"][1],
                "pass_at": {
                    check: {str(k): {"mean": m, "se": s} for k, (m, s) in row.items()}
                    for check, row in table["checks"].items()
                },
            }
        )
    (out / "pass_at_k.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(out / "pass_at_k.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        checks = list(results[0].passed)
        writer.writerow(["model", "prompt", "seed", "noise_seed", "reward", *checks])
        for result in results:
            for p, prompt in enumerate(result.prompts):
                for j, seed in enumerate(result.seeds):
                    noise = image_noise_seed(seed, prompt)
                    row = [result.label, prompt, seed, noise, f"{result.rewards[p, j].item():.8g}"]
                    writer.writerow(row + [int(result.passed[c][p, j]) for c in checks])
    return out / "pass_at_k.json"
