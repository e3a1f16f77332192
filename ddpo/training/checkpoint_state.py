"""A run's state to and from disk: what of a trainer goes into a checkpoint (:func:`save_checkpoint`), how it comes
back on resume (:func:`load_checkpoint`), and the exported ``final/`` (:func:`save_final`).

The file format, its atomic writing and its verification are :mod:`~ddpo.training.checkpoint`'s. All processes call
these functions (each writes its own RNG state; the main process writes the rest).
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from ..models import lora_metadata, lora_state_dict
from . import checkpoint
from .killpoints import kill_point
from .processes import TrainingError


def trainable_state(accelerator: Accelerator, denoiser, trainable_names: list[str]) -> dict[str, torch.Tensor]:
    """The trained tensors of ``denoiser`` (unwrapped from DDP / compile), by parameter name (detached, not copied)."""
    named = dict(accelerator.unwrap_model(denoiser).named_parameters())
    return {name: named[name].detach() for name in trainable_names}


@contextlib.contextmanager
def removed_on_failure(tmp: Path | None, name: str, previous: Path | None, run_dir: Path):
    """Remove the temporary folder ``tmp`` of ``name`` (a checkpoint or ``final/``) when writing it fails or is
    interrupted; a full disk becomes one :class:`~ddpo.training.processes.TrainingError` naming ``previous``, the
    checkpoint to resume from."""
    try:
        yield
    except BaseException as err:
        if tmp is not None:
            checkpoint.discard(tmp)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise TrainingError(checkpoint.disk_full_message(err, name, previous, run_dir)) from err
        raise


def save_checkpoint(
    accelerator: Accelerator,
    run_dir: Path,
    epochs_done: int,
    *,
    trainable: dict[str, torch.Tensor],
    trainable_names: list[str],
    optimizer,
    reward,
    estimator,
    advantage_state,
    global_step: int,
    keep: int,
) -> Path:
    """Atomically write ``run_dir/checkpoints/checkpoint_<epochs_done>`` (all processes must call this):
    ``trainable`` (:func:`trainable_state`), the optimiser, reward and estimator states, the per-prompt advantage
    statistics ``advantage_state`` (or None; stored under ``state.json``'s key ``tracker``), ``global_step`` and
    every process's RNG states. Keeps the newest ``keep`` checkpoints."""
    acc = accelerator
    folder = run_dir / "checkpoints"
    final = folder / f"{checkpoint.PREFIX}{epochs_done:06d}"
    previous = checkpoint.latest(folder)
    tmp = checkpoint.begin(folder) if acc.is_main_process else None
    tmp = Path(gather_object([str(tmp)])[0]) if acc.num_processes > 1 else tmp
    with removed_on_failure(tmp if acc.is_main_process else None, final.name, previous, run_dir):
        if acc.is_main_process:
            checkpoint.write_payload(
                tmp, trainable, optimizer.state_dict(), reward.state_dict(), estimator.state_dict()
            )
            kill_point("checkpoint_payload")
        checkpoint.write_json(tmp / f"rng_{acc.process_index}.json", checkpoint.rng_state())
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {
                "epoch": epochs_done,
                "global_step": global_step,
                "tracker": advantage_state.state_dict() if advantage_state is not None else None,
                "num_processes": acc.num_processes,
                "trainable_names": trainable_names,
            }
            final = checkpoint.commit(tmp, folder, epochs_done, state, keep)
    acc.wait_for_everyone()
    return final


def load_checkpoint(
    path: Path,
    accelerator: Accelerator,
    *,
    denoiser,
    trainable_names: list[str],
    optimizer,
    estimator,
    advantage_state,
    reward,
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote into the given objects, and this process's RNG states; returns the
    checkpoint's ``state.json`` (``epoch``, ``global_step``, ...)."""
    acc = accelerator
    data = checkpoint.load(path, acc.process_index)
    state = data["state"]
    if state["num_processes"] != acc.num_processes:
        raise ValueError(
            f"{path} was written by {state['num_processes']} processes; resume with the same number "
            f"(now {acc.num_processes}) so that the random streams match"
        )
    named = dict(acc.unwrap_model(denoiser).named_parameters())
    checkpoint.restore_trainable(path, data["trainable"], {name: named[name] for name in trainable_names})
    optimizer.load_state_dict(data["optimizer"])
    estimator.load_state_dict(data["extra"], str(path))
    if advantage_state is not None:
        if state["tracker"] is None:
            raise ValueError(f"{path} has no per-prompt tracker state but train.advantage is per_prompt")
        advantage_state.load_state_dict(state["tracker"])
    reward.load_state_dict(data["reward"] or {})
    if data["rng"] is not None:
        checkpoint.set_rng_state(data["rng"])
    return state


def save_final(accelerator: Accelerator, run_dir: Path, denoiser, use_lora: bool, family, pipe) -> Path:
    """``run_dir/final/``: LoRA weights for ``pipe.load_lora_weights(final)``, or a full pipeline folder (all
    processes must call this; the main process writes)."""
    acc = accelerator
    final = run_dir / "final"
    acc.wait_for_everyone()
    if acc.is_main_process:
        tmp = run_dir / f".final-tmp-{os.getpid()}"
        with removed_on_failure(tmp, "final/", checkpoint.latest(run_dir / "checkpoints"), run_dir):
            model = acc.unwrap_model(denoiser)
            if use_lora:
                family.save_lora(tmp, lora_state_dict(model), lora_metadata(model))
            else:
                family.set_denoiser(model)
                pipe.save_pretrained(tmp, safe_serialization=True)
            kill_point("final_payload")
            checkpoint.replace_dir(tmp, final)
    acc.wait_for_everyone()
    return final
