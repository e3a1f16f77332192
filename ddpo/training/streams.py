"""The registry of a run's random streams: every random draw of training and evaluation comes from a
``torch.Generator`` seeded :func:`derive_seed` ``(seed, STREAM, ...)``, one :class:`Stream` per purpose, so that
streams never overlap and a resumed run draws exactly what an uninterrupted one would.

The numbers are part of every run's results (changing one changes the runs): new streams take new numbers.
"""

from __future__ import annotations

from enum import IntEnum


class Stream(IntEnum):
    """The id of a random stream: the second value given to :func:`derive_seed`."""

    PROMPTS = 1
    """The prompts of a training batch (:func:`ddpo.training.prompts.draw_prompts`): ``(seed, 1, epoch, batch,
    process)``."""
    SAMPLING_NOISE = 2
    """Sampling noise of training batches (``x_T`` and every step's noise): ``(seed, 2, epoch, batch, process)``."""
    SHUFFLE = 3
    """The shuffled (trajectory, step) pairs of an inner epoch: ``(seed, 3, epoch, inner, process)``."""
    EVAL_PROMPTS = 4
    """The fixed order of the held-out prompt list (:func:`ddpo.training.evaluation.eval_prompt_list`): ``(0, 4)``,
    the same for every run."""
    EVAL_NOISE = 5
    """Sampling noise of held-out evaluation chunk ``k``: ``(0, 5, k)``, the same for every run and evaluation."""
    FORWARD_NOISE = 6
    """The re-noising of clean latents (forward-process and preference estimators; offline DPO also draws its
    minibatches' timesteps from it): ``(seed, 6, epoch, inner, process)``."""
    EVAL_IMAGE_NOISE = 7
    """The per-image noise of ``ddpo eval`` (:func:`ddpo.training.evaluation.image_noise_seed`): ``(seed, 7,
    crc32(prompt), repeat)``."""
    TRUNCATION = 8
    """AlignProp's number of back-propagated steps of a training batch: ``(seed, 8, epoch, batch)``, the same on every
    process."""
    REWARD_NOISE = 9
    """DRaFT-LV's re-noising of a training batch's clean samples (and its last step's noise): ``(seed, 9, epoch,
    batch, process)``."""
    PREFERENCE_ORDER = 10
    """The shuffled order of offline DPO's preference pairs in an epoch (:mod:`ddpo.training.estimators.preference`):
    ``(seed, 10, epoch)``, the same on every process (each takes its own share of each minibatch)."""


def _mix(*values: int) -> int:
    """Combine integers into one 63-bit seed (SplitMix64-style), so nearby seeds give unrelated streams."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        value = int(value)
        state = (state ^ (value + 0x9E3779B97F4A7C15 + (state << 6) + (state >> 2))) & 0xFFFFFFFFFFFFFFFF
        state = (state * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 31
    return state & 0x7FFFFFFFFFFFFFFF


def derive_seed(*values: int) -> int:
    """A seed for one stream of the run, e.g. ``derive_seed(seed, Stream.SAMPLING_NOISE, epoch, batch, process)``."""
    return _mix(*values)
