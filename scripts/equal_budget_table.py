"""The equal-budget table of docs/results.md from the runs of ``ablations/equal_budget.yaml``.

Every finished run (``RUN/final``) is checked over all 173 held-out prompts x noise seeds 10 and 11 with the sampler
it trained with (DDPO-IS: 10 DDIM steps, eta 1, CFG 5; NFT and AWM: 10 CFG-free DPM-Solver++ steps), its base model on
the same noise and sampler, as a user checks a run::

    ddpo eval RUN --count 173 --seeds 10 11 --out RUN/eval_all

(skipped where ``RUN/eval_all/summary.json`` exists, so the script resumes), then the paired changes are tabulated per
estimator and budget: the mean over seeds with the standard error over seeds, each seed's change with its own paired
standard error over the 173 prompts, and the mean training wall time (the sum of the run's ``epoch_seconds``: sampling,
scoring and optimisation, without model loading). Writes ``OUT/equal_budget.md`` and ``OUT/equal_budget.png`` (default
OUT: the ablation folder) and prints the table. ``--update FILE ...`` also replaces the table between the lines
``<!-- equal_budget:begin -->`` and ``<!-- equal_budget:end -->`` of each file (``--marker NAME`` for other lines), so
the published table is the script's output. The default run's three seeds (``ablations/default.yaml``) are tabulated
the same way, under the marker ``default_run`` of README.md and docs/results.md:

    python scripts/equal_budget_table.py runs/ablations/equal_budget [--out docs] [--no-eval]
    python scripts/equal_budget_table.py runs/ablations/equal_budget --out docs --update docs/results.md
    python scripts/equal_budget_table.py runs/ablations/default --marker default_run --update README.md docs/results.md
"""

from __future__ import annotations

from ddpo.tools.ablate.equal_budget import (
    check_run,
    checked_runs,
    collect,
    plot,
    table,
    table_script_parser,
    update_marked,
)


def main() -> None:
    parser = table_script_parser(__doc__, "equal_budget", "equal_budget.md / .png")
    parser.add_argument(
        "--marker",
        default="equal_budget",
        help="NAME of the lines <!-- NAME:begin --> / <!-- NAME:end --> around the table in --update files "
        "(default: equal_budget; the default run's seeds: default_run)",
    )
    args = parser.parse_args()
    if not args.no_eval:
        for run in checked_runs(args.ablation):
            check_run(run)
    rows = collect(args.ablation)
    if not rows:
        raise SystemExit(
            f"no finished runs under {args.ablation / 'runs'} (run: ddpo ablate ablations/equal_budget.yaml)"
        )
    markdown, stats = table(rows)
    out = args.out or args.ablation
    out.mkdir(parents=True, exist_ok=True)
    (out / "equal_budget.md").write_text(markdown)
    plot(stats).savefig(out / "equal_budget.png", dpi=100)
    for path in args.update:
        update_marked(path, markdown, args.marker)
    print(markdown)
    print(f"wrote {out / 'equal_budget.md'} and {out / 'equal_budget.png'}")


if __name__ == "__main__":
    main()
