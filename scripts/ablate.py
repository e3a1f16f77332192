"""Run a reward-ablation grid; the same as ``ddpo ablate GRID.yaml [--parallel N] [--output-dir DIR] [--dry-run]``.

Example: ``python scripts/ablate.py ablations/world_vs_compressibility.yaml --parallel 2``.
"""

from __future__ import annotations

import sys

from ddpo.cli import main

if __name__ == "__main__":
    sys.exit(main(["ablate", *sys.argv[1:]]))
