"""Benchmark one DDPO epoch, ours vs the straightforward reference: ``python scripts/bench.py [ddpo bench args]``.

Same as ``ddpo bench``, e.g. ``python scripts/bench.py --preset tiny --threads 1 --repeats 3 --json bench.json``.
"""

import sys

from ddpo.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
