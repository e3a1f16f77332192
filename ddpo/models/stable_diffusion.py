"""Loading Stable Diffusion 1.x/2.x pipelines (hub id, local folder, the embedded world model) and the tiny test pipeline;
the code that loads a run's result with plain diffusers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline

from world import build_sd_pipeline, world_model_path

from ..policy.conditioning import Conditioning
from ..policy.sampling import encode_prompts, unet_call
from .family import (
    FAMILIES,
    ModelFamily,
    family_for_class_name,
    family_for_pipeline,
    get_family,
    pipeline_class_name,
    register_family,
)
from .schedulers import FLOW_SCHEDULERS, build_scheduler

TINY = "tiny"
"""``model.pretrained`` value that builds :func:`build_tiny_pipeline` instead of loading weights."""
SD15_RANDOM = "sd15_random"
"""``model.pretrained`` value that builds the Stable Diffusion 1.5 architecture with random weights
(:func:`build_sd15_architecture`): for speed and memory measurements, which do not depend on the weights."""
WORLD = "world"
"""``model.pretrained`` value for the embedded pretrained model of the procedural world (shipped in the package)."""
WORLD_FLOW = "world_flow"
"""``model.pretrained`` value for the embedded world's flow-matching twin (a ``StableDiffusion3Pipeline``)."""


def _world_flow_path() -> Path:
    import world

    return world.world_flow_model_path()


EMBEDDED = {WORLD: world_model_path, WORLD_FLOW: _world_flow_path}
"""``model.pretrained`` names of the models shipped in the package -> their folder."""


TINY_UNET: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
TINY_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "block_out_channels": (32, 64),
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 32,
}
TINY_TEXT_ENCODER: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}


def build_tiny_pipeline(seed: int = 0, sample_size: int = 32) -> StableDiffusionPipeline:
    """A Stable-Diffusion-shaped pipeline with random weights, built from configs (no download).

    UNet ``(32, 64)`` channels with cross-attention, a 2-level AutoencoderKL (``sample_size`` latents decode to
    ``2 * sample_size`` pixels), a 2-layer CLIP text encoder with hidden size 32 and the real CLIP tokenizer,
    and the Stable Diffusion DDIM scheduler configuration. Deterministic for a given ``seed``.
    """
    return build_sd_pipeline(
        unet={**TINY_UNET, "sample_size": sample_size},
        vae={**TINY_VAE, "sample_size": 2 * sample_size},
        text_encoder=TINY_TEXT_ENCODER,
        seed=seed,
        construction_order=("unet", "vae", "text_encoder"),
    )


def latent_size(pipe, resolution: int | None) -> int:
    """The latent side ``h = w`` for images of ``resolution`` pixels (None: the denoiser's native size).

    ``pipe`` is a pipeline of any family or its :class:`~ddpo.models.family.ModelFamily`. Raises ``ValueError``
    naming ``sample.resolution`` and the valid sizes when ``resolution`` is not a multiple of the VAE's factor (times
    the transformer's patch size, for SD3 and FLUX).
    """
    family = pipe if isinstance(pipe, ModelFamily) else family_for_pipeline(pipe)(pipe)
    if resolution is None:
        return family.native_latent_size()
    factor = family.vae_scale_factor() * family.latent_multiple()
    if resolution % factor != 0:
        native = family.native_latent_size() * family.vae_scale_factor()
        raise ValueError(
            f"sample.resolution={resolution} is not a multiple of this model's VAE factor {factor}"
            f"{' (times the transformer patch size)' if family.latent_multiple() > 1 else ''}; use a multiple such as "
            f"{max(factor, resolution // factor * factor)} or {(resolution // factor + 1) * factor} (native: {native})"
        )
    return resolution // family.vae_scale_factor()


SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
"""The published ``unet/config.json`` of Stable Diffusion 1.5 (859.5M parameters)."""
SD15_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
}
"""The published ``vae/config.json`` of Stable Diffusion 1.5 (83.7M parameters)."""
SD15_TEXT_ENCODER: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
"""The CLIP ViT-L/14 text encoder of Stable Diffusion 1.5 (123.1M parameters)."""


def build_sd15_architecture(seed: int = 0, sample_size: int = 64) -> StableDiffusionPipeline:
    """Stable Diffusion 1.5's architecture (UNet, VAE, CLIP text encoder, DDIM scheduler) from its published configs
    with seeded random weights: no download. ``sample_size`` is the latent side (64: 512 px). Speed and memory do not
    depend on the weights, so ``ddpo bench`` measures the real model's cost with it (``scripts/gpu_bench.sh``)."""
    return build_sd_pipeline(
        unet={**SD15_UNET, "sample_size": sample_size},
        vae={**SD15_VAE, "sample_size": 8 * sample_size},
        text_encoder=SD15_TEXT_ENCODER,
        seed=seed,
    )


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1] or Path(name).exists()


def load_pipeline(
    pretrained: str,
    revision: str | None = None,
    scheduler: str = "ddim",
    family: str = "auto",
    options: dict[str, Any] | None = None,
):
    """Load a pipeline of any model family from a hub id or a local folder, in float32, without safety checker.

    ``pretrained`` may also name a tiny random-weight pipeline (``tiny``: Stable Diffusion, ``tiny_sdxl``,
    ``tiny_sd3``, ``tiny_flux``), ``sd15_random`` (:func:`build_sd15_architecture`), ``world`` or ``world_flow`` (the
    embedded models). The family is ``family`` when given, else the one of the pipeline's class
    (``model_index.json``). The scheduler is replaced by the sampler ``scheduler``
    (:func:`~ddpo.models.schedulers.build_scheduler`: ``ddim``, ``ddpm``, ``flow_sde``, ``dpmsolver++``, ...) built
    from the pipeline's own scheduler config, so the noise schedule is unchanged. Errors name what is missing and how
    to fix it, instead of surfacing from deep inside a download. See :func:`load_model` for the family too.
    """
    return load_model(pretrained, revision, scheduler, family, options)[0]


def load_model(
    pretrained: str,
    revision: str | None = None,
    scheduler: str = "ddim",
    family: str = "auto",
    options: dict[str, Any] | None = None,
) -> tuple[Any, ModelFamily]:
    """``(pipeline, family)``: :func:`load_pipeline` and the :class:`~ddpo.models.family.ModelFamily` that drives it.

    ``options`` are the ``model.*`` settings a family reads while loading (e.g. ``drop_t5`` for SD3).
    """
    options = dict(options or {})
    cls = resolve_family(pretrained, revision, family)
    check_sampler(cls, scheduler)  # before any weight is read: the family comes from model_index.json
    if pretrained == cls.tiny_name:
        pipe = cls.build_tiny()
    elif pretrained == SD15_RANDOM:
        pipe = build_sd15_architecture()
    else:
        source = _source(pretrained, revision)
        try:
            pipe = cls.from_pretrained(source, revision, options)
        except OSError as err:
            raise _load_error(pretrained, err) from err
    if not cls.flow_matching:
        prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
        if prediction not in PREDICTION_TYPES:
            raise ValueError(
                f"model.pretrained={pretrained!r}: its scheduler's prediction_type {prediction!r} is not supported; "
                f"ddpo trains {', '.join(PREDICTION_TYPES)} models"
            )
    pipe.scheduler = build_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe, cls(pipe)


def resolve_family(pretrained: str, revision: str | None = None, family: str = "auto") -> type[ModelFamily]:
    """The family of ``model.pretrained`` without loading weights: a tiny name's, ``sd15_random``'s, else
    ``model.family`` when given, else the one of the ``_class_name`` in the pipeline's ``model_index.json``."""
    tiny = {cls.tiny_name: cls for cls in FAMILIES.values() if cls.tiny_name}
    if pretrained in tiny or pretrained == SD15_RANDOM:
        cls = tiny.get(pretrained, StableDiffusionFamily)
        if family not in ("auto", cls.name):
            raise ValueError(f"model.pretrained={pretrained} is a {cls.name} pipeline, but model.family={family}")
        return cls
    if family != "auto":
        return get_family(family)
    source = _source(pretrained, revision)  # its errors name the problem and the fix themselves
    try:
        return family_for_class_name(pipeline_class_name(source, revision))
    except OSError as err:
        raise _load_error(pretrained, err) from err


def _source(pretrained: str, revision: str | None) -> str:
    """The folder or hub id to load ``pretrained`` from (an embedded name resolved), checked: a folder has a
    ``model_index.json``, a path exists, a hub id is cached when offline."""
    if pretrained in EMBEDDED:
        pretrained = str(EMBEDDED[pretrained]())
    local = Path(pretrained).expanduser()
    if local.exists():
        if not local.is_dir():
            raise FileNotFoundError(
                f"model.pretrained={pretrained!r} is a file, not a folder; point it at a diffusers pipeline folder "
                "(saved with pipe.save_pretrained) or a hub id"
            )
        if not (local / "model_index.json").is_file():
            raise FileNotFoundError(
                f"model.pretrained={pretrained!r} is a folder without model_index.json; point it at a diffusers "
                "pipeline folder (saved with pipe.save_pretrained) or a hub id"
            )
        return str(local)
    if _looks_like_path(pretrained) and not _is_hub_id(pretrained):
        raise FileNotFoundError(
            f"model.pretrained={pretrained!r} does not exist; give an existing local pipeline folder or a hub id "
            "like 'stable-diffusion-v1-5/stable-diffusion-v1-5'"
        )
    _check_reachable(pretrained, revision)
    return pretrained


def _load_error(pretrained: str, err: OSError) -> OSError:
    return OSError(
        f"could not load the pipeline {pretrained!r}: {err}\n"
        "If this machine is offline, download the model elsewhere (e.g. `hf download "
        f"{pretrained} --local-dir DIR`) and set model.pretrained=DIR."
    )


def check_sampler(cls: type[ModelFamily], scheduler: str) -> None:
    """Raise ValueError when a flow-matching family gets a DDPM-style sampler or the other way round."""
    flow_sampler = scheduler in FLOW_SCHEDULERS or scheduler.startswith("FlowMatch")
    if cls.flow_matching and not flow_sampler:
        raise ValueError(
            f"model.family={cls.name} is a flow-matching model; sample.scheduler={scheduler!r} is a DDPM-style "
            f"sampler: use sample.scheduler=flow_sde (or flow_cps; flow_euler for train.algorithm=awm|nft)"
        )
    if not cls.flow_matching and flow_sampler:
        raise ValueError(
            f"sample.scheduler={scheduler!r} is a flow-matching sampler but model.family={cls.name} is a diffusion "
            "model: use ddim or ddpm (any diffusers sampler for train.algorithm=awm|nft)"
        )


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
"""Scheduler ``prediction_type`` values the log-prob steps and forward-process losses understand."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _check_reachable(hub_id: str, revision: str | None) -> None:
    """With ``HF_HUB_OFFLINE=1``, raise FileNotFoundError at once (naming the fix) unless the hub id is cached."""
    if not _offline():
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(hub_id, "model_index.json", revision=revision)
    except Exception:  # an id the hub library refuses is not cached either
        cached = None
    if not isinstance(cached, str):
        raise FileNotFoundError(
            f"model.pretrained={hub_id!r} is a hub id, HF_HUB_OFFLINE=1 is set and it is not in the local cache; "
            f"download it on a machine with internet (`hf download {hub_id} --local-dir DIR`) and set "
            "model.pretrained=DIR, or unset HF_HUB_OFFLINE"
        )


def _is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def load_code(
    pretrained: str,
    final: str | Path,
    use_lora: bool = True,
    revision: str | None = None,
    family: str = "sd",
    none_components: tuple[str, ...] = (),
) -> str:
    """The Python code that loads a run's result with plain diffusers: its base model (``model.pretrained``; a
    shipped world model by its folder, a local folder by its absolute path) in the ``family``'s pipeline class, and
    ``final/``. Printed at the end of a run; it runs as is (a tiny random-weight pipeline is rebuilt with its
    family's ``build_tiny``). ``none_components``: the pipeline's required components the run loaded as None (e.g.
    SD3 without T5: :func:`absent_components`), passed as None, as ``from_pretrained`` requires."""
    cls = get_family(family)
    name = cls.pipeline_class_name
    load_extra = ", safety_checker=None" if cls is StableDiffusionFamily else ""
    load_extra += "".join(f", {component}=None" for component in none_components)
    final = str(Path(final).resolve())
    if not use_lora:
        return f"from diffusers import {name}\n\npipe = {name}.from_pretrained({final!r}{load_extra})"
    if pretrained == cls.tiny_name:
        lines = [
            "from ddpo.models import get_family",
            "",
            f"pipe = get_family({cls.name!r}).build_tiny()  # random weights",
        ]
    else:
        base = str(EMBEDDED[pretrained]()) if pretrained in EMBEDDED else pretrained
        local = Path(base).expanduser()
        if local.exists():
            base = str(local.resolve())
        extra = f", revision={revision!r}" if revision else ""
        lines = [f"from diffusers import {name}", "", f"pipe = {name}.from_pretrained({base!r}{extra}{load_extra})"]
    lines.append(f"pipe.load_lora_weights({final!r})")
    return "\n".join(lines)


def absent_components(pipe) -> tuple[str, ...]:
    """The components ``pipe`` holds as None that its class does not list as optional (an SD3 pipeline without T5:
    ``text_encoder_3``, ``tokenizer_3``): ``from_pretrained`` must be given them as None."""
    optional = set(getattr(type(pipe), "_optional_components", ()))
    return tuple(k for k, v in pipe.components.items() if v is None and k not in optional)


@register_family
class StableDiffusionFamily(ModelFamily):
    """Stable Diffusion 1.x/2.x (``StableDiffusionPipeline``): one CLIP text encoder, a UNet predicting epsilon,
    v or the sample; DDIM/DDPM log-prob steps."""

    name = "sd"
    pipeline_class_name = "StableDiffusionPipeline"
    tiny_name = TINY

    @classmethod
    def build_tiny(cls, seed: int = 0) -> StableDiffusionPipeline:
        return build_tiny_pipeline(seed)

    @classmethod
    def load_kwargs(cls, options: dict[str, Any]) -> dict[str, Any]:
        return {"safety_checker": None, "requires_safety_checker": False}

    def bind(self, model, guidance_scale: float = 1.0):
        return lambda latents, timesteps, cond: unet_call(model, latents, timesteps, cond)

    def encode(self, prompts: list[str], device: torch.device, latent_size: int) -> Conditioning:
        return Conditioning(encode_prompts(self.pipe.tokenizer, self.pipe.text_encoder, prompts, device))
