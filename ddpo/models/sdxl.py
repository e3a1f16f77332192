"""Stable Diffusion XL (``StableDiffusionXLPipeline``): two CLIP text encoders, a UNet with SDXL's added
conditioning (pooled text embedding and micro-conditioning time ids), and its tiny test pipeline.

The conditioning is exactly diffusers': the sequence states are the pipeline's own ``encode_prompt`` output (both
encoders' penultimate hidden states, concatenated), the pooled embedding is ``text_encoder_2``'s projected output, and
the time ids are ``pipe._get_add_time_ids`` of ``(original_size, crop_top_left=(0, 0), target_size)`` at the sampled
resolution. A denoising loop over :meth:`StableDiffusionXLFamily.encode` and :meth:`StableDiffusionXLFamily.bind` thus
reproduces ``StableDiffusionXLPipeline.__call__`` (``tests/test_family_sdxl.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline

from world import CLIP_TEXT_IDS, build_clip_tokenizer

from ..policy.conditioning import Conditioning
from ..policy.sampling import denoiser_call
from .family import Denoiser, ModelFamily, register_family
from .stable_diffusion import TINY_VAE

TINY_SDXL = "tiny_sdxl"
"""``model.pretrained`` value that builds :func:`build_tiny_sdxl_pipeline` instead of loading weights."""

TINY_SDXL_TEXT_ENCODER: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
}
"""``CLIPTextConfig`` of the tiny first text encoder (a ``CLIPTextModel``, SDXL's CLIP ViT-L)."""
TINY_SDXL_TEXT_ENCODER_2: dict[str, Any] = {
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "hidden_act": "gelu",
    "projection_dim": 32,
}
"""``CLIPTextConfig`` of the tiny second text encoder (a ``CLIPTextModelWithProjection``, SDXL's OpenCLIP bigG).
Its hidden size differs from the first's, so a wrong concatenation order or a missing encoder fails loudly."""
TINY_SDXL_ADDITION_TIME_EMBED_DIM = 8
"""Sinusoidal embedding width of each of the 6 micro-conditioning numbers (SDXL: 256)."""
TINY_SDXL_UNET: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 4),
    "transformer_layers_per_block": (1, 2),
    "use_linear_projection": True,
    "norm_num_groups": 32,
    # Cross-attention on both encoders' hidden states, concatenated along the feature axis.
    "cross_attention_dim": TINY_SDXL_TEXT_ENCODER["hidden_size"] + TINY_SDXL_TEXT_ENCODER_2["hidden_size"],
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TINY_SDXL_ADDITION_TIME_EMBED_DIM,
    # 6 time ids (original h, w; crop top, left; target h, w), each embedded, plus the pooled text embedding.
    "projection_class_embeddings_input_dim": 6 * TINY_SDXL_ADDITION_TIME_EMBED_DIM
    + TINY_SDXL_TEXT_ENCODER_2["projection_dim"],
}
"""``UNet2DConditionModel`` of the tiny SDXL pipeline (SDXL's added ``text_time`` conditioning, linear projections,
more transformer layers in the deeper block), without ``sample_size`` (an argument of the builder)."""
TINY_SDXL_VAE: dict[str, Any] = {**TINY_VAE, "scaling_factor": 0.13025, "force_upcast": True}
"""The tiny AutoencoderKL of Stable Diffusion with SDXL's VAE settings: its latent scaling and ``force_upcast`` (the
SDXL VAE overflows in float16, so diffusers decodes in float32)."""

SDXL_DDIM_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}
"""The published SDXL base scheduler (``EulerDiscreteScheduler``: scaled_linear 0.00085..0.012, 1000 steps, epsilon,
``steps_offset=1``, ``leading`` spacing) as a ``DDIMScheduler`` configuration."""


def build_tiny_sdxl_pipeline(seed: int = 0, sample_size: int = 32) -> StableDiffusionXLPipeline:
    """An SDXL-shaped pipeline with random weights, built from configs (no download).

    UNet ``(32, 64)`` channels with SDXL's ``text_time`` added conditioning (:data:`TINY_SDXL_UNET`), the 2-level tiny
    AutoencoderKL (``sample_size`` latents decode to ``2 * sample_size`` pixels) with ``force_upcast``, a 2-layer
    ``CLIPTextModel`` (hidden 32) and a 2-layer ``CLIPTextModelWithProjection`` (hidden 48, projection 32), both with
    the real CLIP tokenizer, and the SDXL scheduler configuration as DDIM. No watermarker. Deterministic for a given
    ``seed`` (torch's global RNG is restored afterwards); ``save_pretrained`` writes a folder that plain
    ``StableDiffusionXLPipeline.from_pretrained`` loads.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        unet = UNet2DConditionModel(**TINY_SDXL_UNET, sample_size=sample_size)
        vae = AutoencoderKL(**TINY_SDXL_VAE, sample_size=2 * sample_size)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_TEXT_IDS, **TINY_SDXL_TEXT_ENCODER))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_TEXT_IDS, **TINY_SDXL_TEXT_ENCODER_2))
    finally:
        torch.random.set_rng_state(state)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(**SDXL_DDIM_SCHEDULER),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


@register_family
class StableDiffusionXLFamily(ModelFamily):
    """Stable Diffusion XL (``StableDiffusionXLPipeline``): two CLIP text encoders, a UNet predicting epsilon with
    SDXL's added conditioning (pooled text embedding and micro-conditioning time ids); DDIM/DDPM log-prob steps.

    Conditioning (:meth:`encode`): ``embeds`` ``[B, 77, D1 + D2]`` and ``pooled`` ``[B, P]`` from the pipeline's own
    ``encode_prompt``, ``time_ids`` ``[B, 6]`` = ``(original_size, (0, 0), target_size)`` with both sizes the sampled
    resolution in pixels. The empty prompt encodes to zeros when the pipeline's ``force_zeros_for_empty_prompt`` is
    set (SDXL base's default): that is what ``StableDiffusionXLPipeline.__call__`` uses as the unconditional input of
    classifier-free guidance when no negative prompt is given, so our CFG with ``sample.negative_prompt=""`` matches
    the pipeline's.

    Memory: gradient checkpointing and bf16 frozen weights are generic (the trainer's). The VAE must stay in float32
    (:attr:`vae_force_upcast`): the SDXL VAE overflows in float16 (diffusers upcasts it whenever its config says
    ``force_upcast``), so the trainer must not cast the VAE of a family with ``vae_force_upcast = True`` to a
    half-precision dtype; decoding casts the latents to float32 instead. ``model.vae_path`` loads an fp16-fix VAE
    (e.g. ``madebyollin/sdxl-vae-fp16-fix``) in its place.
    """

    name = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    text_encoder_attrs = ("text_encoder", "text_encoder_2")
    tiny_name = TINY_SDXL
    vae_force_upcast = True

    @classmethod
    def build_tiny(cls, seed: int = 0) -> StableDiffusionXLPipeline:
        return build_tiny_sdxl_pipeline(seed)

    @classmethod
    def load_kwargs(cls, options: dict[str, Any]) -> dict[str, Any]:
        """SDXL has no safety checker; ``options["vae_path"]`` (a local folder or hub id of an AutoencoderKL, e.g.
        ``madebyollin/sdxl-vae-fp16-fix``) replaces the pipeline's VAE."""
        kwargs: dict[str, Any] = {}
        vae_path = options.get("vae_path")
        if vae_path:
            from diffusers import AutoencoderKL

            kwargs["vae"] = AutoencoderKL.from_pretrained(str(vae_path), dtype=torch.float32)
        return kwargs

    def bind(self, model, guidance_scale: float = 1.0) -> Denoiser:
        return lambda latents, timesteps, cond: denoiser_call(model, latents, timesteps, cond)

    def time_ids(self, batch: int, latent_size: int, device: torch.device) -> torch.Tensor:
        """SDXL's micro-conditioning ``[batch, 6]`` float32: ``(original_size, crop_top_left=(0, 0), target_size)``
        with both sizes ``latent_size * vae_scale_factor`` pixels (what ``pipe(height=width=that)`` uses)."""
        pixels = latent_size * self.vae_scale_factor()
        size = (pixels, pixels)
        ids = self.pipe._get_add_time_ids(
            size, (0, 0), size, dtype=torch.float32, text_encoder_projection_dim=self._projection_dim()
        )
        return ids.to(device).repeat(batch, 1)

    def _projection_dim(self) -> int:
        encoder_2 = self.pipe.text_encoder_2
        return int(encoder_2.config.projection_dim)

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device, latent_size: int) -> Conditioning:
        """``Conditioning(embeds [B, 77, D1 + D2], pooled [B, P], time_ids [B, 6])`` float32 of ``prompts``.

        Prompts that are ``""`` encode to zeros (``embeds`` and ``pooled``) when the pipeline's config has
        ``force_zeros_for_empty_prompt`` (the unconditional input ``StableDiffusionXLPipeline`` uses for CFG).
        """
        prompts = list(prompts)
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        embeds, pooled = embeds.float(), pooled.float()
        if self.pipe.config.get("force_zeros_for_empty_prompt", False):
            empty = torch.tensor([p == "" for p in prompts], device=embeds.device)
            if bool(empty.any()):
                embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
                pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        return Conditioning(embeds, pooled.to(device), self.time_ids(len(prompts), latent_size, device))
