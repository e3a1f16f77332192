"""The ``ddpo`` command line: ``ddpo train | bench | presets | config | rewards | prompts``."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import yaml

from .training.config import DEFAULT_PRESET


def _config_from(args: argparse.Namespace):
    """The config of ``--preset`` / ``--config`` / overrides; with neither file option, the default preset."""
    from .training.config import build_config

    preset = args.preset or (None if args.config else DEFAULT_PRESET)
    return build_config(preset=preset, config_file=args.config, overrides=_overrides(args))


def _overrides(args: argparse.Namespace) -> list[str]:
    """The key=value overrides, with ``--trust-import-path`` as ``reward.trust_import_path=true``."""
    return list(args.overrides) + (["reward.trust_import_path=true"] if args.trust_import_path else [])


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help=f"a shipped preset (`ddpo presets` lists them; default: {DEFAULT_PRESET})")
    parser.add_argument("--config", help="a YAML config file (instead of the default preset)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    parser.add_argument(
        "--trust-import-path",
        action="store_true",
        help="allow a reward given by import path (package.module:attribute): importing it runs its code",
    )
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="print error tracebacks")


def _train(args: argparse.Namespace) -> int:
    from .training.trainer import resume, train

    if args.resume:
        if args.preset or args.config:
            from .training.config import ConfigError

            raise ConfigError("ddpo train: --resume takes the run's own config.yaml; give only key=value overrides")
        resume(args.resume, _overrides(args))
        return 0
    train(_config_from(args))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .tools import bench

    bench.main(_config_from(args), args.json, args.repeats, args.warmup, args.threads, args.mode)
    return 0


def _presets(args: argparse.Namespace) -> int:
    from importlib import resources

    from .training.config import preset_names

    for name in preset_names():
        first = resources.files("ddpo.presets").joinpath(f"{name}.yaml").read_text().splitlines()[0]
        print(f"{name:28s} {first.lstrip('# ')}")
    return 0


def _config(args: argparse.Namespace) -> int:
    from .training.config import to_dict

    print(yaml.safe_dump(to_dict(_config_from(args)), sort_keys=False), end="")
    return 0


def _rewards(args: argparse.Namespace) -> int:
    import rewards

    print("\n".join(rewards.available()))
    return 0


def _prompts(args: argparse.Namespace) -> int:
    from .training.prompts import available_prompt_sets, load_prompts

    for name in available_prompt_sets():
        print(f"{name:24s} {len(load_prompts(name))} prompts")
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from .tools import ablate

    return ablate.main(args.grid, parallel=args.parallel, output_dir=args.output_dir, dry_run=args.dry_run)


def _report(args: argparse.Namespace) -> int:
    from .tools.report import write_report

    options = {"prompts": args.prompt, "seeds": args.seeds, "before_after": not args.no_samples}
    index = write_report(args.path, args.out, **options)
    print(f"ddpo report: {index}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpo", description="RL fine-tuning (DDPO, RWR) of diffusion models.")
    parser.add_argument(
        "--debug", action="store_true", help="print the full traceback of an error (also: DDPO_DEBUG=1)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="train (with no arguments: the embedded default on the CPU)",
        description="Train a run. Config = defaults <- preset <- --config file <- key.sub=value overrides.",
    )
    _add_config_arguments(train)
    train.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its newest checkpoint")
    train.set_defaults(func=_train)

    bench = sub.add_parser(
        "bench",
        help="time an epoch's phases, ours vs the straightforward reference",
        description="Time sampling, decoding, scoring and training of one epoch (median of --repeats after --warmup), "
        "ours and the straightforward reference way on the same config, and print the ours / reference ratios.",
    )
    _add_config_arguments(bench)
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    bench.add_argument("--repeats", type=int, default=3, help="measured epochs per mode (median; default 3)")
    bench.add_argument("--warmup", type=int, default=1, help="unmeasured epochs per mode first (default 1)")
    bench.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's default)")
    bench.add_argument("--mode", choices=("both", "ours", "reference"), default="both")
    bench.set_defaults(func=_bench)

    presets = sub.add_parser("presets", help="list the shipped presets")
    presets.set_defaults(func=_presets)

    config = sub.add_parser("config", help="print the resolved config (every key with its value)")
    _add_config_arguments(config)
    config.set_defaults(func=_config)

    rewards = sub.add_parser("rewards", help="list the registered rewards")
    rewards.set_defaults(func=_rewards)

    prompts = sub.add_parser("prompts", help="list the shipped prompt sets")
    prompts.set_defaults(func=_prompts)

    ablate = sub.add_parser(
        "ablate",
        help="run a grid of (algorithm, reward, seed) cells and tabulate / plot them",
        description="Validate every cell of GRID, train the unfinished ones (resuming interrupted ones), then write "
        "results.csv, summary.csv/.md and reward_vs_queries.png into the grid's output_dir.",
    )
    ablate.add_argument("grid", metavar="GRID.yaml", help="grid file (see docs/ablations-and-reports.md)")
    ablate.add_argument("--parallel", type=int, help="cells trained at once (default: the grid's `parallel`)")
    ablate.add_argument("--output-dir", help="output folder (default: the grid's `output_dir`)")
    ablate.add_argument("--dry-run", action="store_true", help="validate and print the commands; run nothing")
    ablate.set_defaults(func=_ablate)

    report = sub.add_parser(
        "report",
        help="write PNG figures and an index.html for a run directory or an ablation folder",
        description="For a run: reward curves, diagnostics, sample grids across epochs and before/after samples "
        "(base vs final/ weights). For an ablation: reward vs reward queries per cell and the summary table.",
    )
    report.add_argument("path", metavar="RUN_DIR|ABLATION_DIR")
    report.add_argument("--out", help="output folder (default: PATH/report)")
    report.add_argument("--prompt", action="append", help="before/after prompt (repeatable; default: 4 of the run's)")
    report.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="before/after seeds (default: 0 1)")
    report.add_argument("--no-samples", action="store_true", help="skip the before/after samples (no model loaded)")
    report.set_defaults(func=_report)
    return parser


def _user_error(err: BaseException) -> bool:
    """Whether ``err`` is a problem with the user's input, config, files or reward (printed as one message), as
    opposed to a bug in ddpo (left to a traceback). Checked by class without importing torch."""
    from .training.config import ConfigError

    kinds: list[type] = [ConfigError, OSError, ValueError]
    for module, names in (("rewards.base", ("RewardError",)), ("ddpo.training.trainer", ("TrainingError",))):
        if (loaded := sys.modules.get(module)) is not None:
            kinds += [getattr(loaded, name) for name in names]
    return isinstance(err, tuple(kinds))


def debug_enabled(args: argparse.Namespace | None = None) -> bool:
    """``--debug`` or ``DDPO_DEBUG=1``: print the traceback of an error (the user's reward's included)."""
    return bool(getattr(args, "debug", False)) or os.environ.get("DDPO_DEBUG", "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    """Run a command; a bad input, config, file or reward ends in one line ``ddpo: error: ...`` and exit code 2
    (the traceback only with ``--debug`` or ``DDPO_DEBUG=1``)."""
    args = build_parser().parse_args(argv)
    if getattr(args, "preset", None) and getattr(args, "config", None):
        print("ddpo: give either --preset or --config, not both", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except Exception as err:
        if not _user_error(err):
            raise
        if debug_enabled(args):
            traceback.print_exc()
        print(f"ddpo: error: {err}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
