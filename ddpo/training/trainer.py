"""The epoch loop: sample -> score -> advantages -> estimator loss -> optimiser step -> log -> evaluate -> checkpoint.

The trainer only orchestrates. The maths lives in :mod:`ddpo.policy` (sampling, pairs, advantages, losses) and in the
run's :class:`~ddpo.training.estimators.Estimator`; what it trains is built by :func:`~ddpo.training.setup.build_models`;
checkpoints are written and read by :mod:`~ddpo.training.checkpoint_state`; the run's random streams are named in
:mod:`~ddpo.training.streams`. Device placement, mixed precision, gradient accumulation and multi-process gathering go
through ``accelerate``.

Reproducibility: every random stream (prompt draws, sampling noise, minibatch shuffles) is derived from
``(seed, stream, epoch, batch or inner epoch, process)``, and a checkpoint holds the trained weights, the optimiser,
the per-prompt advantage statistics, the reward's state and the RNG states, so a resumed run repeats an
uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object, set_seed

from ..models import absent_components
from ..policy.advantages import COMPONENT_SCHEMES, build_advantage, clip_advantages
from ..policy.sampling import CleanSamples, Trajectories, sample_clean, sample_trajectories
from . import checkpoint_state, heldout, rundir
from .checkpoint import read_json, weights_sha256
from .checkpoint_state import TrainingSnapshot
from .config import RunConfig, train_steps_per_trajectory
from .epoch_sampling import epoch_batches, sample_epoch
from .estimators import EpochRun, Estimator
from .guards import StopRules
from .killpoints import kill_point
from .model_card import write_model_card
from .optimise import MinibatchSteps, optimise_epoch, shuffled_pairs
from .processes import (
    TrainingError,
    check_shared_run_dir,
    collective_failure,
    interrupted_message,
    lost_process_message,
    overlap_scoring,
)
from .progress import EpochProgress, describe_batch_sizes
from .reporting import layout_line, run_summary, write_epoch
from .run_inputs import load_run_inputs
from .runlog import read_jsonl
from .scoring import checked_reward_call, checked_score
from .setup import build_models, make_accelerator
from .sharding import shard_metrics

# Importable from here as before (the CLI and tests import them from the trainer).
__all__ = ["Trainer", "TrainingError", "TrainingSnapshot", "interrupted_message", "new_run_dir", "overlap_scoring"]
__all__ += ["resume", "train", "weights_sha256"]


def new_run_dir(config: RunConfig) -> Path:
    name = config.run_name or time.strftime("%Y%m%d-%H%M%S")
    return Path(config.output_dir) / name


class Trainer:
    """Fine-tunes the denoiser (UNet or transformer) of any model family (:mod:`ddpo.models.family`) with DDPO / RWR /
    Flow-GRPO or the forward-process estimators. Use :meth:`from_config` or :meth:`resume`, then :meth:`run`."""

    def __init__(self, config: RunConfig, run_dir: Path, resume_checkpoint: Path | None = None):
        self.config, self.run_dir = config, Path(run_dir)
        c, s, t = config, config.sample, config.train
        self.accelerator = acc = make_accelerator(c, self.run_dir)
        set_seed(c.seed, device_specific=True)
        # Everything that can fail on user input fails here, before a model is loaded.
        check_shared_run_dir(acc, self.run_dir)  # several machines write one run directory
        if resume_checkpoint is not None:  # resumed by the launch that wrote it (processes, sharding)
            checkpoint_state.check_launch(resume_checkpoint, read_json(resume_checkpoint / "state.json"), acc)
        inputs = load_run_inputs(c, acc.num_processes, acc.is_main_process)
        self.prompts, self.eval_prompts, self.reward = inputs.prompts, inputs.eval_prompts, inputs.reward
        self.prompt_metadata, self.guards = inputs.prompt_metadata, inputs.guards
        # Rules over the held-out evaluations: early stops and the best evaluation (final_checkpoint=best).
        self.stop_rules = StopRules(
            c.stop.guard_drop, c.stop.kl_limit, c.stop.patience, c.best_metric, c.stop.min_delta
        )
        built = build_models(c, acc, inputs.estimator_inputs)
        self.pipe, self.family, self.scheduler = built.pipe, built.family, built.pipe.scheduler
        self.latent_size, self.vae_factor = built.latent_size, built.family.vae_scale_factor()
        self.settings, self.policy = built.settings, built.policy
        self.denoiser, self.optimizer = built.denoiser, built.optimizer  # the UNet or the transformer, prepared
        self.reference_denoiser = built.reference_denoiser
        self.params, self.trainable_names = built.params, built.trainable_names
        # per_component normalises each part of a weighted reward on its own: scoring then keeps the parts too.
        self.by_component = t.advantage in COMPONENT_SCHEMES
        weights = self.reward.weights if self.by_component else None
        self.advantage = build_advantage(t.advantage, t.per_prompt_buffer_size, t.per_prompt_min_count, weights)
        self.reward_components: dict[str, torch.Tensor] | None = None
        # A stateful advantage scheme (per-prompt statistics) is saved in checkpoints.
        self.advantage_state = self.advantage if hasattr(self.advantage, "state_dict") else None
        self.negative_cond = built.negative_cond  # the negative prompt's conditioning for CFG, or None
        self.start_epoch, self.global_step = 0, 0
        self.progress: EpochProgress | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.steps_per_trajectory = train_steps_per_trajectory(c)
        # The run's estimator: its loss, its extra state (an old policy) and its per-epoch hooks.
        self.estimator: Estimator = built.estimator_class(self.policy)
        self.samples_per_epoch = self.estimator.samples_per_epoch(
            s.batch_size * s.num_batches_per_epoch * acc.num_processes
        )
        if resume_checkpoint is not None:
            self._load_checkpoint(resume_checkpoint)
        self._write_run_files()

    # ------------------------------------------------------------------ construction helpers

    @classmethod
    def from_config(cls, config: RunConfig, run_dir: Path | None = None) -> Trainer:
        run_dir = Path(run_dir) if run_dir is not None else new_run_dir(config)
        rundir.check_new_run(run_dir)
        return cls(config, run_dir)

    @classmethod
    def resume(cls, run_dir: Path, overrides: list[str] | None = None) -> Trainer:
        run_dir = Path(run_dir)
        config = rundir.resume_config(run_dir, overrides or [])  # fails on a bad run directory before a model loads
        return cls(config, run_dir, resume_checkpoint=checkpoint_state.resume_point(run_dir))

    def _write_run_files(self) -> None:
        if self.accelerator.is_main_process:
            rundir.write_run_files(self.run_dir, self.config, self.start_epoch)
        self.accelerator.wait_for_everyone()
        self.accelerator.init_trackers("tensorboard")  # TensorBoard writes under RUN_DIR/tensorboard

    # ------------------------------------------------------------------ the loop

    def run(self) -> Path:
        """Train from ``start_epoch`` to ``config.num_epochs``; write the final checkpoint and ``final/``."""
        c, acc = self.config, self.accelerator
        if acc.is_main_process:
            print(f"ddpo: run directory {self.run_dir.resolve()}", flush=True)
            print(describe_batch_sizes(c, acc.num_processes), flush=True)
            print(self.layout(), flush=True)
        # One bar over epochs (one plain line per epoch when stdout is not a terminal); its time left counts
        # training epochs only, evaluations are a phase of their own.
        self.progress = EpochProgress(self.start_epoch, c.num_epochs, enabled=acc.is_local_main_process)
        try:
            with self.scoring_executor():
                if self.stop_rules.stopped:  # resumed after an early stop, with the same rules
                    self._say(f"ddpo: this run stopped early ({self.stop_rules.stopped}); change stop.* to go on")
                elif self.eval_prompts and self.start_epoch == 0:
                    self.judge(self.evaluate(0))
                for epoch in range(self.start_epoch, 0 if self.stop_rules.stopped else c.num_epochs):
                    self.progress.begin_epoch()
                    metrics = self.run_epoch(epoch)
                    self.progress.end_epoch(epoch, metrics)
                    stop = self.eval_prompts and self._eval_due(epoch + 1) and self.judge(self.evaluate(epoch + 1))
                    if stop or (epoch + 1) % c.save_every == 0 or epoch + 1 == c.num_epochs:
                        self._phase("checkpoint")
                        self.save_checkpoint(epoch + 1)
                        self._phase("")
                    if stop:
                        self._say(f"ddpo: {stop}")
                        break
            self.progress.close()
            self.progress = None
            self.save_final()
            kill_point("run_end")
            acc.end_training()
            if acc.is_main_process:
                print(self.summary(), flush=True)
        except RuntimeError as err:
            if acc.num_processes > 1 and collective_failure(err):
                raise TrainingError(lost_process_message(err, acc.num_processes, c, self.run_dir)) from err
            raise
        return self.run_dir

    def overlaps_scoring(self) -> bool:
        """Whether this run scores in the worker thread (:func:`overlap_scoring` of its config, device and reward)."""
        io_bound = bool(getattr(self.reward, "io_bound", False))
        return overlap_scoring(self.config.overlap_scoring, self.accelerator.device, io_bound)

    def layout(self) -> str:
        """The start-up line on where the processes run (:func:`~ddpo.training.reporting.layout_line`)."""
        size = self.latent_size * self.vae_factor
        return layout_line(self.accelerator, size, self.overlaps_scoring(), self.config.overlap_scoring)

    @contextlib.contextmanager
    def scoring_executor(self) -> Iterator[ThreadPoolExecutor]:
        """The worker thread that scores rewards while the next batch samples (where :meth:`overlaps_scoring`), open
        while the context is: :meth:`run` trains in one; a caller of :meth:`sample_and_score` opens its own."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward") as executor:
            previous, self._executor = self._executor, executor
            try:
                yield executor
            finally:
                self._executor = previous

    def _phase(self, name: str) -> None:
        if self.progress is not None:
            self.progress.phase(name)

    def _say(self, text: str) -> None:
        """A line for the person watching (through the progress bar when there is one); main process only."""
        if self.progress is not None:
            self.progress.message(text)
        elif self.accelerator.is_main_process:
            print(text, flush=True)

    def summary(self) -> str:
        """A few lines for the end of a run (:func:`~ddpo.training.reporting.run_summary`)."""
        return run_summary(self.run_dir, self.config, self.reward.name, self.family.name, self.pipe)

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """One epoch, the trainer's (:meth:`sampled_epoch`) or the estimator's own (:meth:`owned_epoch`); returns (and
        logs) its metrics."""
        start = time.perf_counter()
        epoch_of = self.owned_epoch if self.estimator.owns_epoch else self.sampled_epoch
        logged, rewards, all_rewards, train_info, reward_info, timings = epoch_of(epoch)
        metrics = {
            "epoch": epoch,
            "global_step": self.global_step,
            "samples": (epoch + 1) * self.samples_per_epoch,
            "reward_mean": all_rewards.mean().item(),
            "reward_std": all_rewards.std(unbiased=False).item(),
            **train_info,
            **reward_info,
            **timings,
            "epoch_seconds": time.perf_counter() - start,
        }
        if "kl" in train_info:  # the KL to the base model that train.kl_coef weighs (stop.kl_limit reads it)
            self.stop_rules.note_kl(train_info["kl"])
        acc = self.accelerator
        if acc.num_processes > 1:
            # DDP keeps the copies identical; this proves it, every epoch, in metrics.jsonl (sharded: one hash).
            metrics["weights_sha256"] = checkpoint_state.weights_hashes(acc, self.denoiser, self.trainable_names)
            if acc.is_fsdp2:  # what each process holds of the denoiser, measured
                metrics.update(shard_metrics(acc, acc.unwrap_model(self.denoiser)))
        self.log(epoch, metrics, logged, rewards)
        return metrics

    def sampled_epoch(self, epoch: int) -> tuple[Any, torch.Tensor, torch.Tensor, dict, dict, dict]:
        """The trainer's epoch: sample and score, advantages, the estimator's (sample, step) minibatches. Returns
        ``(samples, this process's rewards [B], every process's rewards, train info, reward info, timings)``."""
        samples, rewards, reward_info, timings = self.sample_and_score(epoch)
        all_rewards, all_prompts = self.gather(rewards, samples.prompts)
        all_components = self.gather_components(self.reward_components)
        weights = self.compute_weights(all_rewards, all_prompts, all_components)
        if self.by_component:  # what each component contributed to the advantages
            reward_info.update(self.advantage.last_info())
        reward_info.update(self.learn_reward(samples.images, all_prompts))
        train_start = time.perf_counter()
        train_info = self.optimise(epoch, samples, weights)
        train_info.update(self.estimator.end_epoch(self.global_step))
        timings["training_seconds"] = time.perf_counter() - train_start
        return samples, rewards, all_rewards, train_info, reward_info, timings

    def owned_epoch(self, epoch: int) -> tuple[Any, torch.Tensor, torch.Tensor, dict, dict, dict]:
        """The epoch of an estimator that owns it (:meth:`Estimator.train_epoch` on :meth:`epoch_run`), returned as
        :meth:`sampled_epoch` returns its own (the :class:`~ddpo.training.estimators.EpochResult` as the samples)."""
        self._phase("training")
        steps = MinibatchSteps(
            self.config, self.accelerator, self.denoiser, self.params, self.optimizer, epoch, self.global_step,
            self.run_dir,
        )  # fmt: skip
        train_start = time.perf_counter()
        result = self.estimator.train_epoch(self.epoch_run(epoch, steps))
        self.global_step = steps.global_step
        train_info = steps.diagnostics(result.extra)
        train_info.update(self.estimator.end_epoch(self.global_step))
        timings = {**result.timings, "training_seconds": time.perf_counter() - train_start}
        all_rewards, all_prompts = self.gather(result.rewards, result.prompts)
        reward_info = {**result.reward_info, **self.learn_reward(result.images, all_prompts)}
        return result, result.rewards, all_rewards, train_info, reward_info, timings

    def epoch_run(self, epoch: int, steps: MinibatchSteps) -> EpochRun:
        """What an estimator that owns its epoch works with (:class:`~ddpo.training.estimators.EpochRun`): this
        process's prompt batches and noise seeds of ``epoch``, the reward with and without gradient, ``steps.step``."""
        acc = self.accelerator
        return EpochRun(
            epoch=epoch,
            batches=epoch_batches(self.config, epoch, acc.process_index, self.prompts),
            encode=lambda prompts: self.family.encode(prompts, acc.device, self.latent_size),
            negative_cond=self.negative_cond,
            vae=self.pipe.vae,
            score=self.score,
            reward=self.differentiable_reward,
            step=steps.step,
            sample_and_score=lambda: self.sample_and_score(epoch),
        )

    def learn_reward(self, images: torch.Tensor, all_prompts: list[str]) -> dict[str, float]:
        """An online reward (the discriminator) learns from every process's ``images``, so its copies stay identical;
        returns its info (:meth:`rewards.Reward.update`)."""
        all_images = images if self.accelerator.num_processes == 1 else self.accelerator.gather(images)
        return self.reward.update(all_images, all_prompts)

    # ------------------------------------------------------------------ held-out evaluation

    def _eval_due(self, epochs_done: int) -> bool:
        every = self.config.eval_every
        return epochs_done == self.config.num_epochs or (every > 0 and epochs_done % every == 0)

    def evaluate(self, epochs_done: int) -> dict[str, Any]:
        """Sample and score the fixed held-out set (``eval_prompts``) with the current weights, and the guards
        (``eval_rewards``); log to ``eval.jsonl``. Its inputs are the same in every evaluation of every run
        (:func:`~ddpo.training.heldout.run_evaluation`)."""
        c, acc = self.config, self.accelerator
        self._phase("evaluation")
        self.denoiser.eval()
        denoiser = acc.unwrap_model(self.denoiser)
        metrics = heldout.run_evaluation(
            acc, self.run_dir, self.eval_prompts, c.sample.batch_size, epochs_done,
            lambda p, seed: self.sample(denoiser, p, seed), self.score, self.guards, self.stop_rules.take_kl(),
        )  # fmt: skip
        self._say(
            f"ddpo: held-out evaluation after {epochs_done} epochs ({metrics['samples']} images of {c.eval_prompts}): "
            f"reward {metrics['reward_mean']:.4g} ({metrics['eval_seconds']:.1f} s)"
        )
        self._phase("")
        return metrics

    def judge(self, metrics: dict[str, Any]) -> str | None:
        """Apply the rules to an evaluation's metrics (:class:`~ddpo.training.guards.StopRules`): export ``best/`` when
        it is the best so far and ``final_checkpoint=best``; return why the run must stop, or None."""
        try:
            stop = self.stop_rules.observe(metrics)
        except KeyError as err:
            raise TrainingError(f"{err.args[0]}; set best_metric to one of them") from None
        if self.config.final_checkpoint == "best" and self.stop_rules.best_epoch == metrics["epoch"]:
            self._phase("checkpoint")
            self._export("best")
            self._phase("")
        return stop

    def read_evals(self) -> list[dict[str, Any]]:
        """The held-out evaluations written so far (``eval.jsonl``), oldest first."""
        return read_jsonl(self.run_dir / "eval.jsonl")

    # ------------------------------------------------------------------ phases

    def sample_and_score(
        self, epoch: int, decode: Callable | None = None
    ) -> tuple[Trajectories, torch.Tensor, dict[str, float], dict[str, float]]:
        """Sample this process's trajectories for ``epoch`` and score them: ``(samples, rewards [B], reward info,
        timings)``; with ``train.advantage=per_component`` :attr:`reward_components` then holds the weighted reward's
        per-sample component values (``{name: [B]}``, this process). ``decode`` replaces the sampler's VAE decoding (:func:`ddpo.policy.sampling.decode_latents`,
        called the same way), e.g. to time it.

        With ``overlap_scoring`` (where :func:`overlap_scoring` allows it) and inside :meth:`scoring_executor` the
        reward of batch k runs in a worker thread while batch k+1 is sampled; ``scoring_seconds`` is then only the time
        spent waiting for the reward after sampling ended. Otherwise each batch is scored inline (the same rewards).
        """
        acc, share = self.accelerator, self.config.sample.share_initial_noise
        self.denoiser.eval()
        denoiser = acc.unwrap_model(self.denoiser)  # sampling needs no DDP gradient sync
        executor = self._executor if self.overlaps_scoring() else None
        self._phase("sampling")
        *scored, self.reward_components = sample_epoch(
            self.config, epoch, acc.process_index, self.prompts,
            lambda prompts, seed: self.sample(denoiser, prompts, seed, share_initial_noise=share, decode=decode),
            self.score, self.estimator.sampling_weights, executor,
        )  # fmt: skip
        return tuple(scored)

    def sample(
        self,
        denoiser,
        prompts: list[str],
        seed: int,
        share_initial_noise: bool = False,
        decode: Callable | None = None,
    ) -> Trajectories | CleanSamples:
        """Trajectories of ``prompts`` with the run's sampler settings, the noise drawn from a generator seeded ``seed``
        (``share_initial_noise``: one ``x_T`` per group of consecutive equal prompts, for training batches). An
        estimator without log-probs gets :class:`~ddpo.policy.sampling.CleanSamples` from any sampler instead.
        ``denoiser``: the (unwrapped) model to sample from; ``decode``: as in :meth:`sample_and_score`."""
        device = self.accelerator.device
        embeds = self.family.encode(prompts, device, self.latent_size)
        settings = dataclasses.replace(self.settings, share_initial_noise=share_initial_noise)
        generator = torch.Generator(device=device).manual_seed(seed)
        sample = sample_trajectories if self.estimator.uses_log_probs else sample_clean
        bound = self.family.bind(denoiser, settings.guidance_scale)
        return sample(
            bound, self.pipe.vae, self.scheduler, embeds, self.negative_cond, prompts, generator, settings, decode
        )

    def score(
        self, images: torch.Tensor, prompts: list[str], where: str = ""
    ) -> tuple[torch.Tensor, dict[str, float], float]:
        """The checked reward of ``images`` ``[B, 3, H, W]``: ``(values [B] on the device, reward info, seconds,
        components)`` (:func:`~ddpo.training.scoring.checked_score`; ``where`` names the batch in an error; the
        weighted reward's per-sample components with ``train.advantage=per_component``, else None)."""
        device = self.accelerator.device
        return checked_score(self.reward, images, prompts, device, where, self.metadata(prompts), self.by_component)

    def differentiable_reward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The checked reward of ``images`` ``[B, 3, H, W]`` in the caller's gradient mode: ``[B]`` float32 on the
        device, differentiable w.r.t. the images for a differentiable reward
        (:func:`~ddpo.training.scoring.checked_reward_call`)."""
        values = checked_reward_call(self.reward, images, prompts, metadata=self.metadata(prompts))
        return values.to(self.accelerator.device)

    def metadata(self, prompts: list[str]) -> list[dict] | None:
        """The prompts' rows of the prompt tables' other columns (for a reward that takes ``metadata``), or None."""
        return [self.prompt_metadata.get(p, {}) for p in prompts] if self.prompt_metadata else None

    def gather(self, rewards: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, list[str]]:
        """Rewards and prompts of every process, in process order."""
        if self.accelerator.num_processes == 1:
            return rewards, prompts
        return self.accelerator.gather(rewards), gather_object(prompts)

    def gather_components(self, components: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        """Every process's per-sample component values (:attr:`reward_components`), in process order, or None."""
        if components is None or self.accelerator.num_processes == 1:
            return components
        return {name: self.accelerator.gather(values) for name, values in components.items()}

    def compute_weights(
        self, all_rewards: torch.Tensor, all_prompts: list[str], all_components: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Per-trajectory weights of this process's samples: the estimator's weights of the clipped advantages
        (the advantages themselves for DDPO, RWR's weights for RWR) or of the rewards (online DPO's pairs).
        ``all_components``: every process's per-sample component values of a weighted reward, which
        ``train.advantage=per_component`` needs."""
        t, acc = self.config.train, self.accelerator
        if self.by_component:
            advantages = self.advantage(all_rewards, all_prompts, components=all_components)
        else:
            advantages = self.advantage(all_rewards, all_prompts)
        advantages = clip_advantages(advantages, t.adv_clip_max)
        weights = self.estimator.epoch_weights(all_rewards, all_prompts, advantages)
        return weights.reshape(acc.num_processes, -1)[acc.process_index].to(acc.device)

    def optimise(self, epoch: int, samples: Trajectories | CleanSamples, weights: torch.Tensor) -> dict[str, float]:
        """Inner epochs over shuffled (trajectory, timestep) minibatches of the estimator's loss
        (:func:`~ddpo.training.optimise.optimise_epoch`); returns the epoch's mean diagnostics."""
        self._phase("training")
        info, self.global_step = optimise_epoch(
            self.config, self.accelerator, self.estimator, self.denoiser, self.params, self.optimizer, epoch, samples,
            weights, lambda inner, n: self.training_pairs(epoch, inner, n), self.global_step, self.run_dir,
        )  # fmt: skip
        return info

    def training_pairs(self, epoch: int, inner: int, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The shuffled (trajectory, step) pairs of inner epoch ``inner`` of ``epoch``
        (:func:`~ddpo.training.optimise.shuffled_pairs`)."""
        return shuffled_pairs(self.config, epoch, inner, num_samples, self.steps_per_trajectory, self.accelerator)

    def minibatch_loss(
        self, samples: Trajectories | CleanSamples, weights: torch.Tensor, i: torch.Tensor, j: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The estimator's loss of ``N`` (trajectory ``i``, step ``j``) pairs (``[N]`` each), with diagnostics, as a
        training minibatch computes it (a forward-process estimator draws its noise from the current inner epoch's
        stream: :meth:`Estimator.begin_inner_epoch`)."""
        return self.estimator.loss(samples, weights, i, j)

    # ------------------------------------------------------------------ outputs

    def log(self, epoch: int, metrics: dict[str, Any], samples, rewards: torch.Tensor) -> None:
        """The epoch's metrics to the trackers and ``metrics.jsonl``, its sample grid (:func:`write_epoch`) of
        ``samples``' images and prompts (an epoch's samples or an :class:`~ddpo.training.estimators.EpochResult`)."""
        acc = self.accelerator
        acc.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=epoch)
        if acc.is_main_process:
            write_epoch(self.run_dir, acc.trackers, metrics, samples, rewards, self.config.log_images)

    # ------------------------------------------------------------------ state: snapshots and checkpoints

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors by parameter name (:func:`~ddpo.training.checkpoint_state.trainable_state`)."""
        return checkpoint_state.trainable_state(self.accelerator, self.denoiser, self.trainable_names)

    def snapshot(self) -> TrainingSnapshot:
        """A copy of what training changes (weights, optimiser, per-prompt statistics, global step), for
        :meth:`restore`: e.g. to train the same epoch several times from the same state (``ddpo bench``)."""
        return checkpoint_state.snapshot(self.params, self.optimizer, self.advantage_state, self.global_step)

    def restore(self, saved: TrainingSnapshot) -> None:
        """Back to ``saved`` (:meth:`snapshot`), gradients cleared; ``saved`` stays reusable."""
        self.global_step = checkpoint_state.restore(saved, self.params, self.optimizer, self.advantage_state)
        self.policy.weights_changed()  # a sharded model gathers the restored weights at its next call

    def _checkpointed(self) -> dict[str, Any]:
        """The objects whose state a checkpoint holds (:mod:`~ddpo.training.checkpoint_state`)."""
        names = ("denoiser", "trainable_names", "optimizer", "estimator", "advantage_state", "reward")
        return {name: getattr(self, name) for name in names}

    def _export(self, folder: str, source: Path | None = None, card=None) -> Path:
        c = self.config
        return checkpoint_state.save_final(
            self.accelerator,
            self.run_dir,
            self.denoiser,
            c.model.use_lora,
            self.family,
            self.pipe,
            folder,
            source,
            card,
        )

    def save_checkpoint(self, epochs_done: int) -> Path:
        """Atomically write ``checkpoints/checkpoint_<epochs_done>`` (all processes must call this)."""
        acc, step, keep = self.accelerator, self.global_step, self.config.keep_checkpoints
        rules = self.stop_rules.state_dict()
        return checkpoint_state.save_checkpoint(
            acc, self.run_dir, epochs_done, step, keep, guards=rules, **self._checkpointed()
        )

    def _load_checkpoint(self, path: Path) -> None:
        state = checkpoint_state.load_checkpoint(path, self.accelerator, **self._checkpointed())
        self.start_epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        if state.get("guards"):
            self.stop_rules.load_state_dict(state["guards"])
        if self.accelerator.is_main_process:
            print(f"ddpo: resuming {self.run_dir} from {path.name} (epoch {self.start_epoch})", flush=True)

    def save_final(self) -> Path:
        """``final/``: LoRA weights for ``pipe.load_lora_weights(final)``, or a full pipeline folder; with
        ``final_checkpoint=best``, a copy of ``best/``. Its model card ``README.md`` is written with it."""
        best = self.config.final_checkpoint == "best"
        card = (self.run_dir, self.config, self.family.name, self.reward.name, self.estimator.name)
        card += (absent_components(self.pipe), self.stop_rules.best_epoch if best else None, self.stop_rules.stopped)
        return self._export("final", self.run_dir / "best" if best else None, lambda f: write_model_card(f, *card))


def train(config: RunConfig, run_dir: Path | None = None) -> Path:
    """Train a new run; returns its run directory."""
    return Trainer.from_config(config, run_dir).run()


def resume(run_dir: Path, overrides: list[str] | None = None) -> Path:
    """Continue the run in ``run_dir`` from its newest checkpoint (``num_epochs=N`` extends a finished run)."""
    return Trainer.resume(run_dir, overrides).run()
