"""Prompt files as tables (CSV, JSONL, parquet): the ``prompt`` column and, per row, the other columns as metadata."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from ddpo.training.prompt_files import load_prompt_table


def test_csv_rows_give_prompts_and_typed_metadata(tmp_path):
    """Each CSV row is one prompt; its other cells are its metadata, numbers as numbers, an empty cell as None."""
    path = tmp_path / "p.csv"
    path.write_text('prompt,count,colour\n"two red cubes",2,red\n" a blue ball ",1,\n')
    table = load_prompt_table(path)
    assert table.prompts == ["two red cubes", "a blue ball"]
    assert table.metadata == [{"count": 2, "colour": "red"}, {"count": 1, "colour": None}]
    assert table.has_metadata


def test_jsonl_keeps_nested_metadata_and_skips_blank_lines(tmp_path):
    """A GenEval-style JSONL row keeps its nested lists and dicts as they are; blank lines are skipped."""
    rows = [
        {"prompt": "a photo of two cats", "tag": "counting", "include": [{"class": "cat", "count": 2}]},
        {"prompt": "a red car"},
    ]
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    table = load_prompt_table(path)
    assert table.prompts == ["a photo of two cats", "a red car"]
    assert table.metadata == [{"tag": "counting", "include": [{"class": "cat", "count": 2}]}, {}]


def test_parquet_reads_like_csv(tmp_path):
    """A parquet table gives the same prompts and metadata as the CSV of the same rows."""
    frame = pd.DataFrame({"prompt": ["a", "b"], "count": [3, 4]})
    frame.to_parquet(tmp_path / "p.parquet")
    frame.to_csv(tmp_path / "p.csv", index=False)
    assert load_prompt_table(tmp_path / "p.parquet") == load_prompt_table(tmp_path / "p.csv")


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("p.csv", "caption,count\na cat,1\n", "has no 'prompt' column (its columns: caption, count)"),
        ("p.csv", "prompt,count\n", "holds no row"),
        ("p.jsonl", "", "holds no row"),
        ("p.jsonl", '{"prompt": "a"}\n{"prompt": \n', "line 2: not JSON"),
        ("p.jsonl", '["a cat"]\n', "line 1: a JSONL prompt file holds one JSON object a line"),
        ("p.jsonl", '{"prompt": "a"}\n{"prompt": 3}\n', "row 2: the 'prompt' value is 3"),
        ("p.csv", "prompt,count\na,1\n,2\n", "row 2: the 'prompt' value is empty"),
        ("p.parquet", "not a parquet file", "cannot be read as parquet"),
    ],
)
def test_bad_prompt_tables_are_named_with_the_fix(tmp_path, name, text, message):
    """An unreadable, empty or prompt-less table fails with the file, the config key and what is wrong."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match="prompts: prompt file") as err:
        load_prompt_table(path)
    assert message in str(err.value)
