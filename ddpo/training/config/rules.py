"""Value rules shared by the config and the command line (``ddpo sample`` / ``eval`` check ``--eta`` and
``--guidance`` with the same words): each says what is wrong with a value, naming its key."""

from __future__ import annotations

import math
import re

MAX_PROCESS_TIMEOUT_SECONDS = 365 * 24 * 3600
"""Largest ``process_timeout_seconds`` (a year); far larger values overflow Python's and torch's timeouts."""


def plain_folder_name(name: str) -> bool:
    """Whether ``name`` names one folder inside its parent (``run_name``): no separator, not ``.``/``..``, not
    blank, not absolute. Empty is allowed (``run_name``'s default: a timestamp)."""
    if name == "":
        return True
    return name.strip() != "" and name not in (".", "..") and not any(c in name for c in "/\\\0")


IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
"""The form of a reward given by import path: ``package.module:attribute``."""


def eta_problem(eta: float, scheduler: str, key: str = "sample.eta") -> str | None:
    """What is wrong with the sampler noise ``eta`` for ``scheduler`` (None: nothing), the rule of both ``ddpo train``
    and ``ddpo sample`` / ``eval`` (``key`` names the setting: ``--eta``). Finite, >= 0 and, except for the flow SDE
    sampler, <= 1: above 1 the DDIM variance exceeds what its step leaves room for (the images come out black), and
    CPS's noise ``sin(eta pi / 2)`` peaks at 1. A log-prob algorithm also needs eta > 0 (:func:`validate`)."""
    if not math.isfinite(eta):
        return f"{key} must be a finite number; got {eta}"
    if eta < 0:
        return f"{key} must be >= 0; got {eta}"
    if eta > 1 and scheduler == "flow_cps":
        return f"{key} must be <= 1 with the CPS sampler (its noise is sigma' sin(eta pi / 2)); got {eta}"
    if eta > 1 and not scheduler.startswith("flow"):
        return (
            f"{key} must be <= 1 (above 1 the DDIM variance exceeds 1 - alpha_bar_prev and the step's direction term "
            f"would be clamped to zero); got {eta}"
        )
    return None


def guidance_problem(scale: float, key: str = "sample.guidance_scale") -> str | None:
    """What is wrong with the classifier-free guidance scale ``scale`` (None: nothing), for ``ddpo train`` and
    ``ddpo sample`` / ``eval`` (``key``: ``--guidance``): a finite number >= 1 (1 disables CFG; diffusers also turns it
    off silently for any value below 1 and for NaN)."""
    if not math.isfinite(scale):
        return f"{key} must be a finite number; got {scale}"
    if scale < 1:
        return f"{key} must be >= 1 (1 disables CFG); got {scale}"
    return None
