"""Results of a grid: tidy tables of every finished cell, the per-cell summary, and the files ``ddpo ablate`` writes."""

from __future__ import annotations

from pathlib import Path

from ...training.runlog import read_jsonl
from ..plots import plot_reward_vs_queries, save_figure
from .grid import Grid
from .runner import cell_state, read_metrics

#: Identifying columns of ``results.csv``, first, in this order.
ID_COLUMNS = ["cell", "algorithm", "reward", "seed", "epoch", "reward_queries", "reward_mean", "reward_std"]


def collect(grid: Grid):
    """The tidy results of every finished cell: a ``pandas.DataFrame`` with one row per (cell, seed, epoch).

    Columns: :data:`ID_COLUMNS` (``reward_queries`` is the cumulative number of images scored), then every other
    metric the trainer logged, in the order it logged them.
    """
    import pandas as pd

    rows = []
    for cell in grid.cells:
        if cell_state(cell) != "finished":
            continue
        for metrics in read_metrics(cell.run_dir):
            if metrics["epoch"] >= cell.config.num_epochs:
                continue
            row = {
                "cell": cell.name,
                "algorithm": cell.algorithm,
                "reward": cell.reward,
                "seed": cell.seed,
                "epoch": metrics["epoch"],
                "reward_queries": metrics["samples"],
                "reward_mean": metrics["reward_mean"],
                "reward_std": metrics["reward_std"],
            }
            row.update({k: v for k, v in metrics.items() if k not in ("epoch", "samples") and k not in row})
            rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=ID_COLUMNS)
    return frame


def collect_evals(grid: Grid):
    """The held-out evaluations (``eval.jsonl``, written by runs with ``eval_prompts``) of every finished cell: a
    ``pandas.DataFrame`` with one row per (cell, seed, evaluation); ``epoch`` is the number of epochs trained before
    it (0: the base model). Every metric of the evaluation follows ``reward_mean``."""
    import pandas as pd

    rows = []
    for cell in grid.cells:
        if cell_state(cell) != "finished":
            continue
        for metrics in read_jsonl(cell.run_dir / "eval.jsonl"):
            metrics.pop("rewards", None)  # per-image rewards: eval.csv keeps one scalar per column
            rows.append({"cell": cell.name, "algorithm": cell.algorithm, "reward": cell.reward, "seed": cell.seed})
            rows[-1].update(metrics)
    return pd.DataFrame(rows)


def summarize(results, thresholds: dict[str, float | None] | None = None, final_epochs: int = 1, evals=None):
    """One row per cell: final reward (mean ± std over seeds) and reward queries to reach a threshold.

    Per run, the *final reward* is the mean over its last ``final_epochs`` epochs of the batch reward mean; the
    cell's ``final_mean`` / ``final_std`` are their mean and sample standard deviation (ddof=1) over seeds. The
    *threshold* of a reward is ``thresholds[reward]`` when given, else the midpoint between the initial reward (the
    mean epoch-0 batch reward of all its runs: samples of the base model) and the best cell's ``final_mean``.
    ``queries_mean`` / ``queries_std`` are over the seeds whose batch reward mean reached it (``reached`` of ``seeds``):
    the cumulative reward queries at the first epoch with ``reward_mean >= threshold``.

    With ``evals`` (from :func:`collect_evals`), also the held-out reward of the base model (``heldout_before``: the
    evaluation before the first epoch, identical inputs in every run) and of the trained policy (``heldout_after``:
    the last evaluation), and their paired difference per seed (``heldout_change``), mean and std over seeds.
    """
    import numpy as np
    import pandas as pd

    thresholds = thresholds or {}
    rows = []
    if results.empty:
        return pd.DataFrame()
    for reward, by_reward in results.groupby("reward", sort=False):
        initial = by_reward[by_reward.epoch == 0].reward_mean.mean()
        finals = {}
        for (cell, seed), run in by_reward.groupby(["cell", "seed"], sort=False):
            finals[(cell, seed)] = run.sort_values("epoch").reward_mean.tail(final_epochs).mean()
        final_by_cell = pd.Series(finals).groupby(level=0, sort=False)
        best = final_by_cell.mean().max()
        threshold = thresholds.get(reward)
        source = "given"
        if threshold is None:
            threshold, source = (initial + best) / 2, "midpoint"
        for cell, by_cell in by_reward.groupby("cell", sort=False):
            seed_finals = np.array([finals[(cell, s)] for s in sorted(by_cell.seed.unique())])
            queries = []
            for _, run in by_cell.groupby("seed"):
                run = run.sort_values("epoch")
                hit = run[run.reward_mean >= threshold]
                if not hit.empty:
                    queries.append(float(hit.reward_queries.iloc[0]))
            rows.append(
                {
                    "cell": cell,
                    "algorithm": by_cell.algorithm.iloc[0],
                    "reward": reward,
                    "seeds": len(seed_finals),
                    "epochs": int(by_cell.epoch.max()) + 1,
                    "reward_queries": int(by_cell.reward_queries.max()),
                    "initial_mean": float(by_cell[by_cell.epoch == 0].reward_mean.mean()),
                    "final_mean": float(seed_finals.mean()),
                    "final_std": float(seed_finals.std(ddof=1)) if len(seed_finals) > 1 else float("nan"),
                    "threshold": float(threshold),
                    "threshold_source": source,
                    "queries_mean": float(np.mean(queries)) if queries else float("nan"),
                    "queries_std": float(np.std(queries, ddof=1)) if len(queries) > 1 else float("nan"),
                    "reached": len(queries),
                    **_heldout_columns(evals, cell),
                }
            )
    return pd.DataFrame(rows)


def _heldout_columns(evals, cell: str) -> dict[str, float]:
    import numpy as np

    if evals is None or evals.empty or not (evals.cell == cell).any():
        return {}
    before, after = [], []
    for _, run in evals[evals.cell == cell].groupby("seed"):
        run = run.sort_values("epoch")
        if run.epoch.iloc[0] == 0 and len(run) > 1:
            before.append(run.reward_mean.iloc[0])
            after.append(run.reward_mean.iloc[-1])
    if not before:
        return {}
    before, after = np.array(before), np.array(after)
    change = after - before

    def std(values):
        return float(values.std(ddof=1)) if len(values) > 1 else float("nan")

    return {
        "heldout_before": float(before.mean()),
        "heldout_after_mean": float(after.mean()),
        "heldout_after_std": std(after),
        "heldout_change_mean": float(change.mean()),
        "heldout_change_std": std(change),
    }


def _pm(mean: float, std: float, digits: int) -> str:
    import math

    if math.isnan(mean):
        return "—"
    if math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def summary_markdown(summary, final_epochs: int = 1) -> str:
    """``summary`` (from :func:`summarize`) as a Markdown table, with a note saying how each number is made."""
    if summary.empty:
        return "No finished cells yet.\n"
    heldout = "heldout_before" in summary.columns
    lines = [
        "| reward | algorithm | initial reward | final reward | reward queries to threshold | seeds reaching |"
        + (" held-out before | held-out after | held-out change |" if heldout else ""),
        "|---|---|---|---|---|---|" + ("---|---|---|" if heldout else ""),
    ]
    for row in summary.itertuples():
        line = (
            f"| {row.reward} | {row.algorithm} | {row.initial_mean:.3f} | {_pm(row.final_mean, row.final_std, 3)} "
            f"| {_pm(row.queries_mean, row.queries_std, 0)} | {row.reached}/{row.seeds} |"
        )
        if heldout:
            line += (
                f" {_pm(row.heldout_before, float('nan'), 3)} | {_pm(row.heldout_after_mean, row.heldout_after_std, 3)}"
                f" | {_pm(row.heldout_change_mean, row.heldout_change_std, 3)} |"
            )
        lines.append(line)
    notes = []
    for reward, by_reward in summary.groupby("reward", sort=False):
        row = by_reward.iloc[0]
        how = (
            "the midpoint of the initial reward and the best final reward"
            if row.threshold_source == "midpoint"
            else "given in the grid file"
        )
        notes.append(f"`{reward}`: {row.threshold:.4g} ({how})")
    last = "the last epoch's" if final_epochs == 1 else f"the mean over the last {final_epochs} epochs of the"
    lines += [
        "",
        f"Final reward: {last} batch reward mean, mean ± sample std (ddof=1) over seeds. Initial reward: epoch 0 "
        "(samples of the base model). Reward queries to threshold: images scored until the first epoch whose batch "
        "reward mean reached the threshold, mean ± std over the seeds that reached it. Thresholds: "
        + "; ".join(notes)
        + ".",
    ]
    if heldout:
        lines += [
            "",
            "Held-out: the runs' evaluation on the fixed `eval_prompts` set (the same prompts and initial noise in every "
            "run and evaluation), before the first epoch (the base model) and after the last; change = after - before "
            "per seed (a paired difference), mean ± sample std over seeds.",
        ]
    return "\n".join(lines) + "\n"


def write_outputs(grid: Grid) -> dict[str, Path]:
    """Collect the finished cells and write ``results.csv``, ``summary.csv``, ``summary.md``, ``reward_vs_queries.png``."""
    out = grid.output_dir
    out.mkdir(parents=True, exist_ok=True)
    results = collect(grid)
    evals = collect_evals(grid)
    thresholds = {r.name: r.threshold for r in grid.rewards}
    summary = summarize(results, thresholds, grid.final_epochs, evals)
    paths = {
        "results": out / "results.csv",
        "evals": out / "eval.csv",
        "summary_csv": out / "summary.csv",
        "summary_md": out / "summary.md",
        "plot": out / "reward_vs_queries.png",
    }
    results.to_csv(paths["results"], index=False)
    evals.to_csv(paths["evals"], index=False)
    summary.to_csv(paths["summary_csv"], index=False)
    header = f"# Ablation `{grid.name}`\n\n"
    paths["summary_md"].write_text(header + summary_markdown(summary, grid.final_epochs))
    save_figure(plot_reward_vs_queries(results, summary), paths["plot"])
    return paths
