"""A model family: everything the shared trainer needs to know about one kind of pipeline, and nothing more.

The trainer, the estimators, the rewards, checkpoints and resume are shared by every family. A family (one small
module each: :mod:`.stable_diffusion`, :mod:`.sdxl`, :mod:`.sd3`, :mod:`.flux`) only

* loads its pipeline (hub id or local folder, ``revision``) and builds its tiny random-weight test configuration,
* encodes prompts into whatever its denoiser takes (a :class:`~ddpo.policy.conditioning.Conditioning`),
* calls its denoiser (:meth:`ModelFamily.bind` returns ``denoiser(latents, timesteps, cond) -> output`` for the
  policy maths, which never see a module's calling convention),
* names its latent shape, its noise-schedule extras and its LoRA layers, and saves a ``final/`` that the family's
  own diffusers pipeline loads with ``load_lora_weights``.

The family is chosen from the loaded pipeline's class (:func:`family_for_pipeline`), or from ``model.family``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..policy.conditioning import Conditioning
from ..policy.sampling import Denoiser


def vae_scale_factor(vae) -> int:
    """Pixels per latent pixel of ``vae``: ``2 ** (levels - 1)`` (8 for the published models, 2 for the tiny VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


class ModelFamily:
    """Base class of the families. Subclasses set the class attributes and override what differs.

    Attributes:
        name: ``model.family`` value (``sd``, ``sdxl``, ``sd3``, ``flux``).
        pipeline_class_name: the diffusers pipeline class it loads and whose ``final/`` it writes.
        denoiser_attr: the pipeline attribute of the trained model (``unet`` or ``transformer``).
        text_encoder_attrs: pipeline attributes of the frozen text encoders (None entries are skipped).
        flow_matching: True for rectified-flow models (velocity prediction, ``FlowMatchEulerDiscreteScheduler``).
        guidance_embedded: True where guidance is an input of the denoiser (FLUX.1-dev) instead of CFG rows.
        lora_layers_argument: the keyword of ``Pipeline.save_lora_weights`` for the denoiser's LoRA layers.
        tiny_name: the ``model.pretrained`` value that builds the family's tiny random-weight pipeline.
        vae_force_upcast: True where the VAE must decode in float32 (SDXL: it overflows in float16); the trainer
            must then not cast the VAE to a half-precision dtype.
    """

    name: ClassVar[str] = ""
    pipeline_class_name: ClassVar[str] = ""
    denoiser_attr: ClassVar[str] = "unet"
    text_encoder_attrs: ClassVar[tuple[str, ...]] = ("text_encoder",)
    flow_matching: ClassVar[bool] = False
    guidance_embedded: ClassVar[bool] = False
    lora_layers_argument: ClassVar[str] = "unet_lora_layers"
    tiny_name: ClassVar[str] = ""
    vae_force_upcast: ClassVar[bool] = False

    def __init__(self, pipe):
        self.pipe = pipe

    # ------------------------------------------------------------------ loading

    @classmethod
    def pipeline_class(cls):
        import diffusers

        return getattr(diffusers, cls.pipeline_class_name)

    @classmethod
    def build_tiny(cls, seed: int = 0):
        """The family's tiny pipeline with seeded random weights, built from configs (no download)."""
        raise NotImplementedError

    @classmethod
    def load_kwargs(cls, options: dict[str, Any]) -> dict[str, Any]:
        """Extra ``from_pretrained`` keywords (e.g. no safety checker; SD3 without T5). ``options``: ``model.*``."""
        return {}

    @classmethod
    def from_pretrained(cls, source: str, revision: str | None, options: dict[str, Any]):
        """``Pipeline.from_pretrained(source)`` in float32 with :meth:`load_kwargs`. Components the folder's
        ``model_index.json`` lists as absent (``[null, null]``, e.g. an SD3 saved without T5) are passed as None, which
        diffusers requires for the non-optional ones."""
        pipeline_class = cls.pipeline_class()
        index = pipeline_class.load_config(source, revision=revision)
        absent = {k: None for k, v in index.items() if isinstance(v, list | tuple) and list(v) == [None, None]}
        kwargs = {**absent, **cls.load_kwargs(options)}
        return pipeline_class.from_pretrained(source, revision=revision, dtype=torch.float32, **kwargs)

    # ------------------------------------------------------------------ the denoiser

    def denoiser(self) -> torch.nn.Module:
        """The trained module (the UNet or the transformer)."""
        return getattr(self.pipe, self.denoiser_attr)

    def set_denoiser(self, module: torch.nn.Module) -> None:
        setattr(self.pipe, self.denoiser_attr, module)

    def text_encoders(self) -> list[torch.nn.Module]:
        """The frozen text encoders that are present."""
        return [m for m in (getattr(self.pipe, a, None) for a in self.text_encoder_attrs) if m is not None]

    def bind(self, model: torch.nn.Module, guidance_scale: float = 1.0) -> Denoiser:
        """``model`` (this family's denoiser, or a copy, or it wrapped by accelerate) as a :data:`Denoiser`."""
        raise NotImplementedError

    # ------------------------------------------------------------------ conditioning and shapes

    def encode(self, prompts: list[str], device: torch.device, latent_size: int) -> Conditioning:
        """The conditioning ``[B, ...]`` float32 of ``prompts`` (``latent_size``: for size-dependent extras)."""
        raise NotImplementedError

    def latent_channels(self) -> int:
        """Channels ``C`` of the (unpacked) latents ``[B, C, h, w]`` the sampler works on."""
        return int(self.pipe.vae.config.latent_channels)

    def native_latent_size(self) -> int:
        """The latent side of the model's native resolution."""
        return int(self.denoiser().config.sample_size)

    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel of the pipeline's VAE (:func:`vae_scale_factor`)."""
        return vae_scale_factor(self.pipe.vae)

    def latent_multiple(self) -> int:
        """The latent side must be a multiple of this (2 for patchified transformers)."""
        return 1

    def schedule_kwargs(self, num_steps: int, latent_size: int) -> dict[str, Any]:
        """Extra keywords of ``scheduler.set_timesteps`` (FLUX: its sigmas and resolution-dependent shift ``mu``)."""
        return {}

    # ------------------------------------------------------------------ outputs

    def save_lora(
        self, folder: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None
    ) -> None:
        """Write LoRA weights (diffusers format) that ``Pipeline.load_lora_weights(folder)`` reads. ``metadata``: the
        adapter's peft config (:func:`~ddpo.models.lora.lora_metadata`), stored so that the loader scales the adapter
        by ``lora_alpha / rank`` as trained (without it diffusers assumes ``lora_alpha == rank``)."""
        kwargs = {self.lora_layers_argument: state_dict}
        if metadata is not None:
            kwargs[self.lora_layers_argument.replace("_layers", "_adapter_metadata")] = metadata
        self.pipeline_class().save_lora_weights(str(folder), **kwargs)

    def default_lora_targets(self) -> list[str]:
        """Module names of the denoiser's attention projections (the usual LoRA targets)."""
        return ["to_q", "to_k", "to_v", "to_out.0"]


LOAD_OPTIONS = ("drop_t5", "vae_path")
"""The ``model.*`` keys a family reads while loading (:meth:`ModelFamily.load_kwargs`'s ``options``)."""

FAMILIES: dict[str, type[ModelFamily]] = {}
"""``model.family`` name -> family class (filled by the family modules)."""


def register_family(cls: type[ModelFamily]) -> type[ModelFamily]:
    """Class decorator: add a family to :data:`FAMILIES`."""
    FAMILIES[cls.name] = cls
    return cls


def family_names() -> list[str]:
    """The registered ``model.family`` names in a fixed order: the diffusion families, then the flow-matching ones."""
    return sorted(FAMILIES, key=lambda name: (FAMILIES[name].flow_matching, name))


def unknown_family_message(name: str) -> str:
    return f"model.family={name!r} is not a model family; use one of {', '.join(family_names())} (or auto)"


def get_family(name: str) -> type[ModelFamily]:
    if name not in FAMILIES:
        raise ValueError(unknown_family_message(name))
    return FAMILIES[name]


def family_for_class_name(class_name: str) -> type[ModelFamily]:
    """The family whose pipeline class is ``class_name`` (e.g. ``StableDiffusionXLPipeline``)."""
    for cls in FAMILIES.values():
        if cls.pipeline_class_name == class_name:
            return cls
    known = ", ".join(f"{c.pipeline_class_name} ({c.name})" for c in FAMILIES.values())
    raise ValueError(f"a {class_name} is not a model family ddpo trains; it trains {known}")


def family_for_pipeline(pipe) -> type[ModelFamily]:
    """The family of a loaded pipeline, from its class."""
    return family_for_class_name(type(pipe).__name__)


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


def pipeline_class_name(source: str, revision: str | None = None) -> str:
    """The ``_class_name`` of a pipeline folder's or hub repository's ``model_index.json``."""
    local = Path(source).expanduser()
    if local.is_dir():
        return json.loads((local / "model_index.json").read_text())["_class_name"]
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.load_config(source, revision=revision)["_class_name"]
