"""What a person watching a run reads: the batch sizes at start, then one progress bar over epochs (or one plain line
per epoch when standard output is not a terminal), with an estimate of the time left from training epochs only."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from .config import RunConfig, train_steps_per_trajectory


def batch_sizes(config: RunConfig, num_processes: int) -> dict[str, int]:
    """Samples per epoch and (trajectory, timestep) pairs per optimiser step, per process and global."""
    s, t = config.sample, config.train
    samples = s.batch_size * s.num_batches_per_epoch
    pairs_per_epoch = samples * train_steps_per_trajectory(config) * t.num_inner_epochs
    pairs_per_step = t.batch_size * t.gradient_accumulation_steps
    return {
        "processes": num_processes,
        "samples_per_epoch_per_process": samples,
        "samples_per_epoch": samples * num_processes,
        "pairs_per_epoch_per_process": pairs_per_epoch,
        "pairs_per_step_per_process": pairs_per_step,
        "pairs_per_step": pairs_per_step * num_processes,
        "optimiser_steps_per_epoch": -(-pairs_per_epoch // pairs_per_step),
    }


def describe_batch_sizes(config: RunConfig, num_processes: int) -> str:
    """The lines printed at the start of a run (an estimator that owns its epoch describes its own minibatches)."""
    from .estimators import estimator_for

    b, s, t = batch_sizes(config, num_processes), config.sample, config.train
    plural = "es" if num_processes > 1 else ""
    samples = (
        f"ddpo: {num_processes} process{plural}; per epoch {b['samples_per_epoch']} samples "
        f"({b['samples_per_epoch_per_process']} per process = sample.batch_size {s.batch_size} x "
        f"sample.num_batches_per_epoch {s.num_batches_per_epoch})"
    )
    estimator = estimator_for(config)
    if estimator.owns_epoch:
        steps = (
            f"ddpo: train.algorithm={t.algorithm} runs its own epoch: {estimator.describe_minibatches(config)}; one "
            f"optimiser step every train.gradient_accumulation_steps {t.gradient_accumulation_steps} minibatches"
        )
    else:
        steps = (
            f"ddpo: per optimiser step {b['pairs_per_step']} (trajectory, timestep) pairs "
            f"({b['pairs_per_step_per_process']} per process = train.batch_size {t.batch_size} x "
            f"train.gradient_accumulation_steps {t.gradient_accumulation_steps}); "
            f"{b['pairs_per_epoch_per_process']} pairs and {b['optimiser_steps_per_epoch']} optimiser steps "
            "an epoch per process"
        )
    return "\n".join([samples, steps])


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class EpochProgress:
    """Progress over epochs ``start .. total``.

    ``interactive`` (default: standard output is a terminal): one tqdm bar whose postfix holds the phase (sampling,
    training, evaluation, checkpoint), the last epoch's reward and the time left; otherwise one plain line per epoch.
    The time left is the mean duration of the training epochs run so far times the epochs left: held-out
    evaluations (which run before the first epoch and every ``eval_every`` epochs) are not counted in it.
    """

    def __init__(
        self,
        start: int,
        total: int,
        enabled: bool = True,
        interactive: bool | None = None,
        stream: TextIO | None = None,
        clock=time.perf_counter,
    ):
        self.start, self.total, self.enabled = start, total, enabled
        self.stream = stream if stream is not None else sys.stdout
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.clock = clock
        self.done = start
        self.durations: list[float] = []
        self.current_phase = ""
        self.reward: float | None = None
        self._epoch_start: float | None = None
        self.bar = None
        if enabled and self.interactive:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total,
                initial=start,
                desc="epochs",
                file=self.stream,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
                dynamic_ncols=True,
            )

    def eta_seconds(self) -> float | None:
        """Mean training-epoch duration so far x epochs left (None before the first epoch has finished)."""
        if not self.durations:
            return None
        return sum(self.durations) / len(self.durations) * (self.total - self.done)

    def postfix(self) -> str:
        parts = [self.current_phase] if self.current_phase else []
        if self.reward is not None:
            parts.append(f"reward {self.reward:.4g}")
        eta = self.eta_seconds()
        parts.append(f"left ~{format_seconds(eta)}" if eta is not None else "left: after the first epoch")
        return ", " + ", ".join(parts)

    def phase(self, name: str) -> None:
        """Show the current phase (``sampling``, ``training``, ``evaluation``, ``checkpoint``)."""
        self.current_phase = name
        if self.bar is not None:
            self.bar.set_postfix_str(self.postfix().removeprefix(", "), refresh=True)

    def begin_epoch(self) -> None:
        self._epoch_start = self.clock()

    def end_epoch(self, epoch: int, metrics: dict[str, Any]) -> None:
        """Epoch ``epoch`` (0-based) has finished training: count its duration, show its reward."""
        if self._epoch_start is not None:
            self.durations.append(self.clock() - self._epoch_start)
        self._epoch_start = None
        self.done = epoch + 1
        self.reward = metrics.get("reward_mean")
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.phase("")
            return
        times = ", ".join(
            f"{key.removesuffix('_seconds')} {metrics[key]:.1f}"
            for key in ("sampling_seconds", "scoring_seconds", "training_seconds")
            if key in metrics
        )
        line = f"epoch {epoch + 1}/{self.total}: reward {metrics['reward_mean']:.4g} (std {metrics['reward_std']:.3g})"
        if "approx_kl" in metrics:
            line += f", approx kl {metrics['approx_kl']:.2g}"
        if self.durations:
            line += f"; {self.durations[-1]:.1f} s ({times})"
        eta = self.eta_seconds()
        if eta is not None and self.done < self.total:
            line += f"; left ~{format_seconds(eta)}"
        print(line, file=self.stream, flush=True)

    def message(self, text: str) -> None:
        """A line that does not break the bar (evaluations, resumes)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
