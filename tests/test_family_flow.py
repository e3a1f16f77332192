"""The flow-matching families (SD3, FLUX) on tiny real pipelines built from configs: loading, our sampling loop
against the pipelines' own ``__call__``, LoRA export that diffusers loads back, FLUX latent packing."""

from __future__ import annotations

import json

import pytest
import torch

from ddpo.models import (
    FluxFamily,
    StableDiffusion3Family,
    add_lora,
    build_tiny_flux_pipeline,
    build_tiny_sd3_pipeline,
    latent_size,
    load_model,
    lora_state_dict,
    pack_latents,
    unpack_latents,
)
from ddpo.models.tiny_parts import build_t5_tokenizer

PROMPTS = ["a red circle on a blue background", "a green square and a yellow triangle on a white background"]
PIXELS = 32  # 16x16 latents (8x8 patches), small enough for 2 CPU cores
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd3") / "pipe"
    build_tiny_sd3_pipeline(seed=0, sample_size=8).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("flux") / "pipe"
    build_tiny_flux_pipeline(seed=0, sample_size=8).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize(("name", "cls"), [("tiny_sd3", StableDiffusion3Family), ("tiny_flux", FluxFamily)])
def test_tiny_names_load_their_family(name, cls):
    pipe, family = load_model(name, scheduler="flow_euler")
    assert type(family) is cls and family.pipe is pipe
    assert type(pipe).__name__ == cls.pipeline_class_name
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert family.flow_matching and family.denoiser() is pipe.transformer
    assert family.latent_channels() == 16 and family.latent_multiple() == 2 and family.vae_scale_factor() == 2
    assert family.native_latent_size() == 32


def test_flow_family_rejects_ddpm_samplers():
    with pytest.raises(ValueError, match="flow-matching model"):
        load_model("tiny_sd3", scheduler="ddim")


def test_saved_sd3_folder_is_detected_and_can_drop_t5(sd3_dir):
    assert json.loads((sd3_dir / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    pipe, family = load_model(str(sd3_dir), scheduler="flow_sde")
    assert isinstance(family, StableDiffusion3Family) and pipe.text_encoder_3 is not None
    assert len(family.text_encoders()) == 3
    assert family.native_latent_size() == 8 and latent_size(family, 32) == 16
    with pytest.raises(ValueError, match="multiple of this model's VAE factor 4"):
        latent_size(family, 30)

    dropped, family = load_model(str(sd3_dir), scheduler="flow_sde", options={"drop_t5": True})
    assert dropped.text_encoder_3 is None and dropped.tokenizer_3 is None and len(family.text_encoders()) == 2
    # Without T5 the conditioning's T5 part is the pipeline's zeros; the CLIP part is unchanged.
    full = load_model(str(sd3_dir), scheduler="flow_sde")[1].encode(PROMPTS, CPU, 8)
    cond = family.encode(PROMPTS, CPU, 8)
    assert cond.embeds.shape == full.embeds.shape == (2, 77 + 256, 64)
    torch.testing.assert_close(cond.embeds[:, :77], full.embeds[:, :77])
    torch.testing.assert_close(cond.pooled, full.pooled)
    assert cond.embeds[:, 77:].abs().max() == 0 and full.embeds[:, 77:].abs().max() > 0


def test_saved_flux_folder_is_detected(flux_dir):
    pipe, family = load_model(str(flux_dir), scheduler="flow_sde")
    assert isinstance(family, FluxFamily) and family.guidance_embedded
    assert pipe.transformer.config.guidance_embeds and family.native_latent_size() == 8
    cond = family.encode(PROMPTS, CPU, 8)
    assert cond.embeds.shape == (2, 512, 32) and cond.pooled.shape == (2, 32) and cond.embeds.dtype == torch.float32


def test_t5_tokenizer_is_t5s_and_round_trips(tmp_path):
    tokenizer = build_t5_tokenizer()
    ids = tokenizer(PROMPTS[:1]).input_ids[0]
    assert ids[-1] == tokenizer.eos_token_id == 1 and tokenizer.pad_token_id == 0
    assert len(ids) == len(PROMPTS[0].split()) + 1  # one token per caption word, then </s>
    assert tokenizer.unk_token_id not in tokenizer("zebra crossing 42").input_ids  # spelled out, not <unk>
    tokenizer.save_pretrained(tmp_path)
    reloaded = type(tokenizer).from_pretrained(tmp_path)
    assert reloaded(PROMPTS).input_ids == tokenizer(PROMPTS).input_ids


def test_tiny_builders_are_deterministic():
    a, b = build_tiny_sd3_pipeline(seed=3, sample_size=8), build_tiny_sd3_pipeline(seed=3, sample_size=8)
    c = build_tiny_sd3_pipeline(seed=4, sample_size=8)
    for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        for (key, p), q in zip(getattr(a, name).state_dict().items(), getattr(b, name).state_dict().values()):
            assert torch.equal(p, q), f"{name}.{key}"
    assert not torch.equal(a.transformer.proj_out.weight, c.transformer.proj_out.weight)
    # Built in eval mode, as from_pretrained loads (T5 has dropout): encoding is a function of the prompt.
    flux = build_tiny_flux_pipeline(seed=0, sample_size=8)
    assert not any(m.training for p in (a, flux) for m in p.components.values() if isinstance(m, torch.nn.Module))
    family = StableDiffusion3Family(a)
    assert torch.equal(family.encode(PROMPTS, CPU, 8).embeds, family.encode(PROMPTS, CPU, 8).embeds)
    assert build_tiny_sd3_pipeline(seed=0, sample_size=8, with_t5=False).text_encoder_3 is None


@pytest.mark.parametrize("builder", [build_tiny_sd3_pipeline, build_tiny_flux_pipeline])
def test_plain_diffusers_reloads_and_runs_the_tiny_pipelines(builder, tmp_path):
    import numpy as np

    pipe = builder(seed=0)  # default size: 32x32 latents, 64 px
    pipe.save_pretrained(tmp_path)
    reloaded = type(pipe).from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    pipe.set_progress_bar_config(disable=True)
    images = [
        np.asarray(
            p(
                PROMPTS[0],
                num_inference_steps=2,
                height=64,
                width=64,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
            ).images
        )
        for p in (pipe, reloaded)
    ]
    assert images[0].shape == (1, 64, 64, 3) and np.isfinite(images[0]).all()
    np.testing.assert_allclose(images[1], images[0], atol=1e-5)


# ------------------------------------------------------------------------------ our loop reproduces the pipelines


def hand_loop(pipe, family, latents, steps, guidance, cfg):
    """Our sampler's maths, spelled out: schedule from the family, the bound denoiser on unpacked latents, CFG rows
    by hand where the family needs them, the scheduler's Euler step."""
    size = latents.shape[-1]
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps, **family.schedule_kwargs(steps, size))
    denoiser = family.bind(pipe.transformer, guidance)
    cond = family.encode(PROMPTS, CPU, size)
    negative = family.encode([""], CPU, size).expand(len(PROMPTS))
    x = latents
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = denoiser(x, t, cond)
            if cfg:
                v_uncond = denoiser(x, t, negative)
                v = v_uncond + guidance * (v - v_uncond)
            x = scheduler.step(v, t, x).prev_sample
    return x


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_sd3_loop_reproduces_pipeline(guidance):
    pipe, family = load_model("tiny_sd3", scheduler="flow_euler")
    size = PIXELS // family.vae_scale_factor()
    latents = torch.randn(len(PROMPTS), 16, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = pipe(
            PROMPTS,
            height=PIXELS,
            width=PIXELS,
            num_inference_steps=3,
            guidance_scale=guidance,
            latents=latents.clone(),
            output_type="latent",
        ).images
    ours = hand_loop(pipe, family, latents, 3, guidance, cfg=guidance > 1)
    assert family.schedule_kwargs(3, size) == {}
    assert (ours - latents).abs().mean() > 0.1
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_flux_loop_reproduces_pipeline(guidance):
    pipe, family = load_model("tiny_flux", scheduler="flow_euler")
    size = PIXELS // family.vae_scale_factor()
    latents = torch.randn(len(PROMPTS), 16, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        packed = pipe(
            PROMPTS,
            height=PIXELS,
            width=PIXELS,
            num_inference_steps=3,
            guidance_scale=guidance,
            latents=pack_latents(latents),
            output_type="latent",
        ).images
    expected = unpack_latents(packed, size, size)
    ours = hand_loop(pipe, family, latents, 3, guidance, cfg=False)
    assert (ours - latents).abs().mean() > 0.1
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_flux_guidance_is_an_input():
    pipe, family = load_model("tiny_flux", scheduler="flow_euler")
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = family.encode(PROMPTS[:1], CPU, 8)
    with torch.no_grad():
        v1, v4 = (family.bind(pipe.transformer, g)(x, 500.0, cond) for g in (1.0, 4.0))
    assert v1.shape == x.shape and not torch.allclose(v1, v4)
    # FLUX.1-schnell: no guidance embedding, guidance_scale has no effect.
    schnell = FluxFamily(build_tiny_flux_pipeline(seed=0, guidance_embeds=False))
    cond = schnell.encode(PROMPTS[:1], CPU, 8)
    with torch.no_grad():
        s1, s4 = (schnell.bind(schnell.pipe.transformer, g)(x, torch.tensor([500.0]), cond) for g in (1.0, 4.0))
    torch.testing.assert_close(s1, s4)


def test_flux_schedule_follows_resolution():
    family = load_model("tiny_flux", scheduler="flow_euler")[1]
    small, large = family.schedule_kwargs(4, 32), family.schedule_kwargs(4, 128)
    assert small["sigmas"].tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert small["mu"] == pytest.approx(0.5)  # 16x16 = 256 packed tokens: FLUX's base shift
    assert large["mu"] == pytest.approx(0.5 + (1.15 - 0.5) * (64 * 64 - 256) / (4096 - 256))


def test_sd3_dynamic_shifting_when_the_scheduler_asks():
    pipe, family = load_model("tiny_sd3", scheduler="flow_euler")
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, use_dynamic_shifting=True)
    kwargs = family.schedule_kwargs(3, 64)  # 32x32 patches = 1024 tokens
    max_shift = pipe.scheduler.config.max_shift  # the pipeline reads the config (1.15), its own default is 1.16
    assert set(kwargs) == {"mu"} and kwargs["mu"] == pytest.approx(0.5 + (max_shift - 0.5) * (1024 - 256) / 3840)


# ------------------------------------------------------------------------------------------------------- FLUX layout


def test_flux_pack_unpack_round_trip():
    x = torch.randn(3, 16, 6, 10, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(x)
    assert packed.shape == (3, 3 * 5, 64)
    # Token (row i, column j) holds the 2x2 patch x[:, :, 2i:2i+2, 2j:2j+2], channel-major.
    torch.testing.assert_close(packed[:, 1 * 5 + 3], x[:, :, 2:4, 6:8].reshape(3, 64))
    assert torch.equal(unpack_latents(packed, 6, 10), x)
    # The pipeline's own unpacking (pixel sides, VAE factor 8) agrees.
    from diffusers import FluxPipeline

    assert torch.equal(FluxPipeline._unpack_latents(packed, 6 * 8, 10 * 8, 8), x)


# ------------------------------------------------------------------------------------------------------------ LoRA


@pytest.mark.parametrize(
    ("builder", "cls"), [(build_tiny_sd3_pipeline, StableDiffusion3Family), (build_tiny_flux_pipeline, FluxFamily)]
)
def test_lora_export_loads_in_diffusers(builder, cls, tmp_path):
    family = cls(builder(seed=0, sample_size=8))
    transformer = family.denoiser()
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([700.0, 300.0])
    cond = family.encode(PROMPTS, CPU, 8)
    with torch.no_grad():
        base = family.bind(transformer, 3.0)(x, t, cond)
    add_lora(transformer, 4, 4, family.default_lora_targets())
    generator = torch.Generator().manual_seed(3)
    perturbed = 0
    for name, param in transformer.named_parameters():
        if "lora_B" in name:
            param.data = 0.1 * torch.randn(param.shape, generator=generator)
            perturbed += 1
    assert perturbed >= 8  # every targeted projection got an adapter
    state = lora_state_dict(transformer)
    assert len(state) == 2 * perturbed and all(".lora_A." in k or ".lora_B." in k for k in state)
    with torch.no_grad():
        tuned = family.bind(transformer, 3.0)(x, t, cond)
    family.save_lora(tmp_path, state)

    fresh = builder(seed=0, sample_size=8)
    fresh.load_lora_weights(tmp_path)
    with torch.no_grad():
        loaded = cls(fresh).bind(fresh.transformer, 3.0)(x, t, cond)
    assert (tuned - base).abs().max() > 1e-3
    torch.testing.assert_close(loaded, tuned, rtol=1e-5, atol=1e-5)
