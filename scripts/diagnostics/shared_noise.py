"""How much a check's mean depends on its noise draw: the mean reward of ``--count`` held-out prompts under each noise
seed, once with one ``x_T`` per seed shared by every prompt (how ``ddpo eval`` drew its images before 2026-12-04) and
once with every image's own noise (``ddpo eval`` now: :func:`ddpo.tools.sample.noise_seeds`). Images come from the
pipeline's ``__call__`` (:func:`ddpo.tools.sample.sample_images`), as ``ddpo eval`` draws them.

    python scripts/diagnostics/shared_noise.py                      # the world model, CFG-free DPM-Solver++, 10 steps
    python scripts/diagnostics/shared_noise.py --scheduler ddim --eta 1 --guidance 5

The table of docs/notes/2026-12-04-shared-noise-in-the-check.md came from the first command (64 prompts, seeds 10-13).
"""

from __future__ import annotations

import argparse

import torch

from ddpo.tools import sample
from ddpo.training.evaluation import eval_prompt_list, mean_and_se
from ddpo.training.prompts import load_prompts
from rewards import get_reward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="world", help="model: hub id, folder, 'world' or 'tiny' (default: world)")
    parser.add_argument("--prompts", default="world_heldout", help="prompt set (default: world_heldout)")
    parser.add_argument("--reward", default="world", help="reward name (default: world)")
    parser.add_argument("--count", type=int, default=64, help="prompts (default: 64)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12, 13], help="noise seeds (default 10-13)")
    parser.add_argument("--scheduler", default="dpmsolver++", help="sampler (default: dpmsolver++)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--eta", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = eval_prompt_list(load_prompts(args.prompts), args.count)
    model = sample.load_model(model=args.model, scheduler=args.scheduler)
    reward = get_reward(args.reward)
    options = sample.SamplerOptions(
        num_steps=args.steps,
        guidance_scale=args.guidance,
        eta=args.eta,
        scheduler=args.scheduler,
        batch_size=args.batch_size,
    )
    means: dict[str, list[float]] = {"shared": [], "own": []}
    print(f"{args.model}: {args.count} prompts of {args.prompts}, {args.scheduler} {args.steps} steps, guidance "
          f"{args.guidance}, eta {args.eta}; mean {args.reward} reward per noise seed")  # fmt: skip
    print("\n| noise seed | one x_T shared by all prompts | its own noise per image |\n|---|---|---|")
    for seed in args.seeds:
        row = []
        for mode in ("shared", "own"):
            seeds = [seed] * len(prompts)
            generator_seeds = seeds if mode == "shared" else sample.noise_seeds(prompts, seeds)
            images = sample.sample_images(model.pipe, prompts, generator_seeds, options)
            values, _, _ = sample.score(reward, images, prompts, args.batch_size)
            means[mode].append(sum(values) / len(values))
            row.append(means[mode][-1])
        print(f"| {seed} | {row[0]:.4f} | {row[1]:.4f} |")
    if len(args.seeds) > 1:
        spread = [mean_and_se(torch.tensor(means[mode]))[1] * len(args.seeds) ** 0.5 for mode in ("shared", "own")]
        print(f"| std over the {len(args.seeds)} seeds | {spread[0]:.4f} | {spread[1]:.4f} |")


if __name__ == "__main__":
    main()
