"""Reward ablations: run a grid of (algorithm, reward, seed) cells, then tabulate and plot them.

A grid file is YAML::

    name: world_vs_compressibility          # optional; the output folder's name by default
    output_dir: runs/ablations/world_vs_compressibility
    parallel: 2                              # cells trained at once (one process each)
    threads: 1                               # torch intra-op threads per cell process
    final_epochs: 1                          # "final reward" = mean of the last N epochs' batch reward means
    base:
      preset: world                          # and/or config: FILE (relative to the grid file), not both
      overrides: {num_epochs: 20, sample.batch_size: 8}
    algorithms:
      - {name: ddpo_is, overrides: {train.algorithm: ddpo_is}}
      - {name: ddpo_is_kl, overrides: {train.algorithm: ddpo_is, train.kl_coef: 0.1}}
    rewards:
      - {name: world, reward: {name: world}}
      - {name: jpeg, reward: {name: jpeg_compressibility, options: {quality: 95}}, threshold: -2.0}
      - {name: mix, components: {world: 1.0, jpeg_compressibility: 0.05}}   # a weighted sum
    seeds: [0, 1, 2]

Every cell is ``base <- algorithm overrides <- reward (+ its overrides) <- seed``, trained by ``ddpo train`` in its
own process into ``OUTPUT_DIR/runs/<algorithm>__<reward>__seed<k>``. All cells are validated before any runs. A
rerun skips finished cells (``final/`` and every epoch's metrics present), resumes interrupted ones from their
newest checkpoint, and restarts those that died before their first checkpoint. Outputs, in ``OUTPUT_DIR``:

* ``results.csv``: one row per (cell, seed, epoch): ``cell, algorithm, reward, seed, epoch, reward_queries,
  reward_mean, reward_std`` and every other logged metric;
* ``summary.csv`` / ``summary.md``: per cell, the final reward (mean ± std over seeds) and the reward queries needed
  to reach a threshold (per reward: the entry's ``threshold``, else the midpoint of the initial reward and the best
  cell's final reward), and with ``eval_prompts`` in the base config the held-out reward before -> after;
* ``eval.csv``: the runs' held-out evaluations (``eval.jsonl``), one row per (cell, seed, evaluation);
* ``reward_vs_queries.png``: reward versus reward queries, one panel per reward, mean ± std band per algorithm;
* ``grid.yaml`` (the grid as run), ``configs/`` (each cell's resolved config, which its ``ddpo train`` is started
  from), ``logs/`` (each cell's output).
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from .grid import Cell, Grid, GridError, Variant, format_override, load_grid, parse_grid
from .runner import CellOutcome, _raise_interrupt, cell_command, cell_state, read_metrics, run_grid
from .summary import ID_COLUMNS, collect, collect_evals, summarize, summary_markdown, write_outputs

__all__ = [
    "ID_COLUMNS",
    "Cell",
    "CellOutcome",
    "Grid",
    "GridError",
    "Variant",
    "cell_command",
    "cell_state",
    "collect",
    "collect_evals",
    "format_override",
    "load_grid",
    "main",
    "parse_grid",
    "read_metrics",
    "run_grid",
    "summarize",
    "summary_markdown",
    "write_outputs",
]


def main(
    grid_file: str | Path,
    parallel: int | None = None,
    output_dir: str | Path | None = None,
    dry_run: bool = False,
) -> int:
    """``ddpo ablate``: validate, run the unfinished cells, write the results. Returns the exit code."""
    start = time.perf_counter()
    grid = load_grid(grid_file, output_dir, parallel)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # `kill` stops the cells as Ctrl-C does
    try:
        outcomes = run_grid(grid, dry_run=dry_run)
    except KeyboardInterrupt:
        print(
            f"ddpo ablate: interrupted; rerun `ddpo ablate {grid_file}` to resume the unfinished cells", file=sys.stderr
        )
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    if dry_run:
        return 0
    paths = write_outputs(grid)
    failed = [o for o in outcomes if o.returncode != 0]
    print(f"ddpo ablate: {len(outcomes)} cells run in {time.perf_counter() - start:.0f} s", flush=True)
    print(paths["summary_md"].read_text(), flush=True)
    for name, path in paths.items():
        print(f"ddpo ablate: {name}: {path}")
    if failed:
        names = ", ".join(f"{o.cell.run_name} ({o.log})" for o in failed)
        print(f"ddpo ablate: {len(failed)} cells failed: {names}; rerun to retry them", file=sys.stderr)
        return 1
    return 0
