"""Who may make ddpo import code: a reward given by import path (``package.module:attribute``) runs that module's
code when it is built, so only the user who runs the command can allow it, never a file they were given.

The opt-in is the command-line flag ``--trust-import-path`` (anywhere on the command line of ``ddpo train``,
``config``, ``bench``, ``eval``, ``report``, ``serve-reward`` and ``ablate``) or the environment variable
``DDPO_TRUST_IMPORT_PATH=1``. A config file, a grid file or a ``key=value`` override cannot opt in: the former config
key ``reward.trust_import_path`` is refused when true (and ignored when false, as the ``config.yaml`` of older runs
holds it). Every entry point that builds a reward from a name it did not get from Python code calls :func:`require`
before anything is imported. Torch-free: the CLI and config validation use it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = [
    "FLAG",
    "TRUST_ENV",
    "ImportPathNotTrusted",
    "import_paths_trusted",
    "opted_in",
    "refusal",
    "require",
    "reward_import_paths",
]

FLAG = "--trust-import-path"
TRUST_ENV = "DDPO_TRUST_IMPORT_PATH"
"""Environment variable: ``1`` trusts import-path rewards (as the flag does) for this process and its children."""
FORMER_KEY = "reward.trust_import_path"
"""The former config key: refused when true, ignored when false (older runs' ``config.yaml`` holds ``false``)."""


class ImportPathNotTrusted(ValueError):
    """A reward names an import path and the user has not opted in."""


def import_paths_trusted() -> bool:
    """Whether the user opted in: ``DDPO_TRUST_IMPORT_PATH`` is ``1`` (or ``true`` / ``yes``), which the flag sets
    while its command runs (:func:`opted_in`)."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


@contextlib.contextmanager
def opted_in(trusted: bool) -> Iterator[None]:
    """While the block runs and ``trusted``: import paths are trusted, in this process and the processes it starts
    (``ddpo ablate``'s cells), through the environment variable; restored afterwards."""
    if not trusted or import_paths_trusted():
        yield
        return
    before = os.environ.get(TRUST_ENV)
    os.environ[TRUST_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(TRUST_ENV, None)
        else:
            os.environ[TRUST_ENV] = before


def reward_import_paths(name: Any, options: Any = None) -> list[str]:
    """The import paths that building reward ``name`` with ``options`` would import: ``name`` itself and the names
    of a ``weighted`` reward's components that contain ``:``."""
    paths = [name] if isinstance(name, str) and ":" in name else []
    components = options.get("components") if isinstance(options, Mapping) else None
    if name == "weighted" and isinstance(components, Mapping):
        paths += [str(key) for key in components if ":" in str(key)]
    return paths


def refusal(name: Any, options: Any = None, where: str = "") -> str | None:
    """The message refusing reward ``name`` (with ``options``) because it names an import path the user has not
    trusted; None when it names none or the user opted in. ``where`` prefixes the message (the file it came from)."""
    paths = reward_import_paths(name, options)
    if not paths or import_paths_trusted():
        return None
    return (
        f"{where}reward {paths[0]!r} is an import path: loading it imports and runs that module's code. If you trust "
        f"it, opt in with {FLAG} on the command line or {TRUST_ENV}=1 (a config file cannot opt in)"
    )


def require(name: Any, options: Any = None, where: str = "") -> None:
    """Raise :class:`ImportPathNotTrusted` (before anything is imported) unless reward ``name`` may be built."""
    message = refusal(name, options, where)
    if message is not None:
        raise ImportPathNotTrusted(message)


def former_key_refusal(value: Any) -> str | None:
    """The message for the former config key ``reward.trust_import_path`` set to ``value``; None for false."""
    if value is False or value is None:
        return None
    shown = str(value).lower() if isinstance(value, bool) else repr(value)
    return (
        f"{FORMER_KEY}={shown}: a config file, grid or override cannot opt in to import-path rewards (importing one "
        f"runs its code); delete the key and give {FLAG} on the command line or set {TRUST_ENV}=1"
    )
