"""The tiny text-to-image model pretrained on the world, and the tiny CLIP: architecture, shipped files, loading.

Shipped with the package (``scripts/pretrain_world.py`` trains them; ``scripts/pretrain_world_all.sh`` reproduces
the shipped files bit for bit):

* ``world/assets/world_model/``: a Stable-Diffusion-shaped pipeline (AutoencoderKL, CLIPTextModel +
  CLIPTokenizer, UNet2DConditionModel, DDIM scheduler), 64 px images from 16x16x4 latents, loadable with
  ``StableDiffusionPipeline.from_pretrained(world_model_path())``;
* ``world/assets/world_clip/``: a tiny open_clip model trained contrastively on (render, caption) pairs, loaded
  by :func:`load_world_clip`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .pipeline import build_sd_pipeline
from .scenes import IMAGE_SIZE

ASSETS = Path(__file__).resolve().parent / "assets"
WORLD_CLIP_NAME = "ddpo-world-clip"
"""open_clip model name under which :func:`load_world_clip` registers the tiny CLIP config."""


def world_model_path() -> Path:
    """Folder of the shipped pretrained pipeline (``StableDiffusionPipeline.from_pretrained`` loads it)."""
    return ASSETS / "world_model"


def world_flow_model_path() -> Path:
    """Folder of the shipped flow-matching twin (``StableDiffusion3Pipeline.from_pretrained(path,
    text_encoder_3=None, tokenizer_3=None)`` loads it; :func:`load_world_flow_pipeline`)."""
    return ASSETS / "world_flow"


def world_clip_paths() -> tuple[Path, Path]:
    """``(config_json, weights_safetensors)`` of the shipped tiny open_clip model."""
    directory = ASSETS / "world_clip"
    return directory / f"{WORLD_CLIP_NAME}.json", directory / "open_clip_model.safetensors"


WORLD_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (16, 32, 64),
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": IMAGE_SIZE,
    "mid_block_add_attention": False,
}
WORLD_TEXT_ENCODER: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
WORLD_UNET: dict[str, Any] = {
    "sample_size": IMAGE_SIZE // 4,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}


def build_world_pipeline(seed: int = 0):
    """The shipped pipeline's architecture with fresh random weights (seeded), built from configs.

    * VAE: AutoencoderKL, 3 levels ``(16, 32, 64)``, no mid-block attention, 64 px RGB <-> 16x16x4 latents;
    * text encoder: CLIPTextModel, hidden 32, 2 layers, real 49,408-token CLIP tokenizer (max length 77);
    * UNet: UNet2DConditionModel on 16x16x4 latents, ``(32, 64, 64)`` channels, one layer per block,
      cross-attention (dim 32) at the 8x8 and 4x4 levels (attention at 16x16 would triple the CPU cost),
      epsilon prediction;
    * scheduler: the Stable Diffusion DDIM configuration (scaled_linear 0.00085..0.012, 1000 steps).
    """
    return build_sd_pipeline(unet=WORLD_UNET, vae=WORLD_VAE, text_encoder=WORLD_TEXT_ENCODER, seed=seed)


def load_world_pipeline(path: str | Path | None = None):
    """Load the shipped pretrained pipeline (float32, CPU, progress bar off) with plain diffusers."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(path or world_model_path()), dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


WORLD_FLOW_TRANSFORMER: dict[str, Any] = {
    "sample_size": IMAGE_SIZE // 4,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 6,
    "attention_head_dim": 24,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "caption_projection_dim": 96,
    "pooled_projection_dim": 64,
    "pos_embed_max_size": None,
    "qk_norm": "rms_norm",
}
"""``SD3Transformer2DModel`` of the flow-matching twin: 8x8 patches of 2x2 on the 16x16x4 latents, width 96 (4 heads of
24), 6 joint blocks. ``joint_attention_dim`` 64 is the two CLIP encoders' hidden states side by side (32 + 32, so the
SD3 pipeline pads nothing; its dropped-T5 part is 256 zero tokens of this width), ``pooled_projection_dim`` 64 their
two 32-wide projections."""
WORLD_FLOW_PROJECTION_DIM = 32
"""``projection_dim`` of each of the twin's two ``CLIPTextModelWithProjection`` text encoders."""
WORLD_FLOW_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 1.0}
"""``FlowMatchEulerDiscreteScheduler`` of the twin. SD3 uses shift 3.0 for 128x128 latents; the shift that keeps the
signal-to-noise ratio of a resolution comparable grows with the square root of the latent size, and 16x16 latents are
below SD3's shift-1 base resolution (32x32), so the plain linear schedule (shift 1.0) is used."""


def load_world_flow_pipeline(path: str | Path | None = None):
    """Load the shipped flow-matching twin (float32, CPU, progress bar off) with plain diffusers, without T5."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(
        str(path or world_flow_model_path()), text_encoder_3=None, tokenizer_3=None, dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


#: open_clip config of the tiny world CLIP (64 px ViT, 2-layer text transformer).
WORLD_CLIP_CONFIG: dict = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 3, "width": 96, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
WORLD_CLIP_MEAN = (0.5, 0.5, 0.5)
WORLD_CLIP_STD = (0.5, 0.5, 0.5)
"""Input normalisation of the world CLIP: ``(image - mean) / std`` per channel, images in ``[0, 1]``."""


def register_world_clip_config(config_path: str | Path | None = None) -> str:
    """Register the tiny world CLIP config with open_clip (idempotent). Returns the model name to pass to
    ``open_clip.create_model`` / ``open_clip.get_tokenizer``."""
    import open_clip

    config_path = Path(config_path or world_clip_paths()[0])
    if WORLD_CLIP_NAME not in open_clip.list_models():
        open_clip.add_model_config(config_path)
    return WORLD_CLIP_NAME


def load_world_clip(weights: str | Path | None = None):
    """Load the shipped tiny open_clip model. Returns ``(model, tokenizer, normalize)``.

    ``model.encode_image`` takes images ``[B, 3, 64, 64]`` already normalised by ``normalize`` (a callable mapping
    ``[0, 1]`` images to the model's input), ``model.encode_text`` takes ``tokenizer(list_of_str)``. The model is in
    eval mode on the CPU.
    """
    import open_clip

    name = register_world_clip_config()
    model = open_clip.create_model(name, pretrained=str(weights or world_clip_paths()[1]))
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    mean = torch.tensor(WORLD_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(WORLD_CLIP_STD).view(1, 3, 1, 1)

    def normalize(images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` -> model input ``[B, 3, 64, 64]``."""
        if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            images = torch.nn.functional.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
        return (images - mean.to(images)) / std.to(images)

    return model, tokenizer, normalize
