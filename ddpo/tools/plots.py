"""Figure helpers shared by reports and ablations: axes grids, reward versus reward queries, saving to PNG.

Figures are :class:`matplotlib.figure.Figure` objects (no pyplot state, no GUI backend).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure


def axes_grid(count: int, columns: int, width: float = 4.0, height: float = 3.0) -> tuple[Figure, list[Any]]:
    """A figure with ``count`` axes in rows of ``columns`` (extra axes hidden)."""
    rows = max(1, math.ceil(count / columns))
    columns = min(columns, max(count, 1))
    fig = Figure(figsize=(width * columns, height * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel().tolist()
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


def plot_reward_vs_queries(
    results: pd.DataFrame, summary: pd.DataFrame | None = None, metric: str = "reward_mean"
) -> Figure:
    """``metric`` (default the batch reward mean) versus reward queries: one panel per reward, one line per
    algorithm (mean over seeds) with a ± std band over seeds; the summary's threshold as a dashed line."""
    if results.empty:
        fig = Figure(figsize=(4, 1))
        fig.text(0.5, 0.5, "no finished cells", ha="center", va="center")
        return fig
    rewards = list(dict.fromkeys(results.reward))
    fig, axes = axes_grid(len(rewards), len(rewards), width=5.5, height=4.0)
    for ax, reward in zip(axes, rewards):
        by_reward = results[results.reward == reward]
        for algorithm in dict.fromkeys(by_reward.algorithm):
            rows = by_reward[by_reward.algorithm == algorithm]
            stats = rows.groupby("epoch").agg(
                queries=("reward_queries", "mean"),
                mean=(metric, "mean"),
                std=(metric, "std"),
                seeds=("seed", "nunique"),
            )
            std = stats["std"].fillna(0.0)
            seeds = int(stats.seeds.max())
            (line,) = ax.plot(stats.queries, stats["mean"], label=f"{algorithm} ({seeds} seeds)")
            ax.fill_between(stats.queries, stats["mean"] - std, stats["mean"] + std, color=line.get_color(), alpha=0.2)
        if summary is not None and not summary.empty and metric == "reward_mean":
            threshold = summary[summary.reward == reward].threshold
            if len(threshold):
                ax.axhline(threshold.iloc[0], color="grey", linestyle="--", linewidth=1, label="threshold")
        ylabel = "batch reward mean" if metric == "reward_mean" else metric
        ax.set(xlabel="reward queries (images scored)", ylabel=ylabel, title=reward)
        ax.legend(loc="best", fontsize="small")
        ax.grid(alpha=0.3)
    what = "reward" if metric == "reward_mean" else metric
    fig.suptitle(f"{what} vs reward queries (mean ± std over seeds)")
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
