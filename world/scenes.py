"""The procedural world: its vocabulary, scenes, captions and rendering.

A scene is one or two flat shapes (circle, square, triangle) of distinct named colours on a plain background::

    "a red circle on a white background"
    "a blue square and a yellow triangle on a grey background"

Objects are listed left to right (by the x of their centre). Shape colours and background colours are disjoint
sets, far apart in RGB, so an image can be segmented by nearest named colour. The shipped model of this world is
in :mod:`world.model`; the verifiable reward that checks an image against its caption is :mod:`rewards.world`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# --------------------------------------------------------------------------------------------------------------------
# Vocabulary of the world
# --------------------------------------------------------------------------------------------------------------------

#: Shape colours (RGB in [0, 1]); pairwise far apart and far from every background colour.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.10, 0.70, 0.15),
    "blue": (0.12, 0.25, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.60, 0.15, 0.75),
    "cyan": (0.10, 0.80, 0.85),
}
#: Background colours (RGB in [0, 1]).
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "grey": (0.5, 0.5, 0.5),
}
#: Shape kinds. Squares are axis-aligned, triangles upright and isosceles (base = height = size).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

IMAGE_SIZE = 64
"""Side of the rendered images (pixels)."""

MAX_SHAPES = 2
SINGLE_SIZE_RANGE = (18.0, 30.0)
"""Size (diameter / side, pixels at 64 px) of the shape of a one-object scene."""
PAIR_SIZE_RANGE = (13.0, 21.0)
"""Size of each shape of a two-object scene."""
MARGIN = 2.0
"""Minimum distance (pixels) between a shape's bounding box and the image border."""
GAP = 4.0
"""Minimum gap (pixels) between the bounding boxes of the two shapes of a scene."""


@dataclass(frozen=True)
class Shape:
    """One object of a scene. Positions and sizes are in pixels of a ``IMAGE_SIZE`` image.

    Args:
        kind: one of :data:`SHAPES`.
        colour: one of :data:`COLOURS`.
        size: diameter of a circle, side of a square, base (= height) of a triangle.
        x: horizontal centre of the bounding box (0 = left edge).
        y: vertical centre of the bounding box (0 = top edge).
    """

    kind: str
    colour: str
    size: float
    x: float
    y: float


@dataclass(frozen=True)
class Scene:
    """A scene: one or two :class:`Shape` of distinct colours (left to right) on a background colour."""

    shapes: tuple[Shape, ...]
    background: str


# --------------------------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------------------------


def caption(scene: Scene) -> str:
    """The caption of a scene: ``"a {colour} {shape}[ and a {colour} {shape}] on a {background} background"``."""
    objects = " and ".join(f"a {s.colour} {s.kind}" for s in scene.shapes)
    return f"{objects} on a {scene.background} background"


_OBJECT = rf"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_CAPTION_RE = re.compile(rf"^{_OBJECT}(?: and {_OBJECT})? on a ({'|'.join(BACKGROUNDS)}) background$")


def parse_caption(text: str) -> tuple[list[tuple[str, str]], str]:
    """Parse a caption of the world into ``([(colour, kind), ...], background)``.

    Leading/trailing whitespace, case and a final full stop are ignored. Raises ``ValueError`` on any text outside
    the grammar (also on two objects of the same colour, which the world never renders).
    """
    match = _CAPTION_RE.match(text.strip().lower().rstrip("."))
    if match is None:
        raise ValueError(
            f"not a caption of the world: {text!r}; expected 'a {{colour}} {{shape}}[ and a {{colour}} {{shape}}] "
            f"on a {{background}} background' with colours {list(COLOURS)}, shapes {list(SHAPES)}, "
            f"backgrounds {list(BACKGROUNDS)}"
        )
    c1, k1, c2, k2, background = match.groups()
    objects = [(c1, k1)] + ([(c2, k2)] if c2 is not None else [])
    if c2 is not None and c1 == c2:
        raise ValueError(f"caption {text!r} names two objects of the same colour; the world never renders that")
    return objects, background


def all_captions() -> list[str]:
    """Every caption of the world (864), in a fixed order: one-object captions, then two-object captions."""
    singles = [(c, k) for c in COLOURS for k in SHAPES]
    captions = [f"a {c} {k} on a {b} background" for b in BACKGROUNDS for c, k in singles]
    for b in BACKGROUNDS:
        for c1, k1 in singles:
            for c2, k2 in singles:
                if c1 != c2:
                    captions.append(f"a {c1} {k1} and a {c2} {k2} on a {b} background")
    return captions


def split_captions(seed: int = 0, heldout_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """Split :func:`all_captions` into ``(train, heldout)`` lists by a seeded permutation (each list keeps the
    order of :func:`all_captions`). The shipped model was pretrained on the train captions only."""
    captions = all_captions()
    order = np.random.default_rng(seed).permutation(len(captions))
    n_heldout = int(round(heldout_fraction * len(captions)))
    heldout = set(order[:n_heldout].tolist())
    train = [c for i, c in enumerate(captions) if i not in heldout]
    return train, [c for i, c in enumerate(captions) if i in heldout]


def write_prompt_files(directory: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``world_train.txt`` and ``world_heldout.txt`` (one prompt per line) into ``directory``."""
    directory = Path(directory)
    train, heldout = split_captions(seed)
    paths = directory / "world_train.txt", directory / "world_heldout.txt"
    for path, prompts in zip(paths, (train, heldout)):
        path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return paths


# --------------------------------------------------------------------------------------------------------------------
# Sampling scenes
# --------------------------------------------------------------------------------------------------------------------


def sample_scene(rng: np.random.Generator, caption_text: str | None = None, image_size: int = IMAGE_SIZE) -> Scene:
    """Draw a random scene; a pure function of the state of ``rng``.

    With ``caption_text`` the colours, kinds and background are the caption's and only sizes and positions are
    drawn (the caption's objects are placed left to right in the order named).
    """
    if caption_text is None:
        n = int(rng.integers(1, MAX_SHAPES + 1))
        colours = [list(COLOURS)[i] for i in rng.choice(len(COLOURS), size=n, replace=False)]
        kinds = [SHAPES[i] for i in rng.integers(len(SHAPES), size=n)]
        background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
        objects = list(zip(colours, kinds))
    else:
        objects, background = parse_caption(caption_text)
    scale = image_size / IMAGE_SIZE
    low, high = SINGLE_SIZE_RANGE if len(objects) == 1 else PAIR_SIZE_RANGE
    while True:
        sizes = rng.uniform(low, high, size=len(objects)) * scale
        xs = np.array([rng.uniform(s / 2 + MARGIN, image_size - s / 2 - MARGIN) for s in sizes])
        ys = np.array([rng.uniform(s / 2 + MARGIN, image_size - s / 2 - MARGIN) for s in sizes])
        if len(objects) == 1:
            break
        reach = (sizes[0] + sizes[1]) / 2 + GAP * scale
        # Distinct x centres keep "left to right" well defined.
        if (abs(xs[0] - xs[1]) >= reach or abs(ys[0] - ys[1]) >= reach) and abs(xs[0] - xs[1]) >= 1.0:
            break
    order = np.argsort(xs, kind="stable")
    if caption_text is not None:
        # Keep the caption's order: its first object gets the leftmost position.
        xs, ys_sorted = xs[order], ys[order]
        sizes_sorted = sizes[order]
        shapes = tuple(
            Shape(kind=k, colour=c, size=float(s), x=float(x), y=float(y))
            for (c, k), s, x, y in zip(objects, sizes_sorted, xs, ys_sorted)
        )
    else:
        shapes = tuple(
            Shape(kind=objects[i][1], colour=objects[i][0], size=float(sizes[i]), x=float(xs[i]), y=float(ys[i]))
            for i in order
        )
    return Scene(shapes=shapes, background=background)


def sample_scenes(
    count: int, seed: int, captions: Sequence[str] | None = None, image_size: int = IMAGE_SIZE
) -> list[Scene]:
    """``count`` scenes from ``seed``. With ``captions``, each scene's caption is drawn uniformly from that list
    (e.g. the train split), otherwise scenes are drawn from the whole world."""
    rng = np.random.default_rng(seed)
    if captions is None:
        return [sample_scene(rng, image_size=image_size) for _ in range(count)]
    picks = rng.integers(len(captions), size=count)
    return [sample_scene(rng, captions[i], image_size=image_size) for i in picks]


# --------------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------------

_KIND_INDEX = {k: i for i, k in enumerate(SHAPES)}


def render(scenes: Sequence[Scene], image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """Render scenes into float32 images ``[B, 3, image_size, image_size]`` in ``[0, 1]``.

    Vectorised over the batch: each shape slot's coverage of every pixel comes from the shape's signed distance
    at the pixel centre, ``clamp(0.5 - distance, 0, 1)`` (a one-pixel anti-aliased edge), and the slots are
    composited over the background in order. Scenes are in pixels of ``image_size`` images (see
    :func:`sample_scene`). Deterministic: the same scenes give bit-identical pixels.
    """
    batch = len(scenes)
    kind = np.full((batch, MAX_SHAPES), -1, dtype=np.int64)
    colour = np.zeros((batch, MAX_SHAPES, 3), dtype=np.float32)
    geometry = np.zeros((batch, MAX_SHAPES, 3), dtype=np.float32)  # x, y, half size
    background = np.array([BACKGROUNDS[s.background] for s in scenes], dtype=np.float32).reshape(batch, 3, 1, 1)
    for b, scene in enumerate(scenes):
        for k, shape in enumerate(scene.shapes):
            kind[b, k] = _KIND_INDEX[shape.kind]
            colour[b, k] = COLOURS[shape.colour]
            geometry[b, k] = (shape.x, shape.y, shape.size / 2)
    kind_t, colour_t, geometry_t = torch.from_numpy(kind), torch.from_numpy(colour), torch.from_numpy(geometry)

    centres = torch.arange(image_size, dtype=torch.float32) + 0.5  # pixel centres, in pixels
    image = torch.from_numpy(background).expand(batch, 3, image_size, image_size)
    for s in range(MAX_SHAPES):
        x, y, r = (geometry_t[:, s, i].view(batch, 1, 1) for i in range(3))
        dx = (centres.view(1, 1, image_size) - x).abs()  # [B, 1, W]
        dy = centres.view(1, image_size, 1) - y  # [B, H, 1]
        k = kind_t[:, s].view(batch, 1, 1)
        circle = torch.sqrt(dx * dx + dy * dy) - r
        square = torch.maximum(dx, dy.abs()) - r
        triangle = torch.maximum(dy - r, (2 * dx - dy - r) / 5**0.5)  # upright: apex (0, -r), base at dy = r
        distance = torch.where(k == 0, circle, torch.where(k == 1, square, triangle))  # [B, H, W]
        alpha = ((0.5 - distance).clamp(0, 1) * (k >= 0)).unsqueeze(1)  # [B, 1, H, W]
        image = image + alpha * (colour_t[:, s].view(batch, 3, 1, 1) - image)
    return image.contiguous()


def render_captions(
    captions: Sequence[str], seed: int, image_size: int = IMAGE_SIZE
) -> tuple[torch.Tensor, list[Scene]]:
    """Render one random scene per caption (sizes and positions from ``seed``). Returns ``(images, scenes)``."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, c, image_size=image_size) for c in captions]
    return render(scenes, image_size=image_size), scenes
