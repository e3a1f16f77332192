"""The optimiser and its learning-rate schedule: ``train.optimizer``, ``train.learning_rate``,
``train.lr_warmup_steps``."""

from __future__ import annotations

import torch

from .config import ConfigError


def get_optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """``train.optimizer`` -> optimiser class: ``adamw`` (torch) or ``adamw8bit`` (bitsandbytes)."""
    if name == "adamw":
        return torch.optim.AdamW
    if name == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError as err:
            raise ConfigError(
                "train.optimizer=adamw8bit needs bitsandbytes: `pip install bitsandbytes` (or use train.optimizer=adamw)"
            ) from err
        return bitsandbytes.optim.AdamW8bit
    raise ConfigError(f"train.optimizer must be adamw or adamw8bit; got {name!r}")


def learning_rate_at(step: int, learning_rate: float, warmup_steps: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based): linear warm-up from ``learning_rate / warmup_steps``
    to ``learning_rate`` over the first ``warmup_steps`` steps, then constant (``warmup_steps=0``: constant).

    Adam's first update is ``lr * sign(g)`` in every coordinate (its bias-corrected moments are ``g`` and ``g^2``),
    whatever the gradient's size or noise, so on a model that is already good the first steps are the largest random
    moves of the run; the warm-up shrinks them while the second moment fills."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return learning_rate
    return learning_rate * (step + 1) / warmup_steps


def set_learning_rate(optimizer: torch.optim.Optimizer, learning_rate: float) -> None:
    """Set every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate


def clip_and_schedule(
    accelerator, params: list, optimizer, max_norm: float, global_step: int, learning_rate: float, warmup_steps: int
) -> torch.Tensor | None:
    """At an optimiser step (``accelerator.sync_gradients``: the last micro-batch of an accumulation), clip the
    gradients of ``params`` to ``max_norm`` and set the learning rate of step ``global_step``; returns the gradient
    norm before clipping (None between steps, where nothing is done). A non-finite norm is the caller's to refuse."""
    if not accelerator.sync_gradients:
        return None
    grad_norm = accelerator.clip_grad_norm_(params, max_norm)
    if torch.isfinite(grad_norm):
        set_learning_rate(optimizer, learning_rate_at(global_step, learning_rate, warmup_steps))
    return grad_norm
