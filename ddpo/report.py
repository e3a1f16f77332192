"""Alias of :mod:`ddpo.tools.report` (``from ddpo import report``, as the notebooks do, keeps working)."""

from .tools.report import *  # noqa: F403
from .tools.report import __all__  # noqa: F401
