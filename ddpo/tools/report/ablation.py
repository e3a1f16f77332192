"""An ablation's output folder for the report (see :mod:`ddpo.tools.ablate`): :func:`load_ablation` reads it and
:func:`summary_table` formats its summary for display."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd


@dataclass
class Ablation:
    """An ablation's output folder, loaded (see :mod:`ddpo.tools.ablate`)."""

    path: Path
    results: pd.DataFrame
    """One row per (cell, seed, epoch): ``results.csv``."""
    summary: pd.DataFrame
    """One row per cell: ``summary.csv``."""
    summary_markdown: str


def is_ablation_dir(path: str | Path) -> bool:
    """Whether ``path`` is an ablation output folder (``grid.yaml`` or ``results.csv``)."""
    path = Path(path)
    return (path / "grid.yaml").is_file() or (path / "results.csv").is_file()


def load_ablation(ablation_dir: str | Path) -> Ablation:
    """Read ``results.csv`` / ``summary.csv`` / ``summary.md`` of an ablation folder (collecting them from its runs
    first when only ``grid.yaml`` is there)."""
    path = Path(ablation_dir)
    if not (path / "results.csv").is_file():
        if not (path / "grid.yaml").is_file():
            raise FileNotFoundError(f"{path} is not an ablation folder (no results.csv or grid.yaml)")
        from ..ablate import load_grid, write_outputs

        write_outputs(load_grid(path / "grid.yaml"))
    results = pd.read_csv(path / "results.csv")
    summary_file = path / "summary.csv"
    summary = pd.read_csv(summary_file) if summary_file.stat().st_size > 1 else pd.DataFrame()
    markdown = (path / "summary.md").read_text() if (path / "summary.md").is_file() else ""
    return Ablation(path, results, summary, markdown)


def summary_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary as a display table: ``mean ± std`` strings, one row per cell."""

    def pm(mean: float, std: float, digits: int) -> str:
        if pd.isna(mean):
            return "—"
        return f"{mean:.{digits}f}" if pd.isna(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"

    return pd.DataFrame(
        {
            "reward": summary.reward,
            "algorithm": summary.algorithm,
            "initial reward": summary.initial_mean.map(lambda v: f"{v:.3f}"),
            "final reward": [pm(m, s, 3) for m, s in zip(summary.final_mean, summary.final_std)],
            "threshold": summary.threshold.map(lambda v: f"{v:.4g}"),
            "reward queries to threshold": [pm(m, s, 0) for m, s in zip(summary.queries_mean, summary.queries_std)],
            "seeds reaching": [f"{r}/{n}" for r, n in zip(summary.reached, summary.seeds)],
        }
    )
