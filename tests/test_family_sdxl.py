"""The SDXL family on a tiny real StableDiffusionXLPipeline: detection, conditioning and denoiser against diffusers'
own sampling loop, LoRA export into a fresh pipeline, and the resolution's micro-conditioning."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline

from ddpo.models import (
    StableDiffusionXLFamily,
    add_lora,
    build_tiny_sdxl_pipeline,
    family_for_pipeline,
    load_model,
    lora_state_dict,
)
from ddpo.models.loading import load_code
from ddpo.models.sdxl import TINY_SDXL_VAE
from ddpo.policy.conditioning import Conditioning

CPU = torch.device("cpu")
PROMPTS = ["a red cube on a table", "two cats"]
LATENT = 32  # 64 px with the tiny VAE's factor 2


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_sdxl") / "pipe"
    build_tiny_sdxl_pipeline(seed=0).save_pretrained(path)
    return path


def _pipe() -> tuple[StableDiffusionXLPipeline, StableDiffusionXLFamily]:
    pipe = build_tiny_sdxl_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe, StableDiffusionXLFamily(pipe)


def _latents(batch: int = len(PROMPTS), seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(seed))


def _pipeline_latents(pipe, latents: torch.Tensor, guidance: float, steps: int = 2) -> torch.Tensor:
    """diffusers' own ``StableDiffusionXLPipeline.__call__`` (no negative prompt), final latents."""
    pixels = LATENT * pipe.vae_scale_factor
    return pipe(
        prompt=PROMPTS,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=latents.clone(),
        height=pixels,
        width=pixels,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images


def test_tiny_sdxl_and_saved_folder_are_the_sdxl_family(sdxl_dir, tmp_path):
    pipe, family = load_model("tiny_sdxl")
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert isinstance(family, StableDiffusionXLFamily) and family.name == "sdxl"
    assert family_for_pipeline(pipe) is StableDiffusionXLFamily
    assert family.vae_force_upcast and pipe.vae.config.force_upcast
    assert [type(m).__name__ for m in family.text_encoders()] == ["CLIPTextModel", "CLIPTextModelWithProjection"]

    loaded, loaded_family = load_model(str(sdxl_dir))
    assert isinstance(loaded, StableDiffusionXLPipeline) and loaded_family.name == "sdxl"
    for a, b in zip(loaded.unet.parameters(), pipe.unet.parameters(), strict=True):
        assert torch.equal(a, b)

    # model.vae_path: another VAE replaces the pipeline's (the fp16-fix VAE of SDXL, here a differently seeded one).
    torch.manual_seed(7)
    vae = AutoencoderKL(**TINY_SDXL_VAE, sample_size=64)
    vae.save_pretrained(tmp_path / "vae")
    with_vae, _ = load_model(str(sdxl_dir), options={"vae_path": str(tmp_path / "vae")})
    for a, b in zip(with_vae.vae.parameters(), vae.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(next(with_vae.vae.parameters()), next(loaded.vae.parameters()))


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_family_denoiser_reproduces_the_pipeline(guidance):
    pipe, family = _pipe()
    latents = _latents()
    expected = _pipeline_latents(pipe, latents, guidance)

    cond = family.encode(PROMPTS, CPU, LATENT)
    negative = family.encode([""], CPU, LATENT)
    denoiser = family.bind(pipe.unet, guidance)
    pipe.scheduler.set_timesteps(2, device=CPU)
    x = latents.clone()
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            if guidance > 1:
                both = denoiser(torch.cat([x, x]), t, Conditioning.cat([negative.expand(len(x)), cond]))
                uncond, text = both.chunk(2)
                output = uncond + guidance * (text - uncond)
            else:
                output = denoiser(x, t, cond)
            x = pipe.scheduler.step(output, t, x).prev_sample
    assert not torch.allclose(x, latents, atol=1e-3)
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)


def test_cfg_and_the_empty_prompt_matter():
    """The comparison above can fail: guidance changes the result, and "" encodes to zeros only under the config."""
    pipe, family = _pipe()
    latents = _latents()
    assert not torch.allclose(_pipeline_latents(pipe, latents, 1.0), _pipeline_latents(pipe, latents, 5.0), atol=1e-4)

    empty = family.encode(["", "a cat"], CPU, LATENT)
    assert not empty.embeds[0].any() and not empty.pooled[0].any()
    assert empty.embeds[1].abs().sum() > 0 and empty.pooled[1].abs().sum() > 0
    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    encoded = family.encode([""], CPU, LATENT)
    assert encoded.embeds.abs().sum() > 0 and encoded.pooled.abs().sum() > 0


def test_lora_export_loads_into_a_fresh_sdxl_pipeline(tmp_path):
    pipe, family = _pipe()
    add_lora(pipe.unet, 4, 4.0, family.default_lora_targets())
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    family.save_lora(tmp_path / "final", lora_state_dict(pipe.unet))

    fresh, fresh_family = _pipe()
    latents = _latents()
    before = _pipeline_latents(fresh, latents, 1.0)
    fresh.load_lora_weights(str(tmp_path / "final"))
    after = _pipeline_latents(fresh, latents, 1.0)
    assert not torch.allclose(before, after, atol=1e-3)
    torch.testing.assert_close(after, _pipeline_latents(pipe, latents, 1.0), rtol=1e-5, atol=1e-5)

    # The LoRA'd UNet through our denoiser, and the fresh pipeline's, agree on one call.
    cond = family.encode(PROMPTS, CPU, LATENT)
    with torch.no_grad():
        ours = family.bind(pipe.unet)(latents, 500, cond)
        theirs = fresh_family.bind(fresh.unet)(latents, 500, cond)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)

    # The code printed at the end of a run loads it the same way.
    scope: dict = {}
    exec(load_code("tiny_sdxl", tmp_path / "final", family="sdxl"), scope)
    with torch.no_grad():
        printed = family.bind(scope["pipe"].unet)(latents, 500, cond)
    torch.testing.assert_close(printed, ours, rtol=1e-5, atol=1e-5)


def test_time_ids_reflect_the_resolution():
    pipe, family = _pipe()
    small = family.encode(PROMPTS, CPU, 32)  # 64 px
    large = family.encode(PROMPTS, CPU, 64)  # 128 px
    assert small.time_ids.shape == (2, 6) and small.time_ids.dtype == torch.float32
    assert small.time_ids[0].tolist() == [64, 64, 0, 0, 64, 64]
    assert large.time_ids[0].tolist() == [128, 128, 0, 0, 128, 128]
    torch.testing.assert_close(small.embeds, large.embeds)
    # The UNet sees the difference.
    x = _latents()
    with torch.no_grad():
        denoiser = family.bind(pipe.unet)
        assert not torch.allclose(denoiser(x, 500, small), denoiser(x, 500, large), atol=1e-5)
