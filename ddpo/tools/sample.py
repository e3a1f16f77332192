"""``ddpo sample`` and ``ddpo eval``: images from a base model or a run, and base vs fine-tuned on the same noise.

Both go through the plain diffusers pipeline, the way a user of the result would: the base model is loaded with
:func:`ddpo.models.load_pipeline` (hub id, local folder, ``world`` or ``tiny``) and a run's ``final/`` weights with
``pipe.load_lora_weights(final)`` (or, after full fine-tuning, the pipeline folder ``final/`` itself). Image ``i`` is
drawn from its own ``torch.Generator().manual_seed(seed_i)``, so its noise does not depend on the batch it is in nor
on the model: two models sampled with the same prompts and seeds see the same ``x_T`` and the same per-step noise.
``ddpo sample`` seeds image ``i`` with its ``--seeds`` value itself (one ``x_T`` per seed, shared by the prompts of a
grid column); ``ddpo eval`` gives every (prompt, seed) its own generator seed (:func:`noise_seeds`), because noise shared
across prompts makes their scores correlated and the mean over prompts much noisier than its standard error says.
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..models import load_pipeline, resolve_family
from ..models.family import LOAD_OPTIONS
from ..models.schedulers import SCHEDULERS, build_scheduler, is_known_scheduler
from ..training import rundir
from ..training.config import SampleConfig, eta_problem, guidance_problem
from ..training.evaluation import clustered_change, eval_prompt_list, image_noise_seed, mean_and_se, pass_at_k
from ..training.prompts import load_prompts
from ..training.visualize import image_grid

__all__ = [
    "PASS_AT_SEED_BASE",
    "EvalResult",
    "Model",
    "PassAtK",
    "SamplerOptions",
    "check_count",
    "evaluate",
    "load_model",
    "noise_seeds",
    "pass_at_k_eval",
    "pass_at_seeds",
    "resolve_prompts",
    "sample_images",
    "write_eval",
    "write_pass_at_k",
    "write_samples",
]


@dataclass
class SamplerOptions:
    """How images are drawn: DDIM (or DDPM) steps, eta, classifier-free guidance scale, negative prompt, sampler and
    image size."""

    num_steps: int = SampleConfig.num_steps
    guidance_scale: float = SampleConfig.guidance_scale
    eta: float = SampleConfig.eta
    negative_prompt: str = SampleConfig.negative_prompt
    scheduler: str = SampleConfig.scheduler
    batch_size: int = 8
    resolution: int | None = SampleConfig.resolution
    """Image side in pixels (a run's ``sample.resolution``); None: the pipeline's default, the model's native size."""

    def validate(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"--steps must be at least 1; got {self.num_steps}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1; got {self.batch_size}")
        if not is_known_scheduler(self.scheduler):
            raise ValueError(f"--scheduler {self.scheduler!r} is not a sampler: use one of {', '.join(SCHEDULERS)}")
        # the rules of `ddpo train`'s sample.eta and sample.guidance_scale
        problem = eta_problem(self.eta, self.scheduler, "--eta") or guidance_problem(self.guidance_scale, "--guidance")
        if problem is not None:
            raise ValueError(problem)


@dataclass
class Model:
    """A loaded pipeline and what it is: ``label`` (for tables), the run's config when loaded from a run."""

    pipe: Any
    label: str
    run_config: dict[str, Any] | None = None
    sampler: dict[str, Any] = field(default_factory=dict)
    """The run's sampler settings (``sample:`` of its config), the defaults of ``ddpo sample --run``."""


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    run = Path(run_dir)
    config_file = run / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{run} is not a run directory: it has no config.yaml (give the folder ddpo train wrote)"
        )
    return rundir.read_run_config(run)  # bounded; one line for bad YAML or an empty file


def load_model(model: str | None = None, run: str | Path | None = None, scheduler: str = "ddim") -> Model:
    """The base model ``model`` (any ``model.pretrained`` value), or the result of the run ``run``: its base model
    (``model.pretrained``/``model.revision`` of its ``config.yaml``) with ``final/`` loaded as plain diffusers does."""
    from .report import _quiet_loading

    if (model is None) == (run is None):
        raise ValueError("give either a base model (--model) or a run directory (--run), not both")
    with _quiet_loading():
        if model is not None:
            return Model(_load(model, None, scheduler), label=model)
        run = Path(run)
        config = read_run_config(run)
        final = run / "final"
        if not final.is_dir():
            raise FileNotFoundError(
                f"{final} does not exist: the run has not finished (resume it with `ddpo train --resume {run}`)"
            )
        base = config["model"]
        family = base.get("family", "auto")
        options = {key: base.get(key) for key in LOAD_OPTIONS}
        if base.get("use_lora", True):
            pipe = _load(base["pretrained"], base.get("revision"), scheduler, family, options)
            pipe.load_lora_weights(final)
        else:
            pipe = _load(str(final), None, scheduler, family, options)
    return Model(pipe, label=str(run), run_config=config, sampler=dict(config.get("sample", {})))


def _load(pretrained: str, revision: str | None, scheduler: str, family: str = "auto", options: dict | None = None):
    """:func:`ddpo.models.load_pipeline` with ``scheduler`` for a diffusion model; a flow-matching model gets the
    pipeline's own Euler ODE sampler when ``scheduler`` is a DDPM-style name (``ddpo sample`` uses the pipeline's
    ``__call__``). The family is resolved once and passed on."""
    cls = resolve_family(pretrained, revision, family)
    if cls.flow_matching and not scheduler.startswith("flow"):
        scheduler = "flow_euler"
    return load_pipeline(pretrained, revision, scheduler, cls.name, options)


def sampler_from_run(model: Model, **given: Any) -> SamplerOptions:
    """Sampler options: those given (not None), else the run's, else the defaults of :class:`SamplerOptions`."""
    return sampler_options(model.sampler, **given)


def sampler_options(run: dict[str, Any], **given: Any) -> SamplerOptions:
    """:func:`sampler_from_run` from a run's ``sample:`` settings ``run``, before its model is loaded: checked
    (:meth:`SamplerOptions.validate`)."""
    keys = ("num_steps", "guidance_scale", "eta", "negative_prompt", "scheduler", "resolution")
    values = {key: given[key] if given.get(key) is not None else run.get(key) for key in keys}
    values = {key: value for key, value in values.items() if value is not None}
    if given.get("batch_size") is not None:
        values["batch_size"] = given["batch_size"]
    options = SamplerOptions(**values)
    options.validate()
    return options


def resolve_prompts(
    prompt: list[str] | None, prompt_set: str | None, count: int | None, default_set: str | None = None
) -> list[str]:
    """Prompts from the command line (``--prompt``, in order) or ``count`` of a prompt set or file (the fixed draw
    of :func:`ddpo.training.evaluation.eval_prompt_list`, the same as the trainer's held-out evaluation)."""
    if prompt and prompt_set:
        raise ValueError("give prompts either with --prompt or with --prompts SET_OR_FILE, not both")
    if prompt:
        return list(prompt)
    name = prompt_set or default_set
    if not name:
        raise ValueError(
            "no prompts: give --prompt TEXT (repeatable) or --prompts SET_OR_FILE (`ddpo prompts` lists sets)"
        )
    prompts = load_prompts(name)
    check_count(count)
    return eval_prompt_list(prompts, count or len(prompts))


def check_count(count: int | None) -> None:
    """Raise ValueError for a ``--count`` below 1 (None: not given)."""
    if count is not None and count < 1:
        raise ValueError(f"--count must be at least 1; got {count}")


def sample_images(pipe, prompts: list[str], seeds: list[int], options: SamplerOptions) -> torch.Tensor:
    """Image ``i`` of ``prompts[i]`` from ``torch.Generator().manual_seed(seeds[i])`` through the pipeline's
    ``__call__``, ``options.batch_size`` at a time: ``[N, 3, H, W]`` float32 in ``[0, 1]`` on the CPU."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    use_scheduler(pipe, options.scheduler)
    cfg = options.guidance_scale > 1
    out = []
    for first in range(0, len(prompts), options.batch_size):
        chunk = prompts[first : first + options.batch_size]
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[first : first + options.batch_size]]
        extra = {"eta": options.eta} if "eta" in inspect.signature(pipe.__call__).parameters else {}
        if options.resolution is not None:  # the size the run sampled (and was scored) at
            extra.update(height=options.resolution, width=options.resolution)
        with torch.no_grad():
            images = pipe(
                chunk,
                generator=generators,
                num_inference_steps=options.num_steps,
                guidance_scale=options.guidance_scale,
                negative_prompt=[options.negative_prompt] * len(chunk) if cfg else None,
                output_type="pt",
                **extra,
            ).images
        out.append(images.float().cpu())
    return torch.cat(out)


def use_scheduler(pipe, name: str) -> None:
    """Give ``pipe`` the sampler ``name`` (a run's ``sample.scheduler``) on its own noise schedule, unless it has it
    already. A flow-matching pipeline keeps its Euler ODE sampler (its SDE samplers exist only in training)."""
    if type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler":
        return
    wanted = build_scheduler(name, dict(pipe.scheduler.config))
    if type(wanted) is not type(pipe.scheduler) or dict(wanted.config) != dict(pipe.scheduler.config):
        pipe.scheduler = wanted


def expand(prompts: list[str], seeds: list[int]) -> tuple[list[str], list[int]]:
    """Every prompt with every seed, prompt-major: ``(prompts per image, seeds per image)``."""
    if not seeds:
        raise ValueError("give at least one seed (--seeds)")
    return [p for p in prompts for _ in seeds], [s for _ in prompts for s in seeds]


def noise_seeds(prompts: list[str], seeds: list[int]) -> list[int]:
    """The generator seed of each image of ``ddpo eval`` (image ``i``: ``prompts[i]`` under noise seed ``seeds[i]``):
    :func:`~ddpo.training.evaluation.image_noise_seed`, so every prompt has its own noise under each seed and the
    same (prompt, seed) gets the same noise in every evaluation (``ddpo sample --seeds N`` with the seed it gives
    redraws that image)."""
    repeats: dict[tuple[str, int], int] = {}
    out = []
    for prompt, seed in zip(prompts, seeds):
        key = (prompt, int(seed))
        out.append(image_noise_seed(int(seed), prompt, repeats.get(key, 0)))
        repeats[key] = repeats.get(key, 0) + 1
    return out


SEED_RANGE = (-(2**63), 2**64)
"""The seeds ``torch.Generator().manual_seed`` takes."""


def check_seeds(seeds: list[int] | None) -> None:
    """Raise ValueError for a ``--seeds`` value that ``torch.Generator`` cannot take (before any model loads)."""
    bad = [seed for seed in seeds or [] if not SEED_RANGE[0] <= seed < SEED_RANGE[1]]
    if bad:
        raise ValueError(f"--seeds must be integers in [-2**63, 2**64) (torch.Generator's); got {bad[0]}")


def check_output_dir(out: str | Path, flag: str = "--out") -> None:
    """Raise ValueError, before anything is sampled, when ``out`` cannot become the output folder: it is a file, it
    would be under a file, or its nearest existing folder cannot be written (checked by creating and removing a
    temporary folder in it; nothing is left behind)."""
    out = Path(out)
    for parent in [out, *out.parents]:
        if not parent.exists():
            continue
        if not parent.is_dir():
            where = "is a file" if parent == out else f"would be under {parent}, which is a file"
            raise ValueError(f"{flag} {out} {where}, not a folder; choose another output folder")
        try:
            os.rmdir(tempfile.mkdtemp(prefix=rundir.PROBE_PREFIX, dir=parent))
        except OSError as err:
            raise ValueError(f"cannot write {flag} {out} ({err.strerror or err}); choose a writable folder") from None
        return


def write_samples(images: torch.Tensor, prompts: list[str], seeds: list[int], out: str | Path) -> Path:
    """``out/NNNN_seedS.png`` per image, ``out/grid.png`` and ``out/prompts.tsv`` (file, seed, prompt)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (image, prompt, seed) in enumerate(zip(images, prompts, seeds)):
        name = f"{index:04d}_seed{seed}.png"
        image_grid(image[None], columns=1).save(out / name)
        rows.append(f"{name}\t{seed}\t{prompt}")
    columns = len(set(seeds)) if len(set(seeds)) > 1 else None
    image_grid(images, columns=columns).save(out / "grid.png")
    (out / "prompts.tsv").write_text("file\tseed\tprompt\n" + "\n".join(rows) + "\n")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# ddpo eval
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Per-image scores of two models on the same (prompt, seed) pairs, and their paired comparison."""

    labels: tuple[str, str]
    prompts: list[str]
    seeds: list[int]
    """The ``--seeds`` value of each image."""
    noise_seeds: list[int]
    """The generator seed of each image (:func:`noise_seeds`)."""
    before: list[float]
    after: list[float]
    components_before: dict[str, list[float]]
    """Per-image values of each component of a ``weighted`` reward (empty otherwise)."""
    components_after: dict[str, list[float]]
    info_before: dict[str, float]
    """Means of the reward's own per-batch scalars (``last_info()``), weighted by batch size."""
    info_after: dict[str, float]
    reward: str
    images_before: torch.Tensor | None = None
    images_after: torch.Tensor | None = None

    def summary(self) -> dict[str, Any]:
        n = len(self.before)
        change = clustered_change(self.before, self.after, self.prompts)
        mean_before, mean_after = sum(self.before) / n, sum(self.after) / n
        out: dict[str, Any] = {
            "before": self.labels[0],
            "after": self.labels[1],
            "reward": self.reward,
            "images": n,
            "mean_before": mean_before,
            "mean_after": mean_after,
            "change": change[0] if change else mean_after - mean_before,
            "change_se": change[1] if change else None,
            "prompts": len(set(self.prompts)),
        }
        for name in self.components_before:
            values_b, values_a = self.components_before[name], self.components_after[name]
            out[f"component/{name}"] = {"before": sum(values_b) / n, "after": sum(values_a) / n}
        shown = {f"reward/{name}_mean" for name in self.components_before}  # already above, per image
        for key in self.info_before:
            if key in self.info_after and key not in shown:
                out[f"info/{key}"] = {"before": self.info_before[key], "after": self.info_after[key]}
        return out


def score(reward, images: torch.Tensor, prompts: list[str], batch_size: int):
    """``(values, per-component values, mean of last_info)`` of ``images``, ``batch_size`` at a time."""
    from rewards import check_reward_output
    from rewards.weighted import WeightedReward

    values: list[float] = []
    components: dict[str, list[float]] = {}
    info_sums: dict[str, float] = {}
    for first in range(0, len(prompts), batch_size):
        chunk, chunk_prompts = images[first : first + batch_size], prompts[first : first + batch_size]
        with torch.no_grad():
            out = check_reward_output(reward(chunk, chunk_prompts), len(chunk_prompts), reward.name)
            info = reward.last_info()
            if isinstance(reward, WeightedReward):
                for name, component in reward.components.items():
                    part = check_reward_output(component(chunk, chunk_prompts), len(chunk_prompts), name)
                    components.setdefault(name, []).extend(part.double().cpu().tolist())
        values.extend(out.double().cpu().tolist())
        for key, value in info.items():
            info_sums[key] = info_sums.get(key, 0.0) + float(value) * len(chunk_prompts)
    return values, components, {key: total / len(prompts) for key, total in info_sums.items()}


def evaluate(
    before: Model, after: Model, reward, prompts: list[str], seeds: list[int], options: SamplerOptions
) -> EvalResult:
    """Sample every (prompt, seed) from both models with the same noise and score both with ``reward``. Each image has
    its own noise (:func:`noise_seeds`); the two models see the same noise for the same image."""
    image_prompts, image_seeds = expand(prompts, seeds)
    generator_seeds = noise_seeds(image_prompts, image_seeds)
    images_b = sample_images(before.pipe, image_prompts, generator_seeds, options)
    images_a = sample_images(after.pipe, image_prompts, generator_seeds, options)
    values_b, comp_b, info_b = score(reward, images_b, image_prompts, options.batch_size)
    values_a, comp_a, info_a = score(reward, images_a, image_prompts, options.batch_size)
    return EvalResult(
        labels=(before.label, after.label),
        prompts=image_prompts,
        seeds=image_seeds,
        noise_seeds=generator_seeds,
        before=values_b,
        after=values_a,
        components_before=comp_b,
        components_after=comp_a,
        info_before=info_b,
        info_after=info_a,
        reward=reward.name,
        images_before=images_b,
        images_after=images_a,
    )


def write_eval(result: EvalResult, out: str | Path, grid_columns: int = 8) -> dict[str, Path]:
    """``scores.csv`` (one row per image: prompt, seed, before, after, change, components), ``summary.json`` and
    ``before_after.png`` (base row above fine-tuned row, the first ``grid_columns`` images, same noise per column)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(result.components_before)
    with open(out / "scores.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        header = ["index", "prompt", "seed", "noise_seed", "before", "after", "change"]
        header += [f"{name}_{which}" for name in names for which in ("before", "after")]
        writer.writerow(header)
        for i, (prompt, seed) in enumerate(zip(result.prompts, result.seeds)):
            row = [i, prompt, seed, result.noise_seeds[i], f"{result.before[i]:.8g}", f"{result.after[i]:.8g}"]
            row.append(f"{result.after[i] - result.before[i]:.8g}")
            for name in names:
                row += [f"{result.components_before[name][i]:.8g}", f"{result.components_after[name][i]:.8g}"]
            writer.writerow(row)
    (out / "summary.json").write_text(json.dumps(result.summary(), indent=2) + "\n")
    paths = {"scores": out / "scores.csv", "summary": out / "summary.json"}
    if result.images_before is not None and result.images_after is not None:
        count = min(grid_columns, len(result.prompts))
        pair = torch.cat([result.images_before[:count], result.images_after[:count]])
        image_grid(pair, columns=count).save(out / "before_after.png")
        paths["grid"] = out / "before_after.png"
    return paths


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a few lines for the terminal."""
    n = summary["images"]
    lines = [
        f"ddpo eval: {summary['reward']} on {n} images (same prompts and noise for both; each image its own noise)",
        f"  before ({summary['before']}): {summary['mean_before']:.4f}",
        f"  after  ({summary['after']}): {summary['mean_after']:.4f}",
    ]
    if summary["change_se"] is not None:
        se = summary["change_se"]
        z = summary["change"] / se if se > 0 else math.inf
        lines.append(
            f"  paired change {summary['change']:+.4f} +- {se:.2g} (standard error over {summary['prompts']} prompts; "
            f"{abs(z):.1f} standard errors"
            + ("; within 2 of zero: not distinguishable from noise)" if abs(z) < 2 else ")")
        )
    else:
        lines.append(f"  change {summary['change']:+.4f} (one prompt: no standard error)")
    for key, value in summary.items():
        if key.startswith(("component/", "info/")):
            lines.append(f"  {key.split('/', 1)[1]}: {value['before']:.4g} -> {value['after']:.4g}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# ddpo eval --pass-at
# ---------------------------------------------------------------------------------------------------------------------

PASS_AT_SEED_BASE = 1000
"""``ddpo eval --pass-at K ...`` draws sample ``j`` of every prompt from noise seed ``PASS_AT_SEED_BASE + j`` unless
``--seeds`` is given: seeds that no preset, test or tuning run of the package uses (the trainer's evaluation draws its
noise from the run's own streams, ``ddpo eval`` defaults to seed 0, and the all-prompt checks use seeds 10 and 11)."""


def pass_at_seeds(ks: list[int], seeds: list[int] | None) -> list[int]:
    """The noise seeds of a pass@k evaluation: ``seeds`` if given (at least ``max(ks)`` distinct ones), else
    ``max(ks)`` seeds from :data:`PASS_AT_SEED_BASE`."""
    if not ks or min(ks) < 1:
        raise ValueError(f"--pass-at takes one or more k >= 1, e.g. --pass-at 1 4 16; got {ks}")
    if seeds is None:
        return list(range(PASS_AT_SEED_BASE, PASS_AT_SEED_BASE + max(ks)))
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct for --pass-at (each is one sample of every prompt); got {seeds}")
    if len(seeds) < max(ks):
        raise ValueError(
            f"--pass-at {max(ks)} needs at least {max(ks)} samples per prompt, but --seeds gives {len(seeds)}: "
            f"give {max(ks)} seeds or leave --seeds out ({max(ks)} seeds from {PASS_AT_SEED_BASE})"
        )
    return list(seeds)


@dataclass
class PassAtK:
    """pass@k of one model over ``prompts`` (distinct), each sampled once per seed.

    ``passed[check]`` is bool ``[P, n]`` (prompt ``p``, seed ``j``) for each check of the reward and ``all``;
    ``rewards`` the reward ``[P, n]``."""

    label: str
    prompts: list[str]
    seeds: list[int]
    ks: list[int]
    passed: dict[str, torch.Tensor]
    rewards: torch.Tensor

    def table(self) -> dict[str, Any]:
        """``{"reward_mean": (mean, se), "checks": {check: {k: (mean, se)}}}``; standard errors over prompts."""
        per_prompt_reward = self.rewards.to(torch.float64).mean(1)
        checks = {
            check: {k: mean_and_se(pass_at_k(passed, k)) for k in self.ks} for check, passed in self.passed.items()
        }
        return {"reward_mean": mean_and_se(per_prompt_reward), "checks": checks}


def pass_at_k_eval(
    model: Model, reward, prompts: list[str], seeds: list[int], ks: list[int], options: SamplerOptions
) -> PassAtK:
    """Sample every prompt with every seed (same noise per seed for every model) and record which checks pass."""
    prompts = list(dict.fromkeys(prompts))  # pass@k is per prompt: each prompt once
    image_prompts, image_seeds = expand(prompts, seeds)
    images = sample_images(model.pipe, image_prompts, noise_seeds(image_prompts, image_seeds), options)
    values, _, _ = score(reward, images, image_prompts, options.batch_size)
    passed: dict[str, list[torch.Tensor]] = {}
    for first in range(0, len(image_prompts), options.batch_size):
        chunk = images[first : first + options.batch_size]
        with torch.no_grad():
            checks = reward.pass_fail(chunk, image_prompts[first : first + options.batch_size])
        for name, value in checks.items():
            passed.setdefault(name, []).append(value.bool().cpu())
    shape = (len(prompts), len(seeds))
    return PassAtK(
        label=model.label,
        prompts=prompts,
        seeds=list(seeds),
        ks=list(ks),
        passed={name: torch.cat(parts).view(shape) for name, parts in passed.items()},
        rewards=torch.tensor(values).view(shape),
    )


def format_pass_at_k(results: list[PassAtK]) -> str:
    """One table per model: pass@k per check and for all checks together, mean ± standard error over prompts."""
    first = results[0]
    lines = [
        f"ddpo eval --pass-at: {len(first.prompts)} prompts x {len(first.seeds)} noise seeds "
        f"({first.seeds[0]}..{first.seeds[-1]}); mean +- standard error over prompts"
    ]
    for result in results:
        table = result.table()
        mean, se = table["reward_mean"]
        lines.append(f"  {result.label}: mean reward {mean:.4f} +- {se:.3f}")
        lines.append("    " + f"{'check':<12}" + "".join(f"{'pass@' + str(k):>18}" for k in result.ks))
        for check, row in table["checks"].items():
            cells = "".join(f"{f'{m:.3f} +- {s:.3f}':>18}" for m, s in row.values())
            lines.append("    " + f"{check:<12}" + cells)
    return "\n".join(lines)


def write_pass_at_k(results: list[PassAtK], out: str | Path) -> Path:
    """``out/pass_at_k.json`` (every model's table, prompts and seeds) and ``out/pass_at_k.csv`` (one row per model,
    prompt and seed: the reward and each check)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    for result in results:
        table = result.table()
        summary.append(
            {
                "model": result.label,
                "prompts": len(result.prompts),
                "seeds": result.seeds,
                "reward_mean": table["reward_mean"][0],
                "reward_mean_se": table["reward_mean"][1],
                "pass_at": {
                    check: {str(k): {"mean": m, "se": s} for k, (m, s) in row.items()}
                    for check, row in table["checks"].items()
                },
            }
        )
    (out / "pass_at_k.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(out / "pass_at_k.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        checks = list(results[0].passed)
        writer.writerow(["model", "prompt", "seed", "noise_seed", "reward", *checks])
        for result in results:
            for p, prompt in enumerate(result.prompts):
                for j, seed in enumerate(result.seeds):
                    noise = image_noise_seed(seed, prompt)
                    row = [result.label, prompt, seed, noise, f"{result.rewards[p, j].item():.8g}"]
                    writer.writerow(row + [int(result.passed[c][p, j]) for c in checks])
    return out / "pass_at_k.json"
