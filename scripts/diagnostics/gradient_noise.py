"""How many samples the policy gradient needs: the gradient noise scale of DDPO on a model, per reward and per step.

Samples ``--samples`` trajectories with a run config's sampler (default: the preset ``world_ddpo``, DDPO-IS on the
world, the default run until 2026-12-06), computes the per-sample gradient of every step's log-prob with respect to
the fresh LoRA weights (the first optimiser step of a run), and for each reward forms the per-sample policy-gradient
terms ``v_i = A_i * sum_{t in S} grad log pi_t`` with the config's advantages (computed per epoch-sized batch, as
the trainer does). Then, over the ``n`` samples (:func:`ddpo.tools.diagnostics.gradient_noise_scale`):

* ``|G|^2``, the squared norm of the true gradient (unbiased: ``|mean v|^2 - tr(Sigma) / n``);
* ``tr(Sigma)``, the total variance of one sample's term;
* ``B_noise = tr(Sigma) / |G|^2``: the batch (in samples) at which the gradient's noise equals its signal
  (McCandlish et al. 2018, "An empirical model of large-batch training"). A run whose total number of samples is
  far below ``B_noise`` moves mostly along noise.
* a bootstrap 95 % upper bound of ``|G|^2`` and the lower bound of ``B_noise`` it gives: when the signal is too weak to
  detect with ``--samples`` (``B_noise`` prints ``inf``), the bound still says how many samples it needs at least.

    python scripts/diagnostics/gradient_noise.py                                   # world_ddpo's settings
    python scripts/diagnostics/gradient_noise.py --rewards world brightness jpeg_compressibility
    python scripts/diagnostics/gradient_noise.py --set sample.guidance_scale=2.5   # any config override

The step subsets reported are every single step, the config's trained window, early / late halves, all steps, and
all steps but the one whose terms vary most.
"""

from __future__ import annotations

import argparse
import time

import torch

from ddpo.models import add_lora, load_pipeline
from ddpo.policy.advantages import batch_normalize, group_center, group_normalize
from ddpo.policy.sampling import encode_prompts, sample_trajectories
from ddpo.tools.diagnostics import gradient_noise_scale, log_prob_gradients
from ddpo.training.config import build_config, sampler_settings
from ddpo.training.prompts import derive_seed, draw_prompts, load_prompts
from rewards import get_reward

ADVANTAGES = {"batch": lambda r, p: batch_normalize(r), "group": group_normalize, "group_center": group_center}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="world_ddpo")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--rewards", nargs="+", default=["world"], help="reward names (default: world)")
    parser.add_argument("--advantages", nargs="+", default=None, help="batch, group, group_center (default: config)")
    parser.add_argument("--samples", type=int, default=256, help="trajectories (default: 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draws", type=int, default=200, help="bootstrap resamples for the 95%% bounds (default 200)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = build_config(preset=args.preset, overrides=args.set)
    s, t = config.sample, config.train
    if args.samples < 2 * s.batch_size or args.samples % s.batch_size:
        parser.error(f"--samples must be a multiple of sample.batch_size ({s.batch_size}), at least two batches")
    advantages = args.advantages or [t.advantage]
    rewards = {name: get_reward(name) for name in args.rewards}

    torch.manual_seed(args.seed)
    pipe = load_pipeline(config.model.pretrained, config.model.revision, s.scheduler)
    unet = pipe.unet
    add_lora(unet, config.model.lora_rank, config.model.lora_alpha, config.model.lora_target_modules)
    params = [p for p in unet.parameters() if p.requires_grad]
    prompts_all = load_prompts(config.prompts)
    negative = encode_prompts(pipe.tokenizer, pipe.text_encoder, [s.negative_prompt], "cpu")
    epoch_size = s.batch_size * s.num_batches_per_epoch
    settings = sampler_settings(config)

    start = time.perf_counter()
    scores: dict[str, list[torch.Tensor]] = {name: [] for name in rewards}
    prompts_seen, grads = [], []
    for b in range(args.samples // s.batch_size):
        prompts = draw_prompts(prompts_all, s.batch_size, s.samples_per_prompt, args.seed, 0, b, 0)
        embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts, "cpu")
        generator = torch.Generator().manual_seed(derive_seed(args.seed, 2, 0, b, 0))
        unet.eval()
        traj = sample_trajectories(unet, pipe.vae, pipe.scheduler, embeds, negative, prompts, generator, settings)
        for name, reward in rewards.items():
            with torch.no_grad():
                scores[name].append(reward(traj.images, prompts).float())
        grads.append(log_prob_gradients(unet, pipe.scheduler, traj, params, settings))
        prompts_seen += prompts
        print(f"  batch {b}: {len(prompts_seen)} samples, {time.perf_counter() - start:.0f} s", flush=True)
    grads = torch.cat(grads)  # [N, T, P]
    steps = grads.shape[1]
    trained = max(1, round(steps * t.timestep_window))
    subsets = {f"step {j}": [j] for j in range(steps)}
    subsets |= {
        f"window (first {trained})": list(range(trained)),
        "early half": list(range(steps // 2)),
        "late half": list(range(steps // 2, steps)),
        "all steps": list(range(steps)),
    }
    # The step whose terms vary most (with 10 DDIM steps from t = 901: t = 101, see scripts/diagnostics/score_scales.py).
    loudest = int(grads.pow(2).sum(2).mean(0).argmax())
    subsets[f"all but step {loudest}"] = [j for j in range(steps) if j != loudest]
    print(f"{len(prompts_seen)} samples, {grads.shape[2]} LoRA weights, {time.perf_counter() - start:.0f} s")
    for name in rewards:
        values = torch.cat(scores[name])
        for kind in advantages:
            adv = torch.cat(
                [
                    ADVANTAGES[kind](values[i : i + epoch_size], prompts_seen[i : i + epoch_size])
                    for i in range(0, len(values), epoch_size)
                ]
            ).clamp(-t.adv_clip_max, t.adv_clip_max)
            print(f"\n{name}, {kind} advantages (reward mean {values.mean():.4f}, std {values.std():.4f})")
            print("| steps | |G|^2 | |G|^2, 95% upper | tr(Sigma) | B_noise (samples) | B_noise, 95% lower |")
            print("|---|---|---|---|---|---|")
            for label, subset in subsets.items():
                terms = adv.view(-1, 1) * grads[:, subset].sum(1)
                n = gradient_noise_scale(terms, draws=args.draws, seed=args.seed)
                print(
                    f"| {label} | {n['g2']:.3e} | {n['g2_upper']:.3e} | {n['trace']:.3e} | {n['b_noise']:,.0f} | "
                    f"{n['b_noise_lower']:,.0f} |"
                )


if __name__ == "__main__":
    main()
