"""The model card of a run's result: ``final/README.md``, in the format of the Hugging Face hub's diffusers LoRA cards.

The card is written from the run's own files (``config.yaml`` as the run holds it, ``metrics.jsonl``, ``eval.jsonl``
and the held-out image grids under ``samples/``), into the folder that becomes ``final/`` before it is moved into
place, so ``final/`` and its card are always of the same weights. ``huggingface_hub`` uploads the folder as is::

    hf upload USER/NAME RUN_DIR/final .      # or: huggingface_hub.upload_folder(repo_id=..., folder_path=...)

Front matter (YAML, parsed by ``huggingface_hub.ModelCard``): ``base_model`` (a hub id; left out when the base is a
local folder or a shipped model, which the hub cannot link), ``library_name: diffusers``, ``tags``. The licence is left
to the user: the card says so, and the base model's licence applies to a LoRA of it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from ..models import get_family
from ..models.loading import load_arguments
from .config import RunConfig
from .evaluation import paired_change
from .runlog import read_jsonl

CARD_NAME = "README.md"
BEFORE_IMAGE, AFTER_IMAGE = "heldout_before.png", "heldout_after.png"
"""The held-out grids copied beside the weights (the same prompts and noise before and after training)."""

FAMILY_TAGS = {
    "sd": ["stable-diffusion", "stable-diffusion-diffusers"],
    "sdxl": ["stable-diffusion-xl", "stable-diffusion-xl-diffusers"],
    "sd3": ["sd3", "sd3-diffusers"],
    "flux": ["flux", "flux-diffusers"],
}


def hub_base_model(pretrained: str) -> str | None:
    """``model.pretrained`` when it names a hub repository (``owner/name``, not a local folder or a shipped model);
    else None, since the hub's ``base_model`` field must name a hub model."""
    if Path(pretrained).expanduser().exists() or pretrained.count("/") != 1 or pretrained.startswith((".", "/", "~")):
        return None
    return pretrained


def card_load_code(config: RunConfig, family_name: str, none_components: tuple[str, ...] = ()) -> str:
    """The Python that loads the card's folder once uploaded (``USER/NAME``; a local copy's path works too)."""
    cls = get_family(family_name)
    name = cls.pipeline_class_name
    extra = load_arguments(family_name, none_components)
    if not config.model.use_lora:
        return f'from diffusers import {name}\n\npipe = {name}.from_pretrained("USER/NAME"{extra})  # or this folder'
    base = config.model.pretrained
    revision = f", revision={config.model.revision!r}" if config.model.revision else ""
    return "\n".join(
        [
            f"from diffusers import {name}",
            "",
            f"pipe = {name}.from_pretrained({base!r}{revision}{extra})",
            'pipe.load_lora_weights("USER/NAME")  # or the path of this folder',
        ]
    )


def _samples_seen(metrics: list[dict]) -> int:
    return int(sum(record.get("samples", 0) for record in metrics))


def _label(key: str) -> str:
    name = key.split("/", 1)[1].removesuffix("_mean")
    return f"{name} (guard)" if key.startswith("guard/") else name


def heldout_lines(evals: list[dict], eval_prompts: str, chosen_epoch: int | None = None) -> list[str]:
    """The held-out before/after of the card: reward and its paired change with standard error, per component (and
    guard). "After" is the evaluation of ``chosen_epoch`` (``final_checkpoint=best``), else the last."""
    if len(evals) < 2:
        return ["No held-out evaluation was run (`eval_prompts` was empty), so there is no before/after to report."]
    first = evals[0]
    last = next((e for e in evals if e["epoch"] == chosen_epoch), evals[-1]) if chosen_epoch is not None else evals[-1]
    lines = [
        f"Held-out prompts: `{eval_prompts}`, the same {first['samples']} prompts and noise before (epoch "
        f"{first['epoch']}) and after (epoch {last['epoch']}).",
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| reward (mean) | {first['reward_mean']:.4f} | {last['reward_mean']:.4f} |",
    ]
    lines += [
        f"| {_label(key)} | {first[key]:.4f} | {last[key]:.4f} |"
        for key in first
        if key.startswith(("reward/", "guard/")) and key.endswith("_mean") and key in last
    ]
    change = paired_change(first.get("rewards"), last.get("rewards"))
    if change is not None:
        mean, se = change
        lines += [
            "",
            f"Paired change {mean:+.4f} ± {se:.4f} (standard error over the {first['samples']} images; a change within "
            "about 2 standard errors is not distinguishable from noise).",
        ]
    return lines


def model_card(
    run_dir: Path,
    config: RunConfig,
    family_name: str,
    reward_name: str,
    estimator_name: str,
    none_components: tuple[str, ...] = (),
    images: bool = False,
    chosen_epoch: int | None = None,
    stopped: str | None = None,
) -> str:
    """The text of ``README.md`` for ``run_dir``'s result (``images``: the held-out grids are beside it)."""
    run_dir = Path(run_dir)
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    evals = read_jsonl(run_dir / "eval.jsonl")
    front: dict = {}
    if (base := hub_base_model(config.model.pretrained)) is not None:
        front["base_model"] = base
    front["library_name"] = "diffusers"
    front["tags"] = [
        "text-to-image",
        "diffusers",
        *(["lora"] if config.model.use_lora else []),
        *FAMILY_TAGS.get(family_name, []),
        "ddpo",
        "reinforcement-learning",
        f"reward-{reward_name.split(':')[-1]}",
    ]
    kind = f"LoRA (rank {config.model.lora_rank})" if config.model.use_lora else "full fine-tune"
    seen = _samples_seen(metrics)
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {run_dir.name}",
        "",
        f"A {kind} of `{config.model.pretrained}` fine-tuned with reinforcement learning by ddpo against the "
        f"reward `{reward_name}`.",
        "",
        f"- Estimator: `train.algorithm={estimator_name}`, learning rate {config.train.learning_rate:g}.",
        f"- Samples seen: {seen:,} ({len(metrics)} epochs), {config.sample.num_steps} sampling steps "
        f"(`{config.sample.scheduler}`), guidance {config.sample.guidance_scale:g}, seed {config.seed}.",
        f"- Training prompts: `{config.prompts}`. The whole configuration is the run's `config.yaml`.",
        *(
            [
                f"- The weights are those of epoch {chosen_epoch}, the best held-out `{config.best_metric}` "
                "(`final_checkpoint=best`)."
            ]
            if chosen_epoch is not None
            else []
        ),
        *([f"- The run {stopped.replace('stopping early', 'stopped early', 1)}."] if stopped else []),
        "",
        "## Held-out reward, before and after",
        "",
        *heldout_lines(evals, config.eval_prompts, chosen_epoch),
    ]
    if images:
        lines += [
            "",
            f"Before: ![held-out samples before training]({BEFORE_IMAGE})",
            "",
            f"After: ![held-out samples after training]({AFTER_IMAGE})",
        ]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        card_load_code(config, family_name, none_components),
        "```",
        "",
        "## Licence",
        "",
        "Not set by ddpo: add a `license:` line to the front matter. A LoRA is bound by its base model's licence.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(
    folder: Path,
    run_dir: Path,
    config: RunConfig,
    family_name: str,
    reward_name: str,
    estimator_name: str,
    none_components: tuple[str, ...] = (),
    chosen_epoch: int | None = None,
    stopped: str | None = None,
) -> Path:
    """Write ``README.md`` (and the first and last held-out grids, when the run has them) into ``folder``, the folder
    that becomes ``final/``; returns the card's path."""
    folder = Path(folder)
    grids = sorted((Path(run_dir) / "samples").glob("eval_epoch_*.png"))
    after = Path(run_dir) / "samples" / f"eval_epoch_{chosen_epoch:04d}.png" if chosen_epoch is not None else None
    after = after if after is not None and after.exists() else (grids[-1] if grids else None)
    images = len(grids) >= 2 and after != grids[0]
    if images:
        shutil.copyfile(grids[0], folder / BEFORE_IMAGE)
        shutil.copyfile(after, folder / AFTER_IMAGE)
    card = folder / CARD_NAME
    card.write_text(
        model_card(
            run_dir, config, family_name, reward_name, estimator_name, none_components, images, chosen_epoch, stopped
        ),
        encoding="utf-8",
    )
    return card
