"""Scoring sampled images: one checked reward call (:func:`checked_score`), and the rewards, reward info and timings
of an epoch's batches put together (:func:`combine_scores`)."""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import NamedTuple

import torch

from rewards import RewardError, accepts_metadata, check_reward_output

from .killpoints import kill_point


class Scored(NamedTuple):
    """One batch's checked scores."""

    values: torch.Tensor
    """``float32 [B]`` on the device."""
    info: dict[str, float]
    """The reward's :meth:`~rewards.Reward.last_info`."""
    seconds: float
    """The reward call's wall time."""
    components: dict[str, torch.Tensor] | None = None
    """A ``weighted`` reward's per-sample component values ``{name: float32 [B]}`` on the device, when asked for
    (``train.advantage=per_component``), else None."""


def checked_score(
    reward,
    images: torch.Tensor,
    prompts: list[str],
    device: torch.device,
    where: str = "",
    metadata: list | None = None,
    components: bool = False,
) -> Scored:
    """The checked reward of ``images`` ``[B, 3, H, W]``: ``(values [B] on ``device``, reward info, seconds)``.

    A reward that raises, or returns NaN, the wrong shape or dtype, ends in one :class:`rewards.RewardError` naming
    the reward, the batch (``where``: e.g. ``"epoch 3, samples 8-11 of process 0"``) and, for bad values, the sample
    indices; the reward's own exception is chained (``--debug`` prints it). ``metadata`` (one dict a sample, from a
    prompt table's other columns) goes to a reward that takes the keyword. ``components``: also return a ``weighted``
    reward's per-sample component values (:meth:`rewards.WeightedReward.last_components`), read in the same call so a
    scoring thread cannot mix batches."""
    start = time.perf_counter()
    with torch.no_grad():
        values = checked_reward_call(reward, images, prompts, where, metadata)
    parts = None
    if components:
        parts = {name: part.to(device) for name, part in reward.last_components().items()}
    kill_point("score")
    return Scored(values.detach().to(device), dict(reward.last_info()), time.perf_counter() - start, parts)


def checked_reward_call(
    reward, images: torch.Tensor, prompts: list[str], where: str = "", metadata: list | None = None
) -> torch.Tensor:
    """``reward(images, prompts[, metadata])`` -> values ``[B]`` float32, checked as :func:`checked_score` checks
    them, in the caller's gradient mode: under ``torch.enable_grad()`` a differentiable reward's values carry the
    gradient w.r.t. ``images`` (reward backpropagation)."""
    context = f" ({where})" if where else ""
    try:
        if metadata is not None and accepts_metadata(reward):
            values = reward(images, prompts, metadata=metadata)
        else:
            values = reward(images, prompts)
    except Exception as err:
        raise RewardError(
            f"reward {reward.name!r} raised {type(err).__name__}: {err}{context}. The error is in the reward's own "
            "code; run with --debug (or DDPO_DEBUG=1) for its traceback"
        ) from err
    try:
        return check_reward_output(values, len(prompts), reward.name)
    except RewardError as err:
        raise RewardError(f"{err}{context}") from None


def combine_scores(
    pending: list[Future | Scored], overlap: bool, sampling_seconds: float
) -> tuple[torch.Tensor, dict[str, float], dict[str, float], dict[str, torch.Tensor] | None]:
    """The epoch's ``(rewards, reward info, timings, components)`` from its batches' scores (``pending``: results, or
    futures of the worker thread when ``overlap``), waited for now. ``sampling_seconds`` is the time of the sampling
    loop; inline scoring's own seconds are taken out of it, and ``scoring_seconds`` is then their sum; with ``overlap``
    it is the time spent waiting after sampling ended. The reward info is the mean over batches; ``components`` the
    batches' per-sample component values put together (``{name: [B]}``), or None when they were not asked for."""
    wait_start = time.perf_counter()
    results = [item.result() if isinstance(item, Future) else item for item in pending]
    scoring_seconds = time.perf_counter() - wait_start
    if not overlap:
        scoring_seconds = sum(result.seconds for result in results)
        sampling_seconds -= scoring_seconds
    rewards = torch.cat([result.values for result in results])
    infos = [result.info for result in results]
    reward_info = {k: sum(i[k] for i in infos) / len(infos) for k in infos[0]} if infos and infos[0] else {}
    reward_info["reward_compute_seconds"] = sum(result.seconds for result in results)
    timings = {"sampling_seconds": sampling_seconds, "scoring_seconds": scoring_seconds}
    return rewards, reward_info, timings, concat_components(results)


def concat_components(results: list[Scored]) -> dict[str, torch.Tensor] | None:
    """The batches' per-sample component values put together, ``{name: [sum of B]}``, or None when the batches
    were scored without them."""
    if not results or results[0].components is None:
        return None
    return {name: torch.cat([result.components[name] for result in results]) for name in results[0].components}


def guard_scores(guards: dict, images: torch.Tensor, prompts: list[str], device: torch.device, where: str = "") -> dict:
    """The held-out means of the guard rewards (``eval_rewards``) on ``images``: ``{"guard/<name>_mean": float}``, each
    reward checked as the training reward is (:func:`checked_score`). A set measure (``clip_diversity``) sees the
    images of this call, one chunk of the evaluation."""
    out = {}
    for name, guard in guards.items():
        values = checked_score(guard, images, prompts, device, f"guard {name}, {where}").values
        out[f"guard/{name.split(':')[-1]}_mean"] = values.float().mean().item()
    return out
