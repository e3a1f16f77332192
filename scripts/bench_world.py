"""Speed of the procedural world: rendering scenes and scoring them with the verifiable ``world`` reward.

    python scripts/bench_world.py [--count 1000] [--repeats 5] [--threads 1]

Prints a table (median of ``--repeats`` after one warm-up). Say which CPU (``lscpu`` model name) a figure came from.
"""

from __future__ import annotations

import argparse

import torch

import world
from ddpo.tools.bench import median_seconds
from rewards.world import WorldReward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="images per call (default 1000)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    captions = world.split_captions()[1]
    prompts = [captions[i % len(captions)] for i in range(args.count)]
    scenes = world.sample_scenes(args.count, seed=0)
    images, _ = world.render_captions(prompts, seed=0)
    reward = WorldReward()
    rows = [
        ("render (world.render)", median_seconds(lambda: world.render(scenes), args.repeats)),
        ("world reward", median_seconds(lambda: reward(images, prompts), args.repeats)),
    ]
    print(f"| what | seconds per {args.count} images | images / s |")
    print("|---|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.4f} | {args.count / seconds:,.0f} |")
    print(f"median of {args.repeats} after a warm-up; torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
