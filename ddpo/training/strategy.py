"""Which distribution strategy a launch asked for, and the promise that the run carries it out or stops first.

``accelerate launch`` tells the processes it starts how to distribute through environment variables, from its flags
(``--use_fsdp --fsdp_version 2``) or from an accelerate config file (``distributed_type: FSDP``, ``fsdp_config:``):
``ACCELERATE_USE_FSDP=true``, ``FSDP_VERSION`` and the ``FSDP_*`` options, ``ACCELERATE_USE_DEEPSPEED=true``. The
strategies ddpo runs are data parallel (DDP, the default with several processes) and FSDP2, which shards the trained
denoiser, its gradients and its optimiser state over the processes (docs/multi-gpu.md#sharded-training-fsdp2).

accelerate itself gives a requested strategy up without a word in some places: on a machine without CUDA it makes a
multi-process run plain multi-CPU data parallel whatever ``--use_fsdp`` says, and it ignores DeepSpeed on the CPU.
ddpo never trains with a strategy other than the one asked for: :func:`check_requested` refuses, before the model
loads, what it cannot carry out, and :func:`carry_out` switches accelerate's state to FSDP on a multi-process CPU
run, where ``fully_shard`` runs over gloo, so the same accelerate FSDP2 code path shards there as on GPUs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from .config import ConfigError

FSDP_LAUNCH = "accelerate launch --use_fsdp --fsdp_version 2 --num_processes N"
"""The launch that shards (or ``distributed_type: FSDP`` with ``fsdp_version: 2`` in an accelerate config file)."""


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "false").lower() in ("1", "true", "yes")


def fsdp_requested(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the launch asked for FSDP (``ACCELERATE_USE_FSDP``, set by ``accelerate launch --use_fsdp`` or by an
    accelerate config file with ``distributed_type: FSDP``)."""
    return _flag(env, "ACCELERATE_USE_FSDP")


def check_requested(env: Mapping[str, str] = os.environ) -> None:
    """Refuse, before the model loads, a requested strategy this run would not carry out (:class:`ConfigError` naming
    the problem and the launch that works): DeepSpeed or Megatron-LM (not supported), FSDP version 1, FSDP's own
    activation checkpointing (it renames the parameters that checkpoints are keyed by), and FSDP with one process on
    a machine without CUDA (accelerate would train unsharded)."""
    for flag, name in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM")):
        if _flag(env, flag):
            raise ConfigError(
                f"the launch asks for {name} ({flag}=true), which ddpo does not support (untested: its engine "
                f"replaces the optimiser and the checkpoints this trainer writes); to shard the model use FSDP2: "
                f"{FSDP_LAUNCH} -m ddpo.cli train ... (docs/multi-gpu.md#sharded-training-fsdp2)"
            )
    if not fsdp_requested(env):
        return
    version = env.get("FSDP_VERSION", "1")
    if version != "2":
        raise ConfigError(
            f"the launch asks for FSDP version {version} (FSDP_VERSION={version}; accelerate's default is 1); ddpo "
            "shards with FSDP2 only: add --fsdp_version 2 to accelerate launch (or fsdp_version: 2 under fsdp_config "
            "in the accelerate config file)"
        )
    if _flag(env, "FSDP_ACTIVATION_CHECKPOINTING"):
        raise ConfigError(
            "the launch asks for FSDP's activation checkpointing (FSDP_ACTIVATION_CHECKPOINTING=true), which wraps "
            "the denoiser's blocks and renames the parameters that checkpoints and final/ are keyed by; drop "
            "--fsdp_activation_checkpointing and set train.gradient_checkpointing=true (diffusers' own) instead"
        )
    processes = int(env.get("WORLD_SIZE", "1"))
    if processes < 2 and not torch.cuda.is_available():
        raise ConfigError(
            "the launch asks for FSDP (ACCELERATE_USE_FSDP=true) but started one process on a machine without CUDA, "
            "where accelerate would train unsharded: start two or more processes "
            f"({FSDP_LAUNCH} -m ddpo.cli train ...), or launch without --use_fsdp"
        )


def carry_out(accelerator: Accelerator, env: Mapping[str, str] = os.environ) -> None:
    """Make ``accelerator`` shard with FSDP2 when the launch asked for it (after :func:`check_requested`).

    On GPUs accelerate's state is FSDP already. On a machine without CUDA accelerate keeps a multi-process run
    ``MULTI_CPU`` and drops the FSDP plugin; ``fully_shard`` runs there over gloo, so the state is switched to FSDP
    with the plugin accelerate would have built from the same environment, and ``Accelerator.prepare`` then takes
    accelerate's own FSDP2 path (``fsdp2_prepare_model``), as on GPUs."""
    if not fsdp_requested(env) or accelerator.is_fsdp2:
        return
    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise ConfigError(
            f"the launch asks for FSDP but accelerate set the run up as {state.distributed_type.value} on "
            f"{accelerator.device}; launch with {FSDP_LAUNCH} (docs/multi-gpu.md#sharded-training-fsdp2)"
        )
    plugin = FullyShardedDataParallelPlugin()  # from the launch's FSDP_* variables, as accelerate builds it
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # As accelerate's own state does at the end of its set-up: a later AcceleratorState() copies PartialState's.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
