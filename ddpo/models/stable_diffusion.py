"""Stable Diffusion 1.x/2.x (``StableDiffusionPipeline``): its family, its tiny test pipeline and the published SD 1.5
architecture. Loading any family's pipeline is :mod:`.loading`'s."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionPipeline

from world import build_sd_pipeline

from ..policy.conditioning import Conditioning
from ..policy.sampling import denoiser_call, encode_prompts
from .family import ModelFamily, register_family

TINY = "tiny"
"""``model.pretrained`` value that builds :func:`build_tiny_pipeline` instead of loading weights."""
TINY_UNET: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
TINY_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "block_out_channels": (32, 64),
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 32,
}
TINY_TEXT_ENCODER: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}


def build_tiny_pipeline(seed: int = 0, sample_size: int = 32) -> StableDiffusionPipeline:
    """A Stable-Diffusion-shaped pipeline with random weights, built from configs (no download).

    UNet ``(32, 64)`` channels with cross-attention, a 2-level AutoencoderKL (``sample_size`` latents decode to
    ``2 * sample_size`` pixels), a 2-layer CLIP text encoder with hidden size 32 and the real CLIP tokenizer,
    and the Stable Diffusion DDIM scheduler configuration. Deterministic for a given ``seed``.
    """
    return build_sd_pipeline(
        unet={**TINY_UNET, "sample_size": sample_size},
        vae={**TINY_VAE, "sample_size": 2 * sample_size},
        text_encoder=TINY_TEXT_ENCODER,
        seed=seed,
        construction_order=("unet", "vae", "text_encoder"),
    )


SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
"""The published ``unet/config.json`` of Stable Diffusion 1.5 (859.5M parameters)."""
SD15_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
}
"""The published ``vae/config.json`` of Stable Diffusion 1.5 (83.7M parameters)."""
SD15_TEXT_ENCODER: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
"""The CLIP ViT-L/14 text encoder of Stable Diffusion 1.5 (123.1M parameters)."""


def build_sd15_architecture(seed: int = 0, sample_size: int = 64) -> StableDiffusionPipeline:
    """Stable Diffusion 1.5's architecture (UNet, VAE, CLIP text encoder, DDIM scheduler) from its published configs
    with seeded random weights: no download. ``sample_size`` is the latent side (64: 512 px). Speed and memory do not
    depend on the weights, so ``ddpo bench`` measures the real model's cost with it (``scripts/gpu_bench.sh``)."""
    return build_sd_pipeline(
        unet={**SD15_UNET, "sample_size": sample_size},
        vae={**SD15_VAE, "sample_size": 8 * sample_size},
        text_encoder=SD15_TEXT_ENCODER,
        seed=seed,
    )


@register_family
class StableDiffusionFamily(ModelFamily):
    """Stable Diffusion 1.x/2.x (``StableDiffusionPipeline``): one CLIP text encoder, a UNet predicting epsilon,
    v or the sample; DDIM/DDPM log-prob steps."""

    name = "sd"
    pipeline_class_name = "StableDiffusionPipeline"
    tiny_name = TINY

    @classmethod
    def build_tiny(cls, seed: int = 0) -> StableDiffusionPipeline:
        return build_tiny_pipeline(seed)

    @classmethod
    def load_kwargs(cls, options: dict[str, Any]) -> dict[str, Any]:
        return {"safety_checker": None, "requires_safety_checker": False}

    def bind(self, model, guidance_scale: float = 1.0):
        return lambda latents, timesteps, cond: denoiser_call(model, latents, timesteps, cond)

    def encode(self, prompts: list[str], device: torch.device, latent_size: int) -> Conditioning:
        return Conditioning(encode_prompts(self.pipe.tokenizer, self.pipe.text_encoder, prompts, device))
