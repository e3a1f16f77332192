"""Before / after: the same prompts and seeds sampled from a run's base model and with its fine-tuned ``final/``
weights (:func:`sample_before_after`, the only part of the report that loads a model), and the figure of the pairs
(:func:`plot_before_after`). Torch and diffusers are imported only when sampling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from matplotlib.figure import Figure

from ...training import trust
from .runs import Run


@dataclass
class BeforeAfter:
    """Samples of the base and the fine-tuned model for the same prompts and seeds."""

    prompts: list[str]
    """One entry per image (each prompt repeated once per seed)."""
    seeds: list[int]
    before: Any
    """``torch.Tensor [N, 3, H, W]`` in ``[0, 1]``: the base model."""
    after: Any
    """The same with the fine-tuned weights (``final/``)."""
    before_rewards: list[float] | None = None
    after_rewards: list[float] | None = None


def default_prompts(run: Run, count: int = 4) -> list[str]:
    """The first ``count`` prompts of the run's prompt set."""
    from ...training.prompts import load_prompts

    return load_prompts(run.config["prompts"])[:count]


def sample_before_after(
    run: Run,
    prompts: list[str] | None = None,
    seeds: list[int] | tuple[int, ...] = (0, 1),
    num_steps: int | None = None,
    score: bool = True,
) -> BeforeAfter:
    """Sample ``prompts`` (default: :func:`default_prompts`) with each seed from the base model of the run
    (``model.pretrained`` through :func:`ddpo.models.load_pipeline`), then with the run's ``final/`` weights
    (``pipe.load_lora_weights``, or the full pipeline folder for full fine-tuning), with the run's scheduler, steps,
    eta, CFG scale and negative prompt. ``score`` also computes the run's reward of every image."""
    import inspect

    import torch

    from ...models import load_pipeline
    from ..sample import quiet_loading

    config, s = run.config, run.config["sample"]
    if score:  # before anything is loaded: the run's reward may name an import path the user has not trusted
        trust.require(config["reward"]["name"], config["reward"].get("options"), where=f"{run.path / 'config.yaml'}: ")
    final = run.path / "final"
    if not final.is_dir():
        raise FileNotFoundError(f"{final} does not exist: the run has not finished")
    prompts = list(prompts) if prompts else default_prompts(run)
    seeds = list(seeds)
    batch_prompts = [p for p in prompts for _ in seeds]
    kwargs = {
        "num_inference_steps": num_steps or s["num_steps"],
        "guidance_scale": s["guidance_scale"],
        "negative_prompt": [s["negative_prompt"]] * len(batch_prompts) if s["guidance_scale"] > 1 else None,
        "output_type": "pt",
    }
    if s.get("resolution"):  # the size the run sampled at
        kwargs.update(height=s["resolution"], width=s["resolution"])

    def sample(pipe) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(seed) for _ in prompts for seed in seeds]
        eta = {"eta": s["eta"]} if "eta" in inspect.signature(pipe.__call__).parameters else {}  # SD3 / FLUX: none
        with torch.no_grad():
            return pipe(batch_prompts, generator=generators, **kwargs, **eta).images.float().cpu()

    model = config["model"]
    with quiet_loading():
        pipe = load_pipeline(model["pretrained"], model.get("revision"), s["scheduler"])
        before = sample(pipe)
        if model["use_lora"]:
            pipe.load_lora_weights(final)
        else:
            pipe = load_pipeline(str(final), None, s["scheduler"])
        after = sample(pipe)
    result = BeforeAfter(prompts=batch_prompts, seeds=seeds, before=before, after=after)
    if score:
        from rewards import get_reward

        from ...training.checkpoint import restore_final_reward

        reward = get_reward(config["reward"]["name"], **config["reward"]["options"])
        restore_final_reward(reward, run.path, config.get("num_epochs"))  # e.g. the trained discriminator
        with torch.no_grad():
            result.before_rewards = reward(before, batch_prompts).tolist()
            result.after_rewards = reward(after, batch_prompts).tolist()
    return result


def plot_before_after(result: BeforeAfter, title: str = "") -> Figure:
    """Two rows (base, fine-tuned), one column per (prompt, seed), with the reward of each image when scored."""
    import textwrap

    count = len(result.prompts)
    fig = Figure(figsize=(2.2 * count, 5.2), layout="constrained")
    axes = fig.subplots(2, count, squeeze=False)
    for row, (label, images, scores) in enumerate(
        [
            ("base", result.before, result.before_rewards),
            ("fine-tuned", result.after, result.after_rewards),
        ]
    ):
        for col in range(count):
            ax = axes[row][col]
            ax.imshow(images[col].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            seed = result.seeds[col % len(result.seeds)]
            text = textwrap.fill(result.prompts[col], 24) + f"\nseed {seed}" if row == 0 else ""
            if scores is not None:
                text += ("\n" if text else "") + f"reward {scores[col]:.3g}"
            ax.set_title(text, fontsize="small")
            if col == 0:
                ax.set_ylabel(label)
    fig.suptitle(title or "before (base) / after (fine-tuned)")
    return fig
