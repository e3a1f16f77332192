"""The run directory's JSON-lines logs (``metrics.jsonl``, ``eval.jsonl``): one JSON object per line, appended and
fsynced as each epoch or evaluation ends. No torch import, so reports and ablation summaries load fast.

A log is read as a stream, line by line, with a bound per line (:data:`MAX_LINE_BYTES`) and per file
(:data:`MAX_LOG_BYTES`): a huge or endless file (a link to ``/dev/zero``) is refused with one message naming it,
never read whole. Every problem of a line (not UTF-8, not JSON, not an object, no ``epoch``) is named by file and
line number in a :class:`RunLogError`.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

MAX_LINE_BYTES = 16 << 20
"""Longest line of a run log (an epoch's metrics take about 1 KiB; an evaluation of 10,000 images about 200 KiB)."""
MAX_LOG_BYTES = 128 << 20
"""Largest run log read (about 100,000 epochs of metrics)."""


class RunLogError(ValueError):
    """A run log that cannot be read: too large, not a regular file, or a bad line (file and line named)."""


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON object as a line of ``path`` and fsync it (run logs: ``metrics.jsonl``, ``eval.jsonl``)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def iter_jsonl(path: Path) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """``(line number, line text, JSON object)`` of each non-empty line of ``path``, read as a bounded stream;
    nothing when the file does not exist. Raises :class:`RunLogError` naming the file (and line)."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    with _open_log(path) as f:
        for number, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), start=1):
            if len(raw) > MAX_LINE_BYTES:
                raise RunLogError(f"{path} line {number} is longer than {MAX_LINE_BYTES} bytes; is it a run log?")
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                raise RunLogError(
                    f"{path} line {number} is not UTF-8 text (byte {raw[err.start]:#04x} at column {err.start + 1})"
                ) from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except ValueError as err:
                raise RunLogError(f"{path} line {number} is not JSON ({err})") from None
            if not isinstance(record, dict):
                raise RunLogError(f"{path} line {number} is not a JSON object: {text[:80]}")
            yield number, text, record


def _open_log(path: Path):
    """``path`` opened for binary reading, once it is known to be a regular file of at most MAX_LOG_BYTES."""
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed by the caller's ``with``)
    except OSError as err:
        raise RunLogError(f"{path} cannot be read ({err.strerror or err})") from None
    info = os.fstat(f.fileno())
    if not stat.S_ISREG(info.st_mode):
        f.close()
        raise RunLogError(f"{path} is not a regular file; a run log is a text file written by ddpo train")
    if info.st_size > MAX_LOG_BYTES:
        f.close()
        raise RunLogError(f"{path} is larger than {MAX_LOG_BYTES >> 20} MiB ({info.st_size} bytes); is it a run log?")
    return f


def read_jsonl(path: Path, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The JSON objects of the non-empty lines of ``path``, in order; empty when the file does not exist. A line
    without one of the ``required`` keys raises :class:`RunLogError` naming the file, the line and the key."""
    records = []
    for number, _, record in iter_jsonl(path):
        missing = next((key for key in required if key not in record), None)
        if missing is not None:
            raise RunLogError(
                f"{path} line {number} has no {missing!r}; every line of this log is written by ddpo train with "
                f"{', '.join(required)}: repair or delete the line"
            )
        records.append(record)
    return records


def epoch_of(path: Path, number: int, record: dict[str, Any]) -> int:
    """The ``epoch`` of line ``number`` of the log ``path``: a non-negative integer, else :class:`RunLogError`."""
    epoch = record.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise RunLogError(
            f"{path} line {number} has no integer 'epoch' (got {epoch!r}); every line of a run log is written by "
            "ddpo train with its epoch: repair or delete the line"
        )
    return epoch


def check_epochs(path: Path) -> None:
    """Read the whole log ``path`` as :func:`keep_epochs` will, raising :class:`RunLogError` for any bad line."""
    for number, _, record in iter_jsonl(path):
        epoch_of(path, number, record)


def keep_epochs(path: Path, keep: Callable[[int], bool]) -> None:
    """Rewrite the log ``path`` atomically with only its lines whose epoch passes ``keep`` (byte for byte)."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    kept = [text for number, text, record in iter_jsonl(path) if keep(epoch_of(path, number, record))]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def reward_against_samples(metrics: list[dict[str, Any]], evals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Reward against the samples seen (images scored for training), one row per held-out evaluation and per epoch:
    ``{"samples_seen", "epoch", "train_reward", "heldout_reward"}``, sorted by samples seen.

    An epoch's row has ``samples_seen`` = the cumulative samples after it and its training-batch mean (``None`` for
    ``heldout_reward`` unless an evaluation followed it); an evaluation after ``E`` epochs is merged into the row of
    epoch ``E - 1`` (or a row of 0 samples for the evaluation before training)."""
    rows: dict[int, dict[str, Any]] = {}
    for m in metrics:
        rows[int(m["epoch"]) + 1] = {
            "samples_seen": int(m["samples"]),
            "epoch": int(m["epoch"]) + 1,
            "train_reward": float(m["reward_mean"]),
            "heldout_reward": None,
        }
    for e in evals:
        done = int(e["epoch"])
        row = rows.setdefault(
            done,
            {"samples_seen": 0 if done == 0 else None, "epoch": done, "train_reward": None, "heldout_reward": None},
        )
        row["heldout_reward"] = float(e["reward_mean"])
    return sorted((r for r in rows.values() if r["samples_seen"] is not None), key=lambda r: r["samples_seen"])
