"""``ddpo report`` and the notebooks: load runs and ablations and plot them (reward curves, diagnostics, sample grids,
before/after samples), and write the figures as PNGs with an ``index.html``.

The notebooks in ``notebooks/`` and ``ddpo report`` call these functions, so both show the same figures::

    from ddpo.tools import report

    run = report.load_run("runs/my-run")
    report.plot_rewards(run)                 # reward vs reward queries (matplotlib Figure)
    report.plot_diagnostics(run)             # approx KL, clip fraction, ratio, grad norm, loss, timings
    report.plot_sample_grids(run)            # the logged sample grids across epochs
    report.plot_before_after(report.sample_before_after(run, ["a red circle on a white background"]))
    report.write_run_report("runs/my-run")   # all of the above as PNGs + index.html

This package is their one public path; its modules split the work: a run (:mod:`.runs`), the before/after samples
(:mod:`.before_after`), an ablation folder (:mod:`.ablation`), and here the pages. Figures are built with
:class:`matplotlib.figure.Figure` (no pyplot state, no GUI backend): they render inline in Jupyter and save to PNG
anywhere. Torch and diffusers are imported only by :func:`sample_before_after`.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import yaml

from ...training import trust
from ...training.runlog import reward_against_samples
from ..plots import plot_reward_vs_queries, save_figure
from .ablation import Ablation, is_ablation_dir, load_ablation, summary_table
from .before_after import BeforeAfter, default_prompts, plot_before_after, sample_before_after
from .runs import (
    DIAGNOSTICS,
    TIMINGS,
    Run,
    is_run_dir,
    load_run,
    pick_epochs,
    plot_diagnostics,
    plot_rewards,
    plot_sample_grids,
)

__all__ = [
    "DIAGNOSTICS",
    "TIMINGS",
    "Ablation",
    "BeforeAfter",
    "Run",
    "default_prompts",
    "is_ablation_dir",
    "is_run_dir",
    "load_ablation",
    "load_run",
    "pick_epochs",
    "plot_before_after",
    "plot_diagnostics",
    "plot_reward_vs_queries",
    "plot_rewards",
    "plot_sample_grids",
    "report_ablation",
    "sample_before_after",
    "save_figure",
    "summary_table",
    "write_report",
    "write_run_report",
]


def _html_page(title: str, body: list[str]) -> str:
    return (
        "<!doctype html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em;max-width:1400px} img{max-width:100%} "
        "table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:2px 8px;text-align:right} "
        "pre{background:#f6f6f6;padding:1em;overflow:auto}</style></head><body>\n"
        f"<h1>{html.escape(title)}</h1>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_run_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    prompts: list[str] | None = None,
    seeds: list[int] | tuple[int, ...] = (0, 1),
    before_after: bool = True,
) -> Path:
    """Write ``rewards.png``, ``diagnostics.png``, ``samples_across_epochs.png``, ``before_after.png`` (if the run
    finished and ``before_after``) and an ``index.html`` showing them into ``out`` (default ``RUN_DIR/report``).
    Returns the path of ``index.html``."""
    run = load_run(run_dir)
    if before_after and (run.path / "final").is_dir():  # the before/after samples are scored by the run's reward
        reward = run.config.get("reward") or {}
        trust.require(reward.get("name"), reward.get("options"), where=f"{run.path / 'config.yaml'}: ")
    out = Path(out) if out is not None else run.path / "report"
    figures = {
        "rewards.png": ("Reward", plot_rewards(run)),
        "diagnostics.png": ("Diagnostics", plot_diagnostics(run)),
        "samples_across_epochs.png": ("Samples across epochs", plot_sample_grids(run)),
    }
    if before_after and (run.path / "final").is_dir():
        result = sample_before_after(run, prompts, seeds)
        figures["before_after.png"] = ("Before / after", plot_before_after(result))
    body = []
    for name, (heading, fig) in figures.items():
        save_figure(fig, out / name)
        body.append(f"<h2>{html.escape(heading)}</h2>\n<img src='{name}'>")
    seen = reward_against_samples(run.metrics.to_dict("records"), run.evals.to_dict("records"))
    if seen:

        def cell(value: float | None) -> str:
            return "" if value is None else f"{value:.4g}"

        rows = "".join(
            f"<tr><td>{r['samples_seen']:,}</td><td>{r['epoch']}</td><td>{cell(r['train_reward'])}</td>"
            f"<td>{cell(r['heldout_reward'])}</td></tr>"
            for r in seen
        )
        header = "<tr><th>samples seen</th><th>epochs</th><th>training batch reward</th><th>held-out reward</th></tr>"
        body.append(f"<h2>Reward against samples seen</h2>\n<table class='seen'>{header}{rows}</table>")
    last = run.metrics.iloc[-1].to_dict() if len(run.metrics) else {}
    table = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{v:.6g}</td></tr>" for k, v in last.items())
    body.insert(0, f"<p>Run directory: <code>{html.escape(str(run.path.resolve()))}</code></p>")
    body.append(f"<h2>Last epoch</h2>\n<table>{table}</table>")
    config = html.escape(yaml.safe_dump(run.config, sort_keys=False))
    body.append(f"<h2>Config</h2>\n<pre>{config}</pre>")
    index = out / "index.html"
    index.write_text(_html_page(f"ddpo run {run.name}", body))
    return index


def report_ablation(ablation_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``reward_vs_queries.png``, one PNG per logged diagnostic (``approx_kl``, ``clipfrac``, ...) versus reward
    queries, and an ``index.html`` with the summary table into ``out`` (default ``ABLATION_DIR/report``). Returns
    the path of ``index.html``."""
    ablation = load_ablation(ablation_dir)
    out = Path(out) if out is not None else ablation.path / "report"
    body = [f"<p>Ablation folder: <code>{html.escape(str(ablation.path.resolve()))}</code></p>"]
    save_figure(plot_reward_vs_queries(ablation.results, ablation.summary), out / "reward_vs_queries.png")
    body.append("<h2>Reward vs reward queries</h2>\n<img src='reward_vs_queries.png'>")
    if not ablation.summary.empty:
        body.append("<h2>Summary</h2>\n" + summary_table(ablation.summary).to_html(index=False, escape=True))
        note = ablation.summary_markdown.strip().splitlines()[-1] if ablation.summary_markdown else ""
        body.append(f"<p>{html.escape(note)}</p>")
    for keys, title in DIAGNOSTICS:
        key = keys[0]
        if key in ablation.results and ablation.results[key].notna().any():
            name = f"{key}_vs_queries.png"
            save_figure(plot_reward_vs_queries(ablation.results, metric=key), out / name)
            body.append(f"<h2>{html.escape(title)}</h2>\n<img src='{name}'>")
    index = out / "index.html"
    index.write_text(_html_page(f"ddpo ablation {ablation.path.name}", body))
    return index


def write_report(path: str | Path, out: str | Path | None = None, **kwargs: Any) -> Path:
    """``ddpo report PATH``: a run directory gets :func:`write_run_report`, an ablation folder
    :func:`report_ablation`. Returns the path of the written ``index.html``."""
    if is_run_dir(path):
        return write_run_report(path, out, **kwargs)
    if is_ablation_dir(path):
        return report_ablation(path, out)
    raise FileNotFoundError(
        f"{path} is neither a run directory (config.yaml + metrics.jsonl) nor an ablation folder (grid.yaml)"
    )
