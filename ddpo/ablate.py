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

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .cli import DEFAULT_PRESET
from .config import ConfigError, RunConfig, build_config, read_yaml, to_dict
from .runlog import read_jsonl

GRID_KEYS = {"name", "output_dir", "parallel", "threads", "final_epochs", "base", "algorithms", "rewards", "seeds"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: Config keys that locate a run rather than define it: they may differ between a run directory and its cell.
_LOCATION_KEYS = ("output_dir", "run_name", "num_epochs")
#: Identifying columns of ``results.csv``, first, in this order.
ID_COLUMNS = ["cell", "algorithm", "reward", "seed", "epoch", "reward_queries", "reward_mean", "reward_std"]


class GridError(ValueError):
    """A problem with a grid file or with a cell of it, found before anything runs."""


@dataclass
class Variant:
    """One algorithm or reward entry of a grid: a name and the config overrides it applies."""

    name: str
    overrides: dict[str, Any]
    threshold: float | None = None
    """Rewards only: reward level whose first crossing is reported in the summary (None: the default midpoint)."""
    entry: dict[str, Any] = field(default_factory=dict)
    """The entry as written in the grid file."""


@dataclass
class Cell:
    """One run of the grid: an algorithm, a reward and a seed, with its validated config."""

    algorithm: str
    reward: str
    seed: int
    overrides: list[str]
    """``key=value`` overrides of ``ddpo train`` after the base preset / config file."""
    config: RunConfig
    run_dir: Path

    @property
    def name(self) -> str:
        """The cell's name without the seed: ``<algorithm>__<reward>``."""
        return f"{self.algorithm}__{self.reward}"

    @property
    def run_name(self) -> str:
        return f"{self.name}__seed{self.seed}"


@dataclass
class Grid:
    """A parsed, validated grid file. Build it with :func:`load_grid`."""

    name: str
    output_dir: Path
    preset: str | None
    config_file: Path | None
    base_overrides: dict[str, Any]
    algorithms: list[Variant]
    rewards: list[Variant]
    seeds: list[int]
    parallel: int = 1
    threads: int = 1
    final_epochs: int = 1
    cells: list[Cell] = field(default_factory=list)

    @property
    def runs_dir(self) -> Path:
        return self.output_dir / "runs"

    def to_dict(self) -> dict[str, Any]:
        """The grid as a grid file (what ``grid.yaml`` in the output folder holds)."""
        base: dict[str, Any] = {}
        if self.preset:
            base["preset"] = self.preset
        if self.config_file:
            base["config"] = str(self.config_file)
        base["overrides"] = self.base_overrides
        return {
            "name": self.name,
            "output_dir": str(self.output_dir),
            "parallel": self.parallel,
            "threads": self.threads,
            "final_epochs": self.final_epochs,
            "base": base,
            "algorithms": [a.entry for a in self.algorithms],
            "rewards": [r.entry for r in self.rewards],
            "seeds": self.seeds,
        }


# ---------------------------------------------------------------------------------------------------------------------
# Parsing and validation
# ---------------------------------------------------------------------------------------------------------------------


def format_override(key: str, value: Any) -> str:
    """``("train.kl_coef", 0.1)`` -> ``"train.kl_coef=0.1"``: the value written so that ``ddpo train`` (which reads
    override values as YAML) gets it back unchanged. Plain strings stay bare; anything else is JSON (valid YAML)."""
    if isinstance(value, str) and value and value.strip() == value:
        try:
            if yaml.safe_load(value) == value:
                return f"{key}={value}"
        except yaml.YAMLError:
            pass
    return f"{key}={json.dumps(value)}"


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise GridError(f"{where}: expected a mapping of config keys to values, got {value!r}")
    return dict(value)


def _variants(entries: Any, kind: str) -> list[Variant]:
    if not isinstance(entries, list) or not entries:
        raise GridError(f"grid: `{kind}` must be a non-empty list of entries with a `name`")
    variants = []
    for i, entry in enumerate(entries):
        where = f"{kind}[{i}]"
        if not isinstance(entry, dict) or "name" not in entry:
            raise GridError(f"{where}: expected a mapping with a `name`, got {entry!r}")
        name = str(entry["name"])
        if not _NAME.match(name) or "__" in name:
            raise GridError(f"{where}: name {name!r} must be letters, digits, '_', '-' or '.', without '__'")
        allowed = {"name", "overrides"} | ({"reward", "components", "threshold"} if kind == "rewards" else set())
        unknown = set(entry) - allowed
        if unknown:
            raise GridError(f"{where} ({name}): unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
        overrides = _mapping(entry.get("overrides"), f"{where} ({name}).overrides")
        threshold = None
        if kind == "rewards":
            if ("reward" in entry) == ("components" in entry):
                raise GridError(
                    f"{where} ({name}): give exactly one of `reward: {{name, options}}` or `components: {{name: weight}}`"
                )
            if "reward" in entry:
                reward = _mapping(entry["reward"], f"{where} ({name}).reward")
                if set(reward) - {"name", "options"} or "name" not in reward:
                    raise GridError(
                        f"{where} ({name}).reward: expected {{name: ..., options: {{...}}}}, got {reward!r}"
                    )
                overrides = {"reward.name": reward["name"], "reward.options": reward.get("options") or {}, **overrides}
            else:
                components = _mapping(entry["components"], f"{where} ({name}).components")
                overrides = {"reward.name": "weighted", "reward.options": {"components": components}, **overrides}
            if entry.get("threshold") is not None:
                if isinstance(entry["threshold"], bool) or not isinstance(entry["threshold"], (int, float)):
                    raise GridError(f"{where} ({name}).threshold: expected a number, got {entry['threshold']!r}")
                threshold = float(entry["threshold"])
        variants.append(Variant(name, overrides, threshold, dict(entry)))
    names = [v.name for v in variants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise GridError(f"grid: duplicate {kind} names {duplicates}")
    return variants


def _positive_int(data: dict[str, Any], key: str, default: int) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GridError(f"grid: `{key}` must be an integer >= 1, got {value!r}")
    return value


def parse_grid(
    data: dict[str, Any],
    base_dir: Path | None = None,
    output_dir: str | Path | None = None,
    parallel: int | None = None,
    default_name: str = "ablation",
) -> Grid:
    """Build and validate a :class:`Grid` from a grid file's mapping (see the module docstring).

    ``base_dir`` resolves a relative ``base.config``; ``output_dir`` and ``parallel`` override the file's. Every cell's
    config is built and checked here (config keys and values, reward names, prompt sets, local model folders, and
    any existing run directory's config), so a mistake in the last cell stops the grid before the first one runs.
    """
    if not isinstance(data, dict):
        raise GridError(f"grid: expected a mapping, got {type(data).__name__}")
    unknown = set(data) - GRID_KEYS
    if unknown:
        raise GridError(f"grid: unknown keys {sorted(unknown)}; allowed: {sorted(GRID_KEYS)}")
    for key in ("algorithms", "rewards", "seeds"):
        if key not in data:
            raise GridError(f"grid: `{key}` is missing")
    base = _mapping(data.get("base"), "base")
    unknown = set(base) - {"preset", "config", "overrides"}
    if unknown:
        raise GridError(f"base: unknown keys {sorted(unknown)}; allowed: preset, config, overrides")
    if base.get("preset") and base.get("config"):
        raise GridError("base: give either `preset` or `config`, not both (put extra keys in base.overrides)")
    config_file = None
    if base.get("config"):
        config_file = Path(base["config"])
        if not config_file.is_absolute() and base_dir is not None:
            config_file = base_dir / config_file
    # Like `ddpo train`, no preset and no config file means the default preset.
    preset = base.get("preset") or (None if config_file else DEFAULT_PRESET)
    seeds = data["seeds"]
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise GridError(f"grid: `seeds` must be a non-empty list of distinct integers, got {seeds!r}")
    name = str(data.get("name") or default_name)
    out = Path(output_dir if output_dir is not None else data.get("output_dir") or Path("runs") / "ablations" / name)
    grid = Grid(
        name=name,
        output_dir=out.expanduser().absolute(),
        preset=preset,
        config_file=config_file,
        base_overrides=_mapping(base.get("overrides"), "base.overrides"),
        algorithms=_variants(data["algorithms"], "algorithms"),
        rewards=_variants(data["rewards"], "rewards"),
        seeds=list(seeds),
        parallel=parallel if parallel is not None else _positive_int(data, "parallel", 1),
        threads=_positive_int(data, "threads", 1),
        final_epochs=_positive_int(data, "final_epochs", 1),
    )
    if grid.parallel < 1:
        raise GridError(f"parallel must be >= 1, got {grid.parallel}")
    grid.cells = [
        _build_cell(grid, algorithm, reward, seed)
        for algorithm in grid.algorithms
        for reward in grid.rewards
        for seed in grid.seeds
    ]
    return grid


def load_grid(path: str | Path, output_dir: str | Path | None = None, parallel: int | None = None) -> Grid:
    """Read and validate a grid file (see :func:`parse_grid`)."""
    path = Path(path)
    try:
        data = read_yaml(path)
    except ConfigError as err:
        raise GridError(str(err)) from err
    return parse_grid(data, path.parent, output_dir, parallel, default_name=path.stem)


def _build_cell(grid: Grid, algorithm: Variant, reward: Variant, seed: int) -> Cell:
    run_name = f"{algorithm.name}__{reward.name}__seed{seed}"
    merged = {**grid.base_overrides, **algorithm.overrides, **reward.overrides}
    merged.update({"seed": seed, "output_dir": str(grid.runs_dir), "run_name": run_name})
    overrides = [format_override(key, value) for key, value in merged.items()]
    try:
        config = build_config(preset=grid.preset, config_file=grid.config_file, overrides=overrides)
        _check_resources(config)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        raise GridError(f"cell {run_name}: {err}") from err
    cell = Cell(algorithm.name, reward.name, seed, overrides, config, grid.runs_dir / run_name)
    _check_existing_run(cell)
    return cell


def _check_resources(config: RunConfig) -> None:
    """What ``build_config`` does not check but a run needs before it loads a model: the reward, prompts, model."""
    import rewards
    from rewards.base import _import_path

    from .prompts import load_prompts

    def check_reward(name: str, where: str) -> None:
        if ":" in name:
            _import_path(name)
        elif name not in rewards.available():
            import difflib

            hint = difflib.get_close_matches(name, rewards.available(), n=1)
            suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(
                f"{where}: unknown reward {name!r}.{suggestion} Available: {', '.join(rewards.available())}"
            )

    check_reward(config.reward.name, "reward.name")
    if config.reward.name == "weighted":
        components = config.reward.options.get("components")
        if not isinstance(components, dict) or not components:
            raise ConfigError("reward.options.components: a weighted reward needs a mapping {reward name: weight}")
        for component in components:
            check_reward(component, "reward.options.components")
    load_prompts(config.prompts)
    pretrained = config.model.pretrained
    if pretrained.startswith((".", "/", "~")) and not Path(pretrained).expanduser().exists():
        raise ConfigError(f"model.pretrained={pretrained!r} does not exist")


def _check_existing_run(cell: Cell) -> None:
    """A run directory left by an earlier grid must hold the same experiment (up to location and epoch count)."""
    config_file = cell.run_dir / "config.yaml"
    if not config_file.is_file():
        return
    try:
        old = to_dict(build_config(base=yaml.safe_load(config_file.read_text())))
    except (ConfigError, yaml.YAMLError) as err:
        raise GridError(f"cell {cell.run_name}: {config_file} is unreadable ({err}); delete {cell.run_dir}") from err
    new = to_dict(cell.config)
    differences = [
        f"{key}: {old_value!r} there, {new_value!r} in the grid"
        for key, old_value, new_value in _diff(old, new)
        if key not in _LOCATION_KEYS
    ]
    if differences:
        raise GridError(
            f"cell {cell.run_name}: {cell.run_dir} holds a run of a different config ({'; '.join(differences[:3])}). "
            "Delete that run directory, or give the grid another output_dir."
        )


def _diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _diff(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append((f"{prefix}{key}", x, y))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------------


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The epochs logged in ``run_dir/metrics.jsonl`` (empty if none)."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def cell_state(cell: Cell) -> str:
    """``finished`` (final/ and every epoch logged), ``resume`` (a checkpoint to continue from), ``restart`` (a run
    directory without any checkpoint) or ``new``."""
    run = cell.run_dir
    if not (run / "config.yaml").is_file():
        return "new"
    if (run / "final").is_dir() and len(read_metrics(run)) >= cell.config.num_epochs:
        return "finished"
    checkpoints = run / "checkpoints"
    if checkpoints.is_dir() and any((p / "state.json").is_file() for p in checkpoints.glob("checkpoint_*")):
        return "resume"
    return "restart"


def cell_command(grid: Grid, cell: Cell, state: str, pinned: Path | None = None) -> list[str]:
    """Arguments of ``ddpo`` that (re)start ``cell`` from ``state``: the base preset / config file and the cell's
    overrides, or, with ``pinned``, the cell's fully resolved config file (what :func:`run_grid` launches, so that a
    preset edited while a grid runs cannot change the cells that start later)."""
    if state == "resume":
        return ["train", "--resume", str(cell.run_dir), f"num_epochs={cell.config.num_epochs}"]
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
    counts = {s: sum(1 for _, state in plan if state == s) for s in ("finished", "resume", "restart", "new")}
    print(
        f"ddpo ablate: {grid.name}: {len(plan)} cells ({counts['finished']} finished, {counts['resume']} to resume, "
        f"{counts['restart'] + counts['new']} to run) in {grid.output_dir}",
        flush=True,
    )
    if dry_run:
        for cell, state in todo:
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

    try:
        while queue or running:
            while queue and (len(running) < grid.parallel or in_process):
                cell, state = queue.popleft()
                if state == "restart" and cell.run_dir.exists():  # died before its first checkpoint: nothing to keep
                    shutil.rmtree(cell.run_dir)
                outcome = CellOutcome(cell, state, log=logs / f"{cell.run_name}.log")
                args = cell_command(grid, cell, state, pinned=_pin_config(grid, cell) if state != "resume" else None)
                print(f"ddpo ablate: start {cell.run_name} ({state})", flush=True)
                start = time.perf_counter()
                if in_process:
                    outcome.returncode = _run_in_process(args)
                    outcome.seconds = time.perf_counter() - start
                    outcome.log = None
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
                continue
            time.sleep(0.2)
            for process in [p for p in running if p.poll() is not None]:
                outcome, start, log = running.pop(process)
                log.close()
                outcome.returncode = process.returncode
                outcome.seconds = time.perf_counter() - start
                outcomes.append(outcome)
                done += 1
                report(outcome)
    finally:
        for process, (_, _, log) in running.items():  # interrupted: stop our children; they resume next time
            process.terminate()
            process.wait()
            log.close()
    return outcomes


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
    from .cli import main

    try:
        return main(args)
    except Exception as err:  # a cell's failure must not stop the grid
        print(f"ddpo ablate: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return 1


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


# ---------------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------------


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
    from .report import plot_reward_vs_queries, save_figure

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
