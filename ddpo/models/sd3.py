"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): an MMDiT transformer predicting the flow velocity, two CLIP
text encoders with projection and an optional T5 encoder; and its tiny random-weight test pipeline."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

from world import CLIP_TEXT_IDS, build_clip_tokenizer

from ..policy.conditioning import Conditioning
from .family import Denoiser, ModelFamily, register_family
from .tiny_parts import (
    FLOW_VAE_LATENT_CHANNELS,
    build_t5_tokenizer,
    build_tiny_flow_vae,
    build_tiny_t5,
    seeded,
)

TINY_SD3 = "tiny_sd3"
"""``model.pretrained`` value that builds :func:`build_tiny_sd3_pipeline`."""

TINY_SD3_CLIP: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
}
"""Each of the tiny SD3's two ``CLIPTextModelWithProjection`` encoders (besides the CLIP tokenizer's ids)."""
TINY_SD3_JOINT_DIM = 2 * TINY_SD3_CLIP["hidden_size"]
"""``joint_attention_dim`` of the tiny SD3: the two CLIP encoders' states side by side (32 + 32), which is also the
T5 width, so the pipeline's zero-padding of the CLIP states to the T5 width pads nothing."""
TINY_SD3_TRANSFORMER: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": FLOW_VAE_LATENT_CHANNELS,
    "out_channels": FLOW_VAE_LATENT_CHANNELS,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "joint_attention_dim": TINY_SD3_JOINT_DIM,
    "caption_projection_dim": 32,
    "pooled_projection_dim": 2 * TINY_SD3_CLIP["projection_dim"],
    "qk_norm": "rms_norm",
    "dual_attention_layers": (0,),
}
"""The tiny ``SD3Transformer2DModel``: SD3.5-Medium's block layout (RMS-normed q/k, a dual-attention first block),
width 32 (4 heads of 8) = ``caption_projection_dim``, 2 joint blocks, 2x2 patches of the 16-channel latents;
``pooled_projection_dim`` is the two CLIP projections side by side."""
SD3_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}
"""The ``FlowMatchEulerDiscreteScheduler`` configuration of SD3 and SD3.5 (static shift 3, no dynamic shifting)."""


def build_tiny_sd3_pipeline(seed: int = 0, sample_size: int = 32, with_t5: bool = True) -> StableDiffusion3Pipeline:
    """An SD3-shaped pipeline with random weights, built from configs (no download). Deterministic for a ``seed``.

    :data:`TINY_SD3_TRANSFORMER` on ``sample_size`` latents (``2 * sample_size`` pixels; positional embeddings up to
    twice that), two 2-layer ``CLIPTextModelWithProjection`` encoders (width 32, projection 32) with the real CLIP
    tokenizer, a 2-layer T5 encoder of width 64 with :func:`~ddpo.models.tiny_parts.build_t5_tokenizer` (None
    without ``with_t5``: the pipeline then feeds zeros in its place), the 16-channel tiny VAE with SD3's
    ``scaling_factor``/``shift_factor``, and SD3's scheduler (:data:`SD3_SCHEDULER`).
    """
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    patch = TINY_SD3_TRANSFORMER["patch_size"]

    def build() -> dict[str, Any]:
        modules = {
            "transformer": SD3Transformer2DModel(
                **TINY_SD3_TRANSFORMER, sample_size=sample_size, pos_embed_max_size=2 * sample_size // patch
            ),
            "vae": build_tiny_flow_vae(sample_size, scaling_factor=1.5305, shift_factor=0.0609),
            "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_TEXT_IDS, **TINY_SD3_CLIP)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_TEXT_IDS, **TINY_SD3_CLIP)),
        }
        modules["text_encoder_3"] = build_tiny_t5(TINY_SD3_JOINT_DIM) if with_t5 else None
        return modules

    modules = seeded(seed, build)
    return StableDiffusion3Pipeline(
        **modules,
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(),
        tokenizer_3=build_t5_tokenizer() if with_t5 else None,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
    )


def sd3_call(transformer, latents: torch.Tensor, timesteps, cond: Conditioning) -> torch.Tensor:
    """``SD3Transformer2DModel`` velocity ``[B, C, h, w]``, called as ``StableDiffusion3Pipeline`` calls it
    (``timesteps``: the scheduler's ``sigma * 1000``, a float or ``[B]``)."""
    timestep = torch.as_tensor(timesteps, device=latents.device, dtype=torch.float32)
    timestep = timestep.expand(latents.shape[0]) if timestep.ndim == 0 else timestep
    return transformer(
        hidden_states=latents,
        timestep=timestep,
        encoder_hidden_states=cond.embeds,
        pooled_projections=cond.pooled,
        return_dict=False,
    )[0]


def dynamic_shift_mu(scheduler_config, image_seq_len: int, max_shift_default: float) -> float:
    """The resolution-dependent shift ``mu`` the SD3 and FLUX pipelines compute (diffusers' ``calculate_shift``, with
    their defaults for what the scheduler config does not set; SD3's ``max_shift`` default is 1.16, FLUX's 1.15)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(
        image_seq_len,
        scheduler_config.get("base_image_seq_len", 256),
        scheduler_config.get("max_image_seq_len", 4096),
        scheduler_config.get("base_shift", 0.5),
        scheduler_config.get("max_shift", max_shift_default),
    )


@register_family
class StableDiffusion3Family(ModelFamily):
    """Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): an MMDiT velocity model; CFG by negative rows."""

    name = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    denoiser_attr = "transformer"
    text_encoder_attrs = ("text_encoder", "text_encoder_2", "text_encoder_3")
    flow_matching = True
    lora_layers_argument = "transformer_lora_layers"
    tiny_name = TINY_SD3
    max_sequence_length = 256
    """T5 tokens of the conditioning (the pipeline's default): ``embeds`` is ``[B, 77 + 256, joint_attention_dim]``."""

    @classmethod
    def build_tiny(cls, seed: int = 0) -> StableDiffusion3Pipeline:
        return build_tiny_sd3_pipeline(seed)

    @classmethod
    def load_kwargs(cls, options: dict[str, Any]) -> dict[str, Any]:
        """``model.drop_t5``: load without the T5 encoder (4.7B parameters for SD3; the pipeline uses zeros)."""
        return {"text_encoder_3": None, "tokenizer_3": None} if options.get("drop_t5") else {}

    def bind(self, model, guidance_scale: float = 1.0) -> Denoiser:
        """The transformer's velocity; guidance is classifier-free (the caller's negative rows), so
        ``guidance_scale`` is not an input."""
        return lambda latents, timesteps, cond: sd3_call(model, latents, timesteps, cond)

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device, latent_size: int) -> Conditioning:
        """The pipeline's own ``encode_prompt``: CLIP-L/G penultimate states (side by side, padded to the T5 width)
        followed by the T5 states (zeros without T5), and both CLIP projections side by side as ``pooled``. The
        pipeline's CFG negative is ``encode([""])``."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return Conditioning(embeds.float(), pooled.float())

    def latent_multiple(self) -> int:
        return int(self.denoiser().config.patch_size)

    def schedule_kwargs(self, num_steps: int, latent_size: int) -> dict[str, Any]:
        """``{}`` for SD3 and SD3.5 (static shift); ``mu`` where a scheduler config asks for dynamic shifting, as
        the pipeline computes it from the number of patches."""
        config = self.pipe.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return {}
        patches = (latent_size // self.latent_multiple()) ** 2
        return {"mu": dynamic_shift_mu(config, patches, max_shift_default=1.16)}

    def default_lora_targets(self) -> list[str]:
        """The joint blocks' attention projections, image and text streams (Flow-GRPO's and diffusers' SD3 LoRA
        targets; SD3.5's second image-only attention ``attn2`` is left out, as they do)."""
        return [
            "attn.to_q",
            "attn.to_k",
            "attn.to_v",
            "attn.to_out.0",
            "attn.add_q_proj",
            "attn.add_k_proj",
            "attn.add_v_proj",
            "attn.to_add_out",
        ]
