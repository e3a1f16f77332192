"""Grid files of ``ddpo ablate``: parsing, the cells they define, and their validation before anything runs."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ...training import rundir
from ...training.config import DEFAULT_PRESET, ConfigError, RunConfig, build_config, read_yaml, to_dict

GRID_KEYS = {
    "name",
    "output_dir",
    "parallel",
    "threads",
    "final_epochs",
    "extend_shorter",
    "base",
    "algorithms",
    "rewards",
    "seeds",
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: Config keys that locate a run rather than define it: they may differ between a run directory and its cell.
_LOCATION_KEYS = ("output_dir", "run_name", "num_epochs")


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
    extend_shorter: bool = False
    """A cell whose config differs from a shorter cell's only in ``num_epochs`` starts as a copy of that finished run
    and resumes to its own ``num_epochs`` (:func:`shorter_cell`), instead of training its first epochs again: a
    budget sweep (1k, 2k, 4k samples) costs its longest runs only. Resuming is bit-identical to an uninterrupted run
    on one machine kind (tests/test_train_e2e.py)."""
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
            "extend_shorter": self.extend_shorter,
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


def _bool(data: dict[str, Any], key: str, default: bool) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise GridError(f"grid: `{key}` must be true or false, got {value!r}")
    return value


def shorter_cell(grid: Grid, cell: Cell) -> Cell | None:
    """The longest cell of ``grid`` with the same seed whose config equals ``cell``'s except for a smaller
    ``num_epochs`` (and its location), or None. With ``grid.extend_shorter``, ``cell`` starts from its run."""

    def key(c: Cell) -> dict[str, Any]:
        data = to_dict(c.config)
        for name in _LOCATION_KEYS:
            data.pop(name, None)
        return data

    mine = key(cell)
    shorter = [
        other
        for other in grid.cells
        if other.config.num_epochs < cell.config.num_epochs and other.seed == cell.seed and key(other) == mine
    ]
    return max(shorter, key=lambda c: c.config.num_epochs, default=None)


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
        extend_shorter=_bool(data, "extend_shorter", False),
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
        data = read_yaml(path, what="grid file")
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

    from ...training.prompts import load_prompts

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
        old = to_dict(build_config(base=rundir.read_run_config(cell.run_dir)))
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
