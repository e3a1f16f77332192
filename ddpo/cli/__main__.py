"""``python -m ddpo.cli``: the ``ddpo`` command (as ``accelerate launch -m ddpo.cli`` and ``torchrun -m ddpo.cli`` run it)."""

import sys

from . import main

sys.exit(main())
