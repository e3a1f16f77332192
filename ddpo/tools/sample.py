"""``ddpo sample`` and ``ddpo eval``: images from a base model or a run, and base vs fine-tuned on the same noise.

Both go through the plain diffusers pipeline, the way a user of the result would: the base model is loaded with
:func:`ddpo.models.load_pipeline` (hub id, local folder, ``world`` or ``tiny``) and a run's ``final/`` weights with
``pipe.load_lora_weights(final)`` (or, after full fine-tuning, the pipeline folder ``final/`` itself). Image ``i`` is
drawn from its own ``torch.Generator().manual_seed(seed_i)``, so its noise does not depend on the batch it is in nor
on the model: two models sampled with the same prompts and seeds see the same ``x_T`` and the same per-step noise.
``ddpo sample`` seeds image ``i`` with its ``--seeds`` value itself (one ``x_T`` per seed, shared by the prompts of a
grid column); ``ddpo eval`` gives every (prompt, seed) its own generator seed (:func:`noise_seeds`), because noise shared
across prompts makes their scores correlated and the mean over prompts much noisier than its standard error says.

This module loads models, draws images (:func:`sample_images`) and scores them (:func:`score`); ``ddpo eval``'s
comparisons are built on it: base vs fine-tuned in :mod:`.paired_eval`, pass@k in :mod:`.pass_at`.
"""

from __future__ import annotations

import contextlib
import inspect
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
from ..training.evaluation import eval_prompt_list, image_noise_seed
from ..training.prompts import load_prompts
from ..training.visualize import image_grid

__all__ = [
    "Model",
    "SamplerOptions",
    "check_count",
    "load_model",
    "noise_seeds",
    "resolve_prompts",
    "sample_images",
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
    if (model is None) == (run is None):
        raise ValueError("give either a base model (--model) or a run directory (--run), not both")
    with quiet_loading():
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


@contextlib.contextmanager
def quiet_loading():
    """Hide diffusers' / transformers' loading progress bars and info warnings (e.g. "no LoRA keys for the text
    encoder", expected for UNet-only LoRA) while loading pipelines: ``ddpo sample`` / ``eval`` and the report's
    before/after samples."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()


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
