"""The ``ddpo`` command line: ``ddpo train | sample | eval | serve-reward | ablate | report | bench | presets | config |
rewards | prompts``. It only parses arguments; each command's logic lives in :mod:`ddpo.training` or :mod:`ddpo.tools`.

The package splits the work: :mod:`.parser` builds the argument parser, :mod:`.commands` and :mod:`.sampling`
(``sample`` and ``eval``) run the commands, and :func:`main` here turns a user's mistake into one line and an exit
code. ``python -m ddpo.cli`` runs :func:`main` (:mod:`.__main__`).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from ..training import trust
from .parser import build_parser

__all__ = ["build_parser", "debug_enabled", "main"]


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


def _user_error(err: BaseException) -> bool:
    """Whether ``err`` is a problem with the user's input, config, files or reward (printed as one message), as
    opposed to a bug in ddpo (left to a traceback). Checked by class without importing torch."""
    from ..training.config import ConfigError

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
