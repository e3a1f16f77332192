"""The shipped flow-matching twin (world/assets/world_flow): present, small, loadable by plain diffusers without T5,
and sampling 64 px images."""

from __future__ import annotations

import torch

import world


def test_world_flow_folder_is_small_and_loads_with_plain_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    path = world.world_flow_model_path()
    assert (path / "model_index.json").is_file()
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size <= 25 * 10**6, size

    pipe = StableDiffusion3Pipeline.from_pretrained(
        str(path), text_encoder_3=None, tokenizer_3=None, dtype=torch.float32
    )
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.text_encoder_3 is None and pipe.vae.config.shift_factor == 0.0
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        assert module.dtype == torch.float32
    assert {k: pipe.transformer.config[k] for k in world.WORLD_FLOW_TRANSFORMER} == world.WORLD_FLOW_TRANSFORMER

    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        ["a red circle on a white background", "a blue square and a yellow triangle on a grey background"],
        num_inference_steps=4,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert images.shape == (2, 3, 64, 64)
    assert images.min() >= 0 and images.max() <= 1 and torch.isfinite(images).all()


def test_load_world_flow_pipeline_mirrors_load_world_pipeline():
    pipe = world.load_world_flow_pipeline()
    assert pipe.transformer.dtype == torch.float32 and pipe.text_encoder_3 is None
    assert pipe.scheduler.config.shift == world.WORLD_FLOW_SCHEDULER["shift"]


def test_load_code_passes_the_twins_absent_t5_to_plain_diffusers():
    """The code printed at the end of a run names the components the run loaded as None (the twin has no T5), so a
    full-fine-tuning final/ saved without them loads in plain diffusers."""
    from ddpo.models import absent_components, load_code, load_model

    pipe, family = load_model("world_flow", scheduler="flow_sde")
    absent = absent_components(pipe)
    assert absent == ("text_encoder_3", "tokenizer_3")
    code = load_code(
        "world_flow", world.world_flow_model_path(), use_lora=False, family=family.name, none_components=absent
    )
    scope: dict = {}
    exec(code, scope)
    assert type(scope["pipe"]).__name__ == "StableDiffusion3Pipeline" and scope["pipe"].text_encoder_3 is None
