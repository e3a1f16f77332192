"""The commands of ``ddpo`` other than ``sample`` and ``eval`` (:mod:`.sampling`): each takes the parsed arguments,
calls :mod:`ddpo.training` or :mod:`ddpo.tools`, and returns the exit code."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

import yaml

from ..training.config import DEFAULT_PRESET


def config_from(args: argparse.Namespace):
    """The config of ``--preset`` / ``--config`` / overrides; with neither file option, the default preset."""
    from ..training.config import build_config

    preset = args.preset or (None if args.config else DEFAULT_PRESET)
    return build_config(preset=preset, config_file=args.config, overrides=overrides(args))


def overrides(args: argparse.Namespace) -> list[str]:
    """The key=value overrides."""
    return list(args.overrides)


def yaml_mapping(text: str | None, flag: str) -> dict:
    """The YAML mapping given to ``flag`` (``--options``, ``--reward-options``); empty when not given. Read as config
    files are: safe-loaded, one line for a syntax error, a repeated key or an alias bomb."""
    from ..training.config import load_yaml

    if not text:
        return {}
    value = load_yaml(text, flag)
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a YAML mapping like '{{quality: 80}}'; got {text!r}")
    return value


def train_command(args: argparse.Namespace) -> int:
    """Train or resume; Ctrl-C (SIGINT) ends in one line (the last intact checkpoint, the resume command) and exit
    code :data:`INTERRUPTED`."""
    from ..training.trainer import interrupted_message, new_run_dir, resume, train

    if args.resume and (args.preset or args.config):
        from ..training.config import ConfigError

        raise ConfigError("ddpo train: --resume takes the run's own config.yaml; give only key=value overrides")
    run_dir = args.resume
    try:
        if args.resume:
            resume(args.resume, overrides(args))
            return 0
        config = config_from(args)
        run_dir = new_run_dir(config)
        train(config, run_dir)
        return 0
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # one line for the run, not one per process
            message = interrupted_message(run_dir) if run_dir is not None else "ddpo: interrupted"
            print(message, file=sys.stderr, flush=True)
        return INTERRUPTED


INTERRUPTED = 130
"""Exit code of a run stopped by Ctrl-C (SIGINT): 128 + the signal's number, as shells report it."""


def bench_command(args: argparse.Namespace) -> int:
    from ..tools import bench

    if args.calibrate:
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        bench.calibrate_main(config_from(args), repeats=args.repeats, refresh=args.refresh)
        return 0
    bench.main(config_from(args), args.json, args.repeats, args.warmup, args.threads, args.mode)
    return 0


def presets_command(args: argparse.Namespace) -> int:
    from importlib import resources

    from ..training.config import preset_names

    for name in preset_names():
        text = resources.files("ddpo.presets").joinpath(f"{name}.yaml").read_text()
        print(f"{name}\n{textwrap.indent(preset_description(text), '    ')}\n")
    return 0


def preset_description(text: str) -> str:
    """The leading comment block of a preset file, whole: its paragraphs re-wrapped, blank comment lines kept."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    paragraphs = "\n".join(lines).split("\n\n")
    return "\n\n".join(textwrap.fill(" ".join(p.split()), 100, break_on_hyphens=False) for p in paragraphs if p.strip())


def config_command(args: argparse.Namespace) -> int:
    from ..training.config import to_dict

    print(yaml.safe_dump(to_dict(config_from(args)), sort_keys=False), end="")
    return 0


def rewards_command(args: argparse.Namespace) -> int:
    import rewards

    rows = [("name", "differentiable"), *rewards.listing()]
    width = max(len(name) for name, _ in rows)
    for name, differentiable in rows:
        print(f"{name:<{width}}  {differentiable}")
    return 0


def prompts_command(args: argparse.Namespace) -> int:
    from ..training.prompts import available_prompt_sets, load_prompts

    for name in available_prompt_sets():
        print(f"{name:24s} {len(load_prompts(name))} prompts")
    return 0


def ablate_command(args: argparse.Namespace) -> int:
    from ..tools import ablate

    return ablate.main(args.grid, parallel=args.parallel, output_dir=args.output_dir, dry_run=args.dry_run)


def serve_reward_command(args: argparse.Namespace) -> int:
    import os

    from ..tools.reward_server import serve

    options = yaml_mapping(args.options, "--options")
    token = os.environ.get(args.token_env) or None
    limits = {"max_batch": args.max_batch, "max_image_size": args.max_image_size}
    return serve(args.name, options, args.host, args.port, token, args.device, **limits, token_env=args.token_env)


def report_command(args: argparse.Namespace) -> int:
    from ..tools.report import write_report

    options = {"prompts": args.prompt, "seeds": args.seeds, "before_after": not args.no_samples}
    index = write_report(args.path, args.out, **options)
    print(f"ddpo report: {index}")
    return 0
