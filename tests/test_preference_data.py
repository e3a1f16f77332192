"""Offline preference data (:mod:`ddpo.training.preference_data`): the shipped world fixture (its preferred images
match their captions, its rejected ones contradict them, and its script rewrites it byte for byte), Pick-a-Pic's
parquet layout with image bytes, and every bad input refused through ``ddpo train`` before the model loads."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import record_pipeline_loads

from ddpo.cli import main
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
    """Pick-a-Pic ships the images as bytes in parquet shards (``jpg_0``, ``jpg_1``), with more columns than the four
    read; label_0 = 0 means jpg_1 is preferred. One file, or a folder of shards read in name order."""
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
    (tmp_path / "shards").mkdir()
    table[:20].to_parquet(tmp_path / "shards" / "train-00000-of-00002.parquet")
    table[20:].to_parquet(tmp_path / "shards" / "train-00001-of-00002.parquet")
    folder, parquet = load_preference_data(FIXTURE, 16), load_preference_data(tmp_path / "train.parquet", 16)
    assert parquet.captions == folder.captions and parquet.ties == folder.ties
    assert load_preference_data(tmp_path / "shards", 16).captions == folder.captions  # a folder of shards
    for a, b in zip(folder.images(range(4), 16), parquet.images(range(4), 16)):
        assert torch.equal(a, b)
    first = rows[0]
    assert first["label_0"] == 0.0 and parquet.preferred[0] == (FIXTURE / first["jpg_1"]).read_bytes()


def _copy(tmp_path: Path) -> Path:
    folder = tmp_path / "prefs"
    shutil.copytree(FIXTURE, folder)
    return folder


def _rewrite(folder: Path, edit) -> Path:
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rows = edit(rows)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _small_image(folder: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (12, 12), (255, 0, 0)).save(folder / "003_1.png")
    return folder


BAD_DATA = [  # (id, make the data from a copy of the fixture, key phrase of the message)
    ("no such path", lambda t: t / "nowhere", "does not exist"),
    (
        "folder without metadata",
        lambda t: (t / "empty").mkdir() or t / "empty",
        "has neither metadata.jsonl nor .parquet files",
    ),
    ("missing image", lambda t: (_copy(t) / "002_0.png").unlink() or t / "prefs", "002_0.png' is missing"),
    (
        "label out of range",
        lambda t: _rewrite(_copy(t), lambda rows: [{**r, "label_0": 2} if i == 5 else r for i, r in enumerate(rows)]),
        "row 6: label_0 is 2; it must be 1 (jpg_0 preferred), 0 (jpg_1 preferred) or 0.5",
    ),
    (
        "unreadable image",
        lambda t: (_copy(t) / "001_1.png").write_bytes(b"not a png") and t / "prefs",
        "row 2, jpg_1: '",
    ),
    (
        "image smaller than the resolution",
        lambda t: _small_image(_copy(t)),
        "row 4, jpg_1: the image is 12x12, smaller than sample.resolution=16",
    ),
    (
        "missing column",
        lambda t: _rewrite(_copy(t), lambda rows: [{k: v for k, v in r.items() if k != "label_0"} for r in rows]),
        "has no 'label_0' column",
    ),
    ("no rows", lambda t: _rewrite(_copy(t), lambda rows: []), "holds no row"),
    (
        "only ties",
        lambda t: _rewrite(_copy(t), lambda rows: [{**r, "label_0": 0.5} for r in rows]),
        "all 36 rows are ties",
    ),
    (
        "empty caption",
        lambda t: _rewrite(_copy(t), lambda rows: [{**r, "caption": " "} if i == 0 else r for i, r in enumerate(rows)]),
        "row 1: the caption is",
    ),
    (
        "not a table",
        lambda t: (t / "pairs.txt").write_text("a cat") and t / "pairs.txt",
        "neither a folder of pairs nor a table file",
    ),
    (
        "fewer pairs than an optimiser step",
        lambda t: _rewrite(_copy(t), lambda rows: rows[:3]),
        "holds 3 pairs, fewer than one optimiser step takes (4 = train.batch_size 4",
    ),
]


@pytest.mark.parametrize(("make", "phrase"), [c[1:] for c in BAD_DATA], ids=[c[0] for c in BAD_DATA])
def test_bad_preference_data_is_refused_before_the_model_loads(make, phrase, fast_overrides, tmp_path, capsys,
                                                              monkeypatch):  # fmt: skip
    loads = record_pipeline_loads(monkeypatch)
    data = make(tmp_path)
    capsys.readouterr()
    code = main(["train", "--preset", "tiny", *fast_overrides, "train.algorithm=dpo", f"train.preference_data={data}",
                 "sample.resolution=16"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert err.count("ddpo: error:") == 1 and "Traceback" not in err
    assert "train.preference_data" in err and phrase in err, err[-2000:]
    assert loads == []
    assert not (tmp_path / "runs" / "run" / "config.yaml").exists()
