"""A corrupted newest checkpoint is reported by name and the previous good one is used (issue 18, item 3).

One 2-epoch run (a checkpoint after each epoch) is copied per case; the newest checkpoint is damaged one way; the
resume must name the checkpoint and file, fall back to checkpoint_000001 and end exactly as the uninterrupted run
(weights and metrics), never with a traceback from torch or safetensors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddpo.cli import main
from ddpo.training.runlog import read_jsonl

TIMING = {"sampling_seconds", "scoring_seconds", "training_seconds", "epoch_seconds", "reward_compute_seconds"}


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _flip(path: Path, offsets, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    for offset in offsets:
        data[offset % len(data)] ^= mask
    path.write_bytes(bytes(data))


def _low_bits(path: Path) -> None:
    """Flip the lowest mantissa bit of many float32 weights (past the safetensors header): still loads, silently."""
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    _flip(path, range(header, len(data), 4))


def _manifest_leads_out(checkpoint: Path) -> None:
    """The manifest names a file through ``..`` (here the checkpoint's own state.json, so its checksum matches)."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"][f"../{checkpoint.name}/state.json"] = manifest["files"].pop("state.json")
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


CORRUPTIONS = {
    "weights truncated": lambda c: _truncate(c / "trainable.safetensors", 0.5),
    "weights emptied": lambda c: (c / "trainable.safetensors").write_bytes(b""),
    "weights header flipped": lambda c: _flip(c / "trainable.safetensors", range(8, 40), 0xFF),
    "weights low bits flipped": lambda c: _low_bits(c / "trainable.safetensors"),
    "optimizer truncated": lambda c: _truncate(c / "optimizer.pt", 0.7),
    "optimizer 64 bytes flipped": lambda c: _flip(c / "optimizer.pt", range(-200, -136)),
    "weights deleted": lambda c: (c / "trainable.safetensors").unlink(),
    "rng garbage": lambda c: (c / "rng_0.json").write_text("{not json"),
    "state garbage": lambda c: (c / "state.json").write_text("[1, 2"),
    "manifest garbage": lambda c: (c / "manifest.json").write_text("{"),
    # issue 26, item 4: a checkpoint without its manifest or its state is damaged, named, and skipped
    "manifest deleted": lambda c: (c / "manifest.json").unlink(),
    "state deleted": lambda c: (c / "state.json").unlink(),
    "manifest entry leading out": _manifest_leads_out,
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, fast_settings):
    root = tmp_path_factory.mktemp("corrupt")
    overrides = [f"{k}={v}" for k, v in fast_settings.items()]
    overrides += [f"output_dir={root}", "run_name=run", "num_epochs=2", "keep_checkpoints=2", "log_images=false"]
    assert main(["train", "--preset", "tiny", *overrides]) == 0
    return root / "run"


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_corrupted_newest_checkpoint_falls_back_to_the_previous_one(finished_run, tmp_path, capsys, how):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    capsys.readouterr()
    CORRUPTIONS[how](run / "checkpoints" / "checkpoint_000002")
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "ddpo: skipping checkpoint checkpoint_000002: " in out
    assert "resuming from the newest good checkpoint, checkpoint_000001" in out
    strip = lambda ms: [{k: v for k, v in m.items() if k not in TIMING} for m in ms]  # noqa: E731
    assert strip(read_jsonl(run / "metrics.jsonl")) == strip(read_jsonl(finished_run / "metrics.jsonl"))
    name = "final/pytorch_lora_weights.safetensors"
    a, b = load_file(str(run / name)), load_file(str(finished_run / name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_no_usable_checkpoint_is_one_clear_error(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    for name in ("checkpoint_000001", "checkpoint_000002"):
        _truncate(run / "checkpoints" / name / "optimizer.pt", 0.5)
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "no usable checkpoint (checkpoint_000002: optimizer.pt has" in err and "checkpoint_000001:" in err
    assert "Traceback" not in err
