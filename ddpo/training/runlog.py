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
