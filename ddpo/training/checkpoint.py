"""Atomic checkpoints: everything needed to continue a run bit-for-bit, written so a crash never corrupts one.

Layout of ``RUN_DIR/checkpoints/checkpoint_EEEEEE/`` (``EEEEEE`` = epochs completed):

* ``trainable.safetensors`` -- the trained parameters (LoRA weights, or the whole UNet), by parameter name;
* ``optimizer.pt`` -- the optimiser state (tensors and numbers only; read with ``weights_only=True``);
* ``reward.pt`` -- the reward's state (e.g. the online discriminator), when it has one;
* ``rng_P.json`` -- Python, NumPy and torch RNG states of process ``P``;
* ``state.json`` -- epoch, global step, the per-prompt tracker and the metadata;
* ``manifest.json`` -- size and SHA-256 of every other file; written last.

A checkpoint is written into a hidden temporary folder, every file fsynced, and renamed into place only when
complete, so a crash never leaves a half-written checkpoint under its final name; older ones beyond ``keep`` are
deleted only after that rename. On resume :func:`newest_good` verifies the manifest's checksums (a truncated,
emptied or bit-flipped file, one disk corruption or a copy gone wrong) and falls back to the previous checkpoint,
naming what is wrong with the newer ones; reading never surfaces an exception from torch or safetensors. A checkpoint
without its manifest or its ``state.json`` is damaged (a complete one always has both) and is skipped the same way.
Its JSON files are read with a size bound (:data:`MAX_JSON_BYTES`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import stat
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .killpoints import kill_point
from .sharding import copy_full_

PREFIX = "checkpoint_"
MANIFEST = "manifest.json"
MAX_JSON_BYTES = 64 << 20
"""Largest JSON file of a checkpoint read (``state.json`` with a per-prompt tracker of many prompts: a few MiB)."""
_NAME = re.compile(rf"{PREFIX}\d+")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, truncated or corrupted file), with the checkpoint and file named."""


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


def read_json(path: Path, limit: int = MAX_JSON_BYTES) -> Any:
    """The JSON value of the regular file ``path`` of at most ``limit`` bytes; ``ValueError`` naming the file
    otherwise (a device, a FIFO or a huge file is never read)."""
    with open(path, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path.name} is not a regular file")
        if info.st_size > limit:
            raise ValueError(
                f"{path.name} has {info.st_size} bytes, more than the {limit} a checkpoint's JSON may have"
            )
        return json.loads(f.read(limit + 1))


def discard(tmp: Path) -> None:
    """Remove the temporary folder of a checkpoint (or ``final/``) whose writing failed."""
    shutil.rmtree(tmp, ignore_errors=True)


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
    """Write ``state.json`` and the checksum manifest last, fsync every file and the folder, rename the folder into
    place, then prune old checkpoints. Returns the final path."""
    write_json(tmp / "state.json", state)
    files = {}
    for path in sorted(tmp.iterdir()):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    write_json(tmp / MANIFEST, {"files": files})
    _fsync_dir(tmp)
    kill_point("checkpoint_manifest")
    final = checkpoint_dir / f"{PREFIX}{epoch:06d}"
    replace_dir(tmp, final)  # a re-run of the same epoch after a resume replaces it only once complete
    _fsync_dir(checkpoint_dir)
    kill_point("checkpoint_prune")
    for old in list_checkpoints(checkpoint_dir)[:-keep]:
        shutil.rmtree(old)
    for leftover in [*checkpoint_dir.glob(".tmp-*"), *checkpoint_dir.glob(".old-*")]:  # debris of an earlier crash
        if leftover != tmp:
            shutil.rmtree(leftover, ignore_errors=True)
    return final


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """The checkpoint ``path``'s manifest: ``{file name: {"bytes", "sha256"}}``. :class:`CheckpointError` when it is
    missing (the manifest is written last: the checkpoint is damaged), unreadable, or an entry is not a file of the
    checkpoint with its size and checksum."""
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise CheckpointError(f"{path.name}: {MANIFEST} is missing (a complete checkpoint always has one: damaged)")
    try:
        files = read_json(manifest_file)["files"]
        if not isinstance(files, dict):
            raise TypeError(f"'files' is a {type(files).__name__}, not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path.name}: {MANIFEST} is unreadable ({err})") from err
    for name, expected in files.items():
        if not _plain_entry(name, expected):
            raise CheckpointError(
                f"{path.name}: {MANIFEST} is unreadable (its entry {str(name)[:80]!r} is not a file "
                "of the checkpoint with bytes and sha256)"
            )
    return files


def verify_file(path: Path, name: str, expected: dict[str, Any]) -> None:
    """Raise :class:`CheckpointError` unless the checkpoint ``path``'s file ``name`` exists and matches its manifest
    entry ``expected`` (size, then SHA-256)."""
    file = path / name
    if not file.is_file():
        raise CheckpointError(f"{path.name}: {name} is missing")
    size = file.stat().st_size
    if size != expected["bytes"]:
        raise CheckpointError(
            f"{path.name}: {name} has {size} bytes, the manifest says {expected['bytes']} (truncated?)"
        )
    if _sha256(file) != expected["sha256"]:
        raise CheckpointError(f"{path.name}: {name} does not match its SHA-256 checksum (corrupted)")


def verify(path: Path) -> None:
    """Raise :class:`CheckpointError` naming the file unless every file of the checkpoint matches its manifest
    (size and SHA-256). The manifest is written last, so a checkpoint without one (or without ``state.json``) is
    damaged: an unfinished copy, or a file deleted since."""
    files = read_manifest(path)
    if not (path / "state.json").is_file():
        raise CheckpointError(f"{path.name}: state.json is missing")
    for name, expected in files.items():
        verify_file(path, name, expected)


def _plain_entry(name: Any, expected: Any) -> bool:
    """Whether a manifest entry names a file inside the checkpoint folder and holds its size and checksum."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and isinstance(expected, dict)
        and isinstance(expected.get("bytes"), int)
        and isinstance(expected.get("sha256"), str)
    )


def newest_good(checkpoint_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that passes :func:`verify`, and one message per newer checkpoint that did not."""
    problems = []
    for path in reversed(list_checkpoints(checkpoint_dir)):
        try:
            verify(path)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        return path, problems
    return None, problems


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Checkpoint folders renamed into place (``checkpoint_<epochs>``, damaged ones included), oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = [p for p in checkpoint_dir.iterdir() if _NAME.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint (its manifest and ``state.json`` present; checksums not verified), or None."""
    found = [p for p in list_checkpoints(checkpoint_dir) if (p / MANIFEST).is_file() and (p / "state.json").is_file()]
    return found[-1] if found else None


def load(path: Path, process_index: int = 0) -> dict[str, Any]:
    """Read a checkpoint folder: ``trainable``, ``optimizer``, ``reward`` (or None), ``extra`` (named tensors, or
    None), ``state`` and ``rng``.

    Any failure to read a file raises :class:`CheckpointError` naming the checkpoint and the file.
    """

    def read(name: str, reader):
        try:
            return reader(path / name)
        except Exception as err:  # safetensors, torch and json each raise their own types
            raise CheckpointError(f"{path.name}: {name} is unreadable ({type(err).__name__}: {err})") from err

    rng_name, reward_file = f"rng_{process_index}.json", path / "reward.pt"
    return {
        "state": read("state.json", read_json),
        "trainable": read("trainable.safetensors", lambda p: load_file(str(p))),
        "optimizer": read("optimizer.pt", lambda p: torch.load(p, weights_only=True, map_location="cpu")),
        "reward": read("reward.pt", lambda p: torch.load(p, weights_only=True, map_location="cpu"))
        if reward_file.is_file()
        else None,
        "extra": read("extra.safetensors", lambda p: load_file(str(p)))
        if (path / "extra.safetensors").is_file()
        else None,
        "rng": read(rng_name, read_json) if (path / rng_name).is_file() else None,
    }


def restore_trainable(path: Path, trainable: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> None:
    """Copy a checkpoint's trained weights ``trainable`` into the model's trainable ``params`` (by name), after
    checking that their names and shapes match; ``ValueError`` naming the checkpoint ``path`` otherwise."""
    missing = sorted(set(params) - set(trainable))
    unexpected = sorted(set(trainable) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"{path}: trained weights do not match the model (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}); was the run's model or LoRA config changed?"
        )
    wrong = [
        f"{name} {tuple(value.shape)} vs {tuple(params[name].shape)}"
        for name, value in trainable.items()
        if value.shape != params[name].shape
    ]
    if wrong:
        raise ValueError(
            f"{path}: {len(wrong)} trained weights do not fit the model's shapes (checkpoint vs model: "
            f"{'; '.join(wrong[:3])}); was model.lora_rank or the model changed? Resume with the run's own values"
        )
    for name, value in trainable.items():
        copy_full_(params[name], value)  # a sharded parameter keeps its own slice


def replace_dir(tmp: Path, final: Path) -> None:
    """Atomically put the folder ``tmp`` at ``final`` (replacing an older ``final`` only once ``tmp`` is complete)."""
    if final.exists():
        stale = final.with_name(f".old-{final.name}-{uuid.uuid4().hex}")
        os.replace(final, stale)
        kill_point("replace_dir")
        os.replace(tmp, final)
        shutil.rmtree(stale)
    else:
        kill_point("replace_dir")
        os.replace(tmp, final)


def final_reward_state(run_dir: Path, epochs: int) -> dict[str, Any] | None:
    """The reward's state at the end of a run of ``epochs`` epochs: ``reward.pt`` of
    ``checkpoints/checkpoint_<epochs>``, the checkpoint written together with ``final/`` (what ``ddpo eval`` and ``ddpo report`` score a run with: an
    online reward such as ``discriminator`` is trained during the run). The file is checked against the checkpoint's
    manifest (size and SHA-256) before it is read with ``weights_only=True``. None when that checkpoint holds no
    reward state; :class:`CheckpointError` naming the file when it is missing, damaged or unreadable."""
    path = Path(run_dir) / "checkpoints" / f"{PREFIX}{epochs:06d}"
    if not path.is_dir():
        raise CheckpointError(f"{path} is missing (the checkpoint written with final/)")
    expected = read_manifest(path).get("reward.pt")
    if expected is None:
        return None
    verify_file(path, "reward.pt", expected)
    file = path / "reward.pt"
    try:
        return torch.load(file, weights_only=True, map_location="cpu")
    except Exception as err:  # torch raises its own types
        raise CheckpointError(f"{path.name}: reward.pt is unreadable ({type(err).__name__}: {err})") from err


def restore_final_reward(reward, run_dir: Path, epochs: int | None) -> bool:
    """Give ``reward``, built from a finished run's ``config.yaml``, the state it was trained to during the run (an
    online reward such as ``discriminator`` learns every epoch; freshly built it is untrained), from
    :func:`final_reward_state`. Returns whether it has state; a stateless reward is left as built. ``ValueError``
    naming the run and the file when the state cannot be read."""
    if not reward.state_dict():
        return False
    try:
        if not isinstance(epochs, int):
            raise CheckpointError(f"its config.yaml has no integer num_epochs (got {epochs!r})")
        state = final_reward_state(run_dir, epochs)
    except CheckpointError as err:
        state, problem = None, str(err)
    else:
        problem = "the checkpoint holds no reward state"
    if state is None:
        raise ValueError(
            f"{run_dir}: the run's reward {reward.name!r} is trained during the run, so it is scored with its trained "
            f"state, which cannot be read ({problem}); score with another reward (--reward NAME)"
        )
    reward.load_state_dict(state)
    return True


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the names, dtypes, shapes and bytes of ``state`` (in name order): equal exactly when the tensors are
    bit-identical."""
    return weights_sha256_of((name, state[name]) for name in sorted(state))


def weights_sha256_of(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """:func:`weights_sha256` of ``(name, tensor)`` pairs given in name order, taken one at a time (a sharded run's
    full tensors, gathered one by one, are hashed without ever being held together)."""
    digest = hashlib.sha256()
    for name, value in tensors:
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def checkpoint_note(run_dir: Path) -> str:
    """The sentence of an error that stops a run about what it leaves to resume from: its newest checkpoint (written
    atomically, so intact), or none yet."""
    newest = latest(Path(run_dir) / "checkpoints")
    if newest is None:
        return "No checkpoint was written yet, so a resume starts the run over."
    return f"The last checkpoint, {newest.name}, is intact."


def disk_full_message(err: OSError, name: str, previous: Path | None, run_dir: Path) -> str:
    """One line for a disk that filled up while ``name`` (a checkpoint or ``final/``) was written."""
    intact = f"{previous.name} is intact" if previous is not None else "no earlier checkpoint exists"
    return (
        f"the disk is full ({err.strerror or err}) while writing {name} under {run_dir}; its unfinished files were "
        f"removed and {intact}. Free some space, then continue with `ddpo train --resume {run_dir}`"
    )
