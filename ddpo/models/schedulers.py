"""Samplers by name: the pipeline's own noise schedule under the sampler a run asks for.

``ddim`` and ``ddpm`` have the per-step log-probabilities of :mod:`ddpo.policy.schedulers`; every other name is a
log-prob-free sampler for the forward-process estimators (``train.algorithm=awm|nft``). A diffusers scheduler class
name (``DPMSolverMultistepScheduler``, ``HeunDiscreteScheduler``, ...) works too.
"""

from __future__ import annotations

from typing import Any

SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "flow_sde": ("FlowMatchEulerDiscreteScheduler", {}),
    "flow_cps": ("FlowMatchEulerDiscreteScheduler", {}),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),
}
"""Short name -> (diffusers class name, config overrides)."""

FLOW_SCHEDULERS = ("flow_sde", "flow_cps", "flow_euler")
"""Samplers of flow-matching models: the SDE steps with log-probs (Flow-GRPO's and its coefficients-preserving
variant) and the deterministic Euler ODE (for the forward-process estimators)."""


def _scheduler_class(name: str):
    import diffusers
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    class_name = SCHEDULERS[name][0] if name in SCHEDULERS else name
    cls = getattr(diffusers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        return None
    return cls


def is_known_scheduler(name: str) -> bool:
    """Whether ``name`` is a short name of :data:`SCHEDULERS` or a diffusers scheduler class."""
    return name in SCHEDULERS or (name[:1].isupper() and _scheduler_class(name) is not None)


def build_scheduler(name: str, config: dict[str, Any]):
    """The sampler ``name`` built from a pipeline's scheduler ``config`` (same betas and timestep spacing)."""
    cls = _scheduler_class(name) if is_known_scheduler(name) else None
    if cls is None:
        raise ValueError(
            f"sample.scheduler={name!r} is not a sampler: use one of {', '.join(SCHEDULERS)} or a diffusers scheduler "
            "class name (e.g. DPMSolverMultistepScheduler)"
        )
    overrides = SCHEDULERS[name][1] if name in SCHEDULERS else {}
    return cls.from_config(config, **overrides)
