"""Loading a pipeline of any model family (hub id, local folder, the embedded world models, a family's tiny test
pipeline), and the code that loads a run's result with plain diffusers.

The family is ``model.family`` when given, else the one of the pipeline's class (:func:`resolve_family`, from
``model_index.json`` before any weight is read); the family modules (:mod:`.stable_diffusion`, :mod:`.sdxl`,
:mod:`.sd3`, :mod:`.flux`) know how to build and drive their own pipelines.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from world import world_model_path

from .family import FAMILIES, ModelFamily, family_for_class_name, get_family, pipeline_class_name
from .schedulers import FLOW_SCHEDULERS, build_scheduler
from .stable_diffusion import StableDiffusionFamily, build_sd15_architecture

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


def load_arguments(family: str, none_components: tuple[str, ...] = ()) -> str:
    """The extra ``from_pretrained`` arguments of loading code for ``family``'s pipeline: ``safety_checker=None`` for
    Stable Diffusion, and each of ``none_components`` (:func:`absent_components`) passed as None."""
    extra = ", safety_checker=None" if get_family(family) is StableDiffusionFamily else ""
    return extra + "".join(f", {component}=None" for component in none_components)


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
    load_extra = load_arguments(family, none_components)
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
