"""Human-preference rewards the field reports on: PickScore and HPS v2.1.

* ``pickscore`` (Kirstain et al. 2023): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences, loaded with
  transformers ``CLIPModel`` (hub id ``yuvalkirstain/PickScore_v1`` or a local folder) and the processor of
  ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``; score = ``logit_scale.exp() * cos(image, text)`` (~18..23 for SD 1.5).
* ``hpsv2`` (Wu et al. 2023, HPS v2.1): an open_clip ViT-H-14 whose weights are the HPS v2.1 checkpoint
  (``HPS_v2.1_compressed.pt`` from the hub repo ``xswu/HPSv2``, or a local path); score = ``cos(image, text)``
  (~0.25..0.30 for SD 1.5), as the ``hpsv2`` package computes it.

Both are differentiable with respect to the pixels (preprocessing with tensor ops; frozen weights, no ``no_grad``).
ImageReward is not provided: its only package (``image-reward`` 1.5 on PyPI) pins ``timm==0.6.13`` and
``fairscale==0.4.13``, and open_clip (which ddpo needs) requires timm 1.x.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ._clip import DevicePlacement, _short, preprocess_images, resolve_dtype
from .base import Reward, check_images, register

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
HPSV2_REPO, HPSV2_FILE = "xswu/HPSv2", "HPS_v2.1_compressed.pt"


def _offline_error(reward: str, what: str, name: str, option: str, err: BaseException) -> FileNotFoundError:
    return FileNotFoundError(
        f"reward {reward!r}: could not load the {what} {name!r} (not cached and not downloadable: offline?). "
        f"Download it on a machine with internet access (e.g. `hf download {name} --local-dir DIR`) and pass the "
        f"folder as the {option!r} option ({option}: DIR), or pre-fill the Hugging Face cache. "
        f"Original error: {_short(err)}"
    )


@register("pickscore")
class PickScoreReward(Reward):
    """PickScore: ``logit_scale.exp() * cos(image_embedding, text_embedding)``. Differentiable w.r.t. pixels.

    Options:
        model: hub id or local folder of a transformers ``CLIPModel`` (default ``yuvalkirstain/PickScore_v1``).
        processor: hub id or local folder of its ``CLIPProcessor`` (tokenizer + image preprocessing config;
            default ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
        device: where to score (default: the images' device). dtype: ``float32`` | ``float16`` | ``bfloat16``.
    """

    name = "pickscore"

    #: Frozen weights, tensor-op preprocessing, no ``no_grad`` on the image path (the text side is a constant).
    differentiable = True

    def __init__(
        self,
        model: str = PICKSCORE_MODEL,
        processor: str = PICKSCORE_PROCESSOR,
        device: str | None = None,
        dtype: str = "float32",
    ):
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.processor = CLIPProcessor.from_pretrained(str(processor))
        except OSError as err:
            raise _offline_error(
                "pickscore", "processor (tokenizer and preprocessing config)", str(processor), "processor", err
            ) from None
        try:
            self.model = CLIPModel.from_pretrained(str(model), dtype=torch.float32)
        except OSError as err:
            raise _offline_error("pickscore", "model", str(model), "model", err) from None
        self.model.eval().requires_grad_(False)
        ip = self.processor.image_processor
        size = ip.size.get("shortest_edge") or ip.size.get("height")
        crop = ip.crop_size.get("height", size) if getattr(ip, "do_center_crop", True) else size
        if size != crop:
            raise ValueError(f"pickscore: the processor resizes to {size} but crops {crop}; expected equal sizes")
        self.preprocess_cfg = {
            "size": int(size),
            "mean": list(ip.image_mean),
            "std": list(ip.image_std),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        }
        self.dtype = resolve_dtype(dtype)
        self._placement = DevicePlacement(device, self.dtype)
        self._lock = threading.Lock()

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_images(images)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"pickscore: got {images.shape[0]} images but {len(prompts)} prompts")
        device = self._placement.place(self.model, images)
        pixels = preprocess_images(images.to(device=device, dtype=torch.float32), self.preprocess_cfg).to(self.dtype)
        m = self.model
        image = m.visual_projection(m.vision_model(pixel_values=pixels).pooler_output).float()
        tokens = self.processor.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt"
        ).to(device)
        with torch.no_grad():
            text = m.text_projection(
                m.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
            ).float()
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        scores = m.logit_scale.exp().float() * (image * text).sum(dim=-1)
        return scores.to(device=images.device, dtype=torch.float32)


def resize_longest_and_pad(images: torch.Tensor, size: int) -> torch.Tensor:
    """HPS v2's ``ResizeMaxSize``: the longest side to ``size`` (bicubic, antialiased), then zero padding to a
    centred ``size x size`` square. ``[B, 3, H, W]`` in ``[0, 1]`` -> ``[B, 3, size, size]``."""
    height, width = images.shape[-2:]
    scale = size / max(height, width)
    new_h, new_w = round(height * scale), round(width * scale)
    x = images
    if (new_h, new_w) != (height, width):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    pad_h, pad_w = size - new_h, size - new_w
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


@register("hpsv2")
class HPSv2Reward(Reward):
    """HPS v2.1: ``cos(image_embedding, text_embedding)`` of an open_clip ViT-H-14 with the HPS v2.1 weights.
    Differentiable w.r.t. pixels.

    Options:
        checkpoint: path of ``HPS_v2.1_compressed.pt`` (a state dict, read with ``torch.load(weights_only=True)``);
            default: downloaded once from the hub repo ``xswu/HPSv2`` into the Hugging Face cache.
        model: the open_clip architecture (default ``ViT-H-14``).
        device, dtype: as for ``clip_score``.
    """

    name = "hpsv2"

    #: Frozen weights, tensor-op preprocessing, no ``no_grad`` on the image path (the text side is a constant).
    differentiable = True

    def __init__(
        self, checkpoint: str | None = None, model: str = "ViT-H-14", device: str | None = None, dtype: str = "float32"
    ):
        import open_clip

        path = self._checkpoint_path(checkpoint)
        if model not in open_clip.list_models():
            raise ValueError(f"reward 'hpsv2': unknown open_clip model {model!r}; see open_clip.list_models()")
        self.model = open_clip.create_model(model, pretrained=None)
        try:
            state: Any = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"reward 'hpsv2': could not read the checkpoint {str(path)!r}: {_short(err)}") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        state = {k.removeprefix("module."): v for k, v in state.items()}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"reward 'hpsv2': {path} does not fit open_clip {model!r} (missing {missing[:4]}, unexpected "
                f"{unexpected[:4]}); is it the HPS v2.1 checkpoint?"
            )
        self.model.eval().requires_grad_(False)
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        self.size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
        self.mean, self.std = list(cfg["mean"]), list(cfg["std"])
        self.tokenizer = open_clip.get_tokenizer(model)
        self.dtype = resolve_dtype(dtype)
        self._placement = DevicePlacement(device, self.dtype)

    @staticmethod
    def _checkpoint_path(checkpoint: str | None) -> Path:
        if checkpoint is not None:
            path = Path(checkpoint).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"reward 'hpsv2': checkpoint={str(checkpoint)!r} does not exist; download {HPSV2_FILE} from the "
                    f"hub repo {HPSV2_REPO} and give its path as the 'checkpoint' option"
                )
            return path
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(HPSV2_REPO, HPSV2_FILE))
        except Exception as err:
            raise FileNotFoundError(
                f"reward 'hpsv2': {HPSV2_FILE} is not cached and could not be downloaded from the hub repo "
                f"{HPSV2_REPO} (offline?). Download it on a machine with internet access and pass its path as the "
                f"'checkpoint' option (checkpoint: /path/to/{HPSV2_FILE}). Original error: {_short(err)}"
            ) from None

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_images(images)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"hpsv2: got {images.shape[0]} images but {len(prompts)} prompts")
        device = self._placement.place(self.model, images)
        x = resize_longest_and_pad(images.to(device=device, dtype=torch.float32), self.size)
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        image = self.model.encode_image(((x - mean) / std).to(self.dtype)).float()
        with torch.no_grad():
            text = self.model.encode_text(self.tokenizer(list(prompts)).to(device)).float()
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        return (image * text).sum(dim=-1).to(device=images.device, dtype=torch.float32)


__all__ = ["HPSv2Reward", "PickScoreReward", "resize_longest_and_pad"]
