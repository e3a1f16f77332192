"""FLUX.1 (``FluxPipeline``): a rectified-flow transformer on packed 2x2 latent patches, a CLIP text encoder (pooled
embedding only) and a T5 encoder (the sequence states), guidance as an input (FLUX.1-dev) instead of CFG rows; and
its tiny random-weight test pipeline."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from world import CLIP_TEXT_IDS, build_clip_tokenizer

from ..policy.conditioning import Conditioning
from .family import Denoiser, ModelFamily, register_family
from .sd3 import dynamic_shift_mu
from .tiny_parts import FLOW_VAE_LATENT_CHANNELS, build_t5_tokenizer, build_tiny_flow_vae, build_tiny_t5, seeded

TINY_FLUX = "tiny_flux"
"""``model.pretrained`` value that builds :func:`build_tiny_flux_pipeline`."""

TINY_FLUX_CLIP: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
"""The tiny FLUX's plain ``CLIPTextModel`` (its ``pooler_output``, width 32, is the pooled projection input)."""
TINY_FLUX_T5_DIM = 32
"""Width of the tiny FLUX's T5 encoder (= the transformer's ``joint_attention_dim``)."""
TINY_FLUX_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 4 * FLOW_VAE_LATENT_CHANNELS,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": TINY_FLUX_T5_DIM,
    "pooled_projection_dim": TINY_FLUX_CLIP["hidden_size"],
    "axes_dims_rope": (4, 6, 6),
}
"""The tiny ``FluxTransformer2DModel``: one double-stream and one single-stream block, width 32 (2 heads of 16, rotary
axes 4 + 6 + 6 = 16), on the packed 2x2 patches of the 16-channel latents (64 input channels, as FLUX.1)."""
FLUX_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
"""FLUX.1's ``FlowMatchEulerDiscreteScheduler`` configuration: the shift ``mu`` grows with the number of patches."""


def build_tiny_flux_pipeline(seed: int = 0, sample_size: int = 32, guidance_embeds: bool = True) -> FluxPipeline:
    """A FLUX-shaped pipeline with random weights, built from configs (no download). Deterministic for a ``seed``.

    :data:`TINY_FLUX_TRANSFORMER` (with a guidance embedding as FLUX.1-dev, or without as FLUX.1-schnell), a 2-layer
    ``CLIPTextModel`` of width 32 with the real CLIP tokenizer, a 2-layer T5 encoder of width 32 with
    :func:`~ddpo.models.tiny_parts.build_t5_tokenizer`, the 16-channel tiny VAE of ``2 * sample_size`` pixels with
    FLUX's ``scaling_factor``/``shift_factor`` and FLUX's scheduler (:data:`FLUX_SCHEDULER`). FluxPipeline's own
    default size is 128 latents, whatever the model; use ``height``/``width`` (or ``FluxFamily.native_latent_size``).
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    def build() -> dict[str, Any]:
        return {
            "transformer": FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER, guidance_embeds=guidance_embeds),
            "vae": build_tiny_flow_vae(sample_size, scaling_factor=0.3611, shift_factor=0.1159),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_TEXT_IDS, **TINY_FLUX_CLIP)),
            "text_encoder_2": build_tiny_t5(TINY_FLUX_T5_DIM),
        }

    return FluxPipeline(
        **seeded(seed, build),
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
    )


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w] -> [B, (h/2)(w/2), 4C]``: FLUX's 2x2 patches, row-major, channels-major inside a patch
    (``FluxPipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents`: ``[B, (h/2)(w/2), 4C] -> [B, C, h, w]`` for latent sides ``height`` and
    ``width`` (``FluxPipeline._unpack_latents`` takes pixel sides instead)."""
    b, _, packed_channels = packed.shape
    c = packed_channels // 4
    x = packed.view(b, height // 2, width // 2, c, 2, 2)  # [B, h/2, w/2, C, dy, dx]
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)  # [B, C, h/2, dy, w/2, dx]


def flux_call(
    transformer, latents: torch.Tensor, timesteps, cond: Conditioning, guidance: float | None
) -> torch.Tensor:
    """``FluxTransformer2DModel`` velocity ``[B, C, h, w]`` at unpacked ``latents``, called as ``FluxPipeline`` calls
    it: packed latents, ``timestep / 1000``, ``guidance`` a ``[B]`` tensor (None: a model without guidance
    embedding), zero text position ids and the latent grid's image position ids."""
    b, _, h, w = latents.shape
    device = latents.device
    timestep = torch.as_tensor(timesteps, device=device, dtype=latents.dtype)
    timestep = timestep.expand(b) if timestep.ndim == 0 else timestep
    guidance_vector = None if guidance is None else torch.full([b], guidance, device=device, dtype=torch.float32)
    txt_ids = torch.zeros(cond.embeds.shape[1], 3, device=device, dtype=cond.embeds.dtype)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, latents.dtype)
    packed = transformer(
        hidden_states=pack_latents(latents),
        timestep=timestep / 1000,
        guidance=guidance_vector,
        pooled_projections=cond.pooled,
        encoder_hidden_states=cond.embeds,
        txt_ids=txt_ids,
        img_ids=img_ids,
        return_dict=False,
    )[0]
    return unpack_latents(packed, h, w)


@register_family
class FluxFamily(ModelFamily):
    """FLUX.1 (``FluxPipeline``): guidance is an input of the transformer (FLUX.1-dev; none for FLUX.1-schnell),
    so there are no negative rows; the policy samples the unpacked ``[B, 16, h, w]`` latents."""

    name = "flux"
    pipeline_class_name = "FluxPipeline"
    denoiser_attr = "transformer"
    text_encoder_attrs = ("text_encoder", "text_encoder_2")
    flow_matching = True
    guidance_embedded = True
    lora_layers_argument = "transformer_lora_layers"
    tiny_name = TINY_FLUX
    max_sequence_length = 512
    """T5 tokens of the conditioning (the pipeline's default): ``embeds`` is ``[B, 512, joint_attention_dim]``."""

    @classmethod
    def build_tiny(cls, seed: int = 0) -> FluxPipeline:
        return build_tiny_flux_pipeline(seed)

    def bind(self, model, guidance_scale: float = 1.0) -> Denoiser:
        """The transformer's velocity at ``guidance_scale`` (an input where the model embeds guidance)."""
        guidance = guidance_scale if self.denoiser().config.guidance_embeds else None
        return lambda latents, timesteps, cond: flux_call(model, latents, timesteps, cond, guidance)

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device, latent_size: int) -> Conditioning:
        """The pipeline's own ``encode_prompt``: the T5 states as ``embeds`` and CLIP's pooled output as ``pooled``."""
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=device, max_sequence_length=self.max_sequence_length
        )
        return Conditioning(embeds.float(), pooled.float())

    def latent_channels(self) -> int:
        """The transformer takes ``4C`` packed channels; the sampler works on the ``C`` unpacked ones (the VAE's)."""
        return int(self.denoiser().config.in_channels) // 4

    def native_latent_size(self) -> int:
        """FLUX has no ``sample_size``: the VAE's ``sample_size`` (pixels) over its downsampling, i.e. 1024 / 8 = 128
        for FLUX.1 (the pipeline's ``default_sample_size``) and 64 / 2 = 32 for the tiny pipeline."""
        return int(self.pipe.vae.config.sample_size) // self.vae_scale_factor()

    def latent_multiple(self) -> int:
        """Latents are packed in 2x2 patches."""
        return 2

    def schedule_kwargs(self, num_steps: int, latent_size: int) -> dict[str, Any]:
        """What ``FluxPipeline`` passes to ``set_timesteps``: sigmas ``linspace(1, 1/n, n)`` (None where the scheduler
        uses flow sigmas itself) and the shift ``mu`` of ``(latent_size / 2) ** 2`` packed tokens."""
        config = self.pipe.scheduler.config
        sigmas = None if config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
        mu = dynamic_shift_mu(config, (latent_size // 2) ** 2, max_shift_default=1.15)
        return {"sigmas": sigmas, "mu": mu}

    def default_lora_targets(self) -> list[str]:
        """The attention projections of the double-stream blocks (image and text streams) and of the single-stream
        blocks (``attn.to_q/k/v``), as diffusers' FLUX LoRA training targets them."""
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
