"""What a run reports outside its logs: the experiment trackers it logs to (TensorBoard, wandb), the start-up line
on where it runs, and the summary printed at its end.

(The per-prompt advantage statistics, :class:`~ddpo.policy.advantages.PerPromptStatTracker`, are another thing: the
trainer calls them its ``advantage_state``.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..models import absent_components, load_code
from .config import ConfigError, RunConfig, to_dict
from .evaluation import paired_change
from .killpoints import kill_point
from .runlog import append_jsonl, read_jsonl, reward_against_samples
from .visualize import save_image_grid


def experiment_trackers(config: RunConfig, run_dir: Path) -> list:
    """``log_with`` -> accelerate trackers: ``"tensorboard"`` and a wandb tracker (project ``ddpo``, named after the
    run, its config attached), built only when asked; wandb is imported only then."""
    names = [name.strip() for name in config.log_with.split(",")]
    if names == ["none"]:
        return []
    out: list = []
    for name in names:
        if name == "tensorboard":
            out.append("tensorboard")
        elif name == "wandb":
            try:
                import wandb  # noqa: F401
            except ImportError as err:
                raise ConfigError(
                    "log_with=wandb needs the wandb package: pip install 'ddpo[wandb]' (or pip install wandb), then "
                    "`wandb login` (or WANDB_MODE=offline); or log_with=tensorboard"
                ) from err
            from accelerate.tracking import WandBTracker

            out.append(WandBTracker("ddpo", name=run_dir.name, dir=str(run_dir), config=to_dict(config)))
        else:
            raise ConfigError(
                f"log_with must be tensorboard, wandb, 'tensorboard,wandb' or none; got {config.log_with!r}"
            )
    return out


def log_image(trackers: list[Any], tag: str, image, step: int) -> None:
    """An image grid (PIL) to every accelerate tracker in ``trackers`` (:func:`experiment_trackers`, as accelerate
    built them) that takes images (TensorBoard, wandb)."""
    import numpy as np

    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({tag: np.asarray(image)[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({tag: [image]}, step=step)


def save_grid(trackers: list[Any], path: Path, tag: str, step: int, images, prompts: list[str], rewards: list[float]):
    """The first 16 ``images`` with their prompts and rewards as one grid PNG at ``path``, logged to ``trackers``
    under ``tag`` at ``step`` (:func:`log_image`)."""
    count = min(16, len(images))
    grid = save_image_grid(images[:count], prompts[:count], rewards[:count], path)
    log_image(trackers, tag, grid, step)


def write_epoch(run_dir: Path, trackers: list[Any], metrics: dict[str, Any], samples, rewards, grid: bool) -> None:
    """An epoch's ``metrics`` appended to ``metrics.jsonl``; with ``grid`` (``log_images``), its first samples with
    their ``rewards`` as ``samples/epoch_EEEE.png``, also logged to ``trackers`` (main process only)."""
    epoch = metrics["epoch"]
    append_jsonl(run_dir / "metrics.jsonl", metrics)
    kill_point("metrics")
    if grid:
        path = run_dir / "samples" / f"epoch_{epoch:04d}.png"
        save_grid(trackers, path, "samples", epoch, samples.images, samples.prompts, rewards.tolist())


def write_eval(run_dir: Path, trackers: list[Any], metrics: dict[str, Any], images, prompts, rewards) -> None:
    """A held-out evaluation's ``metrics`` appended to ``eval.jsonl``; when this process has the first chunk's
    ``images`` (else None), them with their ``prompts`` and ``rewards`` as ``samples/eval_epoch_EEEE.png``, also logged
    to ``trackers`` (main process only)."""
    append_jsonl(run_dir / "eval.jsonl", metrics)
    if images is not None:
        path = run_dir / "samples" / f"eval_epoch_{metrics['epoch']:04d}.png"
        save_grid(trackers, path, "eval/samples", metrics["epoch"], images, prompts, rewards)


def layout_line(accelerator, image_size: int, overlaps: bool, overlap_requested: bool) -> str:
    """The start-up line after :func:`~ddpo.training.progress.describe_batch_sizes` (which gives the batch sizes):
    where the processes run (device, distributed type and backend), the image size and where rewards are scored
    (``overlaps``: in the worker thread; ``overlap_requested``: the config's ``overlap_scoring``)."""
    import torch

    n = accelerator.num_processes
    how = f" ({accelerator.distributed_type.value}, {torch.distributed.get_backend()})" if n > 1 else ""
    if overlaps:
        scoring = "rewards scored in a worker thread while the next batch samples"
    elif overlap_requested:
        scoring = "rewards scored inline (on a CPU a scoring thread competes with sampling for the same cores)"
    else:
        scoring = "rewards scored inline (overlap_scoring=false)"
    return (
        f"ddpo: {n} process{'es' if n > 1 else ''} on {accelerator.device.type}{how}; {image_size} px images; {scoring}"
    )


def run_summary(run_dir: Path, config: RunConfig, reward_name: str, family_name: str, pipe) -> str:
    """A few lines for the end of a run: reward of the first and last epochs and of the held-out evaluations, where
    the outputs are, and the Python that loads the final weights (:func:`ddpo.models.load_code` of the model family
    ``family_name`` and the components ``pipe`` lacks)."""
    m = config.model
    code = load_code(m.pretrained, run_dir / "final", m.use_lora, m.revision, family_name, absent_components(pipe))
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    lines = [f"ddpo: done after {len(metrics)} epochs; run directory {run_dir.resolve()}"]
    if metrics:
        first, last = metrics[0], metrics[-1]
        lines.append(
            f"  training batches, reward ({reward_name}): epoch {first['epoch']} {first['reward_mean']:.4g} "
            f"(std {first['reward_std']:.3g}) -> epoch {last['epoch']} {last['reward_mean']:.4g} "
            f"(std {last['reward_std']:.3g})"
        )
    evals = read_jsonl(run_dir / "eval.jsonl")
    if len(evals) >= 2:
        first, last = evals[0], evals[-1]
        lines.append(
            f"  held-out ({config.eval_prompts}, the same {first['samples']} prompts and noise each time): "
            f"reward {first['reward_mean']:.4g} before epoch {first['epoch']} -> {last['reward_mean']:.4g} "
            f"after epoch {last['epoch']}"
        )
        if (change := paired_change(first.get("rewards"), last.get("rewards"))) is not None:
            mean, se = change
            lines.append(
                f"    paired change {mean:+.4f} +- {se:.2g} (standard error over the {first['samples']} images; "
                "a change within about 2 standard errors is not distinguishable from noise)"
            )
        parts = [
            f"{key.removeprefix('reward/')} {first[key]:.3g} -> {last[key]:.3g}"
            for key in first
            if key.startswith(("reward/", "guard/")) and key.endswith("_mean") and key in last
        ]
        if parts:
            lines.append("    " + ", ".join(parts))
        seen = [r for r in reward_against_samples(metrics, evals) if r["heldout_reward"] is not None]
        if seen:
            lines.append(
                "    held-out reward against samples seen: "
                + ", ".join(f"{r['samples_seen']:,} -> {r['heldout_reward']:.4g}" for r in seen)
            )
        grids = sorted((run_dir / "samples").glob("eval_epoch_*.png"))
        if grids:
            lines.append(f"  held-out grids (same prompts and noise): {grids[0].resolve()} vs {grids[-1].name}")
    lines.append(f"  image grids: {(run_dir / 'samples').resolve()}/epoch_*.png")
    final = run_dir / "final"
    lines.append(f"  weights:     {final.resolve()}; load them with their base model ({config.model.pretrained}):")
    lines += ["", *(f"    {line}" if line else "" for line in code.splitlines()), ""]
    lines.append(f"  or sample and compare: ddpo sample --run {run_dir} --prompt '...'; ddpo eval {run_dir}")
    return "\n".join(lines)
