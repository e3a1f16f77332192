"""How a run's processes run and how they fail: the CPU multi-process switch, where rewards are scored, and the one
line each way of stopping (a lost process, Ctrl-C) leaves for the person who resumes."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import checkpoint
from .config import RunConfig


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite gradients, ...); the last checkpoint is intact."""


def overlap_scoring(requested: bool, device: torch.device, io_bound: bool = False) -> bool:
    """Whether to score rewards in the worker thread: when asked (``overlap_scoring``) and the device is not the CPU,
    or the reward waits on I/O (``io_bound``, e.g. a remote reward server).

    On a CPU the cores that would score a local reward are the ones sampling, so overlapping buys nothing, and it
    costs: the worker thread's first torch op gives it an OpenMP team of its own, and once libgomp manages more threads
    than there are cores it stops spinning between parallel regions, so the intra-op threads of every later UNet call
    sleep and are woken at each operator (measured on a 2-core Intel Xeon: ~800 voluntary context switches per UNet
    call instead of 0, calls 20% slower for the rest of the run; docs/performance.md).
    """
    return requested and (device.type != "cpu" or io_bound)


def launched_on_cpu() -> bool:
    """Whether a launcher started several processes (``WORLD_SIZE > 1``) on a machine without CUDA: then the run is
    made multi-CPU over gloo explicitly. ``accelerate launch --multi_gpu`` exports ``ACCELERATE_USE_CPU=False``, with
    which accelerate would otherwise give every process a one-process state (each training alone, into the same run
    directory)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def collective_failure(err: BaseException) -> bool:
    """Whether ``err`` is a failed collective (gather, all-reduce, barrier) of several processes: another process
    died (its connections closed) or did not answer within ``process_timeout_seconds``. torch raises a plain
    RuntimeError from gloo, a DistError subclass elsewhere; the gradient all-reduce of DDP fails inside autograd."""
    if isinstance(err, torch.distributed.DistError):
        return True
    tb = err.__traceback__
    while tb is not None:
        if f"torch{os.sep}distributed{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    text = str(err)
    return any(
        mark in text for mark in ("gloo/transport", "ProcessGroupGloo", "ProcessGroupNCCL", "Connection closed by peer")
    )


def lost_process_message(err: BaseException, num_processes: int, config: RunConfig, run_dir: Path) -> str:
    """One line for a failed collective: which limit applied, what probably happened, and how to go on."""
    detail = " ".join(str(err).split())
    detail = detail if len(detail) <= 240 else detail[:237] + "..."
    return (
        f"another of the {num_processes} processes died or stopped answering (each waits at most "
        f"process_timeout_seconds={config.process_timeout_seconds} s for the others), so a collective operation "
        f"failed: {detail}. {checkpoint.checkpoint_note(run_dir)} See the other process's output for why it stopped, "
        f"then resume with the same number of processes (--resume {run_dir})"
    )


def interrupted_message(run_dir: Path) -> str:
    """One line for a run stopped by Ctrl-C (SIGINT): its last intact checkpoint, or none, and the resume command."""
    latest = checkpoint.latest(Path(run_dir) / "checkpoints")
    if not (Path(run_dir) / "config.yaml").is_file():
        return f"ddpo: interrupted before {run_dir} held a run (nothing to resume); run the same command again"
    if latest is None:
        return f"ddpo: interrupted; no checkpoint was written yet; start it over with: ddpo train --resume {run_dir}"
    epochs = int(latest.name[len(checkpoint.PREFIX) :])
    return (
        f"ddpo: interrupted; the last intact checkpoint is {latest} ({epochs} epoch{'s' * (epochs != 1)} done); "
        f"continue with: ddpo train --resume {run_dir}"
    )
