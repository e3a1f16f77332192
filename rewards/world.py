"""``world``: a verifiable, GenEval-style reward for images of the procedural world (:mod:`world`).

No learned model: the caption is parsed into its objects ``(colour, shape)`` and background, and the image is
checked by pixel statistics:

1. every pixel is labelled with its nearest named colour of the world (shape colours and backgrounds), or left
   unlabelled when no named colour is within ``tolerance`` (RGB Euclidean distance);
2. the pixels of each shape colour are split into 8-connected components (batched label propagation); components
   smaller than ``min_area`` pixels (at 64 px) are noise;
3. the largest component of each colour is classified by the fill ratio of its bounding box (square ~1.0,
   circle ~0.785, triangle ~0.5) and how its mass splits between the upper and lower half (an upright triangle
   holds 3/4 of it below the middle).

Checks per sample (each passes or fails):

* ``colour``: for each object of the caption, a component of its colour exists;
* ``shape``: for each object, the largest component of its colour has the named shape;
* ``count``: the number of components over all shape colours equals the number of objects named;
* ``background``: the background colour covers at least half of the image.

The reward is the fraction of checks passed, in ``[0, 1]`` (a one-object caption has 4 checks, a two-object one 6).
``checks`` restricts the reward to some of them (for example ``checks=["background"]``, to train on one check
while :meth:`WorldReward.last_info` still reports every check and the total over all of them).
Captions outside the world's grammar score 0. Runs on any image size (resampled to 64 px) and device (computed on
the CPU), about a thousand images per second.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from world import BACKGROUNDS, COLOURS, IMAGE_SIZE, SHAPES, parse_caption

from .base import Reward, check_images, register

_COLOUR_NAMES = list(COLOURS)
_BACKGROUND_NAMES = list(BACKGROUNDS)
_PALETTE = torch.tensor([COLOURS[c] for c in _COLOUR_NAMES] + [BACKGROUNDS[b] for b in _BACKGROUND_NAMES])
_N_COLOURS = len(_COLOUR_NAMES)
CHECKS = ("colour", "shape", "count", "background")


def label_colours(images: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Nearest named colour of every pixel: ``[B, 3, H, W]`` -> long ``[B, H, W]`` with values ``0..5`` (shape
    colours, in :data:`world.COLOURS` order), ``6..8`` (backgrounds) or ``-1`` (no colour within
    ``tolerance``)."""
    palette = _PALETTE.to(images)
    # Squared distances |x - p|^2 = |x|^2 - 2 x.p + |p|^2, as one matrix product: [B, P, H, W].
    dist = images.pow(2).sum(1, keepdim=True) - 2 * torch.einsum("bchw,pc->bphw", images, palette)
    dist = dist + palette.pow(2).sum(1).view(1, -1, 1, 1)
    best, index = dist.min(1)
    return torch.where(best <= tolerance**2, index, torch.full_like(index, -1))


def mode_filter(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """3x3 majority filter of a label map ``[B, H, W]`` (values ``-1..classes-1``): removes isolated noisy pixels
    and ragged edges before shapes are measured."""
    onehot = F.one_hot(labels + 1, classes + 1).permute(0, 3, 1, 2).float()  # [B, classes + 1, H, W]
    votes = F.avg_pool2d(onehot, 3, stride=1, padding=1, count_include_pad=False)
    return votes.argmax(1) - 1


def _max3x3(x: torch.Tensor) -> torch.Tensor:
    """3x3 maximum filter of non-negative maps ``[N, H, W]`` (zero padding), as shifted maxima (separable; several
    times faster on the CPU than ``max_pool2d`` on single-channel maps)."""
    row = x.clone()
    row[:, :, 1:] = torch.maximum(row[:, :, 1:], x[:, :, :-1])
    row[:, :, :-1] = torch.maximum(row[:, :, :-1], x[:, :, 1:])
    out = row.clone()
    out[:, 1:] = torch.maximum(out[:, 1:], row[:, :-1])
    out[:, :-1] = torch.maximum(out[:, :-1], row[:, 1:])
    return out


def connected_components(mask: torch.Tensor) -> torch.Tensor:
    """8-connected components of boolean masks ``[N, H, W]``; returns labels ``[N, H, W]`` (long, 0 outside the
    mask, otherwise 1 + the largest flat pixel index of the component).

    Max-label propagation over 3x3 neighbourhoods, sped up by pointer jumping: a label is the index (+1) of a pixel
    of the same component, so every pixel may also take the label held by that pixel.
    """
    n, h, w = mask.shape
    index = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, h, w)
    maskf = mask.float()
    labels = index * maskf
    while True:
        previous = labels
        for _ in range(4):
            labels = _max3x3(labels) * maskf
            flat = labels.view(n, h * w)
            jumped = flat.gather(1, (flat.long() - 1).clamp(min=0)) * (flat > 0)
            labels = torch.maximum(flat, jumped).view(n, h, w)
        if torch.equal(labels, previous):
            return labels.long()


def shape_statistics(mask: torch.Tensor, min_area: int) -> dict[str, torch.Tensor]:
    """Component statistics of boolean masks ``[N, H, W]``.

    Returns ``count`` (components of at least ``min_area`` pixels, long ``[N]``) and, for the largest component,
    float ``[N]`` features (0 where no component of ``min_area`` pixels can exist): ``area``; ``fill`` (area /
    bounding-box area); ``lower`` (fraction of its pixels in the lower half of its bounding box); ``top_corners``
    and ``bottom_corners`` (filled fraction of the two upper / lower corner cells of a 5x5 grid over the bounding
    box).
    """
    n, h, w = mask.shape
    keys = ("count", "area", "fill", "lower", "top_corners", "bottom_corners")
    out = {k: torch.zeros(n, dtype=torch.long if k == "count" else torch.float32) for k in keys}
    occupied = (mask.view(n, -1).sum(1) >= min_area).nonzero().flatten()  # only these can hold a counted component
    if len(occupied) == 0:
        return out
    mask = mask[occupied]
    m = len(occupied)
    labels = connected_components(mask)  # [M, H, W], 0 = none
    ids = (torch.arange(m).view(m, 1, 1) * (h * w + 1) + labels).flatten()
    areas = torch.bincount(ids, minlength=m * (h * w + 1)).view(m, h * w + 1)
    areas[:, 0] = 0
    area, largest = areas.max(1)
    component = (labels == largest.view(m, 1, 1)).float()  # [M, H, W]
    rows, cols = component.amax(2) > 0, component.amax(1) > 0  # [M, H], [M, W]
    ys, xs = torch.arange(h), torch.arange(w)
    y0 = torch.where(rows, ys, h).min(1).values
    y1 = torch.where(rows, ys, -1).max(1).values
    x0 = torch.where(cols, xs, w).min(1).values
    x1 = torch.where(cols, xs, -1).max(1).values
    height = (y1 - y0 + 1).float().view(m, 1)
    width = (x1 - x0 + 1).float().view(m, 1)
    # Pixel-centre coordinates relative to the bounding box, in [0, 1] inside it: v [M, H], u [M, W].
    v = (ys.float().view(1, h) + 0.5 - y0.view(m, 1)) / height
    u = (xs.float().view(1, w) + 0.5 - x0.view(m, 1)) / width
    row_sums = component.sum(2)  # [M, H]
    side_sums = (component * ((u < 0.2) | (u > 0.8)).float().view(m, 1, w)).sum(2)  # [M, H]
    side_cells = (((u < 0.2) | (u > 0.8)) & (u >= 0) & (u <= 1)).sum(1, keepdim=True).float()  # [M, 1]
    top, bottom = (v >= 0) & (v < 0.2), (v > 0.8) & (v <= 1)
    areaf = area.float()
    out["count"][occupied] = (areas >= min_area).sum(1)
    out["area"][occupied] = areaf
    out["fill"][occupied] = areaf / (height * width).flatten()
    lower, upper = (row_sums * (v > 0.5)).sum(1), (row_sums * (v < 0.5)).sum(1)
    out["lower"][occupied] = lower / (lower + upper).clamp(min=1)
    for key, cells in (("top_corners", top), ("bottom_corners", bottom)):
        filled = (side_sums * cells).sum(1)
        out[key][occupied] = filled / (side_cells.flatten() * cells.sum(1)).clamp(min=1)
    return out


def classify_shapes(stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """Shape index (into :data:`world.SHAPES`: circle 0, square 1, triangle 2) of the largest components
    described by :func:`shape_statistics`: a square fills its bounding box's corners, an upright triangle only the
    lower ones (and holds most of its mass below the middle), a circle none."""
    top, bottom, lower = stats["top_corners"], stats["bottom_corners"], stats["lower"]
    triangle = (lower > 0.6) | ((bottom - top > 0.35) & (lower > 0.55))
    square = ~triangle & (top + bottom > 1.0)
    return torch.where(triangle, 2, torch.where(square, 1, 0))


@register("world")
class WorldReward(Reward):
    """Fraction of the caption's checks (colour, shape, count, background) that the image passes.

    Args:
        tolerance: maximum RGB distance (colours in ``[0, 1]``) from a named colour for a pixel to count as that
            colour.
        min_area: smallest component (pixels, at 64 px) counted as an object.
        checks: the checks the reward is the fraction of (default: all four); every check is still reported.
    """

    #: Thresholded pixel counts and connected components on the CPU, under ``no_grad``: piecewise constant.
    differentiable = False

    def __init__(
        self,
        tolerance: float = 0.3,
        min_area: int = 12,
        checks: Sequence[str] = CHECKS,
    ):
        if not 0 < tolerance < 1:
            raise ValueError(f"world reward: tolerance must be in (0, 1); got {tolerance}")
        if min_area < 1:
            raise ValueError(f"world reward: min_area must be >= 1; got {min_area}")
        if isinstance(checks, str) or not checks or not set(checks) <= set(CHECKS) or len(set(checks)) < len(checks):
            raise ValueError(
                f"world reward: checks must be a non-empty list of distinct names from {list(CHECKS)}; got {checks!r}"
            )
        self.tolerance = float(tolerance)
        self.min_area = int(min_area)
        self.checks = tuple(checks)
        self._info: dict[str, float] = {}

    @torch.no_grad()
    def details(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Per-sample results ``[B]``: ``colour``, ``shape`` (fractions of the caption's objects passing),
        ``count``, ``background`` (0/1), ``all`` (fraction of all checks passed), ``total`` (fraction of the
        selected ``checks`` passed: the reward; equal to ``all`` by default), ``background_fraction`` (share of the
        pixels in the caption's background colour; ``background`` is 1 when it is at least 0.5), ``valid`` (caption
        parsed)."""
        check_images(images)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"world reward: {images.shape[0]} images but {len(prompts)} prompts")
        images = images.detach().float().cpu().clamp(0, 1)
        if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
        b = images.shape[0]
        labels = mode_filter(label_colours(images, self.tolerance), len(_PALETTE))  # [B, H, W]
        masks = labels[:, None] == torch.arange(_N_COLOURS).view(1, -1, 1, 1)  # [B, C, H, W]
        stats = shape_statistics(masks.flatten(0, 1), self.min_area)
        count = stats["count"].view(b, _N_COLOURS)
        count = count.tolist()
        kind = classify_shapes(stats).view(b, _N_COLOURS).tolist()
        pixels = labels.shape[1] * labels.shape[2]
        keys = (torch.arange(b).view(b, 1, 1) * (len(_PALETTE) + 1) + labels + 1).flatten()
        palette_pixels = torch.bincount(keys, minlength=b * (len(_PALETTE) + 1)).view(b, -1)[:, 1:].tolist()

        result = {k: torch.zeros(b) for k in (*CHECKS, "all", "total", "background_fraction", "valid")}
        for i, prompt in enumerate(prompts):
            try:
                objects, background = parse_caption(prompt)
            except ValueError:
                continue
            colour_ok = [count[i][_COLOUR_NAMES.index(c)] > 0 for c, _ in objects]
            shape_ok = [
                ok and kind[i][_COLOUR_NAMES.index(c)] == SHAPES.index(k) for ok, (c, k) in zip(colour_ok, objects)
            ]
            count_ok = sum(count[i]) == len(objects)
            background_fraction = palette_pixels[i][_N_COLOURS + _BACKGROUND_NAMES.index(background)] / pixels
            background_ok = background_fraction >= 0.5
            result["colour"][i] = sum(colour_ok) / len(objects)
            result["shape"][i] = sum(shape_ok) / len(objects)
            result["count"][i] = float(count_ok)
            result["background"][i] = float(background_ok)
            result["background_fraction"][i] = background_fraction
            passed = {"colour": sum(colour_ok), "shape": sum(shape_ok), "count": count_ok, "background": background_ok}
            # Checks per caption: colour and shape once per object, count and background once.
            total = {"colour": len(objects), "shape": len(objects), "count": 1, "background": 1}
            result["all"][i] = sum(passed.values()) / sum(total.values())
            result["total"][i] = sum(passed[c] for c in self.checks) / sum(total[c] for c in self.checks)
            result["valid"][i] = 1.0
        return result

    score_key = "total"
    """The entry of :meth:`details` that the reward returns (a subclass may return another, e.g.
    ``background_fraction``)."""

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        details = self.details(images, prompts)
        self._info = {
            f"reward/world_{k}_mean": v.mean().item()
            for k, v in details.items()
            if k not in ("valid", "background_fraction")
        }
        self._info["reward/world_exact_mean"] = (details["all"] == 1).float().mean().item()
        self._info["reward/world_invalid_prompts"] = float((details["valid"] == 0).sum().item())
        return details[self.score_key].to(torch.float32)

    def last_info(self) -> dict[str, float]:
        return dict(self._info)

    def pass_fail(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Per sample, bool ``[B]``: each check passed for every object of the caption (``colour``, ``shape``,
        ``count``, ``background``), and ``all`` of them (the ``exact`` of :meth:`last_info`). A caption outside the
        grammar passes nothing."""
        details = self.details(images, prompts)
        valid = details["valid"] == 1
        out = {check: (details[check] == 1) & valid for check in CHECKS}
        out["all"] = (details["all"] == 1) & valid
        return out
