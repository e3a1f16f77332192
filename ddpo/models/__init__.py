"""Model loading: pipelines (hub id, local folder, the embedded world model, the tiny test pipeline) and LoRA.

A layer of its own below :mod:`ddpo.training`, above :mod:`ddpo.policy` (a family builds its conditioning and binds
its denoiser for the policy maths) and :mod:`world` (the shipped models). One module per family: stable_diffusion,
sdxl, sd3, flux (docs/model-families.md); :mod:`.loading` loads a pipeline of any of them.
"""

from __future__ import annotations

from world import build_clip_tokenizer

from .family import (
    FAMILIES,
    Denoiser,
    ModelFamily,
    family_for_pipeline,
    get_family,
    latent_size,
    vae_scale_factor,
)
from .flux import TINY_FLUX, FluxFamily, build_tiny_flux_pipeline, pack_latents, unpack_latents
from .loading import (
    SD15_RANDOM,
    WORLD,
    WORLD_FLOW,
    absent_components,
    load_code,
    load_model,
    load_pipeline,
    resolve_family,
)
from .lora import add_lora, lora_metadata, lora_state_dict
from .sd3 import TINY_SD3, StableDiffusion3Family, build_tiny_sd3_pipeline
from .sdxl import TINY_SDXL, StableDiffusionXLFamily, build_tiny_sdxl_pipeline
from .stable_diffusion import TINY, StableDiffusionFamily, build_sd15_architecture, build_tiny_pipeline

__all__ = [
    "absent_components",
    "FAMILIES",
    "SD15_RANDOM",
    "TINY",
    "TINY_SDXL",
    "TINY_FLUX",
    "TINY_SD3",
    "WORLD",
    "WORLD_FLOW",
    "Denoiser",
    "ModelFamily",
    "StableDiffusionFamily",
    "StableDiffusionXLFamily",
    "StableDiffusion3Family",
    "FluxFamily",
    "family_for_pipeline",
    "get_family",
    "load_model",
    "add_lora",
    "build_clip_tokenizer",
    "build_sd15_architecture",
    "build_tiny_pipeline",
    "build_tiny_sdxl_pipeline",
    "build_tiny_sd3_pipeline",
    "build_tiny_flux_pipeline",
    "pack_latents",
    "unpack_latents",
    "latent_size",
    "load_code",
    "load_pipeline",
    "lora_metadata",
    "lora_state_dict",
    "resolve_family",
    "vae_scale_factor",
]
