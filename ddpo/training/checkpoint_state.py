"""A run's state to and from disk: what of a trainer goes into a checkpoint (:func:`save_checkpoint`), how it comes
back on resume (:func:`load_checkpoint`), and the exported ``final/`` (:func:`save_final`).

The file format, its atomic writing and its verification are :mod:`~ddpo.training.checkpoint`'s. All processes call
these functions (each writes its own RNG state; the main process writes the rest).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from ..models import lora_metadata, lora_state_dict
from . import checkpoint, sharding
from .killpoints import kill_point
from .processes import TrainingError


def trainable_state(accelerator: Accelerator, denoiser, trainable_names: list[str]) -> dict[str, torch.Tensor]:
    """The trained tensors of ``denoiser`` (unwrapped from DDP / compile), by parameter name (detached, not copied).

    Under sharding (FSDP2) their full tensors, gathered from every process's shard one at a time
    (:func:`~ddpo.training.sharding.full_tensors`), on the main process only: the others get an empty dict, and all
    processes must call this."""
    model = accelerator.unwrap_model(denoiser)
    if accelerator.is_fsdp2:
        sharding.reshard(model)  # named_parameters() then gives the shards
        named = dict(model.named_parameters())
        return sharding.full_tensors(named, trainable_names, keep=accelerator.is_main_process)
    named = dict(model.named_parameters())
    return {name: named[name].detach() for name in trainable_names}


def optimizer_state_dict(accelerator: Accelerator, denoiser, optimizer) -> dict[str, Any]:
    """The optimiser state a checkpoint holds (all processes call this): ``optimizer.state_dict()``, or under sharding
    the full state keyed by parameter name on the main process
    (:func:`~ddpo.training.sharding.full_optimizer_state`; the others get an empty dict)."""
    if accelerator.is_fsdp2:
        return sharding.full_optimizer_state(accelerator.unwrap_model(denoiser), optimizer)
    return optimizer.state_dict()


def weights_hashes(accelerator: Accelerator, denoiser, trainable_names: list[str]) -> list[str]:
    """An epoch's ``weights_sha256`` (all processes call this): with data parallelism, every process's hash of its own
    copy of the trained weights, in process order (DDP keeps the copies equal, so the entries are); under sharding one
    entry, the hash of the full weights gathered from the shards (no process holds a copy of its own). Either way
    the hash of the full weights, so runs of both kinds can be compared. Sharded, the full tensors are gathered and
    hashed one at a time: no process holds the full weights (full fine-tuning of FLUX: 44 GiB in fp32)."""
    if not accelerator.is_fsdp2:
        return gather_object([checkpoint.weights_sha256(trainable_state(accelerator, denoiser, trainable_names))])
    model = accelerator.unwrap_model(denoiser)
    sharding.reshard(model)  # named_parameters() then gives the shards
    full = sharding.iter_full_tensors(dict(model.named_parameters()), sorted(trainable_names))
    digest = checkpoint.weights_sha256_of(full)  # every process takes part in the gathers (and hashes)
    return gather_object([digest] if accelerator.is_main_process else [])


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
    global_step: int,
    keep: int,
    *,
    denoiser,
    trainable_names: list[str],
    optimizer,
    estimator,
    advantage_state,
    reward,
    guards: dict[str, Any] | None = None,
) -> Path:
    """Atomically write ``run_dir/checkpoints/checkpoint_<epochs_done>`` (all processes must call this): the
        trained tensors of ``denoiser`` (:func:`trainable_state`), the optimiser, estimator and reward states, the
        per-prompt advantage statistics ``advantage_state`` (or None; stored under ``state.json``'s key ``tracker``),
        ``global_step``, the rules over evaluations' state ``guards`` (:class:`~ddpo.training.guards.StopRules`; JSON
    values, under ``state.json``'s key ``guards``) and every process's RNG states. Keeps the newest ``keep``
    checkpoints."""
    acc = accelerator
    folder = run_dir / "checkpoints"
    final = folder / f"{checkpoint.PREFIX}{epochs_done:06d}"
    previous = checkpoint.latest(folder)
    tmp = checkpoint.begin(folder) if acc.is_main_process else None
    tmp = Path(gather_object([str(tmp)])[0]) if acc.num_processes > 1 else tmp
    with removed_on_failure(tmp if acc.is_main_process else None, final.name, previous, run_dir):
        # Every process takes part: under sharding the full tensors are gathered from all of them.
        trainable = trainable_state(acc, denoiser, trainable_names)
        optimizer_state = optimizer_state_dict(acc, denoiser, optimizer)
        extra = estimator.state_dict()
        if extra:
            extra = sharding.full_tensors(extra, sorted(extra), keep=acc.is_main_process)
        if acc.is_main_process:
            checkpoint.write_payload(tmp, trainable, optimizer_state, reward.state_dict(), extra)
            kill_point("checkpoint_payload")
        checkpoint.write_json(tmp / f"rng_{acc.process_index}.json", checkpoint.rng_state())
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {
                "epoch": epochs_done,
                "global_step": global_step,
                "tracker": advantage_state.state_dict() if advantage_state is not None else None,
                "num_processes": acc.num_processes,
                "sharded": acc.is_fsdp2,
                "trainable_names": trainable_names,
                "guards": guards,
            }
            final = checkpoint.commit(tmp, folder, epochs_done, state, keep)
    acc.wait_for_everyone()
    return final


def check_launch(path: Path, state: dict[str, Any], accelerator: Accelerator) -> None:
    """Refuse to resume the checkpoint ``path`` (its ``state.json``: ``state``) with another launch than the one that
    wrote it: a sharded (FSDP2) checkpoint without FSDP or the reverse (its optimiser state is keyed otherwise), or
    another number of processes (the random streams would differ). ``ValueError`` saying how to resume."""
    sharded = bool(state.get("sharded", False))  # checkpoints from before sharding existed: unsharded
    if sharded != accelerator.is_fsdp2:
        written, now = ("a sharded (FSDP2)", "without") if sharded else ("an unsharded", "with")
        raise ValueError(
            f"{path} was written by {written} run and this one is launched {now} FSDP; resume with the launch "
            "that wrote it (docs/multi-gpu.md#sharded-training-fsdp2)"
        )
    if state["num_processes"] != accelerator.num_processes:
        raise ValueError(
            f"{path} was written by {state['num_processes']} processes; resume with the same number "
            f"(now {accelerator.num_processes}) so that the random streams match"
        )


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
    check_launch(path, state, acc)
    model = acc.unwrap_model(denoiser)
    sharding.reshard(model)  # named_parameters() then gives the shards
    named = dict(model.named_parameters())
    checkpoint.restore_trainable(path, data["trainable"], {name: named[name] for name in trainable_names})
    if acc.is_fsdp2:
        sharding.load_full_optimizer_state(model, optimizer, data["optimizer"])
    else:
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


def save_final(
    accelerator: Accelerator,
    run_dir: Path,
    denoiser,
    use_lora: bool,
    family,
    pipe,
    folder: str = "final",
    source: Path | None = None,
    card: Callable[[Path], Any] | None = None,
) -> Path:
    """``run_dir/<folder>/`` (``final/``, or ``best/``): LoRA weights for ``pipe.load_lora_weights(final)``, or a full
    pipeline folder; or, with ``source``, a copy of that folder's weights (``final/`` from ``best/``). ``card(tmp)``
    writes the model card into the folder before it is put in place, so the card and the weights always go together.
    All processes must call this; the main process writes. A sharded (FSDP2) run writes its full weights, gathered from
    the shards: the same files an unsharded run writes."""
    acc = accelerator
    final = run_dir / folder
    acc.wait_for_everyone()
    model = acc.unwrap_model(denoiser)
    full = None  # under sharding: the full weights (LoRA's, or every parameter), on the main process
    if acc.is_fsdp2 and source is None:
        names = [name for name, param in model.named_parameters() if param.requires_grad or not use_lora]
        full = trainable_state(acc, denoiser, names)
    if acc.is_main_process:
        tmp = run_dir / f".final-tmp-{folder}-{os.getpid()}"
        with removed_on_failure(tmp, f"{folder}/", checkpoint.latest(run_dir / "checkpoints"), run_dir):
            if source is not None:
                shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("README.md", "heldout_*.png"))
            elif use_lora:
                family.save_lora(tmp, lora_state_dict(model, full), lora_metadata(model))
            elif full is not None:  # a plain module of the same class holds the full weights while the pipeline saves
                family.set_denoiser(sharding.unsharded_copy(model, full))
                try:
                    pipe.save_pretrained(tmp, safe_serialization=True)
                finally:
                    family.set_denoiser(model)
            else:
                family.set_denoiser(model)
                pipe.save_pretrained(tmp, safe_serialization=True)
            if card is not None:
                card(tmp)
            kill_point("final_payload")
            checkpoint.replace_dir(tmp, final)
    acc.wait_for_everyone()
    return final


def resume_point(run_dir: Path) -> Path | None:
    """The checkpoint a resume of ``run_dir`` continues from: the newest good one (saying which damaged ones it
    skips), or None when none was written yet (the run starts over). No good one among several is an error."""
    latest, problems = checkpoint.newest_good(run_dir / "checkpoints")
    for problem in problems:
        print(f"ddpo: skipping checkpoint {problem}", flush=True)
    if latest is None and problems:
        raise checkpoint.CheckpointError(
            f"{run_dir}: no usable checkpoint ({'; '.join(problems)}); restore one from a backup, or delete "
            f"{run_dir / 'checkpoints'} to start the run over"
        )
    if latest is not None and problems:
        print(f"ddpo: resuming from the newest good checkpoint, {latest.name}", flush=True)
    if latest is None:
        # Killed before its first checkpoint: nothing of it can be continued, so the run starts over.
        print(f"ddpo: {run_dir} has no checkpoint yet; starting the run from the beginning (epoch 0)", flush=True)
    return latest


@dataclasses.dataclass
class TrainingSnapshot:
    """An in-memory copy of what training changes (:func:`snapshot`): the trained tensors, the optimiser state, the
    per-prompt advantage statistics and the global step."""

    params: list[torch.Tensor]
    optimizer: dict[str, Any]
    advantage_state: dict[str, Any] | None
    global_step: int


def snapshot(params: list[torch.Tensor], optimizer, advantage_state, global_step: int) -> TrainingSnapshot:
    """Copies of ``params``, the optimiser's and ``advantage_state``'s (None: no per-prompt statistics) states."""
    return TrainingSnapshot(
        params=[p.detach().clone() for p in params],
        optimizer=copy.deepcopy(optimizer.state_dict()),
        advantage_state=copy.deepcopy(advantage_state.state_dict()) if advantage_state is not None else None,
        global_step=global_step,
    )


def restore(saved: TrainingSnapshot, params: list[torch.Tensor], optimizer, advantage_state) -> int:
    """Copy ``saved`` back into the objects it was taken from (gradients cleared; ``saved`` stays reusable); returns
    its global step."""
    with torch.no_grad():
        for param, value in zip(params, saved.params, strict=True):
            param.copy_(value)
    optimizer.load_state_dict(copy.deepcopy(saved.optimizer))
    optimizer.zero_grad(set_to_none=True)
    if advantage_state is not None:
        advantage_state.load_state_dict(copy.deepcopy(saved.advantage_state))
    return saved.global_step
