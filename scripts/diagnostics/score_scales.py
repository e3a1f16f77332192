"""Which denoising steps dominate the policy gradient: per step, the analytic scale of the score
(:func:`ddpo.tools.diagnostics.score_scales`, ``|d mean / d model_output| / std``) and the measured norm of
``d log pi / d theta`` over a LoRA's parameters, averaged over ``--samples`` trajectories of the model.

A step whose norm is many times the others' decides the direction (and the noise) of every update; with
``train.timestep_window`` < 1 training leaves the last steps out.

    python scripts/diagnostics/score_scales.py                        # the shipped world model, 10 DDIM steps, eta 1, CFG 5
    python scripts/diagnostics/score_scales.py --steps 20 --samples 4
"""

from __future__ import annotations

import argparse

import torch

from ddpo.models import add_lora, load_pipeline
from ddpo.policy.sampling import SamplerSettings, encode_prompts, sample_trajectories
from ddpo.tools.diagnostics import log_prob_gradients, score_scales
from ddpo.training.config import ModelConfig, SampleConfig
from ddpo.training.evaluation import eval_prompt_list
from ddpo.training.prompts import load_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", default="world", help="model: hub id, folder or 'world' (default: world)")
    parser.add_argument("--prompts", default="world_train", help="prompt set (default: world_train)")
    parser.add_argument("--samples", type=int, default=8, help="trajectories to measure (default: 8)")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps (default: 10)")
    parser.add_argument("--guidance", type=float, default=5.0, help="CFG scale (default: 5)")
    parser.add_argument("--eta", type=float, default=1.0, help="DDIM eta (default: 1)")
    parser.add_argument("--lora-rank", type=int, default=8, help="rank of the LoRA measured (default: 8)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the LoRA initialisation and the noise (default: 0)"
    )
    args = parser.parse_args()

    pipe = load_pipeline(args.pretrained, None, "ddim")
    scales = score_scales(pipe.scheduler, "ddim", args.steps, args.eta)
    torch.manual_seed(args.seed)  # the LoRA's random A matrices, so the measured norms repeat
    add_lora(pipe.unet, args.lora_rank, float(args.lora_rank), ModelConfig().lora_target_modules)
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    prompts = eval_prompt_list(load_prompts(args.prompts), args.samples)
    embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts, "cpu")
    negative_prompt = SampleConfig().negative_prompt  # the trainer's default
    negative = (
        encode_prompts(pipe.tokenizer, pipe.text_encoder, [negative_prompt], "cpu") if args.guidance > 1 else None
    )
    generator = torch.Generator().manual_seed(args.seed)
    settings = SamplerSettings("ddim", args.steps, args.guidance, args.eta)
    trajectories = sample_trajectories(
        pipe.unet, pipe.vae, pipe.scheduler, embeds, negative, prompts, generator, settings
    )
    print(
        f"{args.pretrained}, {args.steps} DDIM steps, eta {args.eta:g}, CFG {args.guidance:g}, {args.samples} samples"
    )
    print("| step | timestep | score scale | grad norm of log pi (LoRA, mean over samples) |")
    print("|---|---|---|---|")
    grads = log_prob_gradients(pipe.unet, pipe.scheduler, trajectories, params, settings)
    norms = grads.norm(dim=2).mean(0)  # [T]: mean over samples of each step's gradient norm
    for j, t in enumerate(trajectories.timesteps.tolist()):
        print(f"| {j} | {t} | {scales[j].item():.3f} | {norms[j].item():.4f} |")


if __name__ == "__main__":
    main()
