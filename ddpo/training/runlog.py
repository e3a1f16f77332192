"""The run directory's JSON-lines logs (``metrics.jsonl``, ``eval.jsonl``): one JSON object per line, appended and
fsynced as each epoch or evaluation ends. No torch import, so reports and ablation summaries load fast."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON object as a line of ``path`` and fsync it (run logs: ``metrics.jsonl``, ``eval.jsonl``)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of the non-empty lines of ``path``, in order; empty when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
