"""Running the cells of a grid: each as its own ``ddpo train`` process (``parallel`` at a time), resumable."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ...training.config import build_config, to_dict
from ...training.runlog import read_jsonl
from .grid import Cell, Grid, GridError, shorter_cell


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The epochs logged in ``run_dir/metrics.jsonl`` (empty if none)."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def run_finished(run: Path, num_epochs: int) -> bool:
    """A run directory is finished when its ``final/`` is written and ``num_epochs`` epochs are logged."""
    return (run / "final").is_dir() and len(read_metrics(run)) >= num_epochs


def cell_state(cell: Cell) -> str:
    """``finished`` (final/ and every epoch logged), ``resume`` (a checkpoint to continue from), ``restart`` (a run
    directory without any checkpoint) or ``new``."""
    run = cell.run_dir
    if not (run / "config.yaml").is_file():
        return "new"
    if run_finished(run, cell.config.num_epochs):
        return "finished"
    checkpoints = run / "checkpoints"
    if checkpoints.is_dir() and any((p / "state.json").is_file() for p in checkpoints.glob("checkpoint_*")):
        return "resume"
    return "restart"


def cell_command(grid: Grid, cell: Cell, state: str, pinned: Path | None = None) -> list[str]:
    """Arguments of ``ddpo`` that (re)start ``cell`` from ``state``: the base preset / config file and the cell's
    overrides, or, with ``pinned``, the cell's fully resolved config file (what :func:`run_grid` launches, so that a
    preset edited while a grid runs cannot change the cells that start later). ``extend``: resume the copy of the
    shorter cell's run that :func:`run_grid` put in the cell's run directory."""
    if state == "resume":
        return ["train", "--resume", str(cell.run_dir), f"num_epochs={cell.config.num_epochs}"]
    if state == "extend":
        return [
            "train",
            "--resume",
            str(cell.run_dir),
            f"num_epochs={cell.config.num_epochs}",
            f"run_name={cell.run_name}",
        ]
    if pinned is not None:
        return ["train", "--config", str(pinned)]
    base = ["--preset", grid.preset] if grid.preset else ["--config", str(grid.config_file)]
    return ["train", *base, *cell.overrides]


@dataclass
class CellOutcome:
    """How one cell's run went in :func:`run_grid`."""

    cell: Cell
    state: str
    """State before the run (see :func:`cell_state`)."""
    returncode: int = 0
    seconds: float = 0.0
    log: Path | None = None


def run_grid(grid: Grid, dry_run: bool = False, in_process: bool = False) -> list[CellOutcome]:
    """Run every unfinished cell of ``grid``, ``grid.parallel`` at a time, each as ``python -m ddpo.cli train ...``.

    With ``dry_run``, only print what would run. ``in_process`` runs the cells one after another in this process
    (no isolation; for debugging and tests). Returns one outcome per cell that was (or would be) run; a failed cell
    does not stop the others. Interrupting (Ctrl-C) stops the running cells; they resume on the next call.
    """
    if dry_run:
        return _run_cells(grid, dry_run=True, in_process=in_process)
    grid.output_dir.mkdir(parents=True, exist_ok=True)
    with _grid_lock(grid.output_dir):
        return _run_cells(grid, dry_run=False, in_process=in_process)


def _run_cells(grid: Grid, dry_run: bool, in_process: bool) -> list[CellOutcome]:
    plan = [(cell, cell_state(cell)) for cell in grid.cells]
    todo = [(cell, state) for cell, state in plan if state != "finished"]
    # extend_shorter: a new cell waits for its shorter cell, then starts from a copy of that run.
    shorter = {}
    if grid.extend_shorter:
        shorter = {cell.run_name: s for cell, state in todo if state == "new" and (s := shorter_cell(grid, cell))}
    finished = {cell.run_name for cell, state in plan if state == "finished"}
    failed: set[str] = set()
    counts = {s: sum(1 for _, state in plan if state == s) for s in ("finished", "resume", "restart", "new")}
    print(
        f"ddpo ablate: {grid.name}: {len(plan)} cells ({counts['finished']} finished, {counts['resume']} to resume, "
        f"{counts['restart'] + counts['new']} to run) in {grid.output_dir}",
        flush=True,
    )
    if dry_run:
        for cell, state in todo:
            if cell.run_name in shorter:
                source = shorter[cell.run_name].run_name
                print(f"[extend {source}] ddpo {' '.join(_quote(a) for a in cell_command(grid, cell, 'extend'))}")
            else:
                print(f"[{state}] ddpo {' '.join(_quote(a) for a in cell_command(grid, cell, state))}")
        return [CellOutcome(cell, state) for cell, state in todo]
    (grid.output_dir / "grid.yaml").write_text(yaml.safe_dump(grid.to_dict(), sort_keys=False))
    logs = grid.output_dir / "logs"
    logs.mkdir(exist_ok=True)
    outcomes: list[CellOutcome] = []
    queue = deque(todo)
    running: dict[subprocess.Popen, tuple[CellOutcome, float, Any]] = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(grid.threads), "MKL_NUM_THREADS": str(grid.threads)}
    done = 0

    def report(outcome: CellOutcome) -> None:
        status = "done" if outcome.returncode == 0 else f"FAILED (exit {outcome.returncode}; log: {outcome.log})"
        print(f"[{done}/{len(todo)}] {outcome.cell.run_name}: {status} in {outcome.seconds:.0f} s", flush=True)

    def startable() -> tuple[Cell, str] | None:
        """The first queued cell that waits for no shorter cell (removed from the queue), with its state."""
        for item in list(queue):
            cell, state = item
            source = shorter.get(cell.run_name)
            if source is not None and source.run_name not in finished | failed:
                continue
            queue.remove(item)
            if source is not None and source.run_name in finished:
                copy_run(source.run_dir, cell.run_dir)
                return cell, "extend"
            return cell, state  # no shorter cell, or it failed: trained from scratch
        return None

    try:
        while queue or running:
            while queue and (len(running) < grid.parallel or in_process):
                item = startable()
                if item is None:
                    break
                cell, state = item
                if state == "restart" and cell.run_dir.exists():  # died before its first checkpoint: nothing to keep
                    shutil.rmtree(cell.run_dir)
                outcome = CellOutcome(cell, state, log=logs / f"{cell.run_name}.log")
                pinned = _pin_config(grid, cell) if state not in ("resume", "extend") else None
                args = cell_command(grid, cell, state, pinned=pinned)
                print(f"ddpo ablate: start {cell.run_name} ({state})", flush=True)
                start = time.perf_counter()
                if in_process:
                    outcome.returncode = _run_in_process(args)
                    outcome.seconds = time.perf_counter() - start
                    outcome.log = None
                    (finished if outcome.returncode == 0 else failed).add(cell.run_name)
                    outcomes.append(outcome)
                    done += 1
                    report(outcome)
                    continue
                log = open(outcome.log, "a")  # noqa: SIM115 (closed when the process ends)
                log.write(f"\n$ ddpo {' '.join(_quote(a) for a in args)}\n")
                log.flush()
                process = subprocess.Popen(
                    [sys.executable, "-m", "ddpo.cli", *args], stdout=log, stderr=subprocess.STDOUT, env=env
                )
                running[process] = (outcome, start, log)
            if not running:
                if queue:  # cannot happen: every cell waited for is queued, running or done
                    raise GridError(f"cells wait for shorter cells that never ran: {[c.run_name for c, _ in queue]}")
                continue
            time.sleep(0.2)
            for process in [p for p in running if p.poll() is not None]:
                outcome, start, log = running.pop(process)
                log.close()
                outcome.returncode = process.returncode
                outcome.seconds = time.perf_counter() - start
                (finished if outcome.returncode == 0 else failed).add(outcome.cell.run_name)
                outcomes.append(outcome)
                done += 1
                report(outcome)
    finally:
        for process, (_, _, log) in running.items():  # interrupted: stop our children; they resume next time
            process.terminate()
            process.wait()
            log.close()
    return outcomes


RESULT_FOLDERS = ("final", "eval", "eval_all")
"""Top-level folders of a run that hold results of its last epoch (the exported weights, ``ddpo eval`` checks): an
extended copy leaves them behind, so a longer run is never taken for finished, or checked, with the shorter run's
results while it trains."""


def copy_run(source: Path, target: Path) -> None:
    """Copy the finished run ``source`` to ``target`` (absent) atomically, without its :data:`RESULT_FOLDERS`: a copy
    interrupted half-way is never taken for a run (it lies under a temporary name until complete)."""
    tmp = target.with_name(f".copy-{target.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    source = Path(source)

    def results_of_the_source(folder: str, names: list[str]) -> list[str]:
        return [name for name in names if Path(folder) == source and name in RESULT_FOLDERS]

    shutil.copytree(source, tmp, ignore=results_of_the_source)
    os.replace(tmp, target)


def _pin_config(grid: Grid, cell: Cell) -> Path:
    """Write the cell's config as validated (every key resolved) to ``OUTPUT_DIR/configs/<run_name>.yaml``."""
    path = grid.output_dir / "configs" / f"{cell.run_name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cell.config), sort_keys=False))
    return path


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _grid_lock(output_dir: Path):
    """Hold an exclusive lock on ``output_dir`` while a grid runs, so two ``ddpo ablate`` never train the same cell."""
    import fcntl

    with open(output_dir / ".ablate.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise GridError(
                f"another `ddpo ablate` is running the grid in {output_dir}; wait for it to finish"
            ) from err
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_in_process(args: list[str]) -> int:
    """Run the ``ddpo train`` arguments of :func:`cell_command` through the training API in this process."""
    from ...training.config import ConfigError
    from ...training.trainer import resume, train

    try:
        if args[1] == "--resume":
            resume(Path(args[2]), args[3:])
        elif args[1] == "--config":
            train(build_config(config_file=args[2], overrides=args[3:]))
        else:  # --preset NAME overrides...
            train(build_config(preset=args[2], overrides=args[3:]))
        return 0
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"ddpo: error: {err}", file=sys.stderr, flush=True)
        return 2
    except Exception as err:  # a cell's failure must not stop the grid
        print(f"ddpo ablate: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return 1


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)
