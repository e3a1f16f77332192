"""``ddpo sample`` and ``ddpo eval``: the checks of their options before any model or reward loads, the reward and
the models ``ddpo eval`` compares; the sampling itself is :mod:`ddpo.tools.sample`, the comparisons
:mod:`ddpo.tools.paired_eval` and :mod:`ddpo.tools.pass_at`."""

from __future__ import annotations

import argparse
import os

from ..training import trust
from .commands import yaml_mapping


def _sampler_options(args: argparse.Namespace, model):
    from ..tools.sample import sampler_from_run

    return sampler_from_run(model, **_given_sampler(args))


def _given_sampler(args: argparse.Namespace) -> dict:
    """The sampler options given on the command line of ``ddpo sample`` / ``eval`` (None: not given)."""
    return {
        "num_steps": args.steps,
        "guidance_scale": args.guidance,
        "eta": args.eta,
        "negative_prompt": args.negative_prompt,
        "scheduler": args.scheduler,
        "batch_size": args.batch_size,
    }


def _check_sampling_arguments(args: argparse.Namespace, run_sampler: dict, out) -> None:
    """Before any model (or reward) loads: the sampler options as they will be used (those given, else the run's
    ``sample:`` settings ``run_sampler``), by the rules of ``ddpo train``; the seeds; the output folder ``out``."""
    from ..tools import sample

    sample.sampler_options(run_sampler, **_given_sampler(args))
    sample.check_seeds(args.seeds)
    sample.check_output_dir(out)


def sample_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..tools import sample

    if (args.model is None) == (args.run is None):
        raise ValueError("ddpo sample: give a base model (--model world|tiny|HUB_ID|FOLDER) or a run (--run RUN_DIR)")
    prompts = sample.resolve_prompts(args.prompt, args.prompts, args.count)
    out = Path(args.out) if args.out else (Path(args.run) / "generated" if args.run else Path("ddpo-samples"))
    _check_sampling_arguments(args, sample.read_run_config(args.run).get("sample", {}) if args.run else {}, out)
    model = sample.load_model(model=args.model, run=args.run)
    options = _sampler_options(args, model)
    image_prompts, image_seeds = sample.expand(prompts, args.seeds)
    images = sample.sample_images(model.pipe, image_prompts, image_seeds, options)
    sample.write_samples(images, image_prompts, image_seeds, out)
    print(f"ddpo sample: {len(images)} images from {model.label} in {out}/ (grid.png, prompts.tsv)")
    return 0


def _eval_reward(args: argparse.Namespace, config: dict | None):
    """The reward of ``ddpo eval``: ``--reward`` (with ``--reward-options``), else the run's own, else (a base model
    alone) ``world`` for the shipped world models."""
    import rewards

    if args.reward:
        options = yaml_mapping(args.reward_options, "--reward-options")
        trust.require(args.reward, options)
        return rewards.get_reward(args.reward, **options)
    if args.reward_options:
        raise ValueError("--reward-options needs --reward NAME (without it the run's own reward and options are used)")
    if config is not None:
        name, options = config["reward"]["name"], config["reward"].get("options", {})
        trust.require(name, options, where=f"{os.path.join(args.runs[-1], 'config.yaml')}: ")
        return rewards.get_reward(name, **options)
    if args.model in WORLD_MODELS:
        return rewards.get_reward("world")
    raise ValueError(f"ddpo eval --model {args.model}: name the reward to score it with (--reward NAME)")


WORLD_MODELS = ("world", "world_flow")
"""The shipped world models: ``ddpo eval --model`` defaults to the ``world`` reward, the ``world_heldout`` prompts and
the sampler of the preset of the same name for them."""


def eval_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..tools import paired_eval, pass_at, sample

    if len(args.runs) > 2:
        raise ValueError("ddpo eval: give one run (base vs run) or two runs (run vs run)")
    if args.base and len(args.runs) == 2:
        raise ValueError("ddpo eval: --base compares a model with ONE run; with two runs give no --base")
    if args.model and (args.runs or args.base):
        raise ValueError("ddpo eval: --model evaluates one base model alone; give it without RUN_DIR and --base")
    if not args.model and not args.runs:
        raise ValueError("ddpo eval: give a run (RUN_DIR), two runs, or a base model (--model NAME --pass-at K ...)")
    if args.model and not args.pass_at:
        raise ValueError(
            "ddpo eval --model needs --pass-at K ... (a base model alone has nothing to be compared with); "
            "to compare a base with a run give the run and --base MODEL"
        )
    config = sample.read_run_config(args.runs[-1]) if args.runs else None
    out = Path(args.out) if args.out else (Path(args.runs[-1]) / "eval" if args.runs else Path("ddpo-eval"))
    _check_sampling_arguments(args, config.get("sample", {}) if config else _preset_sampler(args.model), out)
    sample.check_count(args.count)  # before the reward loads
    if args.pass_at:
        pass_at.pass_at_seeds(args.pass_at, args.seeds)  # checks k and --seeds before the reward and models load
    reward = _eval_reward(args, config)
    if config is not None and not args.reward:  # the run's own reward, with the state it was trained to (if any)
        from ..training.checkpoint import restore_final_reward

        restore_final_reward(reward, Path(args.runs[-1]), config.get("num_epochs"))
    if args.pass_at and not _has_checks(reward):
        raise ValueError(
            f"--pass-at needs a reward with pass/fail checks (one that defines pass_fail, like world); "
            f"{reward.name!r} has none"
        )
    if config is not None:
        default_set = config.get("eval_prompts") or config.get("prompts")
    else:
        default_set = "world_heldout" if args.model in WORLD_MODELS else None
    # pass@k is over the whole prompt set unless --count says otherwise; the paired evaluation draws 64 by default.
    count = args.count if args.count is not None else (None if args.pass_at else 64)
    prompts = sample.resolve_prompts(args.prompt, args.prompts, count, default_set)
    seeds = pass_at.pass_at_seeds(args.pass_at, args.seeds) if args.pass_at else (args.seeds or [0])
    if args.model:
        models = [sample.load_model(model=args.model)]
        models[0].sampler = _preset_sampler(args.model)
    else:
        after = sample.load_model(run=args.runs[-1])
        if len(args.runs) == 2:
            before = sample.load_model(run=args.runs[0])
        else:
            base = args.base or config["model"]["pretrained"]
            before = sample.load_model(model=base)
            if not args.base:
                before.label = f"base {base}"
        models = [before, after]
    options = _sampler_options(args, models[-1])
    if args.pass_at:
        results = [pass_at.pass_at_k_eval(m, reward, prompts, seeds, args.pass_at, options) for m in models]
        path = pass_at.write_pass_at_k(results, out)
        print(pass_at.format_pass_at_k(results))
        print(f"  per-image checks: {path.with_suffix('.csv')}; tables: {path}")
        return 0
    result = paired_eval.evaluate(models[0], models[1], reward, prompts, seeds, options)
    paths = paired_eval.write_eval(result, out)
    print(paired_eval.format_summary(result.summary()))
    print(f"  per-image scores: {paths['scores']}; before/after grid: {paths['grid']}")
    return 0


def _has_checks(reward) -> bool:
    """Whether ``reward`` reports pass/fail checks (:meth:`rewards.Reward.pass_fail` overridden)."""
    import rewards

    method = getattr(type(reward), "pass_fail", None)
    return method is not None and method is not rewards.Reward.pass_fail


def _preset_sampler(model: str) -> dict:
    """The ``sample:`` settings of the preset named like a shipped world model (``world``, ``world_flow``), the
    defaults of ``ddpo eval --model`` for it; empty for any other model."""
    from ..training.config import preset_data, preset_names

    return dict(preset_data(model).get("sample", {})) if model in WORLD_MODELS and model in preset_names() else {}
