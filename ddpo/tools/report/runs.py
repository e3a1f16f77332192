"""A run directory for the report: :func:`load_run` reads it, and its figures are drawn from it: reward curves
(:func:`plot_rewards`), the optimisation diagnostics (:func:`plot_diagnostics`) and the logged sample grids across
epochs (:func:`plot_sample_grids`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ...training import rundir
from ...training.runlog import read_jsonl
from ..plots import axes_grid

#: Diagnostics plotted by :func:`plot_diagnostics` when logged: (metric keys, panel title).
DIAGNOSTICS = [
    (["approx_kl"], "approx KL (old vs new policy)"),
    (["clipfrac"], "clip fraction"),
    (["ratio_mean", "ratio_max"], "importance ratio"),
    (["kl"], "KL to the base model"),
    (["grad_norm"], "gradient norm (before clipping)"),
    (["loss"], "loss"),
]
TIMINGS = ["sampling_seconds", "scoring_seconds", "training_seconds"]


@dataclass
class Run:
    """A run directory, loaded: its resolved config and one metrics row per epoch."""

    path: Path
    config: dict[str, Any]
    metrics: pd.DataFrame
    """One row per epoch of ``metrics.jsonl``; ``samples`` is the cumulative number of reward queries."""
    grids: list[tuple[int, Path]] = field(default_factory=list)
    """``(epoch, PNG path)`` of the sample grids under ``samples/``, by epoch."""
    evals: pd.DataFrame = field(default_factory=pd.DataFrame)
    """One row per held-out evaluation (``eval.jsonl``, runs with ``eval_prompts``); ``epoch`` = epochs trained
    before it; ``rewards`` = the per-image rewards (a list, in evaluation order: paired across rows). Empty without
    one."""

    @property
    def name(self) -> str:
        return self.path.name


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` is a run directory (``config.yaml`` and ``metrics.jsonl``)."""
    path = Path(path)
    return (path / "config.yaml").is_file() and (path / "metrics.jsonl").is_file()


METRICS_KEYS = ("epoch", "samples", "reward_mean")
"""Keys of every ``metrics.jsonl`` line that the report plots (a line without one is named, not a traceback)."""
EVAL_KEYS = ("epoch", "reward_mean")
"""Keys of every ``eval.jsonl`` line that the report plots."""


def load_run(run_dir: str | Path) -> Run:
    """Read ``config.yaml``, ``metrics.jsonl`` and the list of sample grids of a run directory."""
    path = Path(run_dir)
    if not is_run_dir(path):
        raise FileNotFoundError(f"{path} is not a run directory (it needs config.yaml and metrics.jsonl)")
    config = rundir.read_run_config(path)
    metrics = pd.DataFrame(read_jsonl(path / "metrics.jsonl", required=METRICS_KEYS))
    grids = sorted((int(p.stem.split("_")[-1]), p) for p in (path / "samples").glob("epoch_*.png"))
    evals = pd.DataFrame(read_jsonl(path / "eval.jsonl", required=EVAL_KEYS))
    return Run(path, config, metrics, grids, evals)


def plot_rewards(run: Run) -> Figure:
    """Batch reward mean (± the batch's std) versus reward queries; components of a weighted reward alongside; the
    guards' held-out change from the base (``eval_rewards``) when the run has them."""
    m = run.metrics
    components = [c for c in m.columns if c.startswith("reward/") and c.endswith("_mean")]
    guards = [c for c in run.evals.columns if c.startswith("guard/") and c.endswith("_mean")]
    fig, axes = axes_grid(1 + bool(components) + bool(guards), 2, width=5.0, height=3.5)
    ax = axes[0]
    ax.plot(m.samples, m.reward_mean, marker="o", markersize=3, label="batch mean")
    ax.fill_between(m.samples, m.reward_mean - m.reward_std, m.reward_mean + m.reward_std, alpha=0.2, label="± std")
    if len(run.evals):
        # An evaluation after N epochs has seen N epochs' reward queries.
        queries = run.evals.epoch * (m.samples.iloc[0] if len(m) else 0)
        label = f"held-out ({run.config.get('eval_prompts', '')}, fixed noise)"
        ax.plot(queries, run.evals.reward_mean, marker="s", color="black", label=label)
    ax.set(xlabel="reward queries (images scored)", ylabel="reward", title=f"{run.config['reward']['name']} reward")
    ax.legend(loc="best", fontsize="small")
    ax.grid(alpha=0.3)
    if components:
        ax = axes[1]
        for column in components:
            ax.plot(m.samples, m[column], marker="o", markersize=3, label=column[len("reward/") : -len("_mean")])
        ax.set(xlabel="reward queries (images scored)", ylabel="batch mean", title="reward components")
        ax.legend(loc="best", fontsize="small")
        ax.grid(alpha=0.3)
    if guards:  # eval_rewards: each guard's held-out mean minus its first (base) value, so one scale fits all
        ax = axes[1 + bool(components)]
        queries = run.evals.epoch * (m.samples.iloc[0] if len(m) else 0)
        for column in guards:
            values = run.evals[column].to_numpy(dtype=float)
            ax.plot(queries, values - values[0], marker="s", markersize=3, label=column[len("guard/") : -len("_mean")])
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set(xlabel="reward queries (images scored)", ylabel="change from the base", title="held-out guards")
        ax.legend(loc="best", fontsize="small")
        ax.grid(alpha=0.3)
    fig.suptitle(run.name)
    return fig


def plot_diagnostics(run: Run) -> Figure:
    """The logged optimisation diagnostics per epoch: approx KL, clip fraction, ratio mean/max, KL to the base,
    gradient norm, loss, and the seconds spent sampling / scoring / training."""
    m = run.metrics
    panels = [(keys, title) for keys, title in DIAGNOSTICS if any(k in m for k in keys)]
    has_timings = any(k in m for k in TIMINGS)
    fig, axes = axes_grid(len(panels) + has_timings, 3)
    for ax, (keys, title) in zip(axes, panels):
        for key in keys:
            if key in m:
                ax.plot(m.epoch, m[key], marker="o", markersize=3, label=key)
        if len(keys) > 1:
            ax.legend(loc="best", fontsize="small")
        ax.set(xlabel="epoch", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if has_timings:
        ax = axes[-1]
        bottom = np.zeros(len(m))
        for key in TIMINGS:
            if key in m:
                values = m[key].to_numpy(dtype=float)
                ax.bar(m.epoch, values, bottom=bottom, label=key.replace("_seconds", ""))
                bottom += values
        ax.set(xlabel="epoch", ylabel="seconds", title="time per epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="best", fontsize="small")
    fig.suptitle(f"{run.name}: diagnostics ({run.config['train']['algorithm']})")
    return fig


def pick_epochs(epochs: list[int], count: int) -> list[int]:
    """Up to ``count`` epochs from ``epochs``, evenly spaced, always with the first and the last."""
    if len(epochs) <= count:
        return list(epochs)
    index = np.linspace(0, len(epochs) - 1, count).round().astype(int)
    return [epochs[i] for i in sorted(set(index.tolist()))]


def plot_sample_grids(run: Run, max_grids: int = 6) -> Figure:
    """The sample grids logged under ``samples/`` at up to ``max_grids`` evenly spaced epochs, with the epoch's
    batch reward mean."""
    from PIL import Image

    if not run.grids:
        fig = Figure(figsize=(4, 1))
        fig.text(0.5, 0.5, "no sample grids (log_images=false)", ha="center", va="center")
        return fig
    chosen = pick_epochs([epoch for epoch, _ in run.grids], max_grids)
    paths = dict(run.grids)
    rewards = dict(zip(run.metrics.epoch, run.metrics.reward_mean))
    fig, axes = axes_grid(len(chosen), len(chosen), width=max(3.0, 6.0 / len(chosen)), height=3.3)
    for ax, epoch in zip(axes, chosen):
        with Image.open(paths[epoch]) as image:
            ax.imshow(np.asarray(image.convert("RGB")), interpolation="nearest")
        title = f"epoch {epoch}"
        if epoch in rewards:
            title += f"\nreward {rewards[epoch]:.4g}"
        ax.set_title(title, fontsize="medium")
        ax.axis("off")
    fig.suptitle(f"{run.name}: samples across epochs")
    return fig
