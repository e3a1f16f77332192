"""The registry of estimators: ``train.algorithm`` -> its :class:`~ddpo.training.estimators.base.Estimator` class.

This is the one place that reads ``train.algorithm`` (:func:`estimator_for`). Adding an estimator is one module with
its class plus one entry here, or, from outside the package (a test, a plugin), one :func:`register_estimator`
call before the config is built.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .base import Estimator, Need, RunConfig
from .forward_process import AdvantageWeightedMatching, DiffusionNFT
from .log_prob import (
    DDPOImportanceSampling,
    DDPOScoreFunction,
    RewardWeightedRegression,
    SparseRewardWeightedRegression,
)
from .preference import DiffusionDPO, OnlineDPO
from .reward_backprop import AlignProp, DRaFT

ESTIMATORS: dict[str, type[Estimator]] = {
    "ddpo_is": DDPOImportanceSampling,
    "ddpo_sf": DDPOScoreFunction,
    "rwr": RewardWeightedRegression,
    "rwr_sparse": SparseRewardWeightedRegression,
    "awm": AdvantageWeightedMatching,
    "nft": DiffusionNFT,
    "draft": DRaFT,
    "alignprop": AlignProp,
    "dpo": DiffusionDPO,
    "online_dpo": OnlineDPO,
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
    the chosen class checks its settings and its own keys (:meth:`~Estimator.validate`; only the chosen one), and
    another estimator's own key (:attr:`~Estimator.own_keys`) set to other than its default is refused: it would do
    nothing. Returns the chosen class."""
    algorithm = config.train.algorithm
    need(algorithm in ESTIMATORS, f"train.algorithm must be one of {', '.join(ESTIMATORS)}; got {algorithm!r}")
    chosen = estimator_for(config)
    chosen.validate(config, chosen, need)
    mine = own_keys(chosen)
    owners: dict[str, list[str]] = {}
    what: dict[str, str] = {}
    for name, cls in ESTIMATORS.items():
        for key, meaning in own_keys(cls).items():
            if key not in mine:
                owners.setdefault(key, []).append(name)
                what.setdefault(key, meaning)
    for key, names in owners.items():
        value, default = _value_and_default(config, key)
        need(
            value == default,
            f"{key} is {what[key]} and does nothing with train.algorithm={chosen.name}: set it back to "
            f"{_shown(default)} or use train.algorithm={' or '.join(names)}",
        )
    return chosen


def unused_key_notes(config: RunConfig) -> list[str]:
    """One note for each key the run's estimator does not read (:attr:`~Estimator.unused_keys`) that is set to other
    than its default, e.g. ``train.advantage=group_center`` under ``train.algorithm=draft``, so that a setting that
    does nothing is said at start-up rather than silently dropped."""
    chosen = estimator_for(config)
    notes = []
    for key, why in chosen.unused_keys.items():
        value, default = _value_and_default(config, key)
        if value != default:
            notes.append(f"{key}={_shown(value)} plays no part in train.algorithm={chosen.name} ({why}): it is unused")
    return notes


def own_keys(cls: type[Estimator]) -> dict[str, str]:
    """The keys only ``cls`` reads: those its class and its bases declare (:attr:`~Estimator.own_keys`)."""
    keys: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        keys.update(vars(klass).get("own_keys", {}))
    return keys


def _value_and_default(config: RunConfig, key: str) -> tuple[Any, Any]:
    """The value of the dotted ``section.name`` key and its dataclass default."""
    section_name, name = key.split(".")
    section = getattr(config, section_name)
    (spec,) = (f for f in dataclasses.fields(section) if f.name == name)
    default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
    return getattr(section, name), default


def _shown(value: Any) -> str:
    """A default as a user writes it: ``0`` (not ``0.0``), ``0.001``, ``old``, ``null``, ``''`` (an empty string)."""
    if value is None:
        return "null"
    if value == "":
        return "''"
    return f"{value:g}" if isinstance(value, float) else str(value)
