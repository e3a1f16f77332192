"""What scripts/pretrain_world.py (the UNet world model) and scripts/pretrain_world_flow.py (its flow-matching twin)
share: per-step seeding, the learning-rate schedule, EMA steps and checkpoints, the denoiser's training loop (resume,
EMA, logging, checkpoints around a per-step loss), the held-out evaluation's prompts, sampling and chance level, and
the command-line options and start-up both take.

Every phase is reproducible from ``--seed``: the data and noise of step ``k`` of a phase are a pure function of
``(seed, phase, k)`` (:func:`step_seed`), so a resumed phase sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import world

PHASE_IDS = {"vae": 1, "unet": 2, "clip": 3, "eval": 4, "decoder": 5, "transformer": 6, "tune": 7}
"""Phase ids of :func:`step_seed` (``transformer`` and ``tune`` are scripts/pretrain_world_flow.py's; its ``eval`` reuses
the UNet model's evaluation prompts and noise seeds)."""

EVAL_BATCH = 16
"""Samples per pipeline call in the evaluations; each batch has its own noise seed."""


def step_seed(seed: int, phase: str, step: int) -> int:
    """Seed of the data/noise of one step of one phase."""
    return int(np.random.SeedSequence([seed, PHASE_IDS[phase], step]).generate_state(1)[0])


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cosine_lr(step: int, total: int, base: float, warmup: int = 100, floor: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def captioned_latents(
    seed: int, train_captions: list[str], batch: int, cond_drop: float, vae
) -> tuple[list[str], torch.Tensor, torch.Generator]:
    """One denoiser-training batch, a pure function of ``seed``: scenes of ``batch`` random ``train_captions``, their
    captions (each dropped to "" with probability ``cond_drop``, for classifier-free guidance) and VAE latents drawn
    from the posterior, shifted and scaled as the pipeline decodes them (``(z - shift_factor) * scaling_factor``; no
    shift for the UNet model's VAE). Returns the step's generator too, for the step's further draws."""
    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng, train_captions[i]) for i in rng.integers(len(train_captions), size=batch)]
    prompts = [world.caption(sc) if rng.random() >= cond_drop else "" for sc in scenes]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        posterior = vae.encode(world.render(scenes) * 2 - 1).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
    latents = (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
    return prompts, latents, generator


def caption_tokens(tokenizer) -> Callable[[list[str]], torch.Tensor]:
    """``tokens(prompts) -> [B, model_max_length]`` input ids, each distinct caption tokenised once."""
    cache: dict[str, torch.Tensor] = {}

    def tokens(prompts: list[str]) -> torch.Tensor:
        for p in set(prompts) - cache.keys():
            cache[p] = tokenizer(
                p, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids[0]
        return torch.stack([cache[p] for p in prompts])

    return tokens


def optimizer_step(loss: torch.Tensor, opt, params, lr: float) -> torch.Tensor:
    """Set the learning rate, back-propagate ``loss``, clip the gradient norm of ``params`` at 1 and step ``opt``.
    Returns the gradient norm."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return grad_norm


def ema_step(loss: torch.Tensor, opt, params: list, lr: float, ema: list, ema_decay: float, step: int) -> torch.Tensor:
    """:func:`optimizer_step`, then move the EMA ``ema`` of ``params`` (decay ``min(ema_decay, (1 + step) / (10 +
    step))``). Returns the gradient norm."""
    grad_norm = optimizer_step(loss, opt, params, lr)
    decay = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema, params):
            e.lerp_(p.detach(), 1 - decay)
    return grad_norm


@torch.no_grad()
def load_ema(ema: list, params: list) -> None:
    """Copy the EMA weights into ``params`` (in place)."""
    for e, p in zip(ema, params):
        p.copy_(e)


def save_ckpt(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_ckpt(path: Path) -> dict | None:
    return torch.load(path, weights_only=True) if path.exists() else None


def resume(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, phase: str) -> int:
    """Load a phase's ``{"model", "opt", "step"}`` checkpoint into ``model`` and ``opt`` if it exists; the step to
    continue from (0 without one)."""
    if (ckpt := load_ckpt(path)) is None:
        return 0
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    log(f"{phase}: resumed at step {ckpt['step']}")
    return ckpt["step"]


def save_grid(images: torch.Tensor, path: Path, nrow: int = 16) -> None:
    from torchvision.utils import save_image

    save_image(images.clamp(0, 1), path, nrow=nrow)


def train_denoiser(
    phase: str,
    modules: dict[str, torch.nn.Module],
    params: list[torch.nn.Parameter],
    step_loss: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    args,
    *,
    steps: int,
    lr: float,
    warmup: int,
) -> None:
    """The denoiser phases' loop: AdamW on ``params`` with the cosine schedule (``warmup`` steps), gradient norm
    clipped at 1, an EMA of ``params`` (``args.ema_decay``); resumed from and checkpointed to ``WORK/<phase>.pt``
    every ``args.save_every`` steps (``modules``' state dicts under their keys, the optimiser, the EMA, the step);
    the EMA weights are loaded into ``params`` at the end. ``step_loss(step)`` returns the step's ``(loss, mse)``
    (``mse`` is only logged, as a running mean)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema = [p.detach().clone() for p in params]
    ckpt_path = args.work / f"{phase}.pt"
    start = 0
    if (ckpt := load_ckpt(ckpt_path)) is not None:
        for key, module in modules.items():
            module.load_state_dict(ckpt[key])
        opt.load_state_dict(ckpt["opt"])
        ema = ckpt["ema"]
        start = ckpt["step"]
        log(f"{phase}: resumed at step {start}")
    t0 = time.time()
    running = None
    for step in range(start, steps):
        loss, mse = step_loss(step)
        grad_norm = ema_step(loss, opt, params, cosine_lr(step, steps, lr, warmup=warmup), ema, args.ema_decay, step)
        running = mse.item() if running is None else 0.98 * running + 0.02 * mse.item()
        if step % 50 == 0 or step == steps - 1:
            rate = (step + 1 - start) / (time.time() - t0)
            log(
                f"{phase} step {step} mse {running:.4f} grad {grad_norm.item():.2f} "
                f"({time.time() - t0:.0f}s, {rate:.2f} it/s)"
            )
        if (step + 1) % args.save_every == 0 or step == steps - 1:
            states = {key: module.state_dict() for key, module in modules.items()}
            save_ckpt(ckpt_path, **states, opt=opt.state_dict(), ema=ema, step=step + 1)
    load_ema(ema, params)


def eval_prompts(args) -> tuple[list[str], list[int]]:
    """The evaluation's ``args.eval_samples`` held-out captions and the noise seed of each batch of
    :data:`EVAL_BATCH` (the same for the UNet model and its twin)."""
    _, heldout = world.split_captions(args.prompt_seed)
    rng = np.random.default_rng(step_seed(args.seed, "eval", 0))
    prompts = [heldout[i] for i in rng.integers(len(heldout), size=args.eval_samples)]
    seeds = [step_seed(args.seed, "eval", i + 1) for i in range(0, len(prompts), EVAL_BATCH)]
    return prompts, seeds


@torch.no_grad()
def sample_and_score(pipe, reward, prompts: list[str], seeds: list[int], **call_kwargs):
    """``pipe(batch, generator=Generator().manual_seed(seed), output_type="pt", **call_kwargs)`` for each batch of
    :data:`EVAL_BATCH` prompts and its seed, scored by ``reward``: ``(images, scores, infos)``, ``infos`` the reward's
    ``last_info()`` of each batch."""
    images, scores, infos = [], [], []
    for i, seed in zip(range(0, len(prompts), EVAL_BATCH), seeds):
        batch = prompts[i : i + EVAL_BATCH]
        generator = torch.Generator().manual_seed(seed)
        out = pipe(batch, generator=generator, output_type="pt", **call_kwargs).images
        images.append(out)
        scores.append(reward(out, batch))
        infos.append(reward.last_info())
    return torch.cat(images), torch.cat(scores), infos


@torch.no_grad()
def eval_result(reward, images: torch.Tensor, prompts: list[str], infos: list[dict]) -> dict[str, float]:
    """The reward's statistics averaged over the batches, and its chance level: the same samples scored against
    other prompts (``chance_shifted/...``: a model that ignores its prompt)."""
    result = {k: float(np.mean([info[k] for info in infos])) for k in infos[0]}
    reward(images, prompts[1:] + prompts[:1])
    result.update({f"chance_shifted/{k.split('/')[1]}": v for k, v in reward.last_info().items()})
    return result


def save_eval_samples(images: torch.Tensor, prompts: list[str], work: Path) -> None:
    """``WORK/eval_samples.png`` (the first 64 samples, 8 a row) and ``WORK/eval_prompts.txt`` (their prompts)."""
    save_grid(images[:64], work / "eval_samples.png", nrow=8)
    (work / "eval_prompts.txt").write_text("\n".join(prompts[:64]) + "\n")


def parser(doc: str, out_help: str, work: str, phases: str, ema_decay: float, save_every: int):
    """The options both scripts take (their defaults differ where given here)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("world/assets"), help=out_help)
    p.add_argument("--work", type=Path, default=Path(work), help="checkpoints, logs, grids")
    p.add_argument("--phases", default=phases, help="comma-separated subset, run in this order")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-seed", type=int, default=0, help="seed of the train / held-out caption split")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 avoids oversubscription on a shared 2-core box)"
    )
    p.add_argument("--batch", type=int, default=32, help="denoiser training batch")
    p.add_argument("--ema-decay", type=float, default=ema_decay)
    p.add_argument("--cond-drop", type=float, default=0.1, help="caption dropout for classifier-free guidance")
    p.add_argument("--save-every", type=int, default=save_every)
    p.add_argument("--eval-samples", type=int, default=256)
    return p


def start(args, name: str) -> list[str]:
    """Threads, output folders and the start-up log line; the phases to run."""
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    log(f"{name}: {vars(args)}")
    return args.phases.split(",")
