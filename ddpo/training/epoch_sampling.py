"""An epoch's samples: this process's prompt draws and noise seeds (:func:`epoch_batches`), one sampling batch after
another, each scored inline or in the worker thread while the next one samples (:func:`sample_epoch`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager

import torch

from ..policy.sampling import CleanSamples, Trajectories
from .config import RunConfig
from .estimators import PromptBatch
from .killpoints import kill_point
from .prompts import draw_prompts
from .scoring import combine_scores
from .streams import Stream, derive_seed


def epoch_batches(config: RunConfig, epoch: int, process_index: int, prompts: list[str]) -> list[PromptBatch]:
    """This process's ``sample.num_batches_per_epoch`` batches of ``epoch``: batch ``b`` draws its prompts from
    ``prompts`` (:func:`~ddpo.training.prompts.draw_prompts`) and its noise seed from the stream ``(seed,
    SAMPLING_NOISE, epoch, b, process_index)``."""
    c, s = config, config.sample
    batches = []
    for b in range(s.num_batches_per_epoch):
        batch_prompts = draw_prompts(prompts, s.batch_size, s.samples_per_prompt, c.seed, epoch, b, process_index)
        seed = derive_seed(c.seed, Stream.SAMPLING_NOISE, epoch, b, process_index)
        first = b * s.batch_size
        where = f"epoch {epoch}, batch {b}: samples {first}-{first + s.batch_size - 1} of process {process_index}"
        batches.append(PromptBatch(b, batch_prompts, seed, where))
    return batches


def sample_epoch(
    config: RunConfig,
    epoch: int,
    process_index: int,
    prompts: list[str],
    sample: Callable[[list[str], int], Trajectories | CleanSamples],
    score: Callable,
    sampling_weights: Callable[[], AbstractContextManager],
    executor: ThreadPoolExecutor | None,
) -> tuple[Trajectories | CleanSamples, torch.Tensor, dict[str, float], dict[str, float], dict | None]:
    """Sample and score this process's ``sample.num_batches_per_epoch`` batches of ``epoch``: ``(samples, rewards [B],
    reward info, timings, components)`` (``components``: a ``weighted`` reward's per-sample component values
    ``{name: [B]}`` when ``score`` returns them, else None).

    Batch ``b`` draws its prompts and its noise seed as :func:`epoch_batches` says; ``sample(batch prompts, seed)`` samples it under
    ``sampling_weights()`` (the estimator's: DiffusionNFT samples with its old policy) and ``score(images, prompts,
    where)`` scores it, in ``executor`` while the next batch samples when one is given (``scoring_seconds`` is then
    only the wait after sampling ended), else inline."""
    batches: list[Trajectories | CleanSamples] = []
    pending: list[Future | tuple] = []
    sampling_start = time.perf_counter()
    for batch in epoch_batches(config, epoch, process_index, prompts):
        with sampling_weights():
            samples = sample(batch.prompts, batch.noise_seed)
        batches.append(samples)
        kill_point("sample")
        if executor is not None:
            pending.append(executor.submit(score, samples.images, batch.prompts, batch.where))
        else:
            pending.append(score(samples.images, batch.prompts, batch.where))
    sampling_seconds = time.perf_counter() - sampling_start
    rewards, reward_info, timings, components = combine_scores(pending, executor is not None, sampling_seconds)
    return type(batches[0]).cat(batches), rewards, reward_info, timings, components
