"""Shared open_clip helpers for the CLIP-based rewards: loading with clear offline errors, and a differentiable,
on-device version of CLIP's image preprocessing.

Loading goes through open_clip's own ``create_model_and_transforms`` (hub tags, local checkpoint files); only the
error handling and the freezing are added here. Preprocessing re-implements open_clip's evaluation transform
(resize the shortest side, centre crop, normalise) with tensor ops so gradients reach the pixels and the images never
leave their device.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32" | "float16" | "bfloat16"`` (or a ``torch.dtype``) -> ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16") from None


def _short(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


WORLD_CLIP = "ddpo-world-clip"
"""Model name (or ``pretrained="world"``) selecting the tiny CLIP of the embedded world model."""


def load_open_clip(
    model_name: str,
    pretrained: str | os.PathLike,
    *,
    option: str,
    reward: str,
    quick_gelu: bool | None = None,
    cache_dir: str | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build a frozen open_clip model and return ``(model, preprocess_cfg)``.

    Args:
        model_name: an open_clip architecture name (``open_clip.list_models()``), e.g. ``"ViT-L-14"``.
        pretrained: an open_clip pretrained tag (``"openai"``, downloaded once to the hub cache) or the path of a
            local checkpoint file (``.safetensors``, ``.bin``, ``.pt``/``.pth`` state dict).
        option: the reward option that holds ``pretrained`` (named in error messages).
        reward: the reward's name (named in error messages).
        quick_gelu: force QuickGELU activations. ``None``: what the pretrained tag declares (OpenAI weights use
            QuickGELU), else the architecture's default.
        cache_dir: download cache for hub tags (open_clip's default when ``None``).

    Returns:
        The model in eval mode with every parameter frozen (``requires_grad=False``; gradients still flow to the
        inputs), on the CPU in float32, and its preprocessing config (``size``, ``mean``, ``std``,
        ``interpolation``, ``resize_mode``).

    Raises:
        ValueError: unknown architecture, or ``pretrained`` is neither a known tag nor an existing file.
        FileNotFoundError: the tag's weights are not cached and cannot be downloaded (offline); the message names
            the hub file and the option that takes a local path instead.
    """
    import open_clip

    world = model_name == WORLD_CLIP or str(pretrained) == "world"
    if world:  # the tiny CLIP trained on ddpo's procedural world, shipped with the package
        from world import WORLD_CLIP_MEAN, WORLD_CLIP_STD, register_world_clip_config, world_clip_paths

        model_name = register_world_clip_config()
        if str(pretrained) in ("world", ""):
            pretrained = world_clip_paths()[1]
    if model_name not in open_clip.list_models():
        raise ValueError(
            f"reward {reward!r}: unknown open_clip model {model_name!r}; see open_clip.list_models() "
            "(a custom config can be registered with open_clip.add_model_config)"
        )
    if pretrained is None or str(pretrained) == "":
        raise ValueError(
            f"reward {reward!r}: option {option!r} is required: an open_clip pretrained tag for {model_name!r} "
            f"(known: {open_clip.list_pretrained_tags_by_model(model_name)}) or a local checkpoint file"
        )
    pretrained = str(pretrained)
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    path = Path(pretrained).expanduser()
    if not tag_cfg:
        if not path.is_file():
            raise ValueError(
                f"reward {reward!r}: {option}={pretrained!r} is neither an open_clip pretrained tag for "
                f"{model_name!r} (known: {open_clip.list_pretrained_tags_by_model(model_name)}) nor an existing "
                "checkpoint file"
            )
        pretrained = str(path)
    if quick_gelu is None:
        quick_gelu = bool(tag_cfg.get("quick_gelu", False))

    try:
        model, _, _ = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, force_quick_gelu=quick_gelu, cache_dir=cache_dir
        )
    except Exception as err:  # open_clip wraps every download failure in a RuntimeError / FileNotFoundError
        if not tag_cfg:
            raise ValueError(
                f"reward {reward!r}: could not load the checkpoint {pretrained!r} into open_clip model "
                f"{model_name!r}: {_short(err)}"
            ) from None
        hub = tag_cfg.get("hf_hub", "")
        where = (
            f"hub repo {hub.rstrip('/')} (file open_clip_model.safetensors or open_clip_pytorch_model.bin)"
            if hub.endswith("/")
            else f"hub file {hub}"
            if hub
            else f"URL {tag_cfg.get('url')}"
        )
        raise FileNotFoundError(
            f"reward {reward!r}: the weights of open_clip model {model_name!r} with pretrained tag {pretrained!r} "
            f"are not cached and could not be downloaded (offline?). Missing: {where}. Download that file on a "
            f"machine with internet access and pass its local path as the {option!r} option "
            f"(e.g. {option}: /path/to/open_clip_model.safetensors), or pre-fill the Hugging Face cache. "
            f"Original error: {_short(err)}"
        ) from None

    model.eval().requires_grad_(False)
    cfg = dict(open_clip.get_model_preprocess_cfg(model))
    if world:
        cfg.update(mean=WORLD_CLIP_MEAN, std=WORLD_CLIP_STD)
    return model, cfg


def preprocess_images(images: torch.Tensor, cfg: dict[str, Any]) -> torch.Tensor:
    """CLIP evaluation preprocessing with tensor ops (differentiable, on the images' device).

    Resize (shortest side to ``cfg["size"]``, or ``"squash"`` to the exact size) as torchvision's antialiased Resize, clamp to
    ``[0, 1]`` (as 8-bit PIL images are), centre crop, normalise with ``cfg["mean"]`` / ``cfg["std"]``.

    Args:
        images: ``[B, 3, H, W]`` float tensor in ``[0, 1]``.
        cfg: an open_clip preprocess config (``open_clip.get_model_preprocess_cfg(model)``).

    Returns:
        ``[B, 3, S, S]`` normalised tensor, same dtype and device as ``images``.
    """
    size = cfg.get("size", 224)
    out_h, out_w = (size, size) if isinstance(size, int) else tuple(size)
    mode = cfg.get("interpolation", "bicubic")
    if mode not in ("bicubic", "bilinear"):
        mode = "bilinear"
    resize_mode = cfg.get("resize_mode", "shortest")
    height, width = images.shape[-2:]
    if resize_mode == "squash":
        new_h, new_w = out_h, out_w
    elif resize_mode == "shortest":
        # torchvision Resize(int): the short side becomes `size`, the long side int(size * long / short).
        target = min(out_h, out_w)
        if height <= width:
            new_h, new_w = target, int(target * width / height)
        else:
            new_h, new_w = int(target * height / width), target
    else:
        raise ValueError(f"unsupported CLIP resize_mode {resize_mode!r} (supported: shortest, squash)")

    x = images
    if (new_h, new_w) != (height, width):
        # antialias=True even when upsampling, as torchvision's Resize: it also selects PIL's cubic kernel (a=-0.5).
        x = F.interpolate(x, size=(new_h, new_w), mode=mode, align_corners=False, antialias=True)
        x = x.clamp(0.0, 1.0)
    # Centre crop as torchvision.transforms.functional.center_crop.
    top = int(round((new_h - out_h) / 2.0))
    left = int(round((new_w - out_w) / 2.0))
    x = x[..., top : top + out_h, left : left + out_w]
    mean = torch.tensor(cfg["mean"], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class DevicePlacement:
    """Moves a model to the images' device (and the configured dtype) on first use, once, thread-safely.

    ``device=None`` follows the images; an explicit device keeps the model there and moves images to it.
    """

    def __init__(self, device: str | torch.device | None, dtype: torch.dtype):
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self._lock = threading.Lock()
        self._placed: torch.device | None = None

    def place(self, module: torch.nn.Module, images: torch.Tensor) -> torch.device:
        """Return the device to compute on, moving ``module`` there first if needed."""
        device = self.device or images.device
        if self._placed != device:
            with self._lock:
                if self._placed != device:
                    module.to(device=device, dtype=self.dtype)
                    self._placed = device
        return device


def register_tiny_open_clip_config(
    directory: str | os.PathLike,
    name: str,
    *,
    embed_dim: int = 768,
    image_size: int = 32,
    patch_size: int = 8,
    width: int = 64,
    layers: int = 1,
    text_width: int = 32,
    text_layers: int = 1,
) -> str:
    """Write a tiny open_clip config ``<directory>/<name>.json`` and register it (tests and benchmarks).

    The model is a real open_clip ``CLIP`` (vision transformer + text transformer with the real 49,408-token BPE
    vocabulary), just very small. Returns ``name``.
    """
    import open_clip

    config = {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "layers": layers,
            "width": width,
            "head_width": 32,
            "patch_size": patch_size,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": text_width,
            "heads": 2,
            "layers": text_layers,
        },
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(config, indent=2))
    open_clip.add_model_config(path)
    return name
