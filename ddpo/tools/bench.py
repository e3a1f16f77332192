"""``ddpo bench``: time the phases of one epoch, ours against the straightforward way, in the same process.

Both modes run the **same epoch** of the same config from the same weights and optimiser state: the same prompts,
the same sampling noise, the same rewards and advantages, the same (trajectory, timestep) pairs in the same
optimiser steps. They differ only in how the work is executed:

=====================  ===============================================  ===============================================
phase                  ours (:class:`~ddpo.training.Trainer`)             reference (this module, ddpo-pytorch style)
=====================  ===============================================  ===============================================
sampling               batched CFG, Python-int timesteps, log-probs     pipeline-style loop: ``scheduler.timesteps``
                       in float32 on the device, no host syncs          tensors, ``scale_model_input``, log-probs in the
                                                                        UNet dtype
decoding               VAE in chunks under autocast                     whole batch, after the loop
scoring                in a worker thread while the next batch          after all sampling, batch by batch
                       samples (``overlap_scoring``)
training               ``train.batch_size`` pairs per UNet call         one UNet call per sample minibatch of pairs
                       (mixed timesteps)                                (``sample.batch_size`` rows), gradients
                                                                        accumulated up to the same optimiser step
=====================  ===============================================  ===============================================

so their losses and gradients agree to float32 tolerance (``tests/test_bench.py``) and the ratio of their times is
the speed-up of the execution alone. The reference runs the plain UNet: ours' ``model.compile``,
``model.channels_last`` and ``train.gradient_checkpointing`` are switched off for it (:func:`plain_unet`). Each phase is the median over ``repeats`` epochs after ``warmup`` epochs;
modes alternate within a repeat so that a change of machine load hits both. Peak memory is the process RSS on a
CPU (sampled by a thread) and ``torch.cuda.max_memory_allocated`` on a GPU.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import platform
import statistics
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..policy import sampling
from ..policy.conditioning import Conditioning
from ..policy.sampling import AUTOCAST_DTYPES, Trajectories, autocast, encode_prompts, uses_cfg
from ..training.config import to_dict
from ..training.prompts import draw_prompts
from ..training.streams import Stream, derive_seed
from ..training.trainer import Trainer

PHASES = ("sampling_seconds", "decoding_seconds", "scoring_seconds", "training_seconds", "total_seconds")
MODES = ("ours", "reference")


# ---------------------------------------------------------------------------------------------- reference maths


def reference_ddim_step(
    scheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor,
    sample: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM step with log-prob written the ddpo-pytorch way: everything in the dtype of ``model_output``.

    Args:
        model_output: guided UNet output ``[B, C, h, w]`` (its dtype is the compute dtype, as in ddpo-pytorch).
        timestep: 0-d or ``[B]`` long; sample: ``x_t`` ``[B, C, h, w]``; prev_sample: ``x_{t-1}`` to score, or None
            to draw one with ``generator``.
    Returns:
        ``(x_{t-1} [B, C, h, w] float32, log_prob [B])`` with the log-density averaged over latent dimensions.
    """
    dtype, device = model_output.dtype, model_output.device
    shape = (-1,) + (1,) * (sample.ndim - 1)
    timestep = torch.as_tensor(timestep, device=device).long().reshape(-1)
    prev_timestep = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod.to(device)
    alpha_t = alphas[timestep]
    alpha_prev = torch.where(
        prev_timestep >= 0, alphas[prev_timestep.clamp(min=0)], torch.as_tensor(scheduler.final_alpha_cumprod)
    )
    alpha_t = alpha_t.to(dtype).reshape(shape)
    alpha_prev = alpha_prev.to(dtype).reshape(shape)
    sample = sample.to(dtype)
    if scheduler.config.prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - (1 - alpha_t) ** 0.5 * eps) / alpha_t**0.5
    elif scheduler.config.prediction_type == "v_prediction":
        x0 = alpha_t**0.5 * sample - (1 - alpha_t) ** 0.5 * model_output
        eps = alpha_t**0.5 * model_output + (1 - alpha_t) ** 0.5 * sample
    else:
        x0 = model_output
        eps = (sample - alpha_t**0.5 * x0) / (1 - alpha_t) ** 0.5
    if scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        x0 = x0.clamp(-limit, limit)  # epsilon stays the model's, as in DDIMScheduler.step
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance**0.5
    mean = alpha_prev**0.5 * x0 + (1 - alpha_prev - std**2) ** 0.5 * eps
    if prev_sample is None:
        noise = torch.randn(model_output.shape, generator=generator, device=device, dtype=dtype)
        prev_sample = mean + std * noise
    prev_sample = prev_sample.to(dtype)
    log_prob = -((prev_sample.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return prev_sample.float(), log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def reference_guided_output(
    unet,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    embeds: torch.Tensor,
    guidance_scale: float,
    do_cfg: bool,
) -> torch.Tensor:
    """UNet output with CFG as ddpo-pytorch computes it: ``embeds`` is ``cat([negative, prompt])`` ``[2B, L, D]``
    (or ``[B, L, D]`` without CFG), the latents and timesteps are repeated, and the output is split in two."""
    if not do_cfg:
        return unet(latents, timesteps, embeds).sample
    timesteps = torch.cat([timesteps] * 2) if timesteps.ndim == 1 else timesteps
    noise_pred = unet(torch.cat([latents] * 2), timesteps, embeds).sample
    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
    return noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)


def _plain(embeds):
    """The ``[B, L, D]`` text states of a Stable Diffusion 1.x/2.x conditioning (the reference loop's input)."""
    return embeds.embeds if isinstance(embeds, Conditioning) else embeds


@torch.no_grad()
def reference_sample(
    unet,
    scheduler,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    num_steps: int,
    guidance_scale: float,
    eta: float,
    generator: torch.Generator,
    mixed_precision: str = "no",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The denoising loop of ddpo-pytorch's ``pipeline_with_logprob``: one UNet call per timestep.

    Draws the same noise as :func:`ddpo.policy.sampling.sample_trajectories` (``x_T`` first, then one draw per step from
    ``generator``), so the same seed gives the same trajectories.

    Returns:
        ``latents [B, T + 1, C, h, w]`` float32, ``log_probs [B, T]`` float32, ``timesteps [T]`` long.
    """
    prompt_embeds, negative_embeds = _plain(prompt_embeds), _plain(negative_embeds)
    device, batch = prompt_embeds.device, prompt_embeds.shape[0]
    do_cfg = negative_embeds is not None and uses_cfg(guidance_scale)
    embeds = torch.cat([negative_embeds.expand(batch, -1, -1), prompt_embeds]) if do_cfg else prompt_embeds
    scheduler.set_timesteps(num_steps, device=device)
    shape = (batch, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    latents = torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * scheduler.init_noise_sigma
    all_latents, all_log_probs = [latents], []
    for t in scheduler.timesteps:
        latent_model_input = scheduler.scale_model_input(latents, t)
        with autocast(device, mixed_precision):
            noise_pred = reference_guided_output(unet, latent_model_input, t, embeds, guidance_scale, do_cfg)
            latents, log_prob = reference_ddim_step(scheduler, noise_pred, t, latents, eta, generator=generator)
        all_latents.append(latents)
        all_log_probs.append(log_prob.float())
    timesteps = scheduler.timesteps.to(device=device, dtype=torch.long)
    return torch.stack(all_latents, dim=1), torch.stack(all_log_probs, dim=1), timesteps


@torch.no_grad()
def reference_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Decode the whole batch in one VAE call: ``[B, C, h, w]`` -> float32 images ``[B, 3, H, W]`` in ``[0, 1]``."""
    images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


def reference_minibatch_loss(trainer, samples, weights: torch.Tensor, i: torch.Tensor, j: torch.Tensor):
    """Loss and diagnostics of ``N`` pairs (trajectory ``i``, step ``j``, ``[N]`` each) in one UNet call, the
    ddpo-pytorch way: CFG rows from ``cat([negative, prompt])``, and the log-prob in the UNet dtype.
    (No KL-to-base term: :func:`main` refuses ``train.kl_coef > 0`` in the reference mode.)"""
    c, s, t = trainer.config, trainer.config.sample, trainer.config.train
    do_cfg = trainer.negative_embeds is not None and uses_cfg(s.guidance_scale)
    embeds = _plain(samples.prompt_embeds[i])
    if do_cfg:
        embeds = torch.cat([_plain(trainer.negative_embeds).expand(len(i), -1, -1), embeds])
    latents, next_latents, timesteps = samples.latents[i, j], samples.latents[i, j + 1], samples.timesteps[j]
    with autocast(latents.device, c.mixed_precision):
        noise_pred = reference_guided_output(trainer.unet, latents, timesteps, embeds, s.guidance_scale, do_cfg)
        _, log_prob = reference_ddim_step(trainer.scheduler, noise_pred, timesteps, latents, s.eta, next_latents)
    loss_function = type(trainer.estimator).loss_function  # the run's per-step log-prob loss (ddpo.policy.losses)
    loss, info = loss_function(log_prob.float(), samples.log_probs[i, j], weights[i], t.clip_range)
    info["loss"] = loss.detach()
    return loss, info


def reference_optimise(trainer, epoch: int, samples, weights: torch.Tensor) -> dict[str, float]:
    """Training the straightforward way: the same optimiser steps on the same pairs as ``Trainer.optimise``, but
    each step is computed in UNet calls of ``sample.batch_size`` pairs whose gradients are accumulated.

    Returns the mean loss over optimiser steps and the mean gradient norm.
    """
    s, t = trainer.config.sample, trainer.config.train
    trainer.unet.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # the plain torch optimiser
    num_samples = samples.latents.shape[0]
    pairs = num_samples * trainer.steps_per_trajectory
    step_pairs = t.batch_size * t.gradient_accumulation_steps
    call_pairs = s.batch_size
    max_norm = t.max_grad_norm if t.max_grad_norm > 0 else math.inf
    losses, grad_norms = [], []
    for inner in range(t.num_inner_epochs):
        pair_traj, pair_step = trainer.training_pairs(epoch, inner, num_samples)
        for first in range(0, pairs, step_pairs):
            step_loss = 0.0
            for start in range(first, first + step_pairs, call_pairs):
                stop = min(start + call_pairs, first + step_pairs)
                i, j = pair_traj[start:stop], pair_step[start:stop]
                loss, _ = reference_minibatch_loss(trainer, samples, weights, i, j)
                loss = loss * (stop - start) / step_pairs  # the step's loss is the mean over its pairs
                loss.backward()
                step_loss += loss.item()
            grad_norms.append(float(torch.nn.utils.clip_grad_norm_(trainer.params, max_norm)))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
    return {"loss": sum(losses) / len(losses), "grad_norm": sum(grad_norms) / len(grad_norms)}


# ---------------------------------------------------------------------------------------------- measuring


class PeakMemory:
    """Peak memory while the context is open: ``torch.cuda.max_memory_allocated`` on a GPU, else the process RSS
    sampled every ``interval`` seconds by a thread (MiB in :attr:`peak_mib`)."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device, self.interval, self.peak_mib = device, interval, 0.0
        self._stop = threading.Event()

    @staticmethod
    def rss_mib() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:  # not Linux: the lifetime maximum is the best we have
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mib = max(self.peak_mib, self.rss_mib())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _release_freed_memory()  # so that memory a previous run freed does not count as this run's RSS
            self.peak_mib = self.rss_mib()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mib = max(self.peak_mib, self.rss_mib())


def _release_freed_memory() -> None:
    """Give memory that the allocator keeps after ``free`` back to the OS (glibc ``malloc_trim``; else nothing)."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def plain_unet(unet):
    """The UNet as the straightforward way runs it: without ours' ``torch.compile``, channels-last weights and
    gradient checkpointing (restored on exit), so that those options speed up ours only."""
    compiled = getattr(unet, "_compiled_call_impl", None)
    channels_last = any(
        p.ndim == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        for p in unet.parameters()
    )
    checkpointing = getattr(unet, "is_gradient_checkpointing", False)
    unet._compiled_call_impl = None
    if channels_last:
        unet.to(memory_format=torch.contiguous_format)
    if checkpointing:
        unet.disable_gradient_checkpointing()
    try:
        yield unet
    finally:
        unet._compiled_call_impl = compiled
        if channels_last:
            unet.to(memory_format=torch.channels_last)
        if checkpointing:
            unet.enable_gradient_checkpointing()


@contextmanager
def _timed_decoding(totals: dict[str, float], device: torch.device):
    """Time every :func:`ddpo.policy.sampling.decode_latents` call made by ours' sampler (it decodes inside the batch
    loop), adding the seconds to ``totals["decoding_seconds"]``."""
    original = sampling.decode_latents

    def timed(*args, **kwargs):
        _sync(device)
        start = time.perf_counter()
        images = original(*args, **kwargs)
        _sync(device)
        totals["decoding_seconds"] += time.perf_counter() - start
        return images

    sampling.decode_latents = timed
    try:
        yield
    finally:
        sampling.decode_latents = original


class EpochBench:
    """Runs epoch ``epoch`` of ``config`` either way, each time from the same initial weights and optimiser state.

    A :class:`~ddpo.trainer.Trainer` is built in a temporary run directory; ours uses its phases unchanged.
    """

    def __init__(self, config, run_dir: Path, epoch: int = 0):
        self.config, self.epoch = config, epoch
        self.trainer = Trainer(config, run_dir)
        self.device = self.trainer.accelerator.device
        self._initial = {
            "params": [p.detach().clone() for p in self.trainer.params],
            "optimizer": copy.deepcopy(self.trainer.optimizer.state_dict()),
            "tracker": copy.deepcopy(self.trainer.tracker.state_dict()) if self.trainer.tracker else None,
        }

    def reset(self) -> None:
        """Back to the initial trained weights, optimiser state and per-prompt statistics."""
        tr = self.trainer
        with torch.no_grad():
            for param, value in zip(tr.params, self._initial["params"]):
                param.copy_(value)
        tr.optimizer.load_state_dict(copy.deepcopy(self._initial["optimizer"]))
        tr.optimizer.zero_grad(set_to_none=True)
        if tr.tracker is not None:
            tr.tracker.load_state_dict(copy.deepcopy(self._initial["tracker"]))
        tr.global_step = 0

    def run(self, mode: str) -> dict[str, float]:
        """One epoch in ``mode`` (``ours`` or ``reference``): per-phase seconds, throughput, peak memory, loss."""
        from concurrent.futures import ThreadPoolExecutor

        self.reset()
        with contextlib.ExitStack() as stack:
            if mode == "reference":
                stack.enter_context(plain_unet(self.trainer.accelerator.unwrap_model(self.trainer.unet)))
            executor = stack.enter_context(ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward"))
            self.trainer.executor = executor
            _sync(self.device)
            cpu_start = time.process_time()
            with PeakMemory(self.device) as mem:
                result = self._ours() if mode == "ours" else self._reference()
            result["cpu_seconds"] = time.process_time() - cpu_start
        s = self.config.sample
        images = s.batch_size * s.num_batches_per_epoch
        pairs = images * self.trainer.steps_per_trajectory * self.config.train.num_inner_epochs
        result["images_per_second"] = images / max(result["sampling_seconds"] + result["decoding_seconds"], 1e-9)
        result["pairs_per_second"] = pairs / max(result["training_seconds"], 1e-9)
        result["peak_memory_mib"] = mem.peak_mib
        return result

    def _ours(self) -> dict[str, float]:
        tr, epoch = self.trainer, self.epoch
        totals = {"decoding_seconds": 0.0}
        start = time.perf_counter()
        with _timed_decoding(totals, self.device):
            samples, rewards, _, timings = tr.sample_and_score(epoch)
        all_rewards, all_prompts = tr.gather(rewards, samples.prompts)
        weights = tr.compute_weights(all_rewards, all_prompts)
        self.last_epoch = (samples, weights)
        _sync(self.device)
        train_start = time.perf_counter()
        info = tr.optimise(epoch, samples, weights)
        _sync(self.device)
        end = time.perf_counter()
        return {
            "sampling_seconds": timings["sampling_seconds"] - totals["decoding_seconds"],
            "decoding_seconds": totals["decoding_seconds"],
            "scoring_seconds": timings["scoring_seconds"],
            "training_seconds": end - train_start,
            "total_seconds": end - start,
            "loss": info["loss"],
            "grad_norm": info["grad_norm"],
        }

    def _reference(self) -> dict[str, float]:
        tr, epoch, c, s = self.trainer, self.epoch, self.config, self.config.sample
        if tr.family.name != "sd":
            raise ValueError(
                f"the reference mode is ddpo-pytorch's Stable Diffusion 1.x/2.x loop; model.family={tr.family.name} "
                "has no reference: use --mode ours"
            )
        acc, pipe = tr.accelerator, tr.pipe
        tr.unet.eval()
        batches, seconds = [], dict.fromkeys(PHASES, 0.0)
        start = time.perf_counter()
        for b in range(s.num_batches_per_epoch):
            phase = time.perf_counter()
            prompts = draw_prompts(tr.prompts, s.batch_size, s.samples_per_prompt, c.seed, epoch, b, acc.process_index)
            embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts, acc.device)
            seed = derive_seed(c.seed, Stream.SAMPLING_NOISE, epoch, b, acc.process_index)
            generator = torch.Generator(device=acc.device).manual_seed(seed)
            latents, log_probs, timesteps = reference_sample(
                tr.unet,
                tr.scheduler,
                embeds,
                tr.negative_embeds,
                s.num_steps,
                s.guidance_scale,
                s.eta,
                generator,
                c.mixed_precision,
            )
            _sync(self.device)
            decode_start = time.perf_counter()
            images = reference_decode(pipe.vae, latents[:, -1])
            _sync(self.device)
            seconds["sampling_seconds"] += decode_start - phase
            seconds["decoding_seconds"] += time.perf_counter() - decode_start
            batches.append(Trajectories(prompts, embeds, tr.negative_embeds, latents, log_probs, timesteps, images))
        score_start = time.perf_counter()
        rewards = torch.cat([tr.score(batch.images, batch.prompts)[0] for batch in batches])
        seconds["scoring_seconds"] = time.perf_counter() - score_start
        samples = Trajectories.cat(batches)
        all_rewards, all_prompts = tr.gather(rewards, samples.prompts)
        weights = tr.compute_weights(all_rewards, all_prompts)
        train_start = time.perf_counter()
        info = reference_optimise(tr, epoch, samples, weights)
        _sync(self.device)
        end = time.perf_counter()
        seconds["training_seconds"] = end - train_start
        seconds["total_seconds"] = end - start
        return {**seconds, **info}


def median_seconds(fn, repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls of ``fn()`` after one unmeasured warm-up call (for the benchmark
    scripts' tables)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def training_flops_per_pair(bench: EpochBench) -> float:
    """Model FLOPs of one training pair: ``torch.utils.flop_counter`` over one training minibatch (forward, CFG rows
    included, and backward) of ours on the last epoch's samples, divided by its pairs. The weights are restored."""
    from torch.utils.flop_counter import FlopCounterMode

    tr = bench.trainer
    samples, weights = bench.last_epoch
    i, j = (x[: bench.config.train.batch_size] for x in tr.training_pairs(bench.epoch, 0, samples.latents.shape[0]))
    with FlopCounterMode(display=False) as counter:
        loss, _ = tr.minibatch_loss(samples, weights, i, j)
        loss.backward()
    tr.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(i)


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 10) -> float:
    """The measured dense matmul rate of ``device`` in ``dtype`` (TFLOP/s): the best of ``repeats`` square products
    of side ``size`` (8192 on a GPU, 1024 on a CPU) after a warm-up. The MFU's denominator."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def run_bench(
    config,
    repeats: int = 3,
    warmup: int = 1,
    modes: tuple[str, ...] = MODES,
    run_dir: Path | None = None,
) -> dict[str, Any]:
    """Median per-phase results of each mode over ``repeats`` epochs after ``warmup`` unmeasured ones.

    Returns ``{"ours": {...}, "reference": {...}, "ratio_total": ours / reference total seconds, "ratios": {...},
    "runs": {mode: [per-repeat results]}, "machine": {...}, "config": {...}}`` (modes not run are left out).
    """
    with tempfile.TemporaryDirectory(prefix="ddpo-bench-") as tmp:
        bench = EpochBench(config, Path(run_dir) if run_dir is not None else Path(tmp) / "run")
        for _ in range(warmup):
            for mode in modes:
                bench.run(mode)
        runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
        for r in range(repeats):
            for mode in modes if r % 2 == 0 else tuple(reversed(modes)):  # alternate the order against drift
                runs[mode].append(bench.run(mode))
        device = bench.device
        flops = training_flops_per_pair(bench) if "ours" in modes else None
    result: dict[str, Any] = {}
    for mode in modes:
        keys = runs[mode][0].keys()
        result[mode] = {key: statistics.median(run[key] for run in runs[mode]) for key in keys}
    if len(modes) == 2:
        ours, ref = result["ours"], result["reference"]
        result["ratio_total"] = ours["total_seconds"] / ref["total_seconds"]
        result["ratios"] = {
            k: ours[k] / ref[k] if ref[k] > 0 else None for k in (*PHASES, "peak_memory_mib", "cpu_seconds")
        }
        result["max_abs_loss_difference"] = max(
            abs(a["loss"] - b["loss"]) for a, b in zip(runs["ours"], runs["reference"])
        )
    result["runs"] = runs
    result["repeats"], result["warmup"] = repeats, warmup
    result["machine"] = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if flops is not None:
        dtype = AUTOCAST_DTYPES[config.mixed_precision] or torch.float32
        peak = matmul_tflops(device, dtype)
        achieved = flops * result["ours"]["pairs_per_second"] / 1e12
        result["mfu"] = {
            "training_flops_per_pair": flops,
            "training_tflops": achieved,
            "peak_matmul_tflops": peak,
            "matmul_dtype": str(dtype).removeprefix("torch."),
            "training_mfu": achieved / peak,
        }
    result["config"] = to_dict(config)
    return result


def format_table(result: dict[str, Any]) -> str:
    """The human-readable table: one row per phase, a column per mode and the ours / reference ratio."""
    modes = [m for m in MODES if m in result]
    rows = [
        ("sampling (s)", "sampling_seconds"),
        ("decoding (s)", "decoding_seconds"),
        ("scoring, waited (s)", "scoring_seconds"),
        ("training (s)", "training_seconds"),
        ("total epoch (s)", "total_seconds"),
        ("images / s", "images_per_second"),
        ("pairs / s", "pairs_per_second"),
        ("peak memory (MiB)", "peak_memory_mib"),
        ("CPU time, process (s)", "cpu_seconds"),
        ("loss (mean)", "loss"),
    ]
    header = f"{'phase':22s}" + "".join(f"{m:>14s}" for m in modes) + (f"{'ours/ref':>10s}" if len(modes) == 2 else "")
    lines = [header, "-" * len(header)]
    for label, key in rows:
        values = [result[m][key] for m in modes]
        cells = "".join(f"{v:14.4g}" if key == "loss" else f"{v:14.3f}" for v in values)
        if len(modes) == 2 and key not in ("loss",):
            cells += f"{values[0] / values[1]:10.3f}" if values[1] > 0 else f"{'-':>10s}"
        lines.append(f"{label:22s}{cells}")
    m = result["machine"]
    lines.append(
        f"median of {result['repeats']} repeats after {result['warmup']} warm-up; device {m['device']}"
        f"{' (' + m['gpu'] + ')' if m['gpu'] else ''}, torch threads {m['torch_threads']}, "
        f"1-min load {m['load_average_1min']:.2f}"
    )
    if "mfu" in result:
        f = result["mfu"]
        lines.append(
            f"training (ours): {f['training_flops_per_pair'] / 1e9:.3g} GFLOP per pair (forward + backward, counted), "
            f"{f['training_tflops']:.3g} TFLOP/s; measured {f['matmul_dtype']} matmul peak {f['peak_matmul_tflops']:.3g} "
            f"TFLOP/s; model-FLOPs utilisation {100 * f['training_mfu']:.1f} %"
        )
    if "ratio_total" in result:
        lines.append(
            f"ratio_total (ours / reference epoch time) = {result['ratio_total']:.3f}; "
            f"max |loss ours - loss reference| = {result['max_abs_loss_difference']:.3g}"
        )
    return "\n".join(lines)


def main(
    config,
    json_path: str | None = None,
    repeats: int = 3,
    warmup: int = 1,
    threads: int | None = None,
    mode: str = "both",
) -> dict[str, Any]:
    """The ``ddpo bench`` command: run, print the table, optionally write JSON."""
    if mode not in ("both", *MODES):
        raise ValueError(f"--mode must be both, ours or reference; got {mode!r}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"--repeats must be >= 1 and --warmup >= 0; got {repeats} and {warmup}")
    if threads is not None:
        torch.set_num_threads(threads)
    if mode != "ours" and config.sample.scheduler != "ddim":
        raise ValueError(
            "the reference mode implements ddpo-pytorch's DDIM step: use sample.scheduler=ddim or --mode ours"
        )
    if mode != "ours" and config.train.kl_coef > 0:
        raise ValueError("the reference mode does not implement train.kl_coef > 0: set it to 0 or use --mode ours")
    modes = MODES if mode == "both" else (mode,)
    result = run_bench(config, repeats=repeats, warmup=warmup, modes=modes)
    print(format_table(result), flush=True)
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"ddpo bench: wrote {path}", flush=True)
    return result


# ---------------------------------------------------------------------------------------------- calibration


def calibration_key(config) -> str:
    """What a calibration depends on: the machine (CPU model or GPU name, torch, threads), the model and the shapes."""
    import hashlib

    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = torch.cuda.get_device_name(0) if device == "cuda" else _cpu_model()
    s, m = config.sample, config.model
    parts = [
        machine,
        torch.__version__,
        str(torch.get_num_threads()),
        m.pretrained,
        str(m.lora_rank),
        str(s.resolution),
    ]
    parts += [config.mixed_precision, str(s.guidance_scale > 1), str(config.train.batch_size)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def calibrate(config, repeats: int = 3, pairs: int = 32) -> dict[str, Any]:
    """Time the hardware-dependent execution choices of the training phase on this machine and model: pairs per
    training UNet call (``train.batch_size``, with the old log-probs' recomputation it costs when it differs from
    ``sample.batch_size``) and channels-last weights. Each candidate trains the same ``pairs`` (trajectory, timestep)
    pairs of one real sampled batch (forward + backward, gradients discarded); the median of ``repeats`` after a
    warm-up. Returns the table rows and the recommended overrides."""
    from ..training.config import recomputes_old_log_probs

    with tempfile.TemporaryDirectory(prefix="ddpo-calibrate-") as tmp:
        tr = Trainer(config, Path(tmp) / "run")
        s = config.sample
        samples = tr.sample(tr.accelerator.unwrap_model(tr.unet), tr.prompts[: s.batch_size], seed=0)
        weights = torch.ones(s.batch_size, device=tr.accelerator.device)
        i, j = (x.repeat((pairs + len(x) - 1) // len(x))[:pairs] for x in tr.training_pairs(0, 0, s.batch_size))
        unet = tr.accelerator.unwrap_model(tr.unet)

        def seconds_per_pair(call: int, forward_only: bool = False) -> float:
            times = []
            for r in range(repeats + 1):
                _sync(tr.accelerator.device)
                start = time.perf_counter()
                for first in range(0, pairs, call):
                    ii, jj = i[first : first + call], j[first : first + call]
                    if forward_only:
                        with torch.no_grad():
                            tr.estimator.recompute(unet, samples, ii, jj)
                    else:
                        loss, _ = tr.minibatch_loss(samples, weights, ii, jj)
                        loss.backward()
                _sync(tr.accelerator.device)
                if r:
                    times.append((time.perf_counter() - start) / pairs)
                tr.optimizer.zero_grad(set_to_none=True)
            return statistics.median(times)

        rows = []
        recompute = seconds_per_pair(s.batch_size, forward_only=True)
        for call in sorted({4, 8, 16, 32, s.batch_size, config.train.batch_size}):
            if call > pairs:
                continue
            cost = seconds_per_pair(call)
            extra = recompute if call != s.batch_size and recomputes_old_log_probs(config) else 0.0
            rows.append({"choice": f"train.batch_size={call}", "seconds_per_pair": cost + extra, "recompute": extra})
        best = min(rows, key=lambda row: row["seconds_per_pair"])
        call = int(best["choice"].split("=")[1])
        unet.to(memory_format=torch.channels_last)
        channels_last = seconds_per_pair(call)
        unet.to(memory_format=torch.contiguous_format)
        rows.append({"choice": f"train.batch_size={call} model.channels_last=true", "seconds_per_pair": channels_last})
    overrides = [best["choice"]]
    if channels_last < 0.97 * best["seconds_per_pair"]:
        overrides.append("model.channels_last=true")
    return {"key": calibration_key(config), "machine": _cpu_model(), "rows": rows, "recommended": overrides}


def format_calibration(result: dict[str, Any]) -> str:
    lines = [f"ddpo bench --calibrate ({result['machine']}; cache key {result['key']})"]
    lines.append(f"{'choice':48s}{'ms per training pair':>22s}")
    for row in result["rows"]:
        note = f"  (incl. {1e3 * row['recompute']:.1f} ms re-scoring old log-probs)" if row.get("recompute") else ""
        lines.append(f"{row['choice']:48s}{1e3 * row['seconds_per_pair']:22.2f}{note}")
    lines.append("recommended overrides: " + " ".join(result["recommended"]))
    lines.append(
        "(keep train.batch_size * train.gradient_accumulation_steps, the pairs per optimiser step, as it was: "
        "the maths is then unchanged)"
    )
    return "\n".join(lines)


def calibrate_main(config, repeats: int = 3, refresh: bool = False) -> dict[str, Any]:
    """``ddpo bench --calibrate``: measure (or read the cached measurement of this machine and model) and print."""
    cache = Path(os.environ.get("DDPO_CACHE", Path.home() / ".cache" / "ddpo")) / "calibration"
    path = cache / f"{calibration_key(config)}.json"
    if path.is_file() and not refresh:
        result = json.loads(path.read_text())
        print(f"ddpo bench: cached calibration {path} (--refresh to measure again)", flush=True)
    else:
        result = calibrate(config, repeats=repeats)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, path)
    print(format_calibration(result), flush=True)
    return result
