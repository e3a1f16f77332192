"""``clip_diversity``: how different a batch's images are from each other, to catch mode collapse.

Each image's value is its mean cosine distance ``1 - cos`` to the CLIP image embeddings of the other images of its
group, so the batch mean is the mean pairwise distance of the group. A collapsing policy (every image alike) drives
it to 0. As a guard (``eval_rewards``) it is scored on the held-out images.

Unlike other rewards an image's value depends on the other images of the call: the groups are the images of one
prompt (``by: prompt``; an image alone in its group gets 0, and a call where every prompt has one image is refused),
or the whole call (``by: batch``, for a held-out set of one image a prompt).
"""

from __future__ import annotations

import torch

from ._clip import DevicePlacement, load_open_clip, preprocess_images, resolve_dtype
from .base import Reward, check_images, register


def mean_pairwise_distance(embeddings: torch.Tensor, groups: list[int]) -> torch.Tensor:
    """Per row, the mean of ``1 - cos`` to the other rows of its group.

    Args:
        embeddings: ``[B, D]`` float tensor (any norm; normalised here).
        groups: ``B`` group ids; rows of one id are compared with each other.

    Returns:
        float32 ``[B]``; 0 for a row alone in its group.
    """
    unit = embeddings.float() / embeddings.float().norm(dim=-1, keepdim=True)
    distance = 1.0 - unit @ unit.T  # [B, B]
    ids = torch.tensor(groups, device=embeddings.device)
    same = (ids[:, None] == ids[None, :]) & ~torch.eye(len(groups), dtype=torch.bool, device=embeddings.device)
    count = same.sum(1)
    total = (distance * same).sum(1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total)).float()


@register("clip_diversity")
class ClipDiversityReward(Reward):
    """Mean CLIP image-embedding distance of each image to the other images of its group (``by``: ``prompt`` or
    ``batch``). Options as :class:`~rewards.clip_score.ClipScoreReward`'s: ``model``, ``pretrained``, ``quick_gelu``,
    ``device``, ``dtype``.

    Input ``images [B, 3, H, W]`` in ``[0, 1]``, ``prompts`` ``B`` strings; output ``float32 [B]`` in ``[0, 2]``.
    """

    name = "clip_diversity"
    differentiable = False  # a guard, scored without gradients; each value depends on the other images of the call

    def __init__(
        self,
        model: str = "ViT-B-32",
        pretrained: str = "openai",
        by: str = "prompt",
        quick_gelu: bool | None = None,
        device: str | None = None,
        dtype: str = "float32",
    ):
        if by not in ("prompt", "batch"):
            raise ValueError(f"clip_diversity: by must be prompt or batch; got {by!r}")
        self.by = by
        self.dtype = resolve_dtype(dtype)
        self.model, self.preprocess_cfg = load_open_clip(
            model, pretrained, option="pretrained", reward="clip_diversity", quick_gelu=quick_gelu
        )
        self._placement = DevicePlacement(device, self.dtype)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_images(images)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"clip_diversity: got {images.shape[0]} images but {len(prompts)} prompts")
        if self.by == "prompt":
            index = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
            groups = [index[p] for p in prompts]
            if len(index) == len(prompts) and len(prompts) > 1:
                raise ValueError(
                    "clip_diversity: every prompt has one image, so there is nothing to compare within a prompt; "
                    "use the option by: batch (e.g. for a held-out set of one image a prompt)"
                )
        else:
            groups = [0] * len(prompts)
        device = self._placement.place(self.model, images)
        pixels = preprocess_images(images.to(device=device, dtype=torch.float32), self.preprocess_cfg).to(self.dtype)
        with torch.no_grad():
            embeddings = self.model.encode_image(pixels)
        return mean_pairwise_distance(embeddings, groups).to(images.device)
