"""The registry of estimators: ``train.algorithm`` -> its :class:`~ddpo.training.estimators.base.Estimator` class.

This is the one place that reads ``train.algorithm`` (:func:`estimator_for`). Adding an estimator is one module with
its class plus one entry here, or, from outside the package (a test, a plugin), one :func:`register_estimator`
call before the config is built.
"""

from __future__ import annotations

from .base import Estimator, Need, RunConfig
from .forward_process import AdvantageWeightedMatching, DiffusionNFT
from .log_prob import (
    DDPOImportanceSampling,
    DDPOScoreFunction,
    RewardWeightedRegression,
    SparseRewardWeightedRegression,
)

ESTIMATORS: dict[str, type[Estimator]] = {
    "ddpo_is": DDPOImportanceSampling,
    "ddpo_sf": DDPOScoreFunction,
    "rwr": RewardWeightedRegression,
    "rwr_sparse": SparseRewardWeightedRegression,
    "awm": AdvantageWeightedMatching,
    "nft": DiffusionNFT,
}
"""Every ``train.algorithm``, in the order the config's messages list them."""


def register_estimator(name: str, cls: type[Estimator]) -> None:
    """Make ``train.algorithm=<name>`` train with ``cls`` (its :attr:`~Estimator.name` becomes ``name``)."""
    if name in ESTIMATORS and ESTIMATORS[name] is not cls:
        raise ValueError(f"train.algorithm={name!r} is already registered ({ESTIMATORS[name].__name__})")
    cls.name = name
    ESTIMATORS[name] = cls


def unregister_estimator(name: str) -> None:
    """Remove ``train.algorithm=<name>`` (the counterpart of :func:`register_estimator`, for tests)."""
    ESTIMATORS.pop(name, None)


def estimator_for(config: RunConfig) -> type[Estimator]:
    """The estimator class of ``config.train.algorithm``; ``KeyError`` when none is registered under it (the config
    refuses such a name first, :func:`validate_estimators`)."""
    return ESTIMATORS[config.train.algorithm]


def validate_estimators(config: RunConfig, need: Need) -> type[Estimator]:
    """The config rules of the estimators (``need(condition, message)``): ``train.algorithm`` names a registered one,
    and every registered class checks its settings (:meth:`~Estimator.validate`). Returns the chosen class."""
    algorithm = config.train.algorithm
    need(algorithm in ESTIMATORS, f"train.algorithm must be one of {', '.join(ESTIMATORS)}; got {algorithm!r}")
    chosen = estimator_for(config)
    chosen.validate(config, chosen, need)
    for cls in dict.fromkeys(ESTIMATORS.values()):
        if cls is not chosen:
            cls.validate(config, chosen, need)
    return chosen
