"""``ddpo eval RUN_DIR``: base vs fine-tuned (or run vs run) on the same prompts and the same noise, scored by a reward.

Both models draw every (prompt, seed) through :func:`ddpo.tools.sample.sample_images` with the image's own generator
seed (:func:`ddpo.tools.sample.noise_seeds`), so the two images of a pair differ only by the model; the change is the
paired mean with its standard error clustered over prompts (:func:`ddpo.training.evaluation.clustered_change`).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..training.evaluation import clustered_change
from ..training.visualize import image_grid
from .sample import Model, SamplerOptions, expand, noise_seeds, sample_images, score

__all__ = ["EvalResult", "evaluate", "format_summary", "write_eval"]


@dataclass
class EvalResult:
    """Per-image scores of two models on the same (prompt, seed) pairs, and their paired comparison."""

    labels: tuple[str, str]
    prompts: list[str]
    seeds: list[int]
    """The ``--seeds`` value of each image."""
    noise_seeds: list[int]
    """The generator seed of each image (:func:`noise_seeds`)."""
    before: list[float]
    after: list[float]
    components_before: dict[str, list[float]]
    """Per-image values of each component of a ``weighted`` reward (empty otherwise)."""
    components_after: dict[str, list[float]]
    info_before: dict[str, float]
    """Means of the reward's own per-batch scalars (``last_info()``), weighted by batch size."""
    info_after: dict[str, float]
    reward: str
    images_before: torch.Tensor | None = None
    images_after: torch.Tensor | None = None

    def summary(self) -> dict[str, Any]:
        n = len(self.before)
        change = clustered_change(self.before, self.after, self.prompts)
        mean_before, mean_after = sum(self.before) / n, sum(self.after) / n
        out: dict[str, Any] = {
            "before": self.labels[0],
            "after": self.labels[1],
            "reward": self.reward,
            "images": n,
            "mean_before": mean_before,
            "mean_after": mean_after,
            "change": change[0] if change else mean_after - mean_before,
            "change_se": change[1] if change else None,
            "prompts": len(set(self.prompts)),
        }
        for name in self.components_before:
            values_b, values_a = self.components_before[name], self.components_after[name]
            out[f"component/{name}"] = {"before": sum(values_b) / n, "after": sum(values_a) / n}
        shown = {f"reward/{name}_mean" for name in self.components_before}  # already above, per image
        for key in self.info_before:
            if key in self.info_after and key not in shown:
                out[f"info/{key}"] = {"before": self.info_before[key], "after": self.info_after[key]}
        return out


def evaluate(
    before: Model, after: Model, reward, prompts: list[str], seeds: list[int], options: SamplerOptions
) -> EvalResult:
    """Sample every (prompt, seed) from both models with the same noise and score both with ``reward``. Each image has
    its own noise (:func:`noise_seeds`); the two models see the same noise for the same image."""
    image_prompts, image_seeds = expand(prompts, seeds)
    generator_seeds = noise_seeds(image_prompts, image_seeds)
    images_b = sample_images(before.pipe, image_prompts, generator_seeds, options)
    images_a = sample_images(after.pipe, image_prompts, generator_seeds, options)
    values_b, comp_b, info_b = score(reward, images_b, image_prompts, options.batch_size)
    values_a, comp_a, info_a = score(reward, images_a, image_prompts, options.batch_size)
    return EvalResult(
        labels=(before.label, after.label),
        prompts=image_prompts,
        seeds=image_seeds,
        noise_seeds=generator_seeds,
        before=values_b,
        after=values_a,
        components_before=comp_b,
        components_after=comp_a,
        info_before=info_b,
        info_after=info_a,
        reward=reward.name,
        images_before=images_b,
        images_after=images_a,
    )


def write_eval(result: EvalResult, out: str | Path, grid_columns: int = 8) -> dict[str, Path]:
    """``scores.csv`` (one row per image: prompt, seed, before, after, change, components), ``summary.json`` and
    ``before_after.png`` (base row above fine-tuned row, the first ``grid_columns`` images, same noise per column)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(result.components_before)
    with open(out / "scores.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        header = ["index", "prompt", "seed", "noise_seed", "before", "after", "change"]
        header += [f"{name}_{which}" for name in names for which in ("before", "after")]
        writer.writerow(header)
        for i, (prompt, seed) in enumerate(zip(result.prompts, result.seeds)):
            row = [i, prompt, seed, result.noise_seeds[i], f"{result.before[i]:.8g}", f"{result.after[i]:.8g}"]
            row.append(f"{result.after[i] - result.before[i]:.8g}")
            for name in names:
                row += [f"{result.components_before[name][i]:.8g}", f"{result.components_after[name][i]:.8g}"]
            writer.writerow(row)
    (out / "summary.json").write_text(json.dumps(result.summary(), indent=2) + "\n")
    paths = {"scores": out / "scores.csv", "summary": out / "summary.json"}
    if result.images_before is not None and result.images_after is not None:
        count = min(grid_columns, len(result.prompts))
        pair = torch.cat([result.images_before[:count], result.images_after[:count]])
        image_grid(pair, columns=count).save(out / "before_after.png")
        paths["grid"] = out / "before_after.png"
    return paths


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a few lines for the terminal."""
    n = summary["images"]
    lines = [
        f"ddpo eval: {summary['reward']} on {n} images (same prompts and noise for both; each image its own noise)",
        f"  before ({summary['before']}): {summary['mean_before']:.4f}",
        f"  after  ({summary['after']}): {summary['mean_after']:.4f}",
    ]
    if summary["change_se"] is not None:
        se = summary["change_se"]
        z = summary["change"] / se if se > 0 else math.inf
        lines.append(
            f"  paired change {summary['change']:+.4f} +- {se:.2g} (standard error over {summary['prompts']} prompts; "
            f"{abs(z):.1f} standard errors"
            + ("; within 2 of zero: not distinguishable from noise)" if abs(z) < 2 else ")")
        )
    else:
        lines.append(f"  change {summary['change']:+.4f} (one prompt: no standard error)")
    for key, value in summary.items():
        if key.startswith(("component/", "info/")):
            lines.append(f"  {key.split('/', 1)[1]}: {value['before']:.4g} -> {value['after']:.4g}")
    return "\n".join(lines)
