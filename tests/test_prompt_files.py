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


RECORDING_REWARD = """
import torch
import rewards
SEEN = []

@rewards.reward_function
def recording(images, prompts, metadata=None):
    SEEN.append((list(prompts), metadata))
    return torch.zeros(len(prompts))
"""


def test_a_run_hands_each_sample_its_rows_metadata(fast_overrides, tmp_path, monkeypatch):
    """``ddpo train prompts=FILE.csv``: each sample's reward call gets the metadata of its own prompt's row, in
    training batches and in the held-out evaluation (a JSONL file)."""
    from ddpo.cli import main

    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "recording_reward.py").write_text(RECORDING_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    (tmp_path / "train.csv").write_text("prompt,count\na cat,1\ntwo dogs,2\nthree birds,3\n")
    (tmp_path / "eval.jsonl").write_text('{"prompt": "a fox", "count": 1}\n{"prompt": "two owls", "count": 2}\n')
    overrides = [
        *fast_overrides,
        "num_epochs=1",
        f"prompts={tmp_path / 'train.csv'}",
        f"eval_prompts={tmp_path / 'eval.jsonl'}",
        "eval_samples=2",
        "reward.name=recording_reward:recording",
    ]
    assert main(["train", "--trust-import-path", "--preset", "tiny", *overrides]) == 0
    import recording_reward

    counts = {"a cat": 1, "two dogs": 2, "three birds": 3, "a fox": 1, "two owls": 2}
    calls = recording_reward.SEEN
    assert len(calls) == 2 + 2  # two training batches, and the evaluations before and after
    for prompts, metadata in calls:
        assert metadata == [{"count": counts[p]} for p in prompts]
    assert {p for prompts, _ in calls for p in prompts} >= {"a fox", "two owls"}
