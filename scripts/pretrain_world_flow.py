"""Pretrain the flow-matching twin of the embedded world model (``world/assets/world_flow/``), on the CPU.

A ``StableDiffusion3Pipeline`` without T5: the shipped world VAE (weights copied, ``shift_factor`` 0), two
``CLIPTextModelWithProjection`` text encoders initialised from the world CLIP text encoder (new projections), the
world CLIP tokenizer, a small ``SD3Transformer2DModel`` (``world.WORLD_FLOW_TRANSFORMER``) and a
``FlowMatchEulerDiscreteScheduler`` (``world.WORLD_FLOW_SCHEDULER``).

Phases (seeded per step as scripts/pretrain_world.py's, with the helpers both share in
scripts/pretrain_world_common.py: the data and noise of step ``k`` are a pure function of ``(seed, phase, k)``, so a
resumed phase sees exactly the batches an uninterrupted one would):

1. ``transformer`` — the transformer and both text encoders trained jointly with the rectified-flow loss on VAE
   latents of renders of the *train* captions: ``x_s = (1 - s) x0 + s eps``, target ``v = eps - x0``, ``s``
   logit-normal (SD3's ``m = 0, s = 1``: most samples at mid noise, where layout and colour are decided), the
   transformer's timestep ``1000 s`` as the pipeline feeds it; 10% of captions dropped to "" so classifier-free
   guidance works; the saved weights are an EMA of the trained ones. Writes ``OUT/world_flow``.
2. ``tune`` — guidance scales (``--tune-guidance``) compared on 64 samples over *train* captions (never the held-out
   ones); writes ``WORK/tune.json``.
3. ``eval`` — the saved folder, reloaded with plain diffusers, samples 256 images over the held-out captions (the
   UNet model's evaluation prompts and noise seeds; 20 Euler steps, ``--guidance``), scored by the ``world``
   reward; writes ``WORK/eval.json`` and a grid.

The pipeline conditions the transformer on 77 CLIP tokens followed by 256 identical zero "T5" tokens. SD3 has no
positional embedding on the context tokens, so the 256 stay identical through every block, and joint attention over
them equals attention over one of them with its logit raised by ``log 256``. Training does exactly that (one zero
token and an additive attention bias, :class:`CollapsedJointAttnProcessor`): 142 tokens a sample instead of 397, the
same function up to float rounding (checked at start-up against the uncollapsed forward).

Usage (the shipped twin: the defaults, 3500 steps, built by ``bash scripts/pretrain_world_all.sh`` beside the UNet
model from the VAE its decoder phase saves in ``WORK/world_model_vae``)::

    python scripts/pretrain_world_flow.py --out world/assets --work /tmp/world_flow --world-model WORK/world_model_vae
    python scripts/pretrain_world_flow.py --out world/assets --work /tmp/world_flow --phases tune

Checkpoints go to ``--work`` every ``--save-every`` steps; rerunning the same command resumes. A run short of time is
finished from its latest checkpoint by rerunning with ``--steps`` at most the checkpoint's step (the loop is skipped
and the EMA weights are saved).
"""

from __future__ import annotations

import json
import math
import subprocess
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
    eval_prompts,
    eval_result,
    log,
    parser,
    sample_and_score,
    save_eval_samples,
    start,
    step_seed,
    train_denoiser,
)

import world  # noqa: E402

T5_TOKENS = 256
"""Zero "T5" tokens the SD3 pipeline appends when ``text_encoder_3`` is None (its default ``max_sequence_length``)."""


class CollapsedJointAttnProcessor:
    """diffusers' ``JointAttnProcessor2_0`` with ``attention_mask`` added to the attention logits (a float bias over
    the keys, ``[1, 1, 1, L]``); with the bias ``log 256`` on one zero context token it computes what the pipeline's
    256 identical zero tokens do."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch, n = hidden_states.shape[:2]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = (
            heads(attn.to_q(hidden_states)),
            heads(attn.to_k(hidden_states)),
            heads(attn.to_v(hidden_states)),
        )
        if attn.norm_q is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        cq = heads(attn.add_q_proj(encoder_hidden_states))
        ck = heads(attn.add_k_proj(encoder_hidden_states))
        cv = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        out = F.scaled_dot_product_attention(
            torch.cat([query, cq], 2), torch.cat([key, ck], 2), torch.cat([value, cv], 2), attn_mask=attention_mask
        )
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[-1])
        hidden_states, encoder_hidden_states = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return attn.to_out[1](attn.to_out[0](hidden_states)), encoder_hidden_states


def build_flow_pipeline(seed: int, world_model: Path):
    """The twin with the world VAE and text-encoder weights and a fresh (seeded) transformer and projections."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(world_model / "vae", dtype=torch.float32)
    vae.register_to_config(shift_factor=0.0)  # SD3 decodes latents / scaling_factor + shift_factor
    source = CLIPTextModel.from_pretrained(world_model / "text_encoder", dtype=torch.float32).state_dict()
    config = CLIPTextConfig.from_pretrained(world_model / "text_encoder")
    config.projection_dim = world.WORLD_FLOW_PROJECTION_DIM
    state = torch.random.get_rng_state()
    try:
        encoders = []
        for k in range(2):
            torch.manual_seed(seed + k)
            encoder = CLIPTextModelWithProjection(config)
            encoder.text_model.load_state_dict(source)  # all but the new text_projection
            encoders.append(encoder)
        torch.manual_seed(seed + 2)
        transformer = SD3Transformer2DModel(**world.WORLD_FLOW_TRANSFORMER)
    finally:
        torch.random.set_rng_state(state)
    # adaLN-Zero (DiT): every block starts as the identity and the output as zero; much faster early training.
    with torch.no_grad():
        for block in transformer.transformer_blocks:
            for norm in (block.norm1, block.norm1_context):
                norm.linear.weight.zero_()
                norm.linear.bias.zero_()
        transformer.norm_out.linear.weight.zero_()
        transformer.norm_out.linear.bias.zero_()
        transformer.proj_out.weight.zero_()
        transformer.proj_out.bias.zero_()
    tokenizer = CLIPTokenizer.from_pretrained(world_model / "tokenizer")
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**world.WORLD_FLOW_SCHEDULER),
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=tokenizer,
        text_encoder_2=encoders[1],
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode(pipe, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``StableDiffusion3Pipeline.encode_prompt`` computes without T5, but with ONE zero T5 token: ``(context
    [B, 78, 64], pooled [B, 64])`` (the penultimate hidden states of both CLIP encoders side by side, their projections
    side by side)."""
    hidden, pooled = [], []
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out.text_embeds)
    hidden = torch.cat(hidden, -1)
    hidden = F.pad(hidden, (0, pipe.transformer.config.joint_attention_dim - hidden.shape[-1]))
    return torch.cat([hidden, hidden.new_zeros(hidden.shape[0], 1, hidden.shape[-1])], 1), torch.cat(pooled, -1)


def collapsed_bias(pipe, context_tokens: int) -> torch.Tensor:
    """Attention bias over the keys (image patches, then the context with its one zero token last)."""
    config = pipe.transformer.config
    patches = (config.sample_size // config.patch_size) ** 2
    bias = torch.zeros(1, 1, 1, patches + context_tokens)
    bias[..., -1] = math.log(T5_TOKENS)
    return bias


@torch.no_grad()
def check_collapse(pipe, tokens) -> float:
    """Max |difference| between the collapsed forward (training's) and the pipeline's (256 zero tokens)."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    transformer = pipe.transformer
    g = torch.Generator().manual_seed(0)
    # Non-zero adaLN weights, so that the check sees every path (at adaLN-Zero init the blocks are the identity).
    saved = {k: v.clone() for k, v in transformer.state_dict().items()}
    for p in transformer.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=g))
    ids = tokens(["a red circle on a white background", ""])
    context, pooled = encode(pipe, ids)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([300.0, 800.0])
    bias = collapsed_bias(pipe, context.shape[1])
    transformer.set_attn_processor(CollapsedJointAttnProcessor())
    a = transformer(x, timestep=t, encoder_hidden_states=context, pooled_projections=pooled,
                    joint_attention_kwargs={"attention_mask": bias}).sample  # fmt: skip
    transformer.set_attn_processor(JointAttnProcessor2_0())
    full, _, full_pooled, _ = pipe.encode_prompt(
        ["a red circle on a white background", ""], None, None, do_classifier_free_guidance=False
    )
    assert torch.equal(full_pooled, pooled) and torch.equal(full[:, :77], context[:, :77])
    b = transformer(x, timestep=t, encoder_hidden_states=full, pooled_projections=pooled).sample
    transformer.load_state_dict(saved)
    return (a - b).abs().max().item() / b.abs().max().item()


def train_transformer(pipe, args) -> None:
    transformer, vae, tokenizer = pipe.transformer, pipe.vae, pipe.tokenizer
    train_captions, _ = world.split_captions(args.prompt_seed)
    tokens = caption_tokens(tokenizer)
    log(f"transformer: collapsed vs pipeline forward, max relative difference {check_collapse(pipe, tokens):.2e}")
    transformer.set_attn_processor(CollapsedJointAttnProcessor())
    encoders = [pipe.text_encoder, pipe.text_encoder_2]
    params = list(transformer.parameters())
    if args.train_text_encoders:
        params += [p for e in encoders for p in e.parameters()]
    else:
        for e in encoders:
            e.requires_grad_(False)
    transformer.train()
    for e in encoders:
        e.train(args.train_text_encoders)
    vae.requires_grad_(False)
    bias = collapsed_bias(pipe, tokenizer.model_max_length + 1)

    def step_loss(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        seed = step_seed(args.seed, "transformer", step)
        prompts, latents, generator = captioned_latents(seed, train_captions, args.batch, args.cond_drop, vae)
        noise = torch.randn(latents.shape, generator=generator)
        if args.timesteps == "logit_normal":
            sigma = torch.sigmoid(torch.randn(args.batch, generator=generator))
        else:
            sigma = torch.rand(args.batch, generator=generator)
        sig = sigma.view(-1, 1, 1, 1)
        noisy = (1 - sig) * latents + sig * noise
        context, pooled = encode(pipe, tokens(prompts))
        pred = transformer(
            noisy,
            timestep=sigma * 1000,
            encoder_hidden_states=context,
            pooled_projections=pooled,
            joint_attention_kwargs={"attention_mask": bias},
        ).sample
        loss = (pred - (noise - latents)).pow(2).mean(dim=(1, 2, 3)).mean()
        return loss, loss

    modules = {"transformer": transformer, "text_encoder": encoders[0], "text_encoder_2": encoders[1]}
    train_denoiser("transformer", modules, params, step_loss, args, steps=args.steps, lr=args.lr, warmup=args.warmup)
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    transformer.set_attn_processor(JointAttnProcessor2_0())
    transformer.eval()
    for e in encoders:
        e.eval()


def save_flow_pipeline(pipe, args) -> Path:
    """``OUT/world_flow``: safetensors; the two text encoders' weights in float16 (their 49,408 x 32 token embeddings
    are most of the folder), their configs still float32, so the pipeline loads them as float32."""
    from safetensors.torch import load_file, save_file

    model_dir = args.out / "world_flow"
    pipe.save_pretrained(model_dir, safe_serialization=True)
    for name in ("text_encoder", "text_encoder_2"):
        path = model_dir / name / "model.safetensors"
        state = {k: v.to(torch.float16).contiguous() for k, v in load_file(str(path)).items()}
        save_file(state, str(path), metadata={"format": "pt"})
    return model_dir


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"


def tune(args) -> dict:
    """Guidance scales on 64 samples over TRAIN captions (the held-out ones are only for ``eval``)."""
    from rewards import get_reward

    pipe = world.load_world_flow_pipeline(args.out / "world_flow")
    train, _ = world.split_captions(args.prompt_seed)
    rng = np.random.default_rng(step_seed(args.seed, "tune", 0))
    prompts = [train[i] for i in rng.integers(len(train), size=args.tune_samples)]
    seeds = [step_seed(args.seed, "tune", i + 1) for i in range(0, len(prompts), 16)]
    result = {}
    for guidance in args.tune_guidance:
        t0 = time.time()
        _, scores, infos = sample_and_score(
            pipe, get_reward("world"), prompts, seeds, num_inference_steps=args.eval_steps, guidance_scale=guidance
        )
        exact = float(np.mean([info["reward/world_exact_mean"] for info in infos]))
        result[str(guidance)] = {"reward_mean": scores.mean().item(), "exact": exact, "seconds": time.time() - t0}
        log(f"tune: guidance {guidance}: {result[str(guidance)]}")
    return result


def evaluate(args) -> dict:
    """256 samples over the held-out captions: the UNet model's evaluation prompts and per-batch noise seeds
    (scripts/pretrain_world.py's ``evaluate``), 20 Euler steps, guidance ``--guidance``."""
    from rewards import get_reward

    pipe = world.load_world_flow_pipeline(args.out / "world_flow")
    prompts, seeds = eval_prompts(args)
    reward = get_reward("world")
    t0 = time.time()
    images, scores, infos = sample_and_score(
        pipe, reward, prompts, seeds, num_inference_steps=args.eval_steps, guidance_scale=args.guidance
    )
    seconds = time.time() - t0
    result = eval_result(reward, images, prompts, infos)
    # Per-sample exact match (all four checks passed): the reward is the fraction of checks passed, 1.0 is exact.
    exact = (scores >= 1.0 - 1e-6).float()
    result.update(
        {
            "reward/world_mean": scores.mean().item(),
            "reward/world_stderr": (scores.std(unbiased=True) / math.sqrt(len(scores))).item(),
            "exact_fraction": exact.mean().item(),
            "exact_stderr": (exact.std(unbiased=True) / math.sqrt(len(exact))).item(),
            "samples": len(prompts),
            "settings": f"heldout prompts, FlowMatchEuler {args.eval_steps} steps, guidance {args.guidance}, "
            f"shift {pipe.scheduler.config.shift}, T5 dropped",
            "seconds": seconds,
            "seconds_per_16_samples": seconds / (len(prompts) / 16),
            "cpu": cpu_model(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
    )
    save_eval_samples(images, prompts, args.work)
    return result


def main() -> None:
    parser_ = parser(__doc__, "writes world_flow/", "/tmp/world_flow", "transformer,tune,eval", 0.995, 100)
    parser_.add_argument("--world-model", type=Path, default=None, help="the UNet world model (VAE, text encoder)")
    parser_.add_argument("--steps", type=int, default=3500)
    parser_.add_argument("--lr", type=float, default=1e-3)
    parser_.add_argument("--warmup", type=int, default=100)
    parser_.add_argument("--timesteps", choices=["logit_normal", "uniform"], default="logit_normal")
    parser_.add_argument(
        "--no-train-text-encoders", dest="train_text_encoders", action="store_false", help="freeze both"
    )
    parser_.add_argument("--eval-steps", type=int, default=20)
    parser_.add_argument(
        "--guidance",
        type=float,
        default=2.0,
        help="guidance scale of the evaluation phase (the shipped twin: the best of tune)",
    )
    parser_.add_argument("--tune-samples", type=int, default=64)
    parser_.add_argument("--tune-guidance", type=lambda s: [float(x) for x in s.split(",")], default=[2.0, 4.5, 7.0])
    args = parser_.parse_args()
    phases = start(args, "pretrain_world_flow")
    t_start = time.time()
    if "transformer" in phases:
        pipe = build_flow_pipeline(args.seed, args.world_model or world.world_model_path())
        train_transformer(pipe, args)
        model_dir = save_flow_pipeline(pipe, args)
        log(f"saved pipeline to {model_dir}; training wall time {time.time() - t_start:.0f}s")
    if "tune" in phases:
        result = tune(args)
        (args.work / "tune.json").write_text(json.dumps(result, indent=2))
    if "eval" in phases:
        result = evaluate(args)
        (args.work / "eval.json").write_text(json.dumps(result, indent=2))
        log(f"eval: {json.dumps(result)}")


if __name__ == "__main__":
    main()
