"""The argument parser of ``ddpo``: every command's options, help and defaults, and the function that runs it."""

from __future__ import annotations

import argparse

from ..training import trust
from ..training.config import DEFAULT_PRESET
from .commands import (
    ablate_command,
    bench_command,
    config_command,
    presets_command,
    prompts_command,
    report_command,
    rewards_command,
    serve_reward_command,
    train_command,
)
from .sampling import eval_command, sample_command


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help=f"a shipped preset (`ddpo presets` lists them; default: {DEFAULT_PRESET})")
    parser.add_argument("--config", help="a YAML config file (instead of the default preset)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    _add_trust_argument(parser)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="print error tracebacks")


def _add_trust_argument(parser: argparse.ArgumentParser) -> None:
    """``--trust-import-path``, accepted anywhere on the line (:func:`ddpo.cli.main` takes it out first); a config cannot opt in."""
    parser.add_argument(
        trust.FLAG,
        action="store_true",
        help=f"allow a reward given by import path (package.module:attribute): importing it runs its code "
        f"(also: {trust.TRUST_ENV}=1; a config file cannot opt in)",
    )


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
    train.set_defaults(func=train_command)

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
    bench.set_defaults(func=bench_command)

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
    sample.set_defaults(func=sample_command)

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
    evaluate.set_defaults(func=eval_command)

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
    serve.set_defaults(func=serve_reward_command)

    presets = sub.add_parser("presets", help="list the shipped presets")
    presets.set_defaults(func=presets_command)

    config = sub.add_parser("config", help="print the resolved config (every key with its value)")
    _add_config_arguments(config)
    config.set_defaults(func=config_command)

    rewards = sub.add_parser("rewards", help="list the registered rewards")
    rewards.set_defaults(func=rewards_command)

    prompts = sub.add_parser("prompts", help="list the shipped prompt sets")
    prompts.set_defaults(func=prompts_command)

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
    ablate.set_defaults(func=ablate_command)

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
    report.set_defaults(func=report_command)
    return parser
