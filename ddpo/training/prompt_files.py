"""Prompt files as users have them: CSV, JSONL or parquet tables with a ``prompt`` column.

The other columns of a row are that prompt's metadata: a dict handed to the reward with each of its samples (the
``metadata`` keyword of :mod:`rewards.base`), e.g. a GenEval-style file's object counts. JSONL keeps nested values
(lists, dicts) as they are; CSV and parquet values come as pandas reads them (numbers as numbers). Parquet needs
``pyarrow`` (``pip install 'ddpo[parquet]'``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TABLE_SUFFIXES = (".csv", ".jsonl", ".parquet")
"""The file suffixes read as tables; any other file is plain text, one prompt per line."""

PROMPT_COLUMN = "prompt"


class _BadFile(ValueError):
    """A problem found by our own reading (the message is complete but for the config key)."""


@dataclass(frozen=True)
class PromptTable:
    """The prompts of a file and, per prompt, the other columns of its row (``metadata[i]`` goes with ``prompts[i]``;
    empty dicts when the file has no other column)."""

    prompts: list[str]
    metadata: list[dict[str, Any]]

    @property
    def has_metadata(self) -> bool:
        return any(self.metadata)


def is_table(path: Path) -> bool:
    return path.suffix.lower() in TABLE_SUFFIXES


def _rows_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise _BadFile(f"prompt file {str(path)!r}, line {number}: not JSON ({err.msg}); write one JSON object "
                             f"a line, e.g. {{\"prompt\": \"a red cube\"}}") from None  # fmt: skip
        if not isinstance(row, dict):
            raise _BadFile(
                f"prompt file {str(path)!r}, line {number}: a JSONL prompt file holds one JSON object a line, with a "
                f"{PROMPT_COLUMN!r} key; got {type(row).__name__}"
            )
        rows.append(row)
    return rows


def _rows_pandas(path: Path) -> list[dict[str, Any]]:
    import pandas as pd

    if path.suffix.lower() == ".parquet":
        try:
            frame = pd.read_parquet(path)
        except ImportError as err:
            raise _BadFile(
                f"prompt file {str(path)!r}: reading parquet needs pyarrow: pip install 'ddpo[parquet]' (or pip "
                "install pyarrow), or save the table as CSV or JSONL"
            ) from err
    else:
        frame = pd.read_csv(path)
    return frame.to_dict(orient="records")


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def load_prompt_table(path: str | Path, key: str = "prompts") -> PromptTable:
    """The prompts and per-prompt metadata of a CSV, JSONL or parquet file. Raises ``ValueError`` naming the file,
    the config ``key`` it came from and the fix when it cannot be read, has no ``prompt`` column, holds no row, or a
    row's prompt is empty or not text."""
    path = Path(path).expanduser()
    try:
        rows = _rows_jsonl(path) if path.suffix.lower() == ".jsonl" else _rows_pandas(path)
    except _BadFile as err:
        raise ValueError(f"{key}: {err}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{key}: prompt file {str(path)!r} is not UTF-8 ({err.reason}); save it as UTF-8") from None
    except Exception as err:  # pandas' and pyarrow's parser errors have no common base class
        raise ValueError(
            f"{key}: prompt file {str(path)!r} cannot be read as {path.suffix.lower()[1:]} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); check the file, or give a text "
            "file with one prompt per line"
        ) from None
    if not rows:
        raise ValueError(f"{key}: prompt file {str(path)!r} holds no row; add rows with a {PROMPT_COLUMN!r} column")
    columns = sorted({column for row in rows for column in row})
    if PROMPT_COLUMN not in columns:
        raise ValueError(
            f"{key}: prompt file {str(path)!r} has no {PROMPT_COLUMN!r} column (its columns: {', '.join(columns)}); "
            f"name the column of the prompts {PROMPT_COLUMN!r}"
        )
    prompts, metadata = [], []
    for number, row in enumerate(rows, start=1):
        prompt = row.get(PROMPT_COLUMN)
        if _missing(prompt) or not isinstance(prompt, str) or not prompt.strip():
            shown = "empty" if _missing(prompt) or isinstance(prompt, str) else repr(prompt)
            raise ValueError(
                f"{key}: prompt file {str(path)!r}, row {number}: the {PROMPT_COLUMN!r} value is {shown}; every "
                "row needs a non-empty text prompt"
            )
        prompts.append(prompt.strip())
        metadata.append({k: (None if _missing(v) else v) for k, v in row.items() if k != PROMPT_COLUMN})
    return PromptTable(prompts, metadata)
