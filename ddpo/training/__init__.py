"""Training machinery: the run config (:mod:`.config`), the trainer that orchestrates an epoch (:mod:`.trainer`),
the estimators and their registry (:mod:`.estimators`), checkpoints (:mod:`.checkpoint`), run logs
(:mod:`.runlog`), prompt sets and random streams (:mod:`.prompts`), held-out evaluation (:mod:`.evaluation`) and
image grids (:mod:`.visualize`).

It imports :mod:`ddpo.policy` and :mod:`ddpo.models`, never :mod:`ddpo.tools` or the CLI.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RunConfig", "Trainer", "TrainingError", "build_config", "resume", "train"]


def __getattr__(name: str) -> Any:
    """Lazy re-exports: importing the config or the run logs does not load torch, diffusers and accelerate."""
    if name in ("RunConfig", "build_config"):
        from . import config

        return getattr(config, name)
    if name in ("Trainer", "TrainingError", "resume", "train"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
