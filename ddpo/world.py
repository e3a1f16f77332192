"""Alias of the :mod:`world` package (``from ddpo import world`` and ``from ddpo.world import ...`` keep working)."""

from world import *  # noqa: F403
from world import __all__  # noqa: F401
