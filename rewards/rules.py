"""Hand-designed, verifiable rewards: a few tensor ops each, differentiable w.r.t. the pixels, on any device.

Every rule maps ``images [B, 3, H, W]`` in ``[0, 1]`` to ``float32 [B]`` (higher is better). Images outside
``[0, 1]`` are scored as given (no clamping, so gradients are never cut).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Reward, check_images, register

#: Rec. 709 luma weights (on gamma-encoded RGB, i.e. the image values as stored).
LUMA_WEIGHTS = (0.2126, 0.7152, 0.0722)

NAMED_COLORS: dict[str, tuple[float, float, float]] = {
    "black": (0.0, 0.0, 0.0),
    "white": (1.0, 1.0, 1.0),
    "gray": (0.5, 0.5, 0.5),
    "grey": (0.5, 0.5, 0.5),
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
    "orange": (1.0, 0.5, 0.0),
    "purple": (0.5, 0.0, 0.5),
    "pink": (1.0, 0.75, 0.8),
}


def luma(images: torch.Tensor) -> torch.Tensor:
    """Rec. 709 luma ``[B, H, W]`` of ``images [B, 3, H, W]``."""
    weights = torch.tensor(LUMA_WEIGHTS, dtype=images.dtype, device=images.device)
    return torch.einsum("bchw,c->bhw", images, weights)


def parse_color(color: str | Sequence[float]) -> tuple[float, float, float]:
    """A colour name (``"red"``), hex string (``"#ff8000"``) or RGB triple in ``[0, 1]`` (or ``0..255`` if any
    component exceeds 1) -> RGB in ``[0, 1]``."""
    if isinstance(color, str):
        text = color.strip().lower()
        if text in NAMED_COLORS:
            return NAMED_COLORS[text]
        hex_text = text.lstrip("#")
        if len(hex_text) == 6 and all(c in "0123456789abcdef" for c in hex_text):
            return tuple(int(hex_text[i : i + 2], 16) / 255.0 for i in (0, 2, 4))  # type: ignore[return-value]
        raise ValueError(f"unknown colour {color!r}: use a name ({', '.join(NAMED_COLORS)}), '#rrggbb' or [r, g, b]")
    values = [float(v) for v in color]
    if len(values) != 3:
        raise ValueError(f"a colour needs 3 components [r, g, b]; got {color!r}")
    if any(v > 1.0 for v in values):
        values = [v / 255.0 for v in values]
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"colour components must lie in [0, 1] (or 0..255); got {color!r}")
    return tuple(values)  # type: ignore[return-value]


@register("brightness")
class Brightness(Reward):
    """Mean Rec. 709 luma in ``[0, 1]``; with ``target`` set, ``-|mean luma - target|`` (closest to target wins)."""

    name = "brightness"

    #: Plain tensor ops on the pixels, nothing detached: a gradient reaches every pixel the value depends on.
    differentiable = True

    def __init__(self, target: float | None = None):
        if target is not None and not 0.0 <= float(target) <= 1.0:
            raise ValueError(f"brightness target must lie in [0, 1]; got {target}")
        self.target = None if target is None else float(target)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_images(images)
        # The luma is linear in RGB: weight the channel means instead of building a [B, H, W] luma image.
        weights = torch.tensor(LUMA_WEIGHTS, dtype=torch.float32, device=images.device)
        mean = images.float().mean(dim=(2, 3)) @ weights
        return mean if self.target is None else -(mean - self.target).abs()


@register("contrast")
class Contrast(Reward):
    """RMS contrast: the standard deviation of the luma over the pixels of each image (``0..0.5``)."""

    name = "contrast"

    #: Plain tensor ops on the pixels, nothing detached: a gradient reaches every pixel the value depends on.
    differentiable = True

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_images(images)
        return luma(images.float()).flatten(1).std(dim=1, unbiased=False)


@register("saturation")
class Saturation(Reward):
    """Mean HSV saturation ``(max - min) / max`` over the pixels (``0`` grey .. ``1`` pure colours)."""

    name = "saturation"

    #: Plain tensor ops on the pixels, nothing detached: a gradient reaches every pixel the value depends on.
    differentiable = True

    def __init__(self, eps: float = 1e-6):
        self.eps = float(eps)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_images(images)
        images = images.float()
        high = images.amax(dim=1)
        low = images.amin(dim=1)
        return ((high - low) / (high + self.eps)).mean(dim=(1, 2))


@register("colorfulness")
class Colorfulness(Reward):
    """Hasler & Süsstrunk (2003) colourfulness on the 0..255 scale: ``sigma_rgyb + 0.3 * mu_rgyb``.

    ``rg = R - G``, ``yb = (R + G) / 2 - B``; ``sigma = sqrt(std(rg)^2 + std(yb)^2)``,
    ``mu = sqrt(mean(rg)^2 + mean(yb)^2)``. About 0 for grey images, 15 "slightly", 33 "moderately",
    above 59 "highly" colourful (the paper's scale).
    """

    name = "colorfulness"

    #: Plain tensor ops on the pixels, nothing detached: a gradient reaches every pixel the value depends on.
    differentiable = True

    def __init__(self, eps: float = 1e-8):
        self.eps = float(eps)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_images(images)
        red, green, blue = (images.float() * 255.0).flatten(2).unbind(dim=1)
        rg = red - green
        yb = 0.5 * (red + green) - blue
        sigma = (rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False) + self.eps).sqrt()
        mu = (rg.mean(dim=1).square() + yb.mean(dim=1).square() + self.eps).sqrt()
        return sigma + 0.3 * mu


@register("target_color")
class TargetColor(Reward):
    """Minus the mean squared RGB distance of the pixels to a target colour (``0`` when every pixel matches).

    Options:
        color: a name (``"red"``), ``"#rrggbb"`` or ``[r, g, b]`` in ``[0, 1]`` (or ``0..255``). Default red.
    """

    name = "target_color"

    #: Plain tensor ops on the pixels, nothing detached: a gradient reaches every pixel the value depends on.
    differentiable = True

    def __init__(self, color: str | Sequence[float] = "red"):
        self.color = parse_color(color)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_images(images)
        images = images.float()
        target = torch.tensor(self.color, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return -(images - target).square().sum(dim=1).mean(dim=(1, 2))
