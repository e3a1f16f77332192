"""Rules over a run's held-out evaluations: stop early when a guard falls, the policy drifts too far from the base or
the target stops rising, and keep track of the best evaluation (the one ``final/`` can be).

Pure logic over the records of ``eval.jsonl`` (plain dicts): the trainer feeds each evaluation's record to
:meth:`StopRules.observe` and stops with the message it returns. The rules' state (the first guard values, the best
evaluation, the evaluations since it) is saved in checkpoints, so a resumed run stops where an uninterrupted one would.

Keys of a record the rules read:

* ``guard/<name>_mean``: the held-out mean of each guard reward (``eval_rewards``);
* ``kl_to_base``: the held-out divergence of the policy from the base model, when measured;
* the target metric (``best_metric``, by default ``reward_mean``, the training reward on the held-out prompts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

GUARD_PREFIX = "guard/"


def guard_means(record: dict[str, Any]) -> dict[str, float]:
    """``{guard name: held-out mean}`` of an evaluation record (keys ``guard/<name>_mean``)."""
    return {
        key[len(GUARD_PREFIX) : -len("_mean")]: float(value)
        for key, value in record.items()
        if key.startswith(GUARD_PREFIX) and key.endswith("_mean")
    }


@dataclass
class StopRules:
    """When to stop a run early, judged at each held-out evaluation (a threshold of 0 switches its rule off).

    Args:
        guard_drop: stop when a guard's held-out mean falls by more than this fraction of its first evaluation's
            value (the base model's, before any training; of its absolute value, so guards of any scale share one
            threshold: 0.05 is a 5% fall).
        kl_limit: stop when the held-out ``kl_to_base`` passes this.
        patience: stop when ``metric`` has not risen by more than ``min_delta`` above its best for this many
            evaluations in a row.
        metric: the evaluation key that is the run's target (for ``patience`` and for the best evaluation).
        min_delta: how much ``metric`` must rise over its best to count as a rise.
    """

    guard_drop: float = 0.0
    kl_limit: float = 0.0
    patience: int = 0
    metric: str = "reward_mean"
    min_delta: float = 0.0
    first_guards: dict[str, float] = field(default_factory=dict)
    best_value: float = -math.inf
    best_epoch: int | None = None
    since_best: int = 0
    stopped: str | None = None
    """Why the run stopped early (the message of :meth:`observe`), once it has."""
    kl_since_eval: list[float] = field(default_factory=list)
    """The epochs' training KL to the base (``train.kl_coef > 0``) since the last evaluation, whose mean the next one
    logs as ``kl_to_base`` (checkpointed: a resume between two evaluations keeps the epochs before it)."""

    def note_kl(self, kl: float) -> None:
        """Record one epoch's training KL to the base."""
        self.kl_since_eval.append(float(kl))

    def take_kl(self) -> list[float]:
        """The KL values since the last evaluation, for this one (the record starts afresh)."""
        values, self.kl_since_eval = self.kl_since_eval, []
        return values

    def settings(self) -> list:
        """The rules' thresholds: a resumed run whose rules changed (overrides) judges afresh."""
        return [self.guard_drop, self.kl_limit, self.patience, self.metric, self.min_delta]

    def observe(self, record: dict[str, Any]) -> str | None:
        """Take one evaluation's record (in epoch order); return why the run must stop, or None to go on. Updates the
        best evaluation first, so the evaluation that stops a run can still be the best."""
        epoch = int(record["epoch"])
        if self.metric not in record:
            raise KeyError(
                f"best_metric={self.metric!r} is not a key of the held-out evaluation (its keys: "
                f"{', '.join(k for k in record if k != 'rewards')})"
            )
        value = float(record[self.metric])
        if self.best_epoch is None or value > self.best_value + self.min_delta:
            self.best_value, self.best_epoch, self.since_best = value, epoch, 0
        else:
            self.since_best += 1
        guards = guard_means(record)
        if not self.first_guards:
            self.first_guards = dict(guards)
        reasons = []
        if self.guard_drop > 0:
            for name, first in self.first_guards.items():
                now = guards.get(name)
                fall = None if now is None else (first - now) / (abs(first) or 1.0)
                if fall is not None and fall > self.guard_drop:
                    reasons.append(
                        f"guard {name} fell from {first:.4g} to {now:.4g} (by {fall:.2%} of its base value > "
                        f"stop.guard_drop={self.guard_drop:g})"
                    )
        if self.kl_limit > 0 and (kl := record.get("kl_to_base")) is not None and kl > self.kl_limit:
            reasons.append(f"kl_to_base {kl:.4g} > stop.kl_limit={self.kl_limit:g}")
        if self.patience > 0 and self.since_best >= self.patience:
            reasons.append(
                f"{self.metric} has not risen above its best ({self.best_value:.4g} at epoch {self.best_epoch}) for "
                f"{self.since_best} evaluations (stop.patience={self.patience})"
            )
        if not reasons:
            return None
        self.stopped = f"stopping early after epoch {epoch}: " + "; ".join(reasons)
        return self.stopped

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON values (the best value is None before the first evaluation)."""
        return {
            "first_guards": dict(self.first_guards),
            "best_value": None if self.best_epoch is None else self.best_value,
            "best_epoch": self.best_epoch,
            "since_best": self.since_best,
            "stopped": self.stopped,
            "settings": self.settings(),
            "kl_since_eval": list(self.kl_since_eval),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a stop decided under other thresholds than these is forgotten, so a resumed
        run with changed ``stop.*`` goes on training."""
        self.first_guards = dict(state["first_guards"])
        self.best_value = -math.inf if state["best_value"] is None else float(state["best_value"])
        self.best_epoch = state["best_epoch"]
        self.since_best = int(state["since_best"])
        self.kl_since_eval = [float(v) for v in state.get("kl_since_eval", [])]  # absent from older checkpoints
        same_rules = state.get("settings") == self.settings()
        self.stopped = state.get("stopped") if same_rules else None
