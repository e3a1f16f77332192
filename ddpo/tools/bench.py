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
``model.channels_last`` and ``train.gradient_checkpointing`` are switched off for it
(:func:`~ddpo.tools.bench_reference.plain_denoiser`). Each phase is the median over ``repeats`` epochs after
``warmup`` epochs;
modes alternate within a repeat so that a change of machine load hits both. Peak memory is the process RSS on a
CPU (sampled by a thread) and ``torch.cuda.max_memory_allocated`` on a GPU.

Ours runs through the trainer's public API only: :meth:`~ddpo.training.Trainer.sample_and_score` (with a timed
``decode``), :meth:`~ddpo.training.Trainer.scoring_executor`, :meth:`~ddpo.training.Trainer.optimise` and
:meth:`~ddpo.training.Trainer.snapshot` / :meth:`~ddpo.training.Trainer.restore` between measured epochs. The
reference's maths is :mod:`ddpo.tools.bench_reference`, the measuring :mod:`ddpo.tools.bench_measure`, ``ddpo bench
--calibrate`` :mod:`ddpo.tools.bench_calibrate`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..policy.sampling import AUTOCAST_DTYPES, Trajectories, decode_latents, encode_prompts
from ..training.config import to_dict
from ..training.prompts import draw_prompts
from ..training.scoring import concat_components
from ..training.streams import Stream, derive_seed
from ..training.trainer import Trainer
from .bench_calibrate import calibrate, calibrate_main, calibration_key, format_calibration  # noqa: F401 (re-exported)
from .bench_measure import PeakMemory, matmul_tflops, median_seconds, sync  # noqa: F401 (median_seconds: re-exported)
from .bench_reference import (
    plain_denoiser,
    reference_decode,
    reference_minibatch_loss,  # noqa: F401 (re-exported: tests/test_bench.py)
    reference_optimise,
    reference_sample,
)

PHASES = ("sampling_seconds", "decoding_seconds", "scoring_seconds", "training_seconds", "total_seconds")
MODES = ("ours", "reference")


class EpochBench:
    """Runs epoch ``epoch`` of ``config`` either way, each time from the same initial weights and optimiser state.

    A :class:`~ddpo.training.Trainer` is built in ``run_dir``; ours uses its phases unchanged. After a run the
    trainer holds that run's trained weights (:attr:`trained`: them per mode, for comparison).
    """

    def __init__(self, config, run_dir: Path, epoch: int = 0):
        self.config, self.epoch = config, epoch
        self.trainer = Trainer(config, run_dir)
        self.device = self.trainer.accelerator.device
        self.initial = self.trainer.snapshot()
        self.trained: dict[str, dict[str, torch.Tensor]] = {}

    def set_initial(self) -> None:
        """Make the trainer's current state (e.g. weights set by hand) the one every run starts from."""
        self.initial = self.trainer.snapshot()

    def reset(self) -> None:
        """Back to the initial trained weights, optimiser state, per-prompt statistics and global step."""
        self.trainer.restore(self.initial)

    @property
    def weight_update_difference(self) -> float:
        """How far apart the weight updates of the last ours and reference epochs are: ``||update_ours -
        update_reference|| / ||update_ours||`` over all trained tensors (float32 noise: small; a different epoch: ~1).
        Not a largest entry: Adam's first steps move every weight by about the learning rate whatever the size of its
        gradient, so a near-zero gradient whose sign float32 noise flips moves one weight 2 lr apart."""
        ours, ref = self.trained["ours"], self.trained["reference"]
        names, start = self.trainer.trainable_names, self.initial.params
        apart = sum(((ours[n] - ref[n]).double() ** 2).sum().item() for n in names)
        moved = sum(((ours[n] - p).double() ** 2).sum().item() for n, p in zip(names, start))
        return (apart / moved) ** 0.5 if moved > 0 else math.inf

    def run(self, mode: str) -> dict[str, float]:
        """One epoch in ``mode`` (``ours`` or ``reference``): per-phase seconds, throughput, peak memory, loss,
        optimiser steps and VAE decode calls."""
        self.reset()
        with contextlib.ExitStack() as stack:
            if mode == "reference":
                stack.enter_context(plain_denoiser(self.trainer.accelerator.unwrap_model(self.trainer.denoiser)))
            stack.enter_context(self.trainer.scoring_executor())
            sync(self.device)
            cpu_start = time.process_time()
            with PeakMemory(self.device) as mem:
                result = self._ours() if mode == "ours" else self._reference()
            result["cpu_seconds"] = time.process_time() - cpu_start
        self.trained[mode] = {k: v.detach().clone() for k, v in self.trainer.trainable_state().items()}
        s = self.config.sample
        images = s.batch_size * s.num_batches_per_epoch
        pairs = images * self.trainer.steps_per_trajectory * self.config.train.num_inner_epochs
        result["images_per_second"] = images / max(result["sampling_seconds"] + result["decoding_seconds"], 1e-9)
        result["pairs_per_second"] = pairs / max(result["training_seconds"], 1e-9)
        result["peak_memory_mib"] = mem.peak_mib
        return result

    def _ours(self) -> dict[str, float]:
        tr, epoch = self.trainer, self.epoch
        decoding = {"seconds": 0.0, "calls": 0}

        def timed_decode(*args, **kwargs):  # the sampler's own decoding, timed
            sync(self.device)
            start = time.perf_counter()
            images = decode_latents(*args, **kwargs)
            sync(self.device)
            decoding["seconds"] += time.perf_counter() - start
            decoding["calls"] += 1
            return images

        start = time.perf_counter()
        samples, rewards, _, timings = tr.sample_and_score(epoch, decode=timed_decode)
        all_rewards, all_prompts = tr.gather(rewards, samples.prompts)
        weights = tr.compute_weights(all_rewards, all_prompts, tr.gather_components(tr.reward_components))
        self.last_epoch = (samples, weights)
        sync(self.device)
        train_start = time.perf_counter()
        step_before = tr.global_step
        info = tr.optimise(epoch, samples, weights)
        sync(self.device)
        end = time.perf_counter()
        return {
            "sampling_seconds": timings["sampling_seconds"] - decoding["seconds"],
            "decoding_seconds": decoding["seconds"],
            "scoring_seconds": timings["scoring_seconds"],
            "training_seconds": end - train_start,
            "total_seconds": end - start,
            "loss": info["loss"],
            "grad_norm": info["grad_norm"],
            "optimizer_steps": tr.global_step - step_before,
            "decode_calls": decoding["calls"],
        }

    def _reference(self) -> dict[str, float]:
        tr, epoch, c, s = self.trainer, self.epoch, self.config, self.config.sample
        if tr.family.name != "sd":
            raise ValueError(
                f"the reference mode is ddpo-pytorch's Stable Diffusion 1.x/2.x loop; model.family={tr.family.name} "
                "has no reference: use --mode ours"
            )
        acc, pipe = tr.accelerator, tr.pipe
        tr.denoiser.eval()
        batches, seconds, decode_calls = [], dict.fromkeys(PHASES, 0.0), 0
        start = time.perf_counter()
        for b in range(s.num_batches_per_epoch):
            phase = time.perf_counter()
            prompts = draw_prompts(tr.prompts, s.batch_size, s.samples_per_prompt, c.seed, epoch, b, acc.process_index)
            embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts, acc.device)
            seed = derive_seed(c.seed, Stream.SAMPLING_NOISE, epoch, b, acc.process_index)
            generator = torch.Generator(device=acc.device).manual_seed(seed)
            latents, log_probs, timesteps = reference_sample(
                tr.denoiser,
                tr.scheduler,
                embeds,
                tr.negative_cond,
                s.num_steps,
                s.guidance_scale,
                s.eta,
                generator,
                c.mixed_precision,
                tr.latent_size,  # the run's resolution, as ours samples it
            )
            sync(self.device)
            decode_start = time.perf_counter()
            images = reference_decode(pipe.vae, latents[:, -1])
            sync(self.device)
            seconds["sampling_seconds"] += decode_start - phase
            seconds["decoding_seconds"] += time.perf_counter() - decode_start
            decode_calls += 1
            batches.append(Trajectories(prompts, embeds, tr.negative_cond, latents, log_probs, timesteps, images))
        score_start = time.perf_counter()
        scored = [tr.score(batch.images, batch.prompts) for batch in batches]
        rewards = torch.cat([result.values for result in scored])
        components = concat_components(scored)  # train.advantage=per_component's per-sample parts, else None
        seconds["scoring_seconds"] = time.perf_counter() - score_start
        samples = Trajectories.cat(batches)
        all_rewards, all_prompts = tr.gather(rewards, samples.prompts)
        weights = tr.compute_weights(all_rewards, all_prompts, tr.gather_components(components))
        train_start = time.perf_counter()
        info = reference_optimise(tr, epoch, samples, weights)
        sync(self.device)
        end = time.perf_counter()
        seconds["training_seconds"] = end - train_start
        seconds["total_seconds"] = end - start
        return {**seconds, **info, "decode_calls": decode_calls}


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
        result["weight_update_difference"] = bench.weight_update_difference
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
            f"max |loss ours - loss reference| = {result['max_abs_loss_difference']:.3g}; "
            f"|weight update ours - reference| / |update ours| = {result['weight_update_difference']:.3g}"
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
