"""Base model vs fine-tuned weights of finished runs, on held-out prompts, through the plain diffusers pipeline.

For each run directory: ``--prompts`` (``--count`` of them, the fixed draw of :func:`ddpo.training.evaluation.eval_prompt_list`)
x ``--seeds`` are sampled with ``StableDiffusionPipeline.__call__`` (one generator per image) from the run's base
model and again after ``pipe.load_lora_weights(RUN_DIR/final)``, with the run's steps, eta and CFG scale
(:func:`ddpo.tools.report.sample_before_after`), and scored by the run's reward. Prints one JSON line per run: the reward
and its components before and after, and the paired change with its standard error.

    python scripts/eval_before_after.py runs/seed0 runs/seed1 runs/seed2
"""

from __future__ import annotations

import argparse
import json

import torch

from ddpo.tools.report import load_run, sample_before_after
from ddpo.training.evaluation import eval_prompt_list, paired_change
from ddpo.training.prompts import load_prompts
from rewards import get_reward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--prompts", default="world_heldout", help="prompt set (default: world_heldout)")
    parser.add_argument("--count", type=int, default=64, help="prompts drawn from the set (default: 64)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="noise seeds per prompt")
    args = parser.parse_args()
    prompts = eval_prompt_list(load_prompts(args.prompts), args.count)
    for path in args.runs:
        run = load_run(path)
        result = sample_before_after(run, prompts, seeds=args.seeds, score=False)
        reward = get_reward(run.config["reward"]["name"], **run.config["reward"]["options"])
        out: dict = {"run": path, "images": len(result.prompts)}
        values = {}
        for name, images in (("before", result.before), ("after", result.after)):
            with torch.no_grad():
                values[name] = reward(images, result.prompts).double()
            out[name] = {key: round(value, 4) for key, value in reward.last_info().items()}
            out[name]["mean"] = round(values[name].mean().item(), 4)
        change, change_se = paired_change(values["before"].tolist(), values["after"].tolist())
        out["change"] = round(change, 4)
        out["change_se"] = round(change_se, 4)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
