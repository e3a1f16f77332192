"""The comparison of reward backpropagation at equal wall time in docs/results.md, from the runs of
``ablations/reward_backprop.yaml``.

Every finished run (``RUN/final``) is checked twice over all 173 held-out prompts x noise seeds 10 and 11 (never used
while tuning), its base model on the same noise and with the sampler the run trained with, as a user checks a run:

    ddpo eval RUN --count 173 --seeds 10 11 --out RUN/eval_all                    # the training reward (clip_score)
    ddpo eval RUN --count 173 --seeds 10 11 --reward world --out RUN/eval_world   # the guard: the world's rule checks

(each skipped where its ``summary.json`` exists, so the script resumes). The table has one row per estimator: its
epochs and samples, the mean training minutes per run (the sum of the run's ``epoch_seconds``), and the paired
change of the reward and of the guard, each the mean over seeds ± its standard error over seeds, then each seed's
change ± its own standard error over the 173 prompts. Writes ``OUT/reward_backprop.md`` (default OUT: the ablation
folder) and prints it, and ``OUT/reward_backprop.png``: each estimator's in-run evaluations (its own 64 held-out
images, mean over seeds) of the reward and the guard against training minutes, where over-optimisation shows as a
reward that keeps rising while the guard falls; ``--update FILE ...`` replaces the table between ``<!-- reward_backprop:begin -->`` and
``<!-- reward_backprop:end -->`` of each file:

    python scripts/reward_backprop_table.py runs/ablations/reward_backprop [--no-eval] [--update docs/results.md]
"""

from __future__ import annotations

from ddpo.tools.ablate.equal_budget import (
    check_run,
    checked_runs,
    collect,
    plot_reward_and_guard,
    reward_and_guard_curves,
    reward_and_guard_table,
    table_script_parser,
    update_marked,
)

GUARD = "world"


def main() -> None:
    parser = table_script_parser(__doc__, "reward_backprop", "reward_backprop.md/.png")
    args = parser.parse_args()
    if not args.no_eval:
        for run in checked_runs(args.ablation):
            check_run(run)
            check_run(run, f"eval_{GUARD}", ("--reward", GUARD))
    rows = collect(args.ablation)
    if not rows:
        raise SystemExit(
            f"no checked runs under {args.ablation / 'runs'} (run: ddpo ablate ablations/reward_backprop.yaml)"
        )
    markdown = reward_and_guard_table(rows, collect(args.ablation, f"eval_{GUARD}"), "clip_score", GUARD)
    out = args.out or args.ablation
    out.mkdir(parents=True, exist_ok=True)
    (out / "reward_backprop.md").write_text(markdown)
    curves = reward_and_guard_curves(args.ablation, GUARD)
    plot_reward_and_guard(curves, "clip_score", GUARD).savefig(out / "reward_backprop.png", dpi=100)
    for path in args.update:
        update_marked(path, markdown, "reward_backprop")
    print(markdown)
    print(f"wrote {out / 'reward_backprop.md'} and {out / 'reward_backprop.png'}")


if __name__ == "__main__":
    main()
