"""Load runs and ablations and plot them: reward curves, diagnostics, sample grids, before/after samples.

The notebooks in ``notebooks/`` and ``ddpo report`` call these functions, so both show the same figures::

    from ddpo.tools import report

    run = report.load_run("runs/my-run")
    report.plot_rewards(run)                 # reward vs reward queries (matplotlib Figure)
    report.plot_diagnostics(run)             # approx KL, clip fraction, ratio, grad norm, loss, timings
    report.plot_sample_grids(run)            # the logged sample grids across epochs
    report.plot_before_after(report.sample_before_after(run, ["a red circle on a white background"]))
    report.write_run_report("runs/my-run")   # all of the above as PNGs + index.html

Figures are built with :class:`matplotlib.figure.Figure` (no pyplot state, no GUI backend): they render inline in
Jupyter and save to PNG anywhere. Torch and diffusers are imported only by :func:`sample_before_after`.
"""

from __future__ import annotations

import contextlib
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..training import rundir, trust
from ..training.runlog import read_jsonl, reward_against_samples
from .plots import axes_grid, plot_reward_vs_queries, save_figure

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


# ---------------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------------


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
    """Batch reward mean (± the batch's std) versus reward queries; components of a weighted reward alongside."""
    m = run.metrics
    components = [c for c in m.columns if c.startswith("reward/") and c.endswith("_mean")]
    fig, axes = axes_grid(1 + bool(components), 2, width=5.0, height=3.5)
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


@dataclass
class BeforeAfter:
    """Samples of the base and the fine-tuned model for the same prompts and seeds."""

    prompts: list[str]
    """One entry per image (each prompt repeated once per seed)."""
    seeds: list[int]
    before: Any
    """``torch.Tensor [N, 3, H, W]`` in ``[0, 1]``: the base model."""
    after: Any
    """The same with the fine-tuned weights (``final/``)."""
    before_rewards: list[float] | None = None
    after_rewards: list[float] | None = None


def default_prompts(run: Run, count: int = 4) -> list[str]:
    """The first ``count`` prompts of the run's prompt set."""
    from ..training.prompts import load_prompts

    return load_prompts(run.config["prompts"])[:count]


def sample_before_after(
    run: Run,
    prompts: list[str] | None = None,
    seeds: list[int] | tuple[int, ...] = (0, 1),
    num_steps: int | None = None,
    score: bool = True,
) -> BeforeAfter:
    """Sample ``prompts`` (default: :func:`default_prompts`) with each seed from the base model of the run
    (``model.pretrained`` through :func:`ddpo.models.load_pipeline`), then with the run's ``final/`` weights
    (``pipe.load_lora_weights``, or the full pipeline folder for full fine-tuning), with the run's scheduler, steps,
    eta, CFG scale and negative prompt. ``score`` also computes the run's reward of every image."""
    import inspect

    import torch

    from ..models import load_pipeline

    config, s = run.config, run.config["sample"]
    if score:  # before anything is loaded: the run's reward may name an import path the user has not trusted
        trust.require(config["reward"]["name"], config["reward"].get("options"), where=f"{run.path / 'config.yaml'}: ")
    final = run.path / "final"
    if not final.is_dir():
        raise FileNotFoundError(f"{final} does not exist: the run has not finished")
    prompts = list(prompts) if prompts else default_prompts(run)
    seeds = list(seeds)
    batch_prompts = [p for p in prompts for _ in seeds]
    kwargs = {
        "num_inference_steps": num_steps or s["num_steps"],
        "guidance_scale": s["guidance_scale"],
        "negative_prompt": [s["negative_prompt"]] * len(batch_prompts) if s["guidance_scale"] > 1 else None,
        "output_type": "pt",
    }
    if s.get("resolution"):  # the size the run sampled at
        kwargs.update(height=s["resolution"], width=s["resolution"])

    def sample(pipe) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(seed) for _ in prompts for seed in seeds]
        eta = {"eta": s["eta"]} if "eta" in inspect.signature(pipe.__call__).parameters else {}  # SD3 / FLUX: none
        with torch.no_grad():
            return pipe(batch_prompts, generator=generators, **kwargs, **eta).images.float().cpu()

    model = config["model"]
    with _quiet_loading():
        pipe = load_pipeline(model["pretrained"], model.get("revision"), s["scheduler"])
        before = sample(pipe)
        if model["use_lora"]:
            pipe.load_lora_weights(final)
        else:
            pipe = load_pipeline(str(final), None, s["scheduler"])
        after = sample(pipe)
    result = BeforeAfter(prompts=batch_prompts, seeds=seeds, before=before, after=after)
    if score:
        from rewards import get_reward

        from ..training.checkpoint import restore_final_reward

        reward = get_reward(config["reward"]["name"], **config["reward"]["options"])
        restore_final_reward(reward, run.path, config.get("num_epochs"))  # e.g. the trained discriminator
        with torch.no_grad():
            result.before_rewards = reward(before, batch_prompts).tolist()
            result.after_rewards = reward(after, batch_prompts).tolist()
    return result


@contextlib.contextmanager
def _quiet_loading():
    """Hide diffusers' / transformers' loading progress bars and info warnings (e.g. "no LoRA keys for the text
    encoder", expected for UNet-only LoRA) while loading pipelines for :func:`sample_before_after`."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()


def plot_before_after(result: BeforeAfter, title: str = "") -> Figure:
    """Two rows (base, fine-tuned), one column per (prompt, seed), with the reward of each image when scored."""
    import textwrap

    count = len(result.prompts)
    fig = Figure(figsize=(2.2 * count, 5.2), layout="constrained")
    axes = fig.subplots(2, count, squeeze=False)
    for row, (label, images, scores) in enumerate(
        [
            ("base", result.before, result.before_rewards),
            ("fine-tuned", result.after, result.after_rewards),
        ]
    ):
        for col in range(count):
            ax = axes[row][col]
            ax.imshow(images[col].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            seed = result.seeds[col % len(result.seeds)]
            text = textwrap.fill(result.prompts[col], 24) + f"\nseed {seed}" if row == 0 else ""
            if scores is not None:
                text += ("\n" if text else "") + f"reward {scores[col]:.3g}"
            ax.set_title(text, fontsize="small")
            if col == 0:
                ax.set_ylabel(label)
    fig.suptitle(title or "before (base) / after (fine-tuned)")
    return fig


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


# ---------------------------------------------------------------------------------------------------------------------
# Ablations
# ---------------------------------------------------------------------------------------------------------------------


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
        from .ablate import load_grid, write_outputs

        write_outputs(load_grid(path / "grid.yaml"))
    results = pd.read_csv(path / "results.csv")
    summary_file = path / "summary.csv"
    summary = pd.read_csv(summary_file) if summary_file.stat().st_size > 1 else pd.DataFrame()
    markdown = (path / "summary.md").read_text() if (path / "summary.md").is_file() else ""
    return Ablation(path, results, summary, markdown)


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
