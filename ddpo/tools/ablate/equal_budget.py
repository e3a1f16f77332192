"""The equal-budget table: the estimators compared at equal numbers of samples, each run checked by ``ddpo eval``.

A run of ``ablations/equal_budget.yaml`` is named ``<estimator>_<N>k__<reward>__seed<k>`` (the budget suffix is
optional: the default run's seeds, ``ablations/default.yaml``, are ``default__world__seed<k>``); once it is checked
(``ddpo eval RUN --count 173 --seeds 10 11 --out RUN/eval_all``, done by ``scripts/equal_budget_table.py``) its
``eval_all/summary.json`` holds the paired change over all held-out prompts. This module reads those summaries and
the runs' ``metrics.jsonl`` (pure reading: it samples nothing), so the script and the ablation notebook draw the same
table and plot.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ...training import rundir
from ...training.evaluation import mean_and_se
from ...training.runlog import read_jsonl
from .runner import run_finished

__all__ = ["RUN_NAME", "checked_runs", "collect", "plot", "table"]

RUN_NAME = re.compile(r"^(?P<estimator>.+?)(?:_(?P<budget>\d+k))?__(?P<reward>[^_]+)__seed(?P<seed>\d+)$")


def finished(run: Path) -> bool:
    """``final/`` written and every epoch of the run's ``config.yaml`` logged, as ``ddpo ablate`` decides
    (:func:`~ddpo.tools.ablate.runner.run_finished`): a run still training has neither."""
    if not (run / "config.yaml").is_file():
        return False
    epochs = rundir.read_run_config(run).get("num_epochs")
    return isinstance(epochs, int) and run_finished(run, epochs)


def checked_runs(ablation: str | Path) -> list[Path]:
    """The finished runs (:func:`finished`) of an equal-budget grid's output folder, by name."""
    runs = Path(ablation) / "runs"
    if not runs.is_dir():
        return []
    return [run for run in sorted(runs.iterdir()) if RUN_NAME.match(run.name) and finished(run)]


def collect(ablation: str | Path) -> list[dict[str, Any]]:
    """One row per checked run (``eval_all/summary.json`` present): estimator, samples seen, seed, the paired change
    and its standard error, the base's and the run's means, and the training wall time in minutes (the sum of the
    run's ``epoch_seconds``: sampling, scoring and optimisation, without model loading)."""
    rows = []
    for run in checked_runs(ablation):
        summary_file = run / "eval_all" / "summary.json"
        if not summary_file.is_file():
            continue
        summary = json.loads(summary_file.read_text())
        metrics = read_jsonl(run / "metrics.jsonl")
        match = RUN_NAME.match(run.name)
        rows.append(
            {
                "estimator": match["estimator"],
                "samples": int(metrics[-1]["samples"]),
                "seed": int(match["seed"]),
                "change": summary["change"],
                "change_se": summary["change_se"],
                "before": summary["mean_before"],
                "after": summary["mean_after"],
                "minutes": sum(m.get("epoch_seconds", 0.0) for m in metrics) / 60,
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> tuple[str, dict[tuple[str, int], tuple[float, float, int]]]:
    """The Markdown table (one row per estimator, one column per budget: the mean change over seeds ± its standard
    error over seeds, each seed's change ± its own standard error, the mean wall time) and
    ``{(estimator, samples): (mean, se over seeds, seeds)}``."""
    cells: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        cells.setdefault((row["estimator"], row["samples"]), []).append(row)
    budgets = sorted({samples for _, samples in cells})
    estimators = list(dict.fromkeys(row["estimator"] for row in rows))
    stats = {}
    lines = [
        "| estimator | " + " | ".join(f"{b:,} samples" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for estimator in estimators:
        out = []
        for budget in budgets:
            runs = sorted(cells.get((estimator, budget), []), key=lambda r: r["seed"])
            if not runs:
                out.append("not run")
                continue
            mean, se = mean_and_se(torch.tensor([r["change"] for r in runs], dtype=torch.float64))
            stats[(estimator, budget)] = (mean, se, len(runs))
            seeds = ", ".join(f"{r['change']:+.3f} ± {r['change_se']:.3f}" for r in runs)
            minutes = sum(r["minutes"] for r in runs) / len(runs)
            spread = f"{se:.3f}" if len(runs) > 1 else "n/a"
            count = f"{len(runs)} seed{'s' if len(runs) > 1 else ''}"
            out.append(f"**{mean:+.3f} ± {spread}** ({count}: {seeds}; {minutes:.1f} min)")
        lines.append(f"| {estimator} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n", stats


def plot(stats: dict[tuple[str, int], tuple[float, float, int]]):
    """The paired change against samples seen, one line per estimator (mean ± standard error over seeds): a
    matplotlib ``Figure``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for estimator in dict.fromkeys(e for e, _ in stats):
        points = sorted((b, m, s) for (e, b), (m, s, _) in stats.items() if e == estimator)
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                    capsize=3, label=estimator)  # fmt: skip
    ax.axhline(0.0, color="grey", linewidth=1)
    ax.set(xscale="log", xlabel="samples seen", ylabel="paired change, all held-out prompts x 2 seeds",
           title="world reward: change over all held-out prompts (mean ± s.e. over seeds)")  # fmt: skip
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return fig
