"""An epoch's training diagnostics from its minibatches': means over minibatches and processes, with maxima where a
maximum is what matters (``ratio_max``, the estimator's extra values)."""

from __future__ import annotations

import torch
from accelerate import Accelerator


def epoch_diagnostics(
    accelerator: Accelerator,
    history: dict[str, list[torch.Tensor]],
    grad_norms: list[torch.Tensor],
    first_step_kl: list[torch.Tensor],
    extra: dict[str, torch.Tensor],
) -> dict[str, float]:
    """The epoch's metrics: each minibatch diagnostic of ``history`` averaged (``ratio_max``: its maximum), the mean
    gradient norm of the optimiser steps, the largest ``approx_kl`` of the epoch's first optimiser step
    (``first_step_approx_kl``, when given; 0 exactly when every pair of that step had ratio 1) and the estimator's
    ``extra`` values, each reduced over processes."""
    acc = accelerator
    means = {key: acc.reduce(torch.stack(values).mean(), reduction="mean") for key, values in history.items()}
    if "ratio_max" in history:
        means["ratio_max"] = acc.reduce(torch.stack(history["ratio_max"]).max(), reduction="max")
    means["grad_norm"] = acc.reduce(torch.stack(grad_norms).mean(), reduction="mean")
    if first_step_kl:
        extra["first_step_approx_kl"] = torch.stack(first_step_kl).max()
    means.update({key: acc.reduce(value, reduction="max") for key, value in extra.items()})
    return {key: value.item() for key, value in means.items()}
