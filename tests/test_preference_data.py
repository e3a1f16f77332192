"""Offline preference data (:mod:`ddpo.training.preference_data`): the shipped world fixture (its preferred images
match their captions, its rejected ones contradict them, and its script rewrites it byte for byte), Pick-a-Pic's
parquet layout with image bytes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from ddpo.training.preference_data import load_preference_data

FIXTURE = Path(__file__).parent / "data" / "world_prefs"
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_world_preferences.py"


def _script():
    spec = importlib.util.spec_from_file_location("make_world_preferences", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_world_fixture_prefers_the_image_that_matches_its_caption():
    """32 pairs and 4 ties (left out); the world reward (rule checks against the caption) gives every preferred
    image full marks and every rejected image less."""
    from rewards import get_reward

    data = load_preference_data(FIXTURE, 64)
    assert len(data) == 32 and data.ties == 4
    preferred, rejected = data.images(range(len(data)), 64)
    assert preferred.shape == rejected.shape == (32, 3, 64, 64)
    reward = get_reward("world")
    good, bad = reward(preferred, data.captions), reward(rejected, data.captions)
    assert torch.all(good == 1.0) and torch.all(bad < good)
    rows = [json.loads(line) for line in (FIXTURE / "metadata.jsonl").read_text().splitlines()]
    assert {row["label_0"] for row in rows} == {0.0, 0.5, 1.0}
    assert sum(f.stat().st_size for f in FIXTURE.iterdir()) < 100_000  # a tiny fixture


def test_the_fixture_script_rewrites_the_fixture_byte_for_byte(tmp_path):
    assert _script().main(["--out", str(tmp_path / "prefs"), "--pairs", "32", "--ties", "4", "--seed", "0"]) == 0
    written = sorted(p.name for p in (tmp_path / "prefs").iterdir())
    assert written == sorted(p.name for p in FIXTURE.iterdir() if p.name != "README.md")
    for name in written:
        assert (tmp_path / "prefs" / name).read_bytes() == (FIXTURE / name).read_bytes(), name


def test_pick_a_pic_parquet_with_image_bytes_reads_as_the_folder(tmp_path):
    """Pick-a-Pic ships the images as bytes in the parquet file (``jpg_0``, ``jpg_1``), with more columns than the
    four read; label_0 = 0 means jpg_1 is preferred."""
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    rows = [json.loads(line) for line in (FIXTURE / "metadata.jsonl").read_text().splitlines()]
    table = pd.DataFrame(
        {
            "caption": [r["caption"] for r in rows],
            "jpg_0": [(FIXTURE / r["jpg_0"]).read_bytes() for r in rows],
            "jpg_1": [(FIXTURE / r["jpg_1"]).read_bytes() for r in rows],
            "label_0": [r["label_0"] for r in rows],
            "label_1": [1 - r["label_0"] for r in rows],
            "model_0": ["world"] * len(rows),
        }
    )
    table.to_parquet(tmp_path / "train.parquet")
    folder, parquet = load_preference_data(FIXTURE, 16), load_preference_data(tmp_path / "train.parquet", 16)
    assert parquet.captions == folder.captions and parquet.ties == folder.ties
    for a, b in zip(folder.images(range(4), 16), parquet.images(range(4), 16)):
        assert torch.equal(a, b)
    first = rows[0]
    assert first["label_0"] == 0.0 and parquet.preferred[0] == (FIXTURE / first["jpg_1"]).read_bytes()
