"""Published architecture configs of the large model families, used only by scripts/memory_estimate.py: built on the
meta device there to count parameters and activation bytes (tests/test_memory_estimate.py checks the counts).

The tiny test configurations and Stable Diffusion 1.5's (``SD15_UNET``, ...: ``ddpo.models.stable_diffusion`` builds
pipelines from them) stay in the family modules under ``ddpo/models/``.
"""

from __future__ import annotations

from typing import Any

from ddpo.models.stable_diffusion import SD15_VAE

# Published configs of SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0: unet/, vae/, text_encoder/,
# text_encoder_2/ config.json), the architecture-defining keys; the rest are diffusers' defaults. Source: the hub's
# config.json files as mirrored verbatim in public repositories (found through code search: the UNet's full
# config.json and the CLIP-G text config with hidden_act gelu, 1280/5120/32 layers/20 heads, projection 1280); not
# downloaded here. Used on the meta device by scripts/memory_estimate.py (tests/test_memory_estimate.py checks the
# parameter counts).
SDXL_BASE_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "use_linear_projection": True,
    "cross_attention_dim": 2048,
    "norm_num_groups": 32,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 time ids x 256 + the 1280-wide pooled CLIP-G projection
}
"""SDXL base 1.0's ``unet/config.json`` (2,567,463,684 parameters: "2.6B" in the SDXL report)."""
SDXL_VAE: dict[str, Any] = {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
"""SDXL base 1.0's ``vae/config.json``: Stable Diffusion's AutoencoderKL architecture (83,653,863 parameters)."""
SDXL_TEXT_ENCODER: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
"""``text_encoder/config.json``: OpenAI CLIP ViT-L/14's text tower, a ``CLIPTextModel`` (123,060,480 parameters);
SD3's first text encoder is the same tower as a ``CLIPTextModelWithProjection`` (+768 x 768)."""
CLIP_BIGG_TEXT_ENCODER: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
"""``text_encoder_2/config.json``: OpenCLIP ViT-bigG/14's text tower with its projection, a
``CLIPTextModelWithProjection`` (694,659,840 parameters; SDXL and SD3's second text encoder)."""

# Published configs of Stable Diffusion 3.5 Medium (stabilityai/stable-diffusion-3.5-medium: transformer/, vae/,
# text_encoder_3/ config.json), the architecture-defining keys. Source: the hub's config.json files as mirrored in
# public repositories (found through code search: the transformer config with dual_attention_layers 0..12 and
# qk_norm rms_norm; the 16-channel VAE with scaling 1.5305 / shift 0.0609; T5 v1.1 XXL from Google's t5.1.1.xxl gin
# file: d_model 4096, d_ff 10240, 24 layers, 64 heads, gated GELU); not downloaded here. Used on the meta device by
# scripts/memory_estimate.py (tests/test_memory_estimate.py checks the parameter counts).
SD35_MEDIUM_TRANSFORMER: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}
"""SD3.5 Medium's ``transformer/config.json`` (MMDiT-X): 2,243,171,520 parameters, plus the fixed sin-cos positional
table (a persistent buffer of 384 x 384 x 1536 = 226,492,416 values, stored in the checkpoint and held on the GPU):
2,469,663,936 in all, Stability AI's "2.5 billion parameters"."""
SD3_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "latent_channels": 16,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
}
"""The 16-channel AutoencoderKL of SD3 / SD3.5 (``vae/config.json``; 83,819,683 parameters); FLUX.1's has the same
architecture with its own scaling and shift."""
T5_XXL_ENCODER: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "tie_word_embeddings": False,
}
"""``T5Config`` of T5 v1.1 XXL's encoder (google/t5-v1_1-xxl), SD3's ``text_encoder_3`` and FLUX.1's
``text_encoder_2``, a ``T5EncoderModel`` (4,762,310,656 parameters: "4.7B" in the SD3 paper)."""

# Published configs of FLUX.1-dev (black-forest-labs/FLUX.1-dev: transformer/, vae/ config.json), the
# architecture-defining keys. Source: the hub's config.json files as mirrored in public repositories and Black Forest
# Labs' own flux-dev parameters (hidden 3072 = 24 heads x 128, depth 19 + 38 single blocks, axes 16/56/56, vec_in 768,
# context 4096, guidance embedding), found through code search; not downloaded here (the repository is gated). Used on
# the meta device by scripts/memory_estimate.py (tests/test_memory_estimate.py checks the parameter counts).
FLUX1_DEV_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
"""FLUX.1-dev's ``transformer/config.json`` (11,901,408,320 parameters: "12B" in Black Forest Labs' release)."""
FLUX1_VAE: dict[str, Any] = {**SD3_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}
"""FLUX.1's ``vae/config.json``: SD3's 16-channel architecture (83,819,683 parameters), FLUX's scaling and shift."""
