"""The epoch loop: sample -> score -> advantages -> optimise -> log -> checkpoint.

The trainer orchestrates; the maths lives in :mod:`ddpo.policy`: :mod:`~ddpo.policy.schedulers` (log-prob steps),
:mod:`~ddpo.policy.sampling` (trajectories and their recomputation), :mod:`~ddpo.policy.pairs` (which pairs to
train on), :mod:`~ddpo.policy.advantages` and :mod:`~ddpo.policy.losses`. Device
placement, mixed precision, gradient accumulation and multi-process gathering go through ``accelerate``.

Reproducibility: every random stream (prompt draws, sampling noise, minibatch shuffles) is derived from
``(seed, epoch, batch or inner epoch, process)``, and a checkpoint holds the trained weights, the optimiser, the
per-prompt tracker, the reward's state and the RNG states, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, gather_object, set_seed

from rewards import RewardError, check_reward_output, get_reward

from ..models import absent_components, add_lora, latent_size, load_code, load_model, lora_metadata, lora_state_dict
from ..policy.advantages import build_advantage, clip_advantages
from ..policy.pairs import training_pairs
from ..policy.sampling import (
    AUTOCAST_DTYPES,
    CleanSamples,
    Trajectories,
    check_schedule,
    sample_clean,
    sample_trajectories,
    uses_cfg,
)
from . import checkpoint, rundir
from .config import (
    ConfigError,
    RunConfig,
    build_config,
    model_options,
    sampler_settings,
    to_dict,
    train_step_offset,
    train_steps_per_trajectory,
    train_window_steps,
)
from .estimators import Estimator, Policy, estimator_for
from .evaluation import eval_prompt_list
from .killpoints import kill_point
from .optim import get_optimizer_class, learning_rate_at, set_learning_rate
from .progress import EpochProgress, describe_batch_sizes
from .prompts import draw_prompts, load_prompts
from .reporting import log_image, run_summary, trackers
from .runlog import append_jsonl, check_epochs, keep_epochs, read_jsonl
from .streams import Stream, derive_seed
from .visualize import save_image_grid

TIMING_KEYS = ("sampling_seconds", "scoring_seconds", "training_seconds")


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite gradients, ...); the last checkpoint is intact."""


def new_run_dir(config: RunConfig) -> Path:
    name = config.run_name or time.strftime("%Y%m%d-%H%M%S")
    return Path(config.output_dir) / name


class Trainer:
    """Fine-tunes the denoiser (UNet or transformer) of any model family (:mod:`ddpo.models.family`) with DDPO / RWR /
    Flow-GRPO or the forward-process estimators. Use :meth:`from_config` or :meth:`resume`, then :meth:`run`."""

    def __init__(self, config: RunConfig, run_dir: Path, resume_checkpoint: Path | None = None):
        self.config = config
        self.run_dir = Path(run_dir)
        c, s, t = config, config.sample, config.train
        self.accelerator = Accelerator(
            cpu=launched_on_cpu(),
            mixed_precision=c.mixed_precision,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            log_with=trackers(c, self.run_dir) or None,
            project_dir=str(self.run_dir),
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=c.process_timeout_seconds))],
        )
        acc = self.accelerator
        set_seed(c.seed, device_specific=True)

        # Everything that can fail on user input fails here, before a model is loaded.
        self.prompts = load_prompts(c.prompts)
        self.eval_prompts = (
            eval_prompt_list(load_prompts(c.eval_prompts, "eval_prompts"), c.eval_samples) if c.eval_prompts else []
        )
        self.reward = get_reward(c.reward.name, **c.reward.options)
        optimizer_class = get_optimizer_class(t.optimizer)

        pipe, self.family = load_model(
            c.model.pretrained, c.model.revision, s.scheduler, c.model.family, model_options(c)
        )
        self.pipe = pipe
        self.scheduler = pipe.scheduler
        self.latent_size = latent_size(self.family, s.resolution)
        self.vae_factor = self.family.vae_scale_factor()
        # The run's sampler settings with this family's latent shape and schedule arguments (computed once).
        self.settings = sampler_settings(
            c,
            latent_size=self.latent_size,
            latent_channels=self.family.latent_channels(),
            schedule_kwargs=tuple(self.family.schedule_kwargs(s.num_steps, self.latent_size).items()),
        )
        estimator_class = estimator_for(c)
        if estimator_class.uses_log_probs:  # awm / nft and the like take clean samples from any sampler
            check_schedule(self.scheduler, self.settings)
        device = acc.device
        pipe.vae.requires_grad_(False)
        for encoder in self.family.text_encoders():
            encoder.requires_grad_(False)
        unet = self.family.denoiser()  # the UNet or the transformer: "unet" below names the trained denoiser
        if c.model.use_lora:
            add_lora(unet, c.model.lora_rank, c.model.lora_alpha, c.model.lora_target_modules)
        else:
            unet.requires_grad_(True)
        if t.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if c.model.channels_last:
            unet.to(memory_format=torch.channels_last)
        # The estimator's frozen copy of the base denoiser, if it keeps one (the KL reference of full fine-tuning),
        # taken before anything trains or casts the denoiser.
        self.ref_unet = estimator_class.frozen_reference(unet, c)
        if self.ref_unet is not None:
            self.ref_unet.to(device)
        autocast_dtype = AUTOCAST_DTYPES[c.mixed_precision]
        if autocast_dtype is not None and c.model.use_lora:
            # Frozen weights are only ever used under autocast, which casts them to this dtype anyway: storing them
            # in it is numerically identical and halves their memory. Trainable (LoRA) weights stay float32.
            from diffusers.training_utils import cast_training_params

            unet.to(dtype=autocast_dtype)
            cast_training_params(unet, dtype=torch.float32)
            if not self.family.vae_force_upcast:  # SDXL's VAE overflows in fp16: it stays float32
                pipe.vae.to(dtype=autocast_dtype)
        if autocast_dtype is not None and c.model.text_encoder_precision == "auto":
            # The frozen text encoders run once per prompt, outside the policy: in the run's half precision (as
            # diffusers' pipelines run them) they take half the memory (T5-XXL: 8.9 instead of 17.7 GiB). The
            # conditioning is stored in float32 and reused as is in training, so the PPO ratio is unaffected.
            for encoder in self.family.text_encoders():
                encoder.to(dtype=autocast_dtype)
        pipe.vae.to(device)
        for encoder in self.family.text_encoders():
            encoder.to(device)
        unet.to(device)
        self.trainable_names = [n for n, p in unet.named_parameters() if p.requires_grad]
        params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = optimizer_class(
            params,
            lr=t.learning_rate,
            betas=(t.adam_beta1, t.adam_beta2),
            weight_decay=t.adam_weight_decay,
            eps=t.adam_epsilon,
        )
        if c.model.compile:
            unet.compile()  # in place: parameter names (checkpoints, LoRA export) are unchanged
        self.unet, self.optimizer = acc.prepare(unet, optimizer)
        self.params = params
        self.advantage = build_advantage(t.advantage, t.per_prompt_buffer_size, t.per_prompt_min_count)
        # A stateful advantage scheme (per-prompt statistics) is saved in checkpoints.
        self.tracker = self.advantage if hasattr(self.advantage, "state_dict") else None
        self.negative_embeds = None
        if uses_cfg(s.guidance_scale) and not self.family.guidance_embedded:
            self.negative_embeds = self.family.encode([s.negative_prompt], device, self.latent_size)
        self.start_epoch = 0
        self.global_step = 0
        self.progress: EpochProgress | None = None
        self.samples_per_epoch = s.batch_size * s.num_batches_per_epoch * acc.num_processes
        self.steps_per_trajectory = train_steps_per_trajectory(c)
        self.policy = Policy(
            config=c,
            family=self.family,
            scheduler=self.scheduler,
            settings=self.settings,
            accelerator=acc,
            model=self.unet,
            params=params,
            trainable_names=self.trainable_names,
            reference=self.ref_unet,
        )
        # The run's estimator: its loss, its extra state (an old policy) and its per-epoch hooks.
        self.estimator: Estimator = estimator_class(self.policy)
        if resume_checkpoint is not None:
            self._load_checkpoint(resume_checkpoint)
        self._write_run_files()

    # ------------------------------------------------------------------ construction helpers

    @classmethod
    def from_config(cls, config: RunConfig, run_dir: Path | None = None) -> Trainer:
        run_dir = Path(run_dir) if run_dir is not None else new_run_dir(config)
        rundir.check_new_run_dir(run_dir)
        rundir.check_inside(run_dir)
        check_run_dir(run_dir)
        return cls(config, run_dir)

    @classmethod
    def resume(cls, run_dir: Path, overrides: list[str] | None = None) -> Trainer:
        run_dir = Path(run_dir)
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"{run_dir} is not a run directory: it has no config.yaml")
        rundir.check_inside(run_dir)
        rundir.check_resume_overrides(run_dir, overrides or [])
        config = build_config(base=rundir.read_run_config(run_dir), overrides=overrides)
        for log in ("metrics.jsonl", "eval.jsonl"):  # a bad line fails here, before the model loads
            check_epochs(run_dir / log)
        latest, problems = checkpoint.newest_good(run_dir / "checkpoints")
        for problem in problems:
            print(f"ddpo: skipping checkpoint {problem}", flush=True)
        if latest is None and problems:
            raise checkpoint.CheckpointError(
                f"{run_dir}: no usable checkpoint ({'; '.join(problems)}); restore one from a backup, or delete "
                f"{run_dir / 'checkpoints'} to start the run over"
            )
        if latest is not None and problems:
            print(f"ddpo: resuming from the newest good checkpoint, {latest.name}", flush=True)
        if latest is None:
            # Killed before its first checkpoint: nothing of it can be continued, so the run starts over.
            print(f"ddpo: {run_dir} has no checkpoint yet; starting the run from the beginning (epoch 0)", flush=True)
        return cls(config, run_dir, resume_checkpoint=latest)

    def _write_run_files(self) -> None:
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if removed := rundir.remove_debris(self.run_dir):
                print(f"ddpo: removed the unfinished temporary files of an earlier crash: {', '.join(removed)}")
            text = yaml.safe_dump(to_dict(self.config), sort_keys=False)
            tmp = self.run_dir / ".config.yaml.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.run_dir / "config.yaml")  # first: a folder holding a run has its config.yaml
            (self.run_dir / "samples").mkdir(exist_ok=True)
            self._truncate_metrics(self.start_epoch)
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
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward") as executor:
                self.executor = executor
                if self.eval_prompts and self.start_epoch == 0:
                    self.evaluate(0)
                for epoch in range(self.start_epoch, c.num_epochs):
                    self.progress.begin_epoch()
                    metrics = self.run_epoch(epoch)
                    self.progress.end_epoch(epoch, metrics)
                    if self.eval_prompts and self._eval_due(epoch + 1):
                        self.evaluate(epoch + 1)
                    if (epoch + 1) % c.save_every == 0 or epoch + 1 == c.num_epochs:
                        self._phase("checkpoint")
                        self.save_checkpoint(epoch + 1)
                        self._phase("")
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
        """The line after :func:`~ddpo.training.progress.describe_batch_sizes` (which gives the batch sizes): where the
        processes run (device, distributed type and backend) and the image size."""
        n = self.accelerator.num_processes
        how = f" ({self.accelerator.distributed_type.value}, {torch.distributed.get_backend()})" if n > 1 else ""
        if self.overlaps_scoring():
            scoring = "rewards scored in a worker thread while the next batch samples"
        elif self.config.overlap_scoring:
            scoring = "rewards scored inline (on a CPU a scoring thread competes with sampling for the same cores)"
        else:
            scoring = "rewards scored inline (overlap_scoring=false)"
        return (
            f"ddpo: {n} process{'es' if n > 1 else ''} on {self.accelerator.device.type}{how}; "
            f"{self.latent_size * self.vae_factor} px images; {scoring}"
        )

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
        m = self.config.model
        code = load_code(
            m.pretrained, self.run_dir / "final", m.use_lora, m.revision, self.family.name, absent_components(self.pipe)
        )
        return run_summary(self.run_dir, self.config, self.reward.name, code)

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """One epoch; returns (and logs) its metrics."""
        start = time.perf_counter()
        samples, rewards, reward_info, timings = self.sample_and_score(epoch)
        all_rewards, all_prompts = self.gather(rewards, samples.prompts)
        weights = self.compute_weights(all_rewards, all_prompts)
        # Online rewards (the discriminator) learn from every process's samples, so their copies stay identical.
        all_images = samples.images if self.accelerator.num_processes == 1 else self.accelerator.gather(samples.images)
        reward_info.update(self.reward.update(all_images, all_prompts))
        train_start = time.perf_counter()
        train_info = self.optimise(epoch, samples, weights)
        train_info.update(self.estimator.end_epoch(self.global_step))
        timings["training_seconds"] = time.perf_counter() - train_start
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
        if self.accelerator.num_processes > 1:
            # DDP keeps the copies identical; this proves it, every epoch, in metrics.jsonl.
            metrics["weights_sha256"] = gather_object([weights_sha256(self.trainable_state())])
        self.log(epoch, metrics, samples, rewards)
        return metrics

    # ------------------------------------------------------------------ held-out evaluation

    def _eval_due(self, epochs_done: int) -> bool:
        every = self.config.eval_every
        return epochs_done == self.config.num_epochs or (every > 0 and epochs_done % every == 0)

    def evaluate(self, epochs_done: int) -> dict[str, Any]:
        """Sample and score the fixed held-out set (``eval_prompts``) with the current weights; log to ``eval.jsonl``.

        The prompts and the noise of chunk ``k`` (``sample.batch_size`` images) depend only on ``k``, never on the
        run's seed, the epoch or the number of processes (chunk ``k`` runs on process ``k % num_processes``): every
        evaluation of every run over the same ``eval_prompts``/``eval_samples`` sees the same inputs, so differences
        are the policy's. It touches no random stream of training, so resumed runs stay exact. (An online reward such
        as the discriminator changes between evaluations; its numbers are then not paired.)
        """
        c, s, acc = self.config, self.config.sample, self.accelerator
        start = time.perf_counter()
        self._phase("evaluation")
        self.unet.eval()
        unet = acc.unwrap_model(self.unet)
        chunks = [self.eval_prompts[i : i + s.batch_size] for i in range(0, len(self.eval_prompts), s.batch_size)]
        results, first_images = [], None
        for k in range(acc.process_index, len(chunks), acc.num_processes):
            prompts = chunks[k]
            trajectories = self.sample(unet, prompts, derive_seed(0, Stream.EVAL_NOISE, k))
            values, info, _ = self.score(trajectories.images, prompts, f"held-out evaluation, chunk {k}")
            results.append((k, values.cpu().tolist(), info))
            if k == 0:
                first_images = trajectories.images
        if acc.num_processes > 1:
            results = gather_object(results)
        results.sort(key=lambda item: item[0])
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
        metrics["eval_seconds"] = time.perf_counter() - start
        acc.log({f"eval/{k}": v for k, v in metrics.items() if k != "epoch"}, step=epochs_done)
        # Per image, in evaluation order: the summary pairs them with the first evaluation's (same inputs).
        metrics["rewards"] = rewards.tolist()
        if acc.is_main_process:
            append_jsonl(self.run_dir / "eval.jsonl", metrics)
            if first_images is not None:
                count = min(16, len(first_images))
                grid = save_image_grid(
                    first_images[:count],
                    chunks[0][:count],
                    results[0][1][:count],  # sorted by chunk: chunk 0's rewards
                    self.run_dir / "samples" / f"eval_epoch_{epochs_done:04d}.png",
                )
                self.log_image("eval/samples", grid, epochs_done)
            self._say(
                f"ddpo: held-out evaluation after {epochs_done} epochs ({len(rewards)} images of {c.eval_prompts}): "
                f"reward {metrics['reward_mean']:.4g} ({metrics['eval_seconds']:.1f} s)"
            )
        self._phase("")
        return metrics

    def read_evals(self) -> list[dict[str, Any]]:
        """The held-out evaluations written so far (``eval.jsonl``), oldest first."""
        return read_jsonl(self.run_dir / "eval.jsonl")

    # ------------------------------------------------------------------ phases

    def sample_and_score(self, epoch: int) -> tuple[Trajectories, torch.Tensor, dict[str, float], dict[str, float]]:
        """Sample this process's trajectories for ``epoch`` and score them.

        With ``overlap_scoring`` (where :func:`overlap_scoring` allows it) the reward of batch k runs in a worker
        thread while batch k+1 is sampled; ``scoring_seconds`` is then only the time spent waiting for the reward after
        sampling ended.
        """
        c, s, acc = self.config, self.config.sample, self.accelerator
        self.unet.eval()
        unet = acc.unwrap_model(self.unet)  # sampling needs no DDP gradient sync
        batches: list[Trajectories] = []
        pending: list[Future | tuple] = []
        overlap = self.overlaps_scoring()
        sampling_start = time.perf_counter()
        self._phase("sampling")
        for b in range(s.num_batches_per_epoch):
            prompts = draw_prompts(
                self.prompts, s.batch_size, s.samples_per_prompt, c.seed, epoch, b, acc.process_index
            )
            with self.estimator.sampling_weights():  # DiffusionNFT: its old policy
                trajectories = self.sample(
                    unet,
                    prompts,
                    derive_seed(c.seed, Stream.SAMPLING_NOISE, epoch, b, acc.process_index),
                    share_initial_noise=s.share_initial_noise,
                )
            batches.append(trajectories)
            kill_point("sample")
            first = b * s.batch_size
            where = (
                f"epoch {epoch}, batch {b}: samples {first}-{first + s.batch_size - 1} of process {acc.process_index}"
            )
            if overlap:
                pending.append(self.executor.submit(self.score, trajectories.images, prompts, where))
            else:
                pending.append(self.score(trajectories.images, prompts, where))
        sampling_seconds = time.perf_counter() - sampling_start
        wait_start = time.perf_counter()
        results = [item.result() if isinstance(item, Future) else item for item in pending]
        scoring_seconds = time.perf_counter() - wait_start
        if not overlap:
            scoring_seconds = sum(seconds for _, _, seconds in results)
            sampling_seconds -= scoring_seconds
        rewards = torch.cat([values for values, _, _ in results])
        infos = [info for _, info, _ in results]
        reward_info = {k: sum(i[k] for i in infos) / len(infos) for k in infos[0]} if infos and infos[0] else {}
        reward_info["reward_compute_seconds"] = sum(seconds for _, _, seconds in results)
        timings = {"sampling_seconds": sampling_seconds, "scoring_seconds": scoring_seconds}
        return type(batches[0]).cat(batches), rewards, reward_info, timings

    def sample(
        self, unet, prompts: list[str], seed: int, share_initial_noise: bool = False
    ) -> Trajectories | CleanSamples:
        """Trajectories of ``prompts`` with the run's sampler settings, the noise drawn from a generator seeded ``seed``
        (``share_initial_noise``: one ``x_T`` per group of consecutive equal prompts, for training batches). An
        estimator without log-probs gets :class:`~ddpo.policy.sampling.CleanSamples` from any sampler instead."""
        device = self.accelerator.device
        embeds = self.family.encode(prompts, device, self.latent_size)
        settings = dataclasses.replace(self.settings, share_initial_noise=share_initial_noise)
        generator = torch.Generator(device=device).manual_seed(seed)
        sample = sample_trajectories if self.estimator.uses_log_probs else sample_clean
        denoiser = self.family.bind(unet, settings.guidance_scale)
        return sample(
            denoiser, self.pipe.vae, self.scheduler, embeds, self.negative_embeds, prompts, generator, settings
        )

    def score(
        self, images: torch.Tensor, prompts: list[str], where: str = ""
    ) -> tuple[torch.Tensor, dict[str, float], float]:
        """The checked reward of ``images`` ``[B, 3, H, W]``: ``(values [B] on the device, reward info, seconds)``.

        A reward that raises, or returns NaN, the wrong shape or dtype, ends in one :class:`rewards.RewardError`
        naming the reward, the batch (``where``: e.g. ``"epoch 3, samples 8-11 of process 0"``) and, for bad values,
        the sample indices; the reward's own exception is chained (``--debug`` prints it)."""
        start = time.perf_counter()
        name = self.reward.name
        context = f" ({where})" if where else ""
        try:
            with torch.no_grad():
                values = self.reward(images, prompts)
        except Exception as err:
            raise RewardError(
                f"reward {name!r} raised {type(err).__name__}: {err}{context}. The error is in the reward's own code; "
                "run with --debug (or DDPO_DEBUG=1) for its traceback"
            ) from err
        try:
            values = check_reward_output(values, len(prompts), name)
        except RewardError as err:
            raise RewardError(f"{err}{context}") from None
        kill_point("score")
        return values.detach().to(self.accelerator.device), dict(self.reward.last_info()), time.perf_counter() - start

    def gather(self, rewards: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, list[str]]:
        """Rewards and prompts of every process, in process order."""
        if self.accelerator.num_processes == 1:
            return rewards, prompts
        return self.accelerator.gather(rewards), gather_object(prompts)

    def compute_weights(self, all_rewards: torch.Tensor, all_prompts: list[str]) -> torch.Tensor:
        """Per-trajectory weights of this process's samples: the estimator's weights of the clipped advantages
        (the advantages themselves for DDPO, RWR's weights for RWR)."""
        t, acc = self.config.train, self.accelerator
        advantages = clip_advantages(self.advantage(all_rewards, all_prompts), t.adv_clip_max)
        weights = self.estimator.trajectory_weights(advantages)
        return weights.reshape(acc.num_processes, -1)[acc.process_index].to(acc.device)

    def optimise(self, epoch: int, samples: Trajectories | CleanSamples, weights: torch.Tensor) -> dict[str, float]:
        """Inner epochs over shuffled (trajectory, timestep) minibatches of the estimator's loss; returns the epoch's
        mean diagnostics."""
        t, acc = self.config.train, self.accelerator
        unet = self.unet
        unet.train()
        num_samples = samples.latents.shape[0]
        k = self.steps_per_trajectory
        max_norm = t.max_grad_norm if t.max_grad_norm > 0 else math.inf
        history: dict[str, list[torch.Tensor]] = {}
        grad_norms: list[torch.Tensor] = []
        first_step_kl: list[torch.Tensor] = []
        samples, extra = self.estimator.prepare_epoch(
            samples, lambda inner: self.training_pairs(epoch, inner, num_samples)
        )
        self._phase("training")
        for inner in range(t.num_inner_epochs):
            pair_traj, pair_step = self.training_pairs(epoch, inner, num_samples)
            self.estimator.begin_inner_epoch(epoch, inner)
            for first in range(0, num_samples * k, t.batch_size):
                i = pair_traj[first : first + t.batch_size]
                j = pair_step[first : first + t.batch_size]
                with acc.accumulate(unet):
                    loss, info = self.estimator.loss(samples, weights, i, j)
                    if not grad_norms and "approx_kl" in info:
                        # the epoch's first optimiser step: no update yet, so a per-step ratio must be 1
                        first_step_kl.append(info["approx_kl"].float())
                    acc.backward(loss)
                    kill_point("backward")
                    if acc.sync_gradients:
                        grad_norm = acc.clip_grad_norm_(self.params, max_norm)
                        if not torch.isfinite(grad_norm):
                            raise TrainingError(
                                f"non-finite gradient norm at epoch {epoch}, global step {self.global_step}; "
                                f"lower train.learning_rate or use mixed_precision=no. {checkpoint_note(self.run_dir)}"
                            )
                        grad_norms.append(grad_norm.detach().float())
                        lr = learning_rate_at(self.global_step, t.learning_rate, t.lr_warmup_steps)
                        set_learning_rate(self.optimizer, lr)
                        self.global_step += 1
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    kill_point("optimizer_step")
                for key, value in info.items():
                    history.setdefault(key, []).append(value.float())
        means = {key: acc.reduce(torch.stack(values).mean(), reduction="mean") for key, values in history.items()}
        if "ratio_max" in history:
            means["ratio_max"] = acc.reduce(torch.stack(history["ratio_max"]).max(), reduction="max")
        means["grad_norm"] = acc.reduce(torch.stack(grad_norms).mean(), reduction="mean")
        if first_step_kl:  # 0 exactly when every pair of the first optimiser step had ratio 1 (same shapes)
            extra["first_step_approx_kl"] = torch.stack(first_step_kl).max()
        means.update({key: acc.reduce(value, reduction="max") for key, value in extra.items()})
        return {key: value.item() for key, value in means.items()}

    def training_pairs(self, epoch: int, inner: int, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The shuffled (trajectory, step) pairs of inner epoch ``inner`` of ``epoch`` (see
        :func:`ddpo.policy.pairs.training_pairs`), from the run's shuffle stream: two ``[num_samples * k]`` long
        tensors on the device."""
        c, acc = self.config, self.accelerator
        seed = derive_seed(c.seed, Stream.SHUFFLE, epoch, inner, acc.process_index)
        trajs, steps = training_pairs(
            num_samples, self.steps_per_trajectory, train_window_steps(c), torch.Generator().manual_seed(seed)
        )
        return trajs.to(acc.device), (steps + train_step_offset(c)).to(acc.device)

    def minibatch_loss(
        self, samples: Trajectories | CleanSamples, weights: torch.Tensor, i: torch.Tensor, j: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The estimator's loss of ``N`` (trajectory ``i``, step ``j``) pairs (``[N]`` each), with diagnostics, as a
        training minibatch computes it (a forward-process estimator draws its noise from the current inner epoch's
        stream: :meth:`Estimator.begin_inner_epoch`)."""
        return self.estimator.loss(samples, weights, i, j)

    # ------------------------------------------------------------------ outputs

    def log(self, epoch: int, metrics: dict[str, Any], samples: Trajectories, rewards: torch.Tensor) -> None:
        acc = self.accelerator
        acc.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=epoch)
        if not acc.is_main_process:
            return
        append_jsonl(self.run_dir / "metrics.jsonl", metrics)
        kill_point("metrics")
        if self.config.log_images:
            count = min(16, len(samples.prompts))
            grid = save_image_grid(
                samples.images[:count],
                samples.prompts[:count],
                rewards[:count].tolist(),
                self.run_dir / "samples" / f"epoch_{epoch:04d}.png",
            )
            self.log_image("samples", grid, epoch)

    def log_image(self, tag: str, image, step: int) -> None:
        """An image grid (PIL) to every tracker that takes images (:func:`~ddpo.training.reporting.log_image`)."""
        log_image(self.accelerator.trackers, tag, image, step)

    def _truncate_metrics(self, start_epoch: int) -> None:
        """Drop metrics of epochs a resumed run will redo (written after the checkpoint it resumes from), and
        held-out evaluations after that checkpoint (the one at ``start_epoch`` was written before it)."""
        keep_epochs(self.run_dir / "metrics.jsonl", lambda e: e < start_epoch)
        keep_epochs(self.run_dir / "eval.jsonl", lambda e: e <= start_epoch)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        unet = self.accelerator.unwrap_model(self.unet)
        named = dict(unet.named_parameters())
        return {name: named[name].detach() for name in self.trainable_names}

    def save_checkpoint(self, epochs_done: int) -> Path:
        """Atomically write ``checkpoints/checkpoint_<epochs_done>`` (all processes must call this)."""
        acc = self.accelerator
        folder = self.run_dir / "checkpoints"
        final = folder / f"{checkpoint.PREFIX}{epochs_done:06d}"
        previous = checkpoint.latest(folder)
        tmp = checkpoint.begin(folder) if acc.is_main_process else None
        tmp = Path(gather_object([str(tmp)])[0]) if acc.num_processes > 1 else tmp
        with self._removed_on_failure(tmp if acc.is_main_process else None, final.name, previous):
            if acc.is_main_process:
                checkpoint.write_payload(
                    tmp,
                    self.trainable_state(),
                    self.optimizer.state_dict(),
                    self.reward.state_dict(),
                    self.estimator.state_dict(),
                )
                kill_point("checkpoint_payload")
            checkpoint.write_json(tmp / f"rng_{acc.process_index}.json", checkpoint.rng_state())
            acc.wait_for_everyone()
            if acc.is_main_process:
                state = {
                    "epoch": epochs_done,
                    "global_step": self.global_step,
                    "tracker": self.tracker.state_dict() if self.tracker is not None else None,
                    "num_processes": acc.num_processes,
                    "trainable_names": self.trainable_names,
                }
                final = checkpoint.commit(tmp, folder, epochs_done, state, self.config.keep_checkpoints)
        acc.wait_for_everyone()
        return final

    @contextlib.contextmanager
    def _removed_on_failure(self, tmp: Path | None, name: str, previous: Path | None):
        """Remove the temporary folder ``tmp`` of ``name`` (a checkpoint or ``final/``) when writing it fails or is
        interrupted; a full disk becomes one :class:`TrainingError` naming ``previous``, the checkpoint to resume
        from."""
        try:
            yield
        except BaseException as err:
            if tmp is not None:
                checkpoint.discard(tmp)
            if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise TrainingError(disk_full_message(err, name, previous, self.run_dir)) from err
            raise

    def _load_checkpoint(self, path: Path) -> None:
        acc = self.accelerator
        data = checkpoint.load(path, acc.process_index)
        state = data["state"]
        if state["num_processes"] != acc.num_processes:
            raise ValueError(
                f"{path} was written by {state['num_processes']} processes; resume with the same number "
                f"(now {acc.num_processes}) so that the random streams match"
            )
        named = dict(acc.unwrap_model(self.unet).named_parameters())
        checkpoint.restore_trainable(path, data["trainable"], {name: named[name] for name in self.trainable_names})
        self.optimizer.load_state_dict(data["optimizer"])
        self.estimator.load_state_dict(data["extra"], str(path))
        if self.tracker is not None:
            if state["tracker"] is None:
                raise ValueError(f"{path} has no per-prompt tracker state but train.advantage is per_prompt")
            self.tracker.load_state_dict(state["tracker"])
        self.reward.load_state_dict(data["reward"] or {})
        if data["rng"] is not None:
            checkpoint.set_rng_state(data["rng"])
        self.start_epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        if acc.is_main_process:
            print(f"ddpo: resuming {self.run_dir} from {path.name} (epoch {self.start_epoch})", flush=True)

    def save_final(self) -> Path:
        """``final/``: LoRA weights for ``pipe.load_lora_weights(final)``, or a full pipeline folder."""
        acc = self.accelerator
        final = self.run_dir / "final"
        acc.wait_for_everyone()
        if acc.is_main_process:
            tmp = self.run_dir / f".final-tmp-{os.getpid()}"
            with self._removed_on_failure(tmp, "final/", checkpoint.latest(self.run_dir / "checkpoints")):
                unet = acc.unwrap_model(self.unet)
                if self.config.model.use_lora:
                    self.family.save_lora(tmp, lora_state_dict(unet), lora_metadata(unet))
                else:
                    self.family.set_denoiser(unet)
                    self.pipe.save_pretrained(tmp, safe_serialization=True)
                kill_point("final_payload")
                checkpoint.replace_dir(tmp, final)
        acc.wait_for_everyone()
        return final


def overlap_scoring(requested: bool, device: torch.device, io_bound: bool = False) -> bool:
    """Whether to score rewards in the worker thread: when asked (``overlap_scoring``) and the device is not the CPU,
    or the reward waits on I/O (``io_bound``, e.g. a remote reward server).

    On a CPU the cores that would score a local reward are the ones sampling, so overlapping buys nothing, and it
    costs: the worker thread's first torch op gives it an OpenMP team of its own, and once libgomp manages more threads
    than there are cores it stops spinning between parallel regions, so the intra-op threads of every later UNet call
    sleep and are woken at each operator (measured on a 2-core Intel Xeon: ~800 voluntary context switches per UNet
    call instead of 0, calls 20% slower for the rest of the run; docs/performance.md).
    """
    return requested and (device.type != "cpu" or io_bound)


def launched_on_cpu() -> bool:
    """Whether a launcher started several processes (``WORLD_SIZE > 1``) on a machine without CUDA: then the run is
    made multi-CPU over gloo explicitly. ``accelerate launch --multi_gpu`` exports ``ACCELERATE_USE_CPU=False``, with
    which accelerate would otherwise give every process a one-process state (each training alone, into the same run
    directory)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the names, dtypes, shapes and bytes of ``state`` (in name order): equal exactly when the tensors are
    bit-identical."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def collective_failure(err: BaseException) -> bool:
    """Whether ``err`` is a failed collective (gather, all-reduce, barrier) of several processes: another process
    died (its connections closed) or did not answer within ``process_timeout_seconds``. torch raises a plain
    RuntimeError from gloo, a DistError subclass elsewhere; the gradient all-reduce of DDP fails inside autograd."""
    if isinstance(err, torch.distributed.DistError):
        return True
    tb = err.__traceback__
    while tb is not None:
        if f"torch{os.sep}distributed{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    text = str(err)
    return any(
        mark in text for mark in ("gloo/transport", "ProcessGroupGloo", "ProcessGroupNCCL", "Connection closed by peer")
    )


def lost_process_message(err: BaseException, num_processes: int, config: RunConfig, run_dir: Path) -> str:
    """One line for a failed collective: which limit applied, what probably happened, and how to go on."""
    detail = " ".join(str(err).split())
    detail = detail if len(detail) <= 240 else detail[:237] + "..."
    return (
        f"another of the {num_processes} processes died or stopped answering (each waits at most "
        f"process_timeout_seconds={config.process_timeout_seconds} s for the others), so a collective operation "
        f"failed: {detail}. {checkpoint_note(run_dir)} See the other process's output for why it stopped, then "
        f"resume with the same number of processes (--resume {run_dir})"
    )


def checkpoint_note(run_dir: Path) -> str:
    """The sentence of an error that stops a run about what it leaves to resume from: its newest checkpoint (written
    atomically, so intact), or none yet."""
    latest = checkpoint.latest(Path(run_dir) / "checkpoints")
    if latest is None:
        return "No checkpoint was written yet, so a resume starts the run over."
    return f"The last checkpoint, {latest.name}, is intact."


def check_run_dir(run_dir: Path) -> None:
    """Raise ConfigError, before anything is loaded, when the run directory cannot be created or written: a regular
    file where a folder of its path should be, or no permission (a read-only disk, another user's folder)."""
    run_dir = Path(run_dir)
    for parent in [run_dir, *run_dir.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(
                    f"the run directory {run_dir} would be under {parent}, which is a regular file, not a folder; "
                    "choose another output_dir / run_name"
                )
            break
    probe = run_dir / f"{rundir.PROBE_PREFIX}{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"cannot write the run directory {run_dir} ({err.strerror or err}); choose a writable output_dir"
        ) from None


def disk_full_message(err: OSError, name: str, previous: Path | None, run_dir: Path) -> str:
    """One line for a disk that filled up while ``name`` (a checkpoint or ``final/``) was written."""
    intact = f"{previous.name} is intact" if previous is not None else "no earlier checkpoint exists"
    return (
        f"the disk is full ({err.strerror or err}) while writing {name} under {run_dir}; its unfinished files were "
        f"removed and {intact}. Free some space, then continue with `ddpo train --resume {run_dir}`"
    )


def interrupted_message(run_dir: Path) -> str:
    """One line for a run stopped by Ctrl-C (SIGINT): its last intact checkpoint, or none, and the resume command."""
    latest = checkpoint.latest(Path(run_dir) / "checkpoints")
    if not (Path(run_dir) / "config.yaml").is_file():
        return f"ddpo: interrupted before {run_dir} held a run (nothing to resume); run the same command again"
    if latest is None:
        return f"ddpo: interrupted; no checkpoint was written yet; start it over with: ddpo train --resume {run_dir}"
    epochs = int(latest.name[len(checkpoint.PREFIX) :])
    return (
        f"ddpo: interrupted; the last intact checkpoint is {latest} ({epochs} epoch{'s' * (epochs != 1)} done); "
        f"continue with: ddpo train --resume {run_dir}"
    )


def train(config: RunConfig, run_dir: Path | None = None) -> Path:
    """Train a new run; returns its run directory."""
    return Trainer.from_config(config, run_dir).run()


def resume(run_dir: Path, overrides: list[str] | None = None) -> Path:
    """Continue the run in ``run_dir`` from its newest checkpoint (``num_epochs=N`` extends a finished run)."""
    return Trainer.resume(run_dir, overrides).run()
