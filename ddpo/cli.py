"""The ``ddpo`` command line: ``ddpo train | sample | eval | serve-reward | ablate | report | bench | presets | config |
rewards | prompts``. It only parses arguments; each command's logic lives in :mod:`ddpo.training` or :mod:`ddpo.tools`."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import traceback

import yaml

from .training import trust
from .training.config import DEFAULT_PRESET


def _config_from(args: argparse.Namespace):
    """The config of ``--preset`` / ``--config`` / overrides; with neither file option, the default preset."""
    from .training.config import build_config

    preset = args.preset or (None if args.config else DEFAULT_PRESET)
    return build_config(preset=preset, config_file=args.config, overrides=_overrides(args))


def _overrides(args: argparse.Namespace) -> list[str]:
    """The key=value overrides."""
    return list(args.overrides)


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help=f"a shipped preset (`ddpo presets` lists them; default: {DEFAULT_PRESET})")
    parser.add_argument("--config", help="a YAML config file (instead of the default preset)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    _add_trust_argument(parser)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="print error tracebacks")


def _add_trust_argument(parser: argparse.ArgumentParser) -> None:
    """``--trust-import-path``, accepted anywhere on the line (:func:`_take_trust_flag`); a config cannot opt in."""
    parser.add_argument(
        trust.FLAG,
        action="store_true",
        help=f"allow a reward given by import path (package.module:attribute): importing it runs its code "
        f"(also: {trust.TRUST_ENV}=1; a config file cannot opt in)",
    )


TRUST_COMMANDS = ("train", "bench", "config", "eval", "report", "serve-reward", "ablate")
"""The commands that can build a reward from a name, and so take ``--trust-import-path``."""


def _take_trust_flag(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--trust-import-path`` and whether it was there, for a command of :data:`TRUST_COMMANDS`:
    argparse alone would refuse the flag between two overrides (``a=1 --trust-import-path b=2``)."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in TRUST_COMMANDS or trust.FLAG not in argv:
        return argv, False
    end = argv.index("--") if "--" in argv else len(argv)
    kept = [a for i, a in enumerate(argv) if i >= end or a != trust.FLAG]
    return kept, len(kept) < len(argv)


def _train(args: argparse.Namespace) -> int:
    """Train or resume; Ctrl-C (SIGINT) ends in one line (the last intact checkpoint, the resume command) and exit
    code :data:`INTERRUPTED`."""
    from .training.trainer import interrupted_message, new_run_dir, resume, train

    if args.resume and (args.preset or args.config):
        from .training.config import ConfigError

        raise ConfigError("ddpo train: --resume takes the run's own config.yaml; give only key=value overrides")
    run_dir = args.resume
    try:
        if args.resume:
            resume(args.resume, _overrides(args))
            return 0
        config = _config_from(args)
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


def _bench(args: argparse.Namespace) -> int:
    from .tools import bench

    if args.calibrate:
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        bench.calibrate_main(_config_from(args), repeats=args.repeats, refresh=args.refresh)
        return 0
    bench.main(_config_from(args), args.json, args.repeats, args.warmup, args.threads, args.mode)
    return 0


def _presets(args: argparse.Namespace) -> int:
    from importlib import resources

    from .training.config import preset_names

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


def _sampler_arguments(
    parser: argparse.ArgumentParser,
    count: int | None,
    out: str,
    seeds: tuple[int, ...] | None = (0,),
    count_default: str | None = None,
    seeds_default: str | None = None,
) -> None:
    """The prompt, seed and sampler options of ``ddpo sample`` / ``eval``; ``count_default`` / ``seeds_default`` word
    the help's defaults where the command resolves them itself (``count`` / ``seeds`` None)."""
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    parser.add_argument("--prompts", metavar="SET_OR_FILE", help="a shipped prompt set or a text file, one per line")
    parser.add_argument(
        "--count",
        type=int,
        default=count,
        help="prompts drawn from the set (the fixed draw of the trainer's held-out evaluation; default: "
        f"{count_default or count or 'all'})",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None if seeds is None else list(seeds),
        help=f"noise seeds, each with every prompt (default {seeds_default or ' '.join(map(str, seeds or ()))})",
    )
    parser.add_argument("--steps", type=int, help="sampling steps (default: the run's sample.num_steps, else 20)")
    parser.add_argument("--guidance", type=float, help="CFG scale (default: the run's, else 5)")
    parser.add_argument(
        "--eta",
        type=float,
        help="DDIM eta (default: the run's, else 1; flow-matching pipelines sample with their ODE and take no eta)",
    )
    parser.add_argument(
        "--scheduler",
        help="sampler: ddim, ddpm, dpmsolver++, euler, ... (default: the run's sample.scheduler, else ddim; "
        "flow-matching pipelines use their Euler ODE)",
    )
    parser.add_argument("--negative-prompt", help="negative prompt (default: the run's, else empty)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (default 8)")
    parser.add_argument("--out", help=f"output folder (default: {out})")


def _sampler_options(args: argparse.Namespace, model):
    from .tools.sample import sampler_from_run

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
    from .tools import sample

    sample.sampler_options(run_sampler, **_given_sampler(args))
    sample.check_seeds(args.seeds)
    sample.check_output_dir(out)


def _sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .tools import sample

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
        options = _yaml_mapping(args.reward_options, "--reward-options")
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


def _yaml_mapping(text: str | None, flag: str) -> dict:
    """The YAML mapping given to ``flag`` (``--options``, ``--reward-options``); empty when not given. Read as config
    files are: safe-loaded, one line for a syntax error, a repeated key or an alias bomb."""
    from .training.config import load_yaml

    if not text:
        return {}
    value = load_yaml(text, flag)
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a YAML mapping like '{{quality: 80}}'; got {text!r}")
    return value


WORLD_MODELS = ("world", "world_flow")
"""The shipped world models: ``ddpo eval --model`` defaults to the ``world`` reward, the ``world_heldout`` prompts and
the sampler of the preset of the same name for them."""


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .tools import paired_eval, pass_at, sample

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
        from .training.checkpoint import restore_final_reward

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
    from .training.config import preset_data, preset_names

    return dict(preset_data(model).get("sample", {})) if model in WORLD_MODELS and model in preset_names() else {}


def _serve_reward(args: argparse.Namespace) -> int:
    import os

    from .tools.reward_server import serve

    options = _yaml_mapping(args.options, "--options")
    token = os.environ.get(args.token_env) or None
    limits = {"max_batch": args.max_batch, "max_image_size": args.max_image_size}
    return serve(args.name, options, args.host, args.port, token, args.device, **limits, token_env=args.token_env)


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
    bench.add_argument(
        "--calibrate",
        action="store_true",
        help="time the hardware-dependent choices (pairs per training call, channels-last) on this machine and model, "
        "print the recommended overrides; cached per machine and model shape under $DDPO_CACHE/calibration",
    )
    bench.add_argument("--refresh", action="store_true", help="with --calibrate: measure again instead of the cache")
    bench.set_defaults(func=_bench)

    sample = sub.add_parser(
        "sample",
        help="images from a base model or a finished run (PNGs and a grid)",
        description="Sample images through the plain diffusers pipeline from a base model (--model) or a run "
        "(--run RUN_DIR: its base model with final/ loaded by pipe.load_lora_weights). Every prompt is drawn with "
        "every seed; image i's noise comes from torch.Generator().manual_seed(seed).",
    )
    source = sample.add_mutually_exclusive_group()
    source.add_argument(
        "--model",
        help="base model: world, world_flow, tiny, tiny_sdxl, tiny_sd3, tiny_flux, a hub id or a local pipeline folder",
    )
    source.add_argument("--run", metavar="RUN_DIR", help="a finished run: its base model + final/")
    _sampler_arguments(sample, None, "RUN_DIR/generated with --run, else ./ddpo-samples")
    sample.set_defaults(func=_sample)

    evaluate = sub.add_parser(
        "eval",
        help="base vs fine-tuned (or run vs run) on the same prompts and noise, scored by a reward",
        description="Sample every prompt x seed from two models with the same noise and score them: per-image "
        "scores (scores.csv), means, the paired change and its standard error, per-component means, and a "
        "before/after grid. One run: its base model vs the run; two runs: the first vs the second.",
    )
    evaluate.add_argument("runs", nargs="*", metavar="RUN_DIR", help="one run (base vs run) or two (run vs run)")
    evaluate.add_argument("--base", help="compare this base model (not the run's own) with the run")
    evaluate.add_argument(
        "--model",
        help="a base model alone (world, world_flow, a hub id or folder), with --pass-at; for world and world_flow "
        "the reward, prompts (world_heldout) and sampler default to those of the preset of the same name",
    )
    evaluate.add_argument(
        "--pass-at",
        type=int,
        nargs="+",
        metavar="K",
        help="pass@k of each check and of all checks together (unbiased estimator over max(K) samples a prompt, "
        "noise seeds 1000.. unless --seeds), over every prompt of the set unless --count; for a run, of its base "
        "and of the run",
    )
    evaluate.add_argument("--reward", help="reward name or import path (default: the run's reward and options)")
    evaluate.add_argument("--reward-options", metavar="YAML", help="options of --reward, e.g. '{quality: 80}'")
    _add_trust_argument(evaluate)
    _sampler_arguments(
        evaluate,
        None,
        "RUN_DIR/eval of the (last) run, ./ddpo-eval with --model",
        seeds=None,
        count_default="64, all with --pass-at",
        seeds_default="0; with --pass-at K: max(K) seeds from 1000",
    )
    evaluate.set_defaults(func=_eval)

    serve = sub.add_parser(
        "serve-reward",
        help="serve a registered reward over HTTP for `reward.name: remote`",
        description="Serve the reward NAME (any registered name or import path) over HTTP: POST /score (a batch of "
        "images and prompts in, scores out), GET /health. Batches are scored one at a time in arrival order. "
        "Clients use reward.name=remote with reward.options.url=http://HOST:PORT (docs/rewards.md).",
    )
    serve.add_argument("name", metavar="NAME", help="reward name or import path (`ddpo rewards` lists them)")
    serve.add_argument("--options", metavar="YAML", help="the reward's options, e.g. '{model: ViT-B-32}'")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free one, printed)")
    serve.add_argument("--device", help="device the reward runs on, e.g. cuda:1 (default: where the images are)")
    serve.add_argument("--max-batch", type=int, default=256, help="largest batch accepted (default 256)")
    serve.add_argument(
        "--max-image-size",
        type=int,
        default=1024,
        help="largest image side in pixels accepted (default 1024); with --max-batch it bounds a request's size",
    )
    serve.add_argument(
        "--token-env",
        default="DDPO_REWARD_TOKEN",
        help="environment variable holding the token clients must send (default DDPO_REWARD_TOKEN; unset: none, "
        "allowed only on a loopback --host)",
    )
    _add_trust_argument(serve)
    serve.set_defaults(func=_serve_reward)

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
    _add_trust_argument(ablate)
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
    _add_trust_argument(report)
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
    argv, trusted = _take_trust_flag(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    if getattr(args, "preset", None) and getattr(args, "config", None):
        print("ddpo: give either --preset or --config, not both", file=sys.stderr)
        return 2
    try:
        with trust.opted_in(trusted or getattr(args, "trust_import_path", False)):
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
