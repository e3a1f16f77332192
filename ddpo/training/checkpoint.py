"""Atomic checkpoints: everything needed to continue a run bit-for-bit, written so a crash never corrupts one.

Layout of ``RUN_DIR/checkpoints/checkpoint_EEEEEE/`` (``EEEEEE`` = epochs completed):

* ``trainable.safetensors`` -- the trained parameters (LoRA weights, or the whole UNet), by parameter name;
* ``optimizer.pt`` -- the optimiser state (tensors and numbers only; read with ``weights_only=True``);
* ``reward.pt`` -- the reward's state (e.g. the online discriminator), when it has one;
* ``rng_P.json`` -- Python, NumPy and torch RNG states of process ``P``;
* ``state.json`` -- epoch, global step, the per-prompt tracker and the metadata; written last.

A checkpoint is written into a hidden temporary folder and renamed into place only when complete, so the newest
complete checkpoint is always readable; older ones beyond ``keep`` are deleted only after that rename.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "checkpoint_"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file + fsync + rename)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) RNG states of this process, as JSON-serialisable values."""
    np_state = np.random.get_state()
    state = {
        "python": _listify(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuplify(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _listify(value):
    return [_listify(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuplify(value):
    return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value


def begin(checkpoint_dir: Path) -> Path:
    """Create and return the temporary folder a new checkpoint is written into."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    tmp = checkpoint_dir / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    return tmp


def write_payload(
    tmp: Path,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    reward_state: dict[str, Any] | None,
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the tensors of a checkpoint (main process only) into its temporary folder. ``extra`` holds further
    training state as named tensors (DiffusionNFT's old policy), in ``extra.safetensors``."""
    save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    if extra:
        save_file({k: v.detach().contiguous().cpu() for k, v in extra.items()}, str(tmp / "extra.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    if reward_state:
        torch.save(reward_state, tmp / "reward.pt")


def commit(tmp: Path, checkpoint_dir: Path, epoch: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state.json`` last, rename the folder into place, then prune old checkpoints. Returns the final path."""
    write_json(tmp / "state.json", state)
    for path in tmp.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    final = checkpoint_dir / f"{PREFIX}{epoch:06d}"
    replace_dir(tmp, final)  # a re-run of the same epoch after a resume replaces it only once complete
    _fsync_dir(checkpoint_dir)
    for old in list_checkpoints(checkpoint_dir)[:-keep]:
        shutil.rmtree(old)
    for leftover in checkpoint_dir.glob(".tmp-*"):  # debris of an earlier crash
        if leftover != tmp:
            shutil.rmtree(leftover, ignore_errors=True)
    return final


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints (those with ``state.json``), oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = [p for p in checkpoint_dir.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest(checkpoint_dir: Path) -> Path | None:
    found = list_checkpoints(checkpoint_dir)
    return found[-1] if found else None


def load(path: Path, process_index: int = 0) -> dict[str, Any]:
    """Read a checkpoint folder: ``trainable``, ``optimizer``, ``reward`` (or None), ``extra`` (named tensors, or
    None), ``state`` and ``rng``."""
    state = json.loads((path / "state.json").read_text())
    rng_file = path / f"rng_{process_index}.json"
    reward_file = path / "reward.pt"
    return {
        "state": state,
        "trainable": load_file(str(path / "trainable.safetensors")),
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"),
        "reward": torch.load(reward_file, weights_only=True, map_location="cpu") if reward_file.is_file() else None,
        "extra": load_file(str(path / "extra.safetensors")) if (path / "extra.safetensors").is_file() else None,
        "rng": json.loads(rng_file.read_text()) if rng_file.is_file() else None,
    }


def replace_dir(tmp: Path, final: Path) -> None:
    """Atomically put the folder ``tmp`` at ``final`` (replacing an older ``final`` only once ``tmp`` is complete)."""
    if final.exists():
        stale = final.with_name(f".old-{final.name}-{uuid.uuid4().hex}")
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale)
    else:
        os.replace(tmp, final)
