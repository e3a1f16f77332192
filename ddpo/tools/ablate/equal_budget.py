"""The equal-budget table: the estimators compared at equal numbers of samples, each run checked by ``ddpo eval``.

A run of ``ablations/equal_budget.yaml`` is named ``<estimator>_<N>k__<reward>__seed<k>`` (the budget suffix is
optional: the default run's seeds, ``ablations/default.yaml``, are ``default__world__seed<k>``); once it is checked
(``ddpo eval RUN --count 173 --seeds 10 11 --out RUN/eval_all``, done by ``scripts/equal_budget_table.py``) its
``eval_all/summary.json`` holds the paired change over all held-out prompts. This module reads those summaries and
the runs' ``metrics.jsonl``, so the script and the ablation notebook draw the same table and plot; only
:func:`check_run` samples (it runs ``ddpo eval`` where a summary is missing).

The comparison of reward backpropagation at equal wall time (``ablations/reward_backprop.yaml``,
``scripts/reward_backprop_table.py``) checks each run twice, on its training reward (``eval_all``) and on a guard
(``eval_world``), and tabulates both side by side (:func:`reward_and_guard_table`).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ...training import rundir
from ...training.evaluation import mean_and_se
from ...training.runlog import read_jsonl
from .runner import run_finished

__all__ = ["CHECK_ARGS", "RUN_NAME", "check_run", "checked_runs", "collect", "plot", "reward_and_guard_table", "table",
           "table_script_parser", "update_marked", "reward_and_guard_curves", "plot_reward_and_guard"]  # fmt: skip

RUN_NAME = re.compile(r"^(?P<estimator>.+?)(?:_(?P<budget>\d+k))?__(?P<reward>[^_]+)__seed(?P<seed>\d+)$")
CHECK_ARGS = ("--count", "173", "--seeds", "10", "11")
"""The check of every run: all 173 held-out prompts x noise seeds 10 and 11, never used while tuning."""


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


def check_run(run: Path, folder: str = "eval_all", eval_args: tuple[str, ...] = ()) -> dict:
    """``RUN/<folder>/summary.json``, running ``ddpo eval RUN --count 173 --seeds 10 11 <eval_args> --out RUN/<folder>``
    first if it is missing (``eval_args``, e.g. ``("--reward", "world")``, choose another reward than the run's)."""
    summary = run / folder / "summary.json"
    if not summary.is_file():  # the command itself, in a process of its own: tools sit below the CLI's layer
        command = [
            sys.executable,
            "-m",
            "ddpo.cli",
            "eval",
            str(run),
            *CHECK_ARGS,
            *eval_args,
            "--out",
            str(run / folder),
        ]
        if subprocess.run(command).returncode != 0:
            raise SystemExit(f"ddpo eval failed on {run}")
    return json.loads(summary.read_text())


def table_script_parser(description: str, grid: str, outputs: str) -> argparse.ArgumentParser:
    """The arguments both table scripts take: the ablation folder of ``ddpo ablate ablations/<grid>.yaml``, ``--out``
    (where ``outputs`` go), ``--no-eval`` and ``--update FILE ...``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ablation", type=Path, help=f"the output folder of ddpo ablate ablations/{grid}.yaml")
    parser.add_argument("--out", type=Path, default=None, help=f"where {outputs} go (default: ABLATION)")
    parser.add_argument("--no-eval", action="store_true", help="tabulate only runs already checked (no ddpo eval)")
    parser.add_argument("--update", type=Path, nargs="*", default=[], help="files whose marked table to replace")
    return parser


def update_marked(path: Path, markdown: str, marker: str) -> None:
    """Replace the block between the lines ``<!-- marker:begin -->`` and ``<!-- marker:end -->`` of ``path`` by
    ``markdown`` (the marker lines stay), so that a published table is a script's output."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    text = path.read_text()
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise SystemExit(f"{path}: needs one line {begin} and, after it, one line {end} around the table")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{markdown}{end}{tail}")


def collect(ablation: str | Path, check: str = "eval_all") -> list[dict[str, Any]]:
    """One row per checked run (``<check>/summary.json`` present): estimator, samples seen, epochs, seed, the paired
    change and its standard error, the base's and the run's means, and the training wall time in minutes (the sum of
    the run's ``epoch_seconds``: sampling, scoring and optimisation, without model loading)."""
    rows = []
    for run in checked_runs(ablation):
        summary_file = run / check / "summary.json"
        if not summary_file.is_file():
            continue
        summary = json.loads(summary_file.read_text())
        metrics = read_jsonl(run / "metrics.jsonl")
        match = RUN_NAME.match(run.name)
        rows.append(
            {
                "estimator": match["estimator"],
                "samples": int(metrics[-1]["samples"]),
                "epochs": len(metrics),
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
            minutes = sum(r["minutes"] for r in runs) / len(runs)
            out.append(_over_seeds(runs, f"{minutes:.1f} min"))
        lines.append(f"| {estimator} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n", stats


def _over_seeds(runs: list[dict[str, Any]], note: str = "") -> str:
    """``**mean ± se** (k seeds: change ± se, ...[; note])`` of one estimator's runs: the mean change over seeds with
    its standard error over seeds, then each seed's change with its own paired standard error; three decimals, one
    where a change reaches 1 (a CLIP score, not a fraction of checks)."""
    runs = sorted(runs, key=lambda r: r["seed"])
    mean, se = mean_and_se(torch.tensor([r["change"] for r in runs], dtype=torch.float64))
    d = 3 if max(abs(r["change"]) for r in runs) < 1 else 1
    spread = f"{se:.{d}f}" if len(runs) > 1 else "n/a"
    seeds = ", ".join(f"{r['change']:+.{d}f} ± {r['change_se']:.{d}f}" for r in runs)
    count = f"{len(runs)} seed{'s' if len(runs) > 1 else ''}"
    return f"**{mean:+.{d}f} ± {spread}** ({count}: {seeds}{'; ' + note if note else ''})"


def reward_and_guard_table(
    reward_rows: list[dict[str, Any]], guard_rows: list[dict[str, Any]], reward: str, guard: str
) -> str:
    """The Markdown table of a comparison at equal wall time: one row per estimator (in the order of
    ``reward_rows``) with its epochs and samples, the mean training minutes per run, and the paired change of the
    training reward (``reward_rows``, from :func:`collect`) and of the guard (``guard_rows``, the same runs checked on
    another reward), each as the mean over seeds ± its standard error over seeds, then each seed's change."""
    lines = [
        f"| estimator | epochs (samples) | training minutes | `{reward}` change | guard `{guard}` change |",
        "|---|---|---|---|---|",
    ]
    for estimator in dict.fromkeys(row["estimator"] for row in reward_rows):
        runs = [r for r in reward_rows if r["estimator"] == estimator]
        guards = [r for r in guard_rows if r["estimator"] == estimator]
        minutes = sum(r["minutes"] for r in runs) / len(runs)
        budget = f"{runs[0]['epochs']} ({runs[0]['samples']:,})"
        guard_cell = _over_seeds(guards) if guards else "not checked"
        lines.append(f"| {estimator} | {budget} | {minutes:.1f} | {_over_seeds(runs)} | {guard_cell} |")
    return "\n".join(lines) + "\n"


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


def reward_and_guard_curves(ablation: str | Path, guard: str) -> dict[str, list[tuple[float, float, float]]]:
    """The in-run evaluations of each estimator (every run's ``eval.jsonl``: its own held-out images, before training
    and every ``eval_every`` epochs), averaged over seeds at each evaluated epoch: ``{estimator: [(training minutes,
    reward, guard), ...]}``, the minutes being the mean over seeds of the ``epoch_seconds`` summed up to that epoch,
    the guard the ``guard/<guard>_mean`` the trainer logs. Epochs that not every seed evaluated are left out."""
    by_estimator: dict[str, list[dict[int, tuple[float, float, float]]]] = {}
    for run in checked_runs(ablation):
        elapsed, points = [0.0], {}
        for row in read_jsonl(run / "metrics.jsonl"):
            elapsed.append(elapsed[-1] + row.get("epoch_seconds", 0.0) / 60)
        for row in read_jsonl(run / "eval.jsonl") if (run / "eval.jsonl").is_file() else []:
            epoch = int(row["epoch"])
            if f"guard/{guard}_mean" in row and epoch < len(elapsed):
                points[epoch] = (elapsed[epoch], float(row["reward_mean"]), float(row[f"guard/{guard}_mean"]))
        by_estimator.setdefault(RUN_NAME.match(run.name)["estimator"], []).append(points)
    curves = {}
    for estimator, runs in by_estimator.items():
        epochs = sorted(set.intersection(*(set(points) for points in runs)))
        curves[estimator] = [tuple(sum(points[e][i] for points in runs) / len(runs) for i in range(3)) for e in epochs]
    return curves


def plot_reward_and_guard(curves: dict[str, list[tuple[float, float, float]]], reward: str, guard: str):
    """Two panels against training minutes, one line per estimator (:func:`reward_and_guard_curves`): the training
    reward and the guard on the runs' own held-out images. A matplotlib ``Figure``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for estimator, points in curves.items():
        minutes = [p[0] for p in points]
        axes[0].plot(minutes, [p[1] for p in points], marker="o", label=estimator)
        axes[1].plot(minutes, [p[2] for p in points], marker="o", label=estimator)
    axes[0].set(xlabel="training minutes", ylabel=f"held-out {reward}", title=f"training reward: {reward}")
    axes[1].set(xlabel="training minutes", ylabel=f"held-out {guard}", title=f"guard, never trained on: {guard}")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    return fig
