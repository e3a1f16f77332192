"""The procedural world: the embedded default of ``ddpo``, a bottom-level package imported by ``ddpo`` and
``rewards`` (it imports neither).

* :mod:`world.scenes`: vocabulary, scenes, captions, rendering (thousands of images per second, no download);
* :mod:`world.model`: the shipped pretrained pipeline and tiny CLIP (architecture, files, loading);
* :mod:`world.pipeline`: the one builder of small Stable-Diffusion-shaped pipelines and the offline CLIP tokenizer.
"""

from __future__ import annotations

from .model import (
    ASSETS,
    WORLD_CLIP_CONFIG,
    WORLD_CLIP_MEAN,
    WORLD_CLIP_NAME,
    WORLD_CLIP_STD,
    WORLD_TEXT_ENCODER,
    WORLD_UNET,
    WORLD_VAE,
    build_world_pipeline,
    load_world_clip,
    load_world_pipeline,
    register_world_clip_config,
    world_clip_paths,
    world_model_path,
)
from .pipeline import (
    CLIP_TEXT_IDS,
    SD_DDIM_SCHEDULER,
    build_clip_tokenizer,
    build_sd_pipeline,
)
from .scenes import (
    BACKGROUNDS,
    COLOURS,
    GAP,
    IMAGE_SIZE,
    MARGIN,
    MAX_SHAPES,
    PAIR_SIZE_RANGE,
    SHAPES,
    SINGLE_SIZE_RANGE,
    Scene,
    Shape,
    all_captions,
    caption,
    parse_caption,
    render,
    render_captions,
    sample_scene,
    sample_scenes,
    split_captions,
    write_prompt_files,
)

__all__ = [
    "COLOURS",
    "BACKGROUNDS",
    "SHAPES",
    "IMAGE_SIZE",
    "MAX_SHAPES",
    "SINGLE_SIZE_RANGE",
    "PAIR_SIZE_RANGE",
    "MARGIN",
    "GAP",
    "Shape",
    "Scene",
    "caption",
    "parse_caption",
    "all_captions",
    "split_captions",
    "write_prompt_files",
    "sample_scene",
    "sample_scenes",
    "render",
    "render_captions",
    "ASSETS",
    "WORLD_CLIP_NAME",
    "world_model_path",
    "world_clip_paths",
    "WORLD_VAE",
    "WORLD_TEXT_ENCODER",
    "WORLD_UNET",
    "build_world_pipeline",
    "load_world_pipeline",
    "WORLD_CLIP_CONFIG",
    "WORLD_CLIP_MEAN",
    "WORLD_CLIP_STD",
    "register_world_clip_config",
    "load_world_clip",
    "SD_DDIM_SCHEDULER",
    "CLIP_TEXT_IDS",
    "build_clip_tokenizer",
    "build_sd_pipeline",
]
