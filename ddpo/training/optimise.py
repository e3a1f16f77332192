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


class MinibatchSteps:
    """An epoch's training minibatches, one :meth:`step` each: the loss under ``accelerate``'s accumulation context,
    its backward pass, and at each optimiser step (``accelerator.sync_gradients``: every
    ``train.gradient_accumulation_steps``-th minibatch) gradient clipping, the learning rate of the step
    (:func:`~ddpo.training.optim.clip_and_schedule`), the refusal of a non-finite gradient norm and the step itself.
    It keeps the epoch's diagnostics (:meth:`diagnostics`) and the run's global step (:attr:`global_step`).

    The trainer's (sample, step) minibatches (:func:`optimise_epoch`) and an estimator that owns its epoch
    (:attr:`ddpo.training.estimators.EpochRun.step`) both step through it."""

    def __init__(
        self,
        config: RunConfig,
        accelerator: Accelerator,
        denoiser: torch.nn.Module,
        params: list[torch.Tensor],
        optimizer,
        epoch: int,
        global_step: int,
        run_dir: Path,
    ):
        self.config, self.accelerator, self.denoiser = config, accelerator, denoiser
        self.params, self.optimizer, self.epoch, self.run_dir = params, optimizer, epoch, run_dir
        self.global_step = global_step
        """Optimiser steps done in the run so far."""
        t = config.train
        self.max_norm = t.max_grad_norm if t.max_grad_norm > 0 else math.inf
        self.history: dict[str, list[torch.Tensor]] = {}
        self.grad_norms: list[torch.Tensor] = []
        self.first_step_kl: list[torch.Tensor] = []

    def step(self, loss_fn: Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
        """One minibatch: ``loss_fn() -> (loss, info)`` called in the accumulation context (the forward pass must run
        in it: a DDP model syncs gradients only at an optimiser step), ``loss`` back-propagated, the optimiser stepped
        when the accumulation is complete. Returns ``info`` (detached scalars), whose epoch means are logged (an
        ``approx_kl`` of the epoch's first optimiser step also as ``first_step_approx_kl``).

        A non-finite gradient norm stops the run (:class:`~ddpo.training.processes.TrainingError`) before the step."""
        t, acc = self.config.train, self.accelerator
        self.denoiser.train()
        with acc.accumulate(self.denoiser):
            loss, info = loss_fn()
            if not self.grad_norms and "approx_kl" in info:
                # the epoch's first optimiser step: no update yet, so a per-step ratio must be 1
                self.first_step_kl.append(info["approx_kl"].float())
            acc.backward(loss)
            kill_point("backward")
            lr, warmup = t.learning_rate, t.lr_warmup_steps
            grad_norm = clip_and_schedule(acc, self.params, self.optimizer, self.max_norm, self.global_step, lr, warmup)
            if grad_norm is not None:
                if not torch.isfinite(grad_norm):
                    raise TrainingError(
                        f"non-finite gradient norm at epoch {self.epoch}, global step {self.global_step}; lower "
                        f"train.learning_rate or use mixed_precision=no. {checkpoint.checkpoint_note(self.run_dir)}"
                    )
                self.grad_norms.append(grad_norm.detach().float())
                self.global_step += 1
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            kill_point("optimizer_step")
        for key, value in info.items():
            self.history.setdefault(key, []).append(value.float())
        return info

    def diagnostics(self, extra: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """The epoch's mean diagnostics over minibatches and processes, ``grad_norm``, and the ``extra`` values
        (reduced with ``max``) (:func:`~ddpo.training.epoch_stats.epoch_diagnostics`)."""
        acc = self.accelerator
        return epoch_diagnostics(acc, self.history, self.grad_norms, self.first_step_kl, dict(extra or {}))


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
    ``gradient_accumulation_steps`` minibatches (:class:`MinibatchSteps`). Returns the epoch's mean diagnostics and
    the new global step.

    A non-finite gradient norm stops the run (:class:`~ddpo.training.processes.TrainingError`) before the step."""
    t = config.train
    steps = MinibatchSteps(config, accelerator, denoiser, params, optimizer, epoch, global_step, run_dir)
    denoiser.train()
    num_samples = samples.latents.shape[0]
    samples, extra = estimator.prepare_epoch(samples, lambda inner: pairs(inner, num_samples))
    for inner in range(t.num_inner_epochs):
        pair_traj, pair_step = pairs(inner, num_samples)
        estimator.begin_inner_epoch(epoch, inner)
        for first in range(0, len(pair_traj), t.batch_size):
            i = pair_traj[first : first + t.batch_size]
            j = pair_step[first : first + t.batch_size]
            steps.step(lambda: estimator.loss(samples, weights, i, j))  # noqa: B023 (called at once)
    return steps.diagnostics(extra), steps.global_step
