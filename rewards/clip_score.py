"""CLIP text-image alignment (CLIPScore) with any open_clip model."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from ._clip import DevicePlacement, load_open_clip, preprocess_images, resolve_dtype
from .base import Reward, check_images, register


@register("clip_score")
class ClipScoreReward(Reward):
    """``scale * cos(image_embedding, text_embedding)`` for each (image, prompt) pair. Differentiable w.r.t. pixels.

    With ``scale=100`` this is torchmetrics' ``CLIPScore`` (0..100); with ``scale=2.5, clamp_negative=True`` it is
    the CLIP-S of Hessel et al. (2021). Negative cosines are kept by default (``clamp_negative=False``) so that
    badly aligned images are still ranked against each other, which a policy-gradient reward needs.

    Options:
        model: open_clip architecture (``open_clip.list_models()``), default ``"ViT-B-32"``.
        pretrained: open_clip pretrained tag (``"openai"``, fetched into the hub cache on first use) or the path of
            a local checkpoint file.
        scale: multiplier of the cosine similarity (default 100).
        clamp_negative: ``max(cos, 0)`` as in the CLIPScore definition (default ``False``).
        quick_gelu: force QuickGELU activations; ``None``: as the pretrained tag says.
        device: where to score (default: the images' device, chosen on the first call).
        dtype: model precision, ``"float32"`` | ``"float16"`` | ``"bfloat16"``; the cosine is computed in float32.
        text_cache_size: how many prompts' text embeddings are kept (least recently used evicted).

    Input ``images [B, 3, H, W]`` in ``[0, 1]``, ``prompts`` a list of ``B`` strings; output ``float32 [B]``.
    """

    name = "clip_score"

    #: The image path has no ``no_grad`` (frozen weights, tensor-op preprocessing); the text embeddings are constants
    #: (computed under ``no_grad`` and cached), as they do not depend on the pixels.
    differentiable = True

    def __init__(
        self,
        model: str = "ViT-B-32",
        pretrained: str = "openai",
        scale: float = 100.0,
        clamp_negative: bool = False,
        quick_gelu: bool | None = None,
        device: str | None = None,
        dtype: str = "float32",
        text_cache_size: int = 4096,
    ):
        import open_clip

        self.scale = float(scale)
        self.clamp_negative = bool(clamp_negative)
        self.dtype = resolve_dtype(dtype)
        self.model, self.preprocess_cfg = load_open_clip(
            model, pretrained, option="pretrained", reward="clip_score", quick_gelu=quick_gelu
        )
        self.tokenizer = open_clip.get_tokenizer(model)
        self.text_cache_size = int(text_cache_size)
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._placement = DevicePlacement(device, self.dtype)

    def text_embeddings(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """L2-normalised float32 text embeddings ``[B, D]`` (cached per prompt; no gradient)."""
        with self._cache_lock:
            missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
            if missing:
                with torch.no_grad():
                    tokens = self.tokenizer(missing).to(device)
                    embeddings = self.model.encode_text(tokens).float()
                    embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
                for prompt, embedding in zip(missing, embeddings):
                    self._text_cache[prompt] = embedding
            rows = []
            for prompt in prompts:
                self._text_cache.move_to_end(prompt)
                rows.append(self._text_cache[prompt].to(device))
            while len(self._text_cache) > self.text_cache_size:
                self._text_cache.popitem(last=False)
        return torch.stack(rows)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_images(images)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"clip_score: got {images.shape[0]} images but {len(prompts)} prompts")
        device = self._placement.place(self.model, images)
        # Preprocess in float32 (resampling kernels lack half-precision CPU versions), run the model in self.dtype.
        pixels = preprocess_images(images.to(device=device, dtype=torch.float32), self.preprocess_cfg).to(self.dtype)
        image_embeddings = self.model.encode_image(pixels).float()
        image_embeddings = image_embeddings / image_embeddings.norm(dim=-1, keepdim=True)
        cosine = (image_embeddings * self.text_embeddings(list(prompts), device)).sum(dim=-1)
        if self.clamp_negative:
            cosine = cosine.clamp(min=0.0)
        return (self.scale * cosine).to(device=images.device, dtype=torch.float32)
