"""How a run's processes run and how they fail: the CPU multi-process switch, where rewards are scored, the run
directory several machines must share, and the one line each way of stopping (a lost process, Ctrl-C) leaves for the
person who resumes."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import torch

from . import checkpoint
from .config import ConfigError, RunConfig


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


def check_shared_run_dir(accelerator, run_dir: Path) -> None:
    """Refuse, before the model loads, a run over several machines whose processes do not all see ``run_dir`` where
    machine 0 does. Machine 0 writes the checkpoints, every process writes its random state into them and reads them
    on resume, so the run directory must be on a filesystem every machine mounts at the same path. Checked when the
    processes span machines (more of them than ``LOCAL_WORLD_SIZE``, the count the launcher started on this machine):
    machine 0 leaves a marker in the run directory's parent folder, every process looks for it, machine 0 removes it.
    :class:`ConfigError` on every process, naming those that could not see it."""
    from accelerate.utils import gather_object

    if accelerator.num_processes <= int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)):
        return  # one machine
    folder = Path(run_dir).resolve().parent
    token = gather_object([uuid.uuid4().hex if accelerator.is_main_process else ""])[0]
    marker = folder / f".ddpo-shared-{token}"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        marker.touch()
    accelerator.wait_for_everyone()
    seen = gather_object([(accelerator.process_index, socket.gethostname(), marker.is_file())])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker.unlink(missing_ok=True)
    blind = [f"process {index} on {host}" for index, host, found in seen if not found]
    if blind:
        raise ConfigError(
            f"the run directory {run_dir} is not shared by the machines of this run: {', '.join(blind)} cannot see "
            f"the folder machine 0 writes it in; put output_dir on a filesystem every machine mounts at the same "
            "path (NFS, Lustre), with an absolute path: machine 0 writes the checkpoints, every process writes its "
            "random state into them and reads them on resume"
        )


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
