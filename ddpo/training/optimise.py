"""An epoch's optimisation: inner epochs over shuffled (trajectory, timestep) minibatches of the estimator's loss, with
gradient accumulation, clipping and the learning-rate schedule (:func:`optimise_epoch`), and the shuffled pairs of an
inner epoch from the run's shuffle stream (:func:`shuffled_pairs`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator

from ..policy.pairs import training_pairs
from . import checkpoint
from .config import RunConfig, train_step_offset, train_window_steps
from .epoch_stats import epoch_diagnostics
from .killpoints import kill_point
from .optim import clip_and_schedule
from .processes import TrainingError
from .streams import Stream, derive_seed


def shuffled_pairs(
    config: RunConfig, epoch: int, inner: int, num_samples: int, steps_per_trajectory: int, accelerator: Accelerator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shuffled (trajectory, step) pairs of inner epoch ``inner`` of ``epoch`` (see
    :func:`ddpo.policy.pairs.training_pairs`), from the stream ``(seed, SHUFFLE, epoch, inner, process)``: two
    ``[num_samples * steps_per_trajectory]`` long tensors on the device."""
    acc = accelerator
    seed = derive_seed(config.seed, Stream.SHUFFLE, epoch, inner, acc.process_index)
    trajs, steps = training_pairs(
        num_samples, steps_per_trajectory, train_window_steps(config), torch.Generator().manual_seed(seed)
    )
    return trajs.to(acc.device), (steps + train_step_offset(config)).to(acc.device)


def optimise_epoch(
    config: RunConfig,
    accelerator: Accelerator,
    estimator,
    denoiser: torch.nn.Module,
    params: list[torch.Tensor],
    optimizer,
    epoch: int,
    samples,
    weights: torch.Tensor,
    pairs: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]],
    global_step: int,
    run_dir: Path,
) -> tuple[dict[str, float], int]:
    """Train on ``samples`` (``[N]`` trajectories or clean samples, ``weights [N]``) for ``train.num_inner_epochs``
    passes over the pairs ``pairs(inner, N)``, ``train.batch_size`` pairs a minibatch, one optimiser step every
    ``gradient_accumulation_steps`` minibatches. Returns the epoch's mean diagnostics and the new global step.

    A non-finite gradient norm stops the run (:class:`~ddpo.training.processes.TrainingError`) before the step."""
    t, acc = config.train, accelerator
    denoiser.train()
    num_samples = samples.latents.shape[0]
    max_norm = t.max_grad_norm if t.max_grad_norm > 0 else math.inf
    history: dict[str, list[torch.Tensor]] = {}
    grad_norms: list[torch.Tensor] = []
    first_step_kl: list[torch.Tensor] = []
    samples, extra = estimator.prepare_epoch(samples, lambda inner: pairs(inner, num_samples))
    for inner in range(t.num_inner_epochs):
        pair_traj, pair_step = pairs(inner, num_samples)
        estimator.begin_inner_epoch(epoch, inner)
        for first in range(0, len(pair_traj), t.batch_size):
            i = pair_traj[first : first + t.batch_size]
            j = pair_step[first : first + t.batch_size]
            with acc.accumulate(denoiser):
                loss, info = estimator.loss(samples, weights, i, j)
                if not grad_norms and "approx_kl" in info:
                    # the epoch's first optimiser step: no update yet, so a per-step ratio must be 1
                    first_step_kl.append(info["approx_kl"].float())
                acc.backward(loss)
                kill_point("backward")
                lr, warmup = t.learning_rate, t.lr_warmup_steps
                grad_norm = clip_and_schedule(acc, params, optimizer, max_norm, global_step, lr, warmup)
                if grad_norm is not None:
                    if not torch.isfinite(grad_norm):
                        raise TrainingError(
                            f"non-finite gradient norm at epoch {epoch}, global step {global_step}; lower "
                            f"train.learning_rate or use mixed_precision=no. {checkpoint.checkpoint_note(run_dir)}"
                        )
                    grad_norms.append(grad_norm.detach().float())
                    global_step += 1
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                kill_point("optimizer_step")
            for key, value in info.items():
                history.setdefault(key, []).append(value.float())
    return epoch_diagnostics(acc, history, grad_norms, first_step_kl, extra), global_step
