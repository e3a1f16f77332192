"""Pretrain the embedded default model of ddpo on the procedural world, from scratch, on the CPU.

Phases (each reproducible from ``--seed``: the data and noise of step ``k`` are a pure function of
``(seed, phase, k)``, so a resumed phase sees exactly the batches an uninterrupted one would):

1. ``vae``  — AutoencoderKL, 64 px RGB <-> 16x16x4 latents, L1 + MSE reconstruction and a small KL term; the
   latent ``scaling_factor`` is then set to ``1 / std`` of the latents of fresh renders, and the ``world`` reward's
   checks on reconstructions of held-out renders are written to ``WORK/vae_check.json`` (the ceiling of any denoiser
   on this latent space).
2. ``decoder`` — the VAE decoder alone fine-tuned on full images (encoder frozen: the latent space is unchanged,
   so this phase and ``unet`` are independent and may run as two processes at once).
3. ``clip`` — a tiny open_clip model trained contrastively on (render, caption) pairs of the whole world.
4. ``unet`` — UNet2DConditionModel and the CLIP text encoder trained jointly with the DDPM epsilon loss (min-SNR-5
   weighting, offset noise ``--offset-noise``) on VAE latents of renders of the *train* captions; 10% of captions are
   dropped to "" so classifier-free guidance works; the saved weights are an EMA of the trained ones.
5. ``eval`` — the saved pipeline (reloaded with plain diffusers) samples 256 images over the held-out prompts
   (20 DDIM steps, eta 1, guidance 5) and the ``world`` reward scores them; writes ``eval.json`` and a grid.

Usage (the shipped model: the defaults; ``bash scripts/pretrain_world_all.sh [OUT [WORK]]`` runs the phases on both
cores of a 2-core machine beside the flow twin's and rebuilt both shipped models in 67 min: docs/world.md, "How it was
trained")::

    python scripts/pretrain_world.py --out world/assets --work /tmp/world_pretrain

Single-threaded processes (``--threads 1``): on a shared 2-core machine two threads per process oversubscribe the
cores and run several times slower.

Checkpoints go to ``--work`` every ``--save-every`` steps; rerunning the same command resumes. The helpers this script
shares with scripts/pretrain_world_flow.py (seeding, schedules, the denoiser loop, the evaluation) are in
scripts/pretrain_world_common.py.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_world_common import (  # noqa: E402
    caption_tokens,
    captioned_latents,
    cosine_lr,
    eval_prompts,
    eval_result,
    load_ckpt,
    load_ema,
    log,
    optimizer_step,
    parser,
    resume,
    sample_and_score,
    save_ckpt,
    save_eval_samples,
    save_grid,
    start,
    step_seed,
    train_denoiser,
)

import world  # noqa: E402

# --------------------------------------------------------------------------------------------------------------------
# Phase 1: VAE
# --------------------------------------------------------------------------------------------------------------------


def train_vae(pipe, args) -> None:
    vae = pipe.vae
    ckpt_path = args.work / "vae.pt"
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    start = resume(ckpt_path, vae, opt, "vae")
    vae.train()
    t0 = time.time()
    for step in range(start, args.vae_steps):
        s = step_seed(args.seed, "vae", step)
        images = world.render(world.sample_scenes(args.vae_batch, s)) * 2 - 1  # [B, 3, 64, 64] in [-1, 1]
        generator = torch.Generator().manual_seed(s)
        if args.vae_crop < world.IMAGE_SIZE:
            # The VAE is fully convolutional (no attention): random crops cost 4x less per step than full images.
            top, left = torch.randint(0, world.IMAGE_SIZE - args.vae_crop + 1, (2,), generator=generator).tolist()
            top, left = top // 8 * 8, left // 8 * 8  # keep the latent grid aligned with the full image's
            images = images[:, :, top : top + args.vae_crop, left : left + args.vae_crop]
        posterior = vae.encode(images).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        rec = F.l1_loss(recon, images) + F.mse_loss(recon, images)
        kl = posterior.kl().mean() / z[0].numel()
        loss = rec + args.vae_kl * kl
        optimizer_step(loss, opt, vae.parameters(), cosine_lr(step, args.vae_steps, args.vae_lr))
        if step % 50 == 0 or step == args.vae_steps - 1:
            log(f"vae step {step} rec {rec.item():.4f} kl/dim {kl.item():.3f} ({time.time() - t0:.0f}s)")
        if (step + 1) % args.save_every == 0 or step == args.vae_steps - 1:
            save_ckpt(ckpt_path, model=vae.state_dict(), opt=opt.state_dict(), step=step + 1)
    vae.eval()
    # Latent scale: unit variance for the diffusion model (as Stable Diffusion's 0.18215).
    with torch.no_grad():
        images = world.render(world.sample_scenes(args.scale_images, step_seed(args.seed, "vae", 10**6))) * 2 - 1
        z = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(128)])
        recon = torch.cat([vae.decode(chunk).sample for chunk in z.split(128)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    log(
        f"vae: latent std {z.std().item():.3f} -> scaling_factor {vae.config.scaling_factor:.4f}; "
        f"held-out recon MSE {F.mse_loss(recon, images).item():.5f}"
    )
    save_grid(torch.cat([images[:16], recon[:16]]).add(1).div(2), args.work / "vae_recon.png", nrow=16)
    check = reconstruction_check(vae, args)
    (args.work / "vae_check.json").write_text(json.dumps(check, indent=2))
    log(f"vae: world checks on reconstructions of held-out renders {json.dumps(check)}")


@torch.no_grad()
def reconstruction_check(vae, args, count: int = 256) -> dict[str, float]:
    """The ``world`` reward's checks on VAE reconstructions of renders of held-out captions (the most any denoiser on
    this latent space can reach): per-check pass rates and ``exact`` (all checks passed)."""
    from rewards.world import WorldReward

    _, heldout = world.split_captions(args.prompt_seed)
    rng = np.random.default_rng(step_seed(args.seed, "vae", 10**6 + 1))
    prompts = [heldout[i] for i in rng.integers(len(heldout), size=count)]
    images = world.render([world.sample_scene(rng, p) for p in prompts]) * 2 - 1
    recon = torch.cat([vae.decode(vae.encode(c).latent_dist.mean).sample for c in images.split(128)])
    checks = WorldReward().pass_fail(recon.add(1).div(2).clamp(0, 1), prompts)
    return {name: value.float().mean().item() for name, value in checks.items()}


def train_decoder(pipe, args) -> None:
    """Fine-tune the VAE decoder alone (encoder frozen, so the latent space the UNet learns is unchanged), on full
    64 px images decoded from posterior samples, as Stable Diffusion's ft-MSE decoder was."""
    vae = pipe.vae
    vae.requires_grad_(False)
    decoder_params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in decoder_params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(decoder_params, lr=args.decoder_lr, weight_decay=0.0)
    ckpt_path = args.work / "decoder.pt"
    start = resume(ckpt_path, vae, opt, "decoder")
    vae.decoder.train()
    t0 = time.time()
    for step in range(start, args.decoder_steps):
        s = step_seed(args.seed, "decoder", step)
        images = world.render(world.sample_scenes(args.decoder_batch, s)) * 2 - 1
        generator = torch.Generator().manual_seed(s)
        with torch.no_grad():
            posterior = vae.encode(images).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, images) + F.mse_loss(recon, images)
        optimizer_step(loss, opt, decoder_params, cosine_lr(step, args.decoder_steps, args.decoder_lr))
        if step % 50 == 0 or step == args.decoder_steps - 1:
            log(f"decoder step {step} rec {loss.item():.4f} ({time.time() - t0:.0f}s)")
        if (step + 1) % args.save_every == 0 or step == args.decoder_steps - 1:
            save_ckpt(ckpt_path, model=vae.state_dict(), opt=opt.state_dict(), step=step + 1)
    vae.requires_grad_(False)
    vae.eval()
    with torch.no_grad():
        images = world.render(world.sample_scenes(args.scale_images, step_seed(args.seed, "vae", 10**6))) * 2 - 1
        recon = torch.cat([vae.decode(vae.encode(c).latent_dist.mean).sample for c in images.split(128)])
    log(f"decoder: held-out recon MSE {F.mse_loss(recon, images).item():.5f}")
    check = reconstruction_check(vae, args)
    (args.work / "decoder_check.json").write_text(json.dumps(check, indent=2))
    log(f"decoder: world checks on reconstructions of held-out renders {json.dumps(check)}")
    save_grid(torch.cat([images[:16], recon[:16]]).add(1).div(2), args.work / "decoder_recon.png", nrow=16)


# --------------------------------------------------------------------------------------------------------------------
# Phase 2: UNet + text encoder
# --------------------------------------------------------------------------------------------------------------------


def train_unet(pipe, args) -> None:
    unet, text_encoder, vae = pipe.unet, pipe.text_encoder, pipe.vae
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas_cumprod = noise_scheduler.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    loss_weight = torch.clamp(snr, max=args.min_snr_gamma) / snr  # min-SNR weighting for epsilon prediction
    train_captions, _ = world.split_captions(args.prompt_seed)
    tokens = caption_tokens(pipe.tokenizer)

    def step_loss(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        seed = step_seed(args.seed, "unet", step)
        prompts, latents, generator = captioned_latents(seed, train_captions, args.batch, args.cond_drop, vae)
        noise = torch.randn(latents.shape, generator=generator)
        if args.offset_noise > 0:
            # Offset noise (Guttenberg 2023): a per-sample, per-channel constant in the noise, so that the model learns
            # to move an image's mean colour; without it the SD schedule's last steps leave the mean of x_T in the
            # image and black backgrounds come out grey.
            noise = noise + args.offset_noise * torch.randn(latents.shape[:2] + (1, 1), generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (args.batch,), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        hidden = text_encoder(tokens(prompts))[0]
        pred = unet(noisy, timesteps, hidden).sample
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        return (per_sample * loss_weight[timesteps]).mean(), per_sample.mean()

    unet.train()
    text_encoder.train()
    vae.requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    modules = {"unet": unet, "text_encoder": text_encoder}
    train_denoiser("unet", modules, params, step_loss, args, steps=args.unet_steps, lr=args.unet_lr, warmup=200)
    unet.eval()
    text_encoder.eval()


def load_unet_ema(pipe, work: Path) -> None:
    """Put the EMA weights of the latest UNet checkpoint into ``pipe`` (to look at samples mid-training)."""
    ckpt = load_ckpt(work / "unet.pt")
    load_ema(ckpt["ema"], list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters()))


# --------------------------------------------------------------------------------------------------------------------
# Phase 3: world CLIP
# --------------------------------------------------------------------------------------------------------------------


def train_clip(args) -> None:
    import open_clip

    clip_dir = args.out / "world_clip"
    clip_dir.mkdir(parents=True, exist_ok=True)
    config_path = clip_dir / f"{world.WORLD_CLIP_NAME}.json"
    config_path.write_text(json.dumps(world.WORLD_CLIP_CONFIG, indent=2) + "\n")
    name = world.register_world_clip_config(config_path)
    torch.manual_seed(args.seed)
    model = open_clip.create_model(name, pretrained=None)
    tokenizer = open_clip.get_tokenizer(name)
    mean = torch.tensor(world.WORLD_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(world.WORLD_CLIP_STD).view(1, 3, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=args.clip_lr, weight_decay=0.05)
    ckpt_path = args.work / "clip.pt"
    start = resume(ckpt_path, model, opt, "clip")
    model.train()
    all_captions = world.all_captions()
    t0 = time.time()
    for step in range(start, args.clip_steps):
        s = step_seed(args.seed, "clip", step)
        # Distinct captions in a batch: no false negatives in the contrastive loss.
        rng = np.random.default_rng(s)
        picks = rng.choice(len(all_captions), size=args.clip_batch, replace=False)
        scenes = [world.sample_scene(rng, all_captions[i]) for i in picks]
        images = (world.render(scenes) - mean) / std
        # Light augmentation so the model also reads blurry/noisy generated images.
        noise_std = torch.from_numpy(rng.uniform(0, 0.15, size=(len(scenes), 1, 1, 1))).float()
        images = images + noise_std * torch.randn(images.shape, generator=torch.Generator().manual_seed(s))
        text = tokenizer([world.caption(sc) for sc in scenes])
        image_features = F.normalize(model.encode_image(images), dim=-1)
        text_features = F.normalize(model.encode_text(text), dim=-1)
        logits = model.logit_scale.exp() * image_features @ text_features.T
        labels = torch.arange(len(scenes))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        optimizer_step(loss, opt, model.parameters(), cosine_lr(step, args.clip_steps, args.clip_lr))
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0 or step == args.clip_steps - 1:
            acc = (logits.argmax(1) == labels).float().mean().item()
            log(f"clip step {step} loss {loss.item():.3f} acc {acc:.2f} ({time.time() - t0:.0f}s)")
        if (step + 1) % args.save_every == 0 or step == args.clip_steps - 1:
            save_ckpt(ckpt_path, model=model.state_dict(), opt=opt.state_dict(), step=step + 1)
    from safetensors.torch import save_file

    # float16 on disk halves the size; open_clip loads it into the float32 model.
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(clip_dir / "open_clip_model.safetensors"))
    log(f"clip: saved to {clip_dir}")


# --------------------------------------------------------------------------------------------------------------------
# Phase 4: evaluation
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model_dir: Path, args) -> dict:
    from rewards.world import WorldReward

    pipe = world.load_world_pipeline(model_dir)
    prompts, seeds = eval_prompts(args)
    reward = WorldReward()
    t0 = time.time()
    images, scores, infos = sample_and_score(
        pipe, reward, prompts, seeds, num_inference_steps=20, guidance_scale=5.0, eta=1.0
    )
    seconds = time.time() - t0
    result = eval_result(reward, images, prompts, infos)
    # Chance level of perfect renders of random world scenes scored against the evaluation prompts.
    renders = world.render(world.sample_scenes(len(prompts), step_seed(args.seed, "eval", 10**6)))
    reward(renders, prompts)
    result.update({f"chance_random_scenes/{k.split('/')[1]}": v for k, v in reward.last_info().items()})
    result.update(
        {
            "reward/world_mean": scores.mean().item(),
            "samples": len(prompts),
            "seconds_per_16_samples": seconds / (len(prompts) / 16),
            "settings": "heldout prompts, DDIM 20 steps, eta 1.0, guidance 5.0",
        }
    )
    save_eval_samples(images, prompts, args.work)
    return result


def save_pipeline(pipe, args) -> Path:
    model_dir = args.out / "world_model"
    pipe.save_pretrained(model_dir, safe_serialization=True)
    return model_dir


def main() -> None:
    parser_ = parser(
        __doc__, "writes world_model/ and world_clip/", "/tmp/world_pretrain", "vae,decoder,clip,unet,eval", 0.998, 200
    )
    parser_.add_argument("--vae-steps", type=int, default=3000)
    parser_.add_argument("--vae-batch", type=int, default=32)
    parser_.add_argument("--vae-crop", type=int, default=32, help="side of the random crops the VAE trains on")
    parser_.add_argument("--vae-lr", type=float, default=2e-3)
    parser_.add_argument("--vae-kl", type=float, default=1e-4, help="weight of the per-dimension KL term")
    parser_.add_argument(
        "--scale-images",
        type=int,
        default=512,
        help="fresh renders that set the latent scaling factor (1 / std) and measure held-out reconstruction",
    )
    parser_.add_argument("--decoder-steps", type=int, default=800)
    parser_.add_argument("--decoder-batch", type=int, default=16)
    parser_.add_argument("--decoder-lr", type=float, default=1e-3)
    parser_.add_argument("--unet-steps", type=int, default=5000)
    parser_.add_argument("--unet-lr", type=float, default=1e-3)
    parser_.add_argument("--min-snr-gamma", type=float, default=5.0)
    parser_.add_argument(
        "--offset-noise", type=float, default=0.1, help="std of a per-channel constant added to the UNet's noise"
    )
    parser_.add_argument("--clip-steps", type=int, default=200)
    parser_.add_argument("--clip-batch", type=int, default=64)
    parser_.add_argument("--clip-lr", type=float, default=1e-3)
    args = parser_.parse_args()
    phases = start(args, "pretrain_world")
    t_start = time.time()

    pipe = world.build_world_pipeline(seed=args.seed)
    pipe.set_progress_bar_config(disable=True)
    if "vae" in phases:
        train_vae(pipe, args)
        torch.save(pipe.vae.state_dict(), args.work / "vae_final.pt")
        (args.work / "vae_scaling.json").write_text(json.dumps({"scaling_factor": pipe.vae.config.scaling_factor}))
    elif (args.work / "vae_final.pt").exists():
        pipe.vae.load_state_dict(torch.load(args.work / "vae_final.pt", weights_only=True))
        pipe.vae.register_to_config(**json.loads((args.work / "vae_scaling.json").read_text()))
    if "decoder" in phases:
        train_decoder(pipe, args)
        torch.save(pipe.vae.state_dict(), args.work / "vae_final.pt")
        # The trained VAE beside the (seeded, untrained) text encoder, tokenizer and UNet: what
        # scripts/pretrain_world_flow.py builds the flow twin from (--world-model), so that it can train beside the UNet.
        pipe.save_pretrained(args.work / "world_model_vae", safe_serialization=True)
    if "clip" in phases:
        train_clip(args)
    if "unet" in phases:  # last, so that a run short of time can be finished from its latest checkpoint
        train_unet(pipe, args)
        model_dir = save_pipeline(pipe, args)
        log(f"saved pipeline to {model_dir}")
    log(f"training wall time {time.time() - t_start:.0f}s")
    if "eval" in phases:
        result = evaluate(args.out / "world_model", args)
        (args.work / "eval.json").write_text(json.dumps(result, indent=2))
        log(f"eval: {json.dumps(result)}")


if __name__ == "__main__":
    main()
