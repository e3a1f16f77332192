"""Where a reward varies: ``--count`` prompts x ``--seeds`` noise seeds sampled from a model with plain diffusers,
scored, and summarised by :func:`ddpo.tools.diagnostics.reward_spread` (per check too, for a reward with ``details``, such as
``world``).

DDPO with group advantages learns only from the spread *within* a prompt's samples: the ``within_share`` column is
the part of the reward's variance that it can see, and ``never`` / ``always`` count the prompts on which a check gives
no signal at all. One table per (steps, guidance, branch point):

    python scripts/diagnostics/reward_spread.py                                    # the shipped world model, world reward
    python scripts/diagnostics/reward_spread.py --steps 10 20 --guidance 2.5 5 10  # how sampler settings change it
    python scripts/diagnostics/reward_spread.py --lora runs/seed0/final            # after fine-tuning
    python scripts/diagnostics/reward_spread.py --share-initial-noise              # a prompt's samples share x_T (as
                                                                       # sample.share_initial_noise trains)
    python scripts/diagnostics/reward_spread.py --branch-after 2 4 6 8             # ... and share the first K steps too

``--branch-after K`` measures how much of the within-prompt variance the last ``steps - K`` denoising steps make:
a prompt's samples follow seed 0's trajectory for ``K`` steps, then each continues with its own noise. Its
``within_var`` is ``E[Var(R | x after K steps)]``, the variance of the advantage that step ``K``'s action would get
with an exact per-step baseline ``V(x_t)`` (tree-structured sampling), against ``Var(R | prompt)`` without branching.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from ddpo.models import load_pipeline
from ddpo.tools.diagnostics import reward_spread
from ddpo.training.config import SampleConfig
from ddpo.training.evaluation import eval_prompt_list
from ddpo.training.prompts import load_prompts
from rewards import get_reward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", default="world", help="model: hub id, folder or 'world' (default: world)")
    parser.add_argument("--lora", default=None, help="LoRA weights to load (a run's final/ folder)")
    parser.add_argument("--reward", default="world", help="reward name (default: world)")
    parser.add_argument("--prompts", default="world_train", help="prompt set (default: world_train)")
    parser.add_argument("--count", type=int, default=48, help="prompts, a fixed draw from the set (default: 48)")
    parser.add_argument("--seeds", type=int, default=8, help="noise seeds per prompt, 0..N-1 (default: 8)")
    parser.add_argument("--steps", type=int, nargs="+", default=[10], help="DDIM steps (default: 10)")
    parser.add_argument("--guidance", type=float, nargs="+", default=[5.0], help="CFG scales (default: 5)")
    parser.add_argument("--eta", type=float, default=1.0, help="DDIM eta (default: 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--share-initial-noise",
        action="store_true",
        help="the seeds of a prompt share one x_T (drawn from seed 10000 + the prompt's index); only the steps' "
        "noise differs between them",
    )
    parser.add_argument(
        "--branch-after",
        type=int,
        nargs="+",
        default=None,
        metavar="K",
        help="a prompt's samples share seed 0's state after K denoising steps (K >= 1; one table per K)",
    )
    args = parser.parse_args()
    if args.branch_after is not None and (min(args.branch_after) < 1 or max(args.branch_after) > min(args.steps)):
        parser.error(
            f"--branch-after takes K from 1 to --steps ({min(args.steps)}); to share only x_T use --share-initial-noise"
        )
    if args.branch_after is not None and args.share_initial_noise:
        parser.error("--branch-after already shares x_T (and the first K steps): drop --share-initial-noise")
    if args.seeds < 2:
        parser.error("--seeds must be at least 2: the spread within a prompt needs two samples")
    if args.threads:
        torch.set_num_threads(args.threads)

    prompts = eval_prompt_list(load_prompts(args.prompts), args.count)
    negative_prompt = SampleConfig().negative_prompt  # the trainer's default
    seeds = list(range(args.seeds))
    reward = get_reward(args.reward)
    pipe = load_pipeline(args.pretrained, None, "ddim")
    pipe.set_progress_bar_config(disable=True)
    if args.lora:
        pipe.load_lora_weights(args.lora)
    unet = pipe.unet.config
    latent_shape = (1, unet.in_channels, unet.sample_size, unet.sample_size)
    for steps, guidance, branch_after in itertools.product(args.steps, args.guidance, args.branch_after or [None]):
        start = time.perf_counter()
        callback = None if branch_after is None else share_state_after(branch_after)
        images = []
        for index, prompt in enumerate(prompts):
            generators = [torch.Generator().manual_seed(seed) for seed in seeds]
            latents = None
            if args.share_initial_noise:
                x_t = torch.randn(latent_shape, generator=torch.Generator().manual_seed(10_000 + index))
                latents = x_t.expand(len(seeds), -1, -1, -1).clone()
            with torch.no_grad():
                out = pipe(
                    [prompt] * len(seeds),
                    latents=latents,
                    generator=generators,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    negative_prompt=[negative_prompt] * len(seeds) if guidance > 1 else None,
                    eta=args.eta,
                    output_type="pt",
                    callback_on_step_end=callback,
                )
            images.append(out.images.float().cpu())
        batch = torch.cat(images)
        batch_prompts = [p for p in prompts for _ in seeds]
        with torch.no_grad():
            if hasattr(reward, "details"):  # per check; its "total" is what the reward returns
                details = reward.details(batch, batch_prompts)
                rows = {
                    "total": details["total"],
                    **{k: v for k, v in details.items() if k not in ("total", "all", "background_fraction", "valid")},
                }
            else:
                rows = {"total": reward(batch, batch_prompts)}
        seconds = time.perf_counter() - start
        shared = " sharing x_T" if args.share_initial_noise else ""
        if branch_after is not None:
            shared = f" sharing the state after {branch_after} of {steps} steps"
        print(
            f"\n{args.pretrained}, {steps} steps, guidance {guidance:g}, eta {args.eta:g}: "
            f"{len(prompts)} prompts x {len(seeds)} seeds{shared} ({seconds:.0f} s)"
        )
        print(f"| {'':10} | mean  | within_share | within_var | tied | never | always |")
        print("|---|---|---|---|---|---|---|")
        for name, values in rows.items():
            s = reward_spread(values.double().view(len(prompts), len(seeds)))
            print(
                f"| {name:10} | {s['mean']:.3f} | {s['within_share']:.2f} | {s['within_var']:.4f} | {s['tied']:.2f} | "
                f"{s['never']:.2f} | {s['always']:.2f} |"
            )


def share_state_after(k: int):
    """A diffusers ``callback_on_step_end`` that, after the ``k``-th denoising step, replaces every sample's latents
    ``[S, C, h, w]`` by the first sample's: from there on the samples differ only by their own step noise."""

    def callback(pipe, i: int, t: int, kwargs: dict) -> dict:
        latents = kwargs["latents"]
        if i == k - 1:
            latents = latents[:1].expand_as(latents).clone()
        return {"latents": latents}

    return callback


if __name__ == "__main__":
    main()
