"""Model loading: pipelines (hub id, local folder, the embedded world model, the tiny test pipeline) and LoRA.

A layer of its own below :mod:`ddpo.training`: it imports :mod:`world` (the shipped model), never the policy maths.
"""

from __future__ import annotations

from world import build_clip_tokenizer

from .family import FAMILIES, Denoiser, ModelFamily, family_for_pipeline, get_family
from .flux import TINY_FLUX, FluxFamily, build_tiny_flux_pipeline, pack_latents, unpack_latents
from .lora import add_lora, lora_state_dict
from .sd3 import TINY_SD3, StableDiffusion3Family, build_tiny_sd3_pipeline
from .stable_diffusion import (
    SD15_RANDOM,
    TINY,
    WORLD,
    WORLD_FLOW,
    StableDiffusionFamily,
    build_sd15_architecture,
    build_tiny_pipeline,
    latent_size,
    load_code,
    load_model,
    load_pipeline,
    vae_scale_factor,
)

__all__ = [
    "FAMILIES",
    "SD15_RANDOM",
    "TINY",
    "TINY_FLUX",
    "TINY_SD3",
    "WORLD",
    "WORLD_FLOW",
    "Denoiser",
    "ModelFamily",
    "StableDiffusionFamily",
    "StableDiffusion3Family",
    "FluxFamily",
    "family_for_pipeline",
    "get_family",
    "load_model",
    "add_lora",
    "build_clip_tokenizer",
    "build_sd15_architecture",
    "build_tiny_pipeline",
    "build_tiny_sd3_pipeline",
    "build_tiny_flux_pipeline",
    "pack_latents",
    "unpack_latents",
    "latent_size",
    "load_code",
    "load_pipeline",
    "lora_state_dict",
    "vae_scale_factor",
]
