"""Estimators: what turns an epoch's samples and their weights into a loss (:mod:`.base`), one module per family
(:mod:`.log_prob`: DDPO-IS/SF, RWR, sparse RWR; :mod:`.forward_process`: AWM, DiffusionNFT; :mod:`.preference`:
Diffusion-DPO offline and online), and the registry from
``train.algorithm`` to a class (:mod:`.registry`).

The trainer imports this package (the interface and the registry), never a family's module.
"""

from __future__ import annotations

from .base import EpochResult, EpochRun, Estimator, Policy, PromptBatch, not_differentiable_message
from .registry import (
    ESTIMATORS,
    estimator_for,
    register_estimator,
    unregister_estimator,
    unused_key_notes,
    validate_estimators,
)

__all__ = [
    "ESTIMATORS",
    "EpochResult",
    "EpochRun",
    "Estimator",
    "Policy",
    "PromptBatch",
    "estimator_for",
    "not_differentiable_message",
    "register_estimator",
    "unregister_estimator",
    "unused_key_notes",
    "validate_estimators",
]
