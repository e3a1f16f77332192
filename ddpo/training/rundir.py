"""The rules of a run directory (``output_dir/run_name``), checked before a model loads.

* A new run's folder can be created and written (:func:`check_run_dir`).
* A new run takes an absent or empty folder only: it never truncates or replaces files it did not write
  (:func:`check_new_run_dir`).
* Nothing the run reads, writes or prunes leads out of the run directory through a symbolic link
  (:func:`check_inside`): ``config.yaml``, the logs, ``checkpoints/`` and each checkpoint's files, ``final/``, ...
* A run's ``config.yaml`` is read by the config loader, with its size bound, and must hold a config
  (:func:`read_run_config`).
* A resume leaves the run where it is: ``run_name`` / ``output_dir`` overrides may only name its own folder
  (:func:`check_resume_overrides`).
* Temporary files of a crashed run (a checkpoint or ``final/`` being written) are removed when the run starts again
  (:func:`remove_debris`).

The package's own layout is described in docs/run-directory.md.
"""

from __future__ import annotations

import os
import shutil
from itertools import islice
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, RunConfig, build_config, parse_override, read_yaml, to_dict
from .runlog import check_epochs, keep_epochs

PROBE_PREFIX = ".ddpo-write-test-"
"""Files :func:`check_run_dir` writes and deletes at once to test that a folder is writable."""

RUN_ENTRIES = ("config.yaml", "metrics.jsonl", "eval.jsonl", "checkpoints", "final", "samples", "tensorboard")
"""What a run writes directly under its folder."""

DEBRIS = (
    "checkpoints/.tmp-*",  # a checkpoint being written
    "checkpoints/.old-*",  # a checkpoint being replaced
    ".final-tmp-*",  # final/ being written
    ".old-final-*",  # final/ being replaced
    ".old-best-*",  # best/ being replaced (final_checkpoint=best)
    ".config.yaml.tmp",
    ".metrics.jsonl.tmp",
    ".eval.jsonl.tmp",
)
"""Temporary files and folders a run removes on success; a crash (SIGKILL, power cut) can leave them behind."""


def check_new_run_dir(run_dir: Path) -> None:
    """Raise :class:`ConfigError` unless ``run_dir`` is absent or empty: a new run never truncates or replaces
    files it did not write (``metrics.jsonl``, ``final/``, ...)."""
    run_dir = Path(run_dir)
    if (run_dir / "config.yaml").exists():
        raise ConfigError(
            f"{run_dir} already holds a run; continue it with `ddpo train --resume {run_dir}` "
            "or choose another run_name / output_dir"
        )
    if not run_dir.is_dir():
        return
    ours = (PROBE_PREFIX, ".config.yaml.tmp")  # a writability probe, a config.yaml not yet renamed into place
    names = sorted(p.name for p in islice(run_dir.iterdir(), 100) if not p.name.startswith(ours))
    if names:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise ConfigError(
            f"{run_dir} holds files but no config.yaml ({shown}); a new run there would overwrite them. Choose "
            f"another run_name or output_dir, or empty the folder; to continue a run there, it needs its "
            f"config.yaml (`ddpo train --resume {run_dir}`)"
        )


def check_inside(run_dir: Path) -> None:
    """Raise :class:`ConfigError` when a path the run reads, writes or prunes is a symbolic link that leads out of
    ``run_dir`` (the run directory itself may be a link). Nothing is followed before this check."""
    run_dir = Path(run_dir)
    root = run_dir.resolve()
    paths = [run_dir / name for name in RUN_ENTRIES]
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir() and not checkpoints.is_symlink():
        for entry in checkpoints.iterdir():
            paths.append(entry)
            if entry.is_dir() and not entry.is_symlink():
                paths.extend(entry.iterdir())
    for path in paths:
        if os.path.lexists(path) and not path.resolve().is_relative_to(root):
            raise ConfigError(
                f"{path} is a symbolic link to {path.resolve()}, outside the run directory {run_dir}; ddpo never "
                "reads, writes or deletes through such a link. Replace it with the folder or file itself"
            )


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The settings of ``run_dir/config.yaml``, read by the config loader (:func:`~ddpo.training.config.read_yaml`:
    a regular file of at most ``MAX_CONFIG_BYTES``, one line for a YAML error) and never empty, else
    :class:`ConfigError` (``FileNotFoundError`` when there is none)."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: it has no config.yaml")
    data = read_yaml(path)
    if not data:
        raise ConfigError(
            f"{path} is empty; a run's config.yaml holds its whole config (ddpo train writes it): restore it from a "
            "backup, or start a new run"
        )
    return data


def check_resume_overrides(run_dir: Path, overrides: list[str]) -> None:
    """Raise :class:`ConfigError` for a ``run_name`` / ``output_dir`` override of a resume that names a folder other
    than ``run_dir``: the resumed run stays where it is (an override naming its own folder records it)."""
    run_dir = Path(run_dir)
    for text in overrides:
        key, value = parse_override(text)
        if key == "run_name" and value != run_dir.name:
            problem = f"run_name={value!r}"
        elif key == "output_dir" and Path(str(value)).resolve() != run_dir.resolve().parent:
            problem = f"output_dir={value!r}"
        else:
            continue
        raise ConfigError(
            f"ddpo train --resume {run_dir}: {problem} would name another folder; a resumed run stays in {run_dir}. "
            "Drop the override, or copy the folder and resume the copy"
        )


def remove_debris(run_dir: Path) -> list[str]:
    """Remove the temporary files of :data:`DEBRIS` under ``run_dir``; their paths relative to it."""
    run_dir = Path(run_dir)
    removed = []
    for pattern in DEBRIS:
        for path in sorted(run_dir.glob(pattern)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(str(path.relative_to(run_dir)))
    return removed


def check_run_dir(run_dir: Path) -> None:
    """Raise ConfigError, before anything is loaded, when the run directory cannot be created or written: a regular
    file where a folder of its path should be, or no permission (a read-only disk, another user's folder)."""
    run_dir = Path(run_dir)
    for parent in [run_dir, *run_dir.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(
                    f"the run directory {run_dir} would be under {parent}, which is a regular file, not a folder; "
                    "choose another output_dir / run_name"
                )
            break
    probe = run_dir / f"{PROBE_PREFIX}{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"cannot write the run directory {run_dir} ({err.strerror or err}); choose a writable output_dir"
        ) from None


def write_run_files(run_dir: Path, config: RunConfig, start_epoch: int) -> None:
    """Set up the run directory of a run starting at ``start_epoch`` (main process only): remove an earlier crash's
    temporary files, write ``config.yaml`` (first: a folder holding a run has its config.yaml), create ``samples/``,
    and drop the metrics of epochs a resumed run will redo (written after the checkpoint it resumes from) and the
    held-out evaluations after that checkpoint (the one at ``start_epoch`` was written before it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if removed := remove_debris(run_dir):
        print(f"ddpo: removed the unfinished temporary files of an earlier crash: {', '.join(removed)}")
    text = yaml.safe_dump(to_dict(config), sort_keys=False)
    tmp = run_dir / ".config.yaml.tmp"
    tmp.write_text(text)
    os.replace(tmp, run_dir / "config.yaml")
    (run_dir / "samples").mkdir(exist_ok=True)
    keep_epochs(run_dir / "metrics.jsonl", lambda e: e < start_epoch)
    keep_epochs(run_dir / "eval.jsonl", lambda e: e <= start_epoch)


def check_new_run(run_dir: Path) -> None:
    """Everything checked of a new run's directory before a model loads: absent or empty (:func:`check_new_run_dir`),
    no link out (:func:`check_inside`), creatable and writable (:func:`check_run_dir`)."""
    check_new_run_dir(run_dir)
    check_inside(run_dir)
    check_run_dir(run_dir)


def resume_config(run_dir: Path, overrides: list[str]) -> RunConfig:
    """The config a resume of ``run_dir`` runs with: its ``config.yaml`` with ``overrides``, after checking (before a
    model loads) that it is a run directory with no link out, that the overrides leave it where it is, and that its
    logs have no bad line."""
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: it has no config.yaml")
    check_inside(run_dir)
    check_resume_overrides(run_dir, overrides)
    config = build_config(base=read_run_config(run_dir), overrides=overrides)
    for log in ("metrics.jsonl", "eval.jsonl"):
        check_epochs(run_dir / log)
    return config
