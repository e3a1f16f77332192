"""The held-out evaluation of a training run: the fixed ``eval_prompts`` sampled and scored in chunks
(:func:`evaluate_chunks`), and the metrics written to ``eval.jsonl`` (:func:`eval_metrics`).

The prompts and the noise of chunk ``k`` (``sample.batch_size`` images) depend only on ``k``, never on the run's seed,
the epoch or the number of processes (chunk ``k`` runs on process ``k % num_processes``): every evaluation of every
run over the same ``eval_prompts``/``eval_samples`` sees the same inputs, so differences are the policy's. It touches
no random stream of training, so resumed runs stay exact. (An online reward such as the discriminator changes between
evaluations; its numbers are then not paired.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from .reporting import write_eval
from .scoring import guard_scores
from .streams import Stream, derive_seed

ChunkResult = tuple[int, list[float], dict[str, float]]
"""``(chunk index, rewards of its images, reward info)``."""


def evaluate_chunks(
    accelerator: Accelerator, prompts: list[str], batch_size: int, sample: Callable, score: Callable
) -> tuple[list[list[str]], list[ChunkResult], torch.Tensor | None]:
    """Sample and score ``prompts`` in chunks of ``batch_size``: chunk ``k`` on process ``k % num_processes``, with
    ``sample(prompts, seed)`` (the noise seed ``derive_seed(0, Stream.EVAL_NOISE, k)``, never the run's seed, epoch or
    process count) and ``score(images, prompts, where)``. Returns the chunks, every process's results sorted by chunk,
    and chunk 0's images on the process that sampled them (else None).

    Under sharding (FSDP2) each call of the denoiser gathers its weights from every process, so every process must
    call it as often as the others: a process left one chunk short samples the last chunk once more and discards it
    (the evaluated set and its results are those of an unsharded run)."""
    acc = accelerator
    chunks = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    mine = range(acc.process_index, len(chunks), acc.num_processes)
    results, first_images = [], None
    for k in mine:
        trajectories = sample(chunks[k], derive_seed(0, Stream.EVAL_NOISE, k))
        values, info = score(trajectories.images, chunks[k], f"held-out evaluation, chunk {k}")[:2]
        results.append((k, values.cpu().tolist(), info))
        if k == 0:
            first_images = trajectories.images
    rounds = -(-len(chunks) // acc.num_processes)
    if acc.is_fsdp2 and len(mine) < rounds:  # in step with the processes that sample one more chunk
        sample(chunks[-1], derive_seed(0, Stream.EVAL_NOISE, len(chunks) - 1))
    if acc.num_processes > 1:
        results = gather_object(results)
    results.sort(key=lambda item: item[0])
    return chunks, results, first_images


def eval_metrics(epochs_done: int, results: list[ChunkResult]) -> tuple[dict[str, Any], torch.Tensor]:
    """The evaluation's metrics (epoch, samples, reward mean and std, the reward info averaged over images) and its
    per-image rewards (float64, in evaluation order)."""
    rewards = torch.tensor([v for _, values, _ in results for v in values], dtype=torch.float64)
    metrics: dict[str, Any] = {
        "epoch": epochs_done,
        "samples": len(rewards),
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std(unbiased=False).item(),
    }
    infos = [(len(values), info) for _, values, info in results if info]
    for key in infos[0][1] if infos else []:
        metrics[key] = sum(n * info[key] for n, info in infos) / sum(n for n, _ in infos)
    return metrics, rewards


def run_evaluation(
    accelerator: Accelerator,
    run_dir,
    prompts: list[str],
    batch_size: int,
    epochs_done: int,
    sample: Callable,
    score: Callable,
    guards: dict,
    kl_values: list[float],
) -> dict[str, Any]:
    """One held-out evaluation after ``epochs_done`` epochs: :func:`evaluate_chunks` with ``score`` plus the guards'
    means (``guard/<name>_mean``), the mean of ``kl_values`` (the training KL to the base since the previous
    evaluation) as ``kl_to_base``, logged to the trackers and written to ``eval.jsonl`` with its first chunk's grid.
    Returns the metrics (with ``rewards``, per image in evaluation order: later evaluations pair with them)."""
    acc, start = accelerator, time.perf_counter()

    def score_with_guards(images: torch.Tensor, chunk: list[str], where: str):
        values, info, seconds = score(images, chunk, where)[:3]
        return values, {**info, **guard_scores(guards, images, chunk, acc.device, where)}, seconds

    chunks, results, first_images = evaluate_chunks(acc, prompts, batch_size, sample, score_with_guards)
    metrics, rewards = eval_metrics(epochs_done, results)
    if kl_values:
        metrics["kl_to_base"] = sum(kl_values) / len(kl_values)
    metrics["eval_seconds"] = time.perf_counter() - start
    acc.log({f"eval/{k}": v for k, v in metrics.items() if k != "epoch"}, step=epochs_done)
    metrics["rewards"] = rewards.tolist()
    if acc.is_main_process:
        write_eval(run_dir, acc.trackers, metrics, first_images, chunks[0], results[0][1])
    return metrics
