"""The equal-budget table of docs/results.md from the runs of ``ablations/equal_budget.yaml``.

Every finished run (``RUN/final``) is checked over all 173 held-out prompts x noise seeds 10 and 11 with the sampler
it trained with (DDPO-IS: 10 DDIM steps, eta 1, CFG 5; NFT and AWM: 10 CFG-free DPM-Solver++ steps), its base model on
the same noise and sampler, as a user checks a run::

    ddpo eval RUN --count 173 --seeds 10 11 --out RUN/eval_all

(skipped where ``RUN/eval_all/summary.json`` exists, so the script resumes), then the paired changes are tabulated per
estimator and budget: the mean over seeds with the standard error over seeds, each seed's change with its own paired
standard error over 346 images, and the mean training wall time (the sum of the run's ``epoch_seconds``: sampling,
scoring and optimisation, without model loading). Writes ``OUT/equal_budget.md`` and ``OUT/equal_budget.png`` (default
OUT: the ablation folder) and prints the table.

    python scripts/equal_budget_table.py runs/ablations/equal_budget [--out docs] [--no-eval]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from ddpo.training.evaluation import mean_and_se
from ddpo.training.runlog import read_jsonl

RUN_NAME = re.compile(r"^(?P<estimator>.+)_(?P<budget>\d+k)__(?P<reward>[^_]+)__seed(?P<seed>\d+)$")
EVAL_ARGS = ["--count", "173", "--seeds", "10", "11"]


def check_run(run: Path) -> dict:
    """``RUN/eval_all/summary.json``, running ``ddpo eval`` first if it is missing."""
    summary = run / "eval_all" / "summary.json"
    if not summary.is_file():
        from ddpo.cli import main

        if main(["eval", str(run), *EVAL_ARGS, "--out", str(run / "eval_all")]) != 0:
            raise SystemExit(f"ddpo eval failed on {run}")
    return json.loads(summary.read_text())


def collect(ablation: Path, evaluate: bool) -> list[dict]:
    rows = []
    for run in sorted((ablation / "runs").iterdir()):
        match = RUN_NAME.match(run.name)
        if match is None or not (run / "final").is_dir():
            continue
        if not evaluate and not (run / "eval_all" / "summary.json").is_file():
            continue
        summary = check_run(run)
        metrics = read_jsonl(run / "metrics.jsonl")
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


def table(rows: list[dict]) -> tuple[str, dict]:
    """Markdown table and ``{(estimator, samples): (mean, se over seeds, seeds)}``."""
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


def plot(stats: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for estimator in dict.fromkeys(e for e, _ in stats):
        points = sorted((b, m, s) for (e, b), (m, s, _) in stats.items() if e == estimator)
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                    capsize=3, label=estimator)  # fmt: skip
    ax.axhline(0.0, color="grey", linewidth=1)
    ax.set(xscale="log", xlabel="samples seen", ylabel="paired change, 346 held-out images",
           title="world reward: change over all held-out prompts (mean ± s.e. over seeds)")  # fmt: skip
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ablation", type=Path, help="the output folder of ddpo ablate ablations/equal_budget.yaml")
    parser.add_argument("--out", type=Path, default=None, help="where equal_budget.md / .png go (default: ABLATION)")
    parser.add_argument("--no-eval", action="store_true", help="tabulate only runs already checked (no ddpo eval)")
    args = parser.parse_args()
    rows = collect(args.ablation, evaluate=not args.no_eval)
    if not rows:
        raise SystemExit(
            f"no finished runs under {args.ablation / 'runs'} (run: ddpo ablate ablations/equal_budget.yaml)"
        )
    markdown, stats = table(rows)
    out = args.out or args.ablation
    out.mkdir(parents=True, exist_ok=True)
    (out / "equal_budget.md").write_text(markdown)
    plot(stats, out / "equal_budget.png")
    print(markdown)
    print(f"wrote {out / 'equal_budget.md'} and {out / 'equal_budget.png'}")


if __name__ == "__main__":
    main()
