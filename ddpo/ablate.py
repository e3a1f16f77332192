"""Alias of :mod:`ddpo.tools.ablate` (``from ddpo.ablate import load_grid, run_grid, write_outputs`` keeps working)."""

from .tools.ablate import *  # noqa: F403
from .tools.ablate import __all__  # noqa: F401
