"""A tiny offline preference dataset of the procedural world, in Pick-a-Pic's layout, for ``train.algorithm=dpo``.

Each pair is one caption of the world with two renders: the **preferred** image is a scene of the caption; the
**rejected** one is a scene of a caption that contradicts it in one respect, drawn at random: an object's colour
(another colour not in the scene), an object's shape, the count (an object added or left out) or the background.
Which of the two is ``jpg_0`` is drawn too, so ``label_0`` is 1 or 0 about equally often. ``--ties`` further rows
hold two renders of the same caption with ``label_0 = 0.5`` (a tie, which training leaves out, as Diffusion-DPO
does).

Written to ``OUT``: ``metadata.jsonl`` (one row a pair: ``caption``, ``jpg_0``, ``jpg_1``, ``label_0``, and
``rejected_caption``, the contradicting caption, or the caption itself for a tie; training reads only the first
four) and the PNG images ``NNN_0.png`` / ``NNN_1.png`` at the world's 64 px. Deterministic: the same ``--seed``
writes the same bytes. The fixture ``tests/data/world_prefs/`` is::

    python scripts/make_world_preferences.py --out tests/data/world_prefs --pairs 32 --ties 4 --seed 0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from world import BACKGROUNDS, COLOURS, SHAPES, parse_caption, render, sample_scene, split_captions  # noqa: E402

CONTRADICTIONS = ("colour", "shape", "count", "background")


def caption_of(objects: list[tuple[str, str]], background: str) -> str:
    """The world's caption of ``[(colour, kind), ...]`` on ``background``."""
    return " and ".join(f"a {colour} {kind}" for colour, kind in objects) + f" on a {background} background"


def contradicting_caption(text: str, rng: np.random.Generator) -> tuple[str, str]:
    """``(caption, what)``: a caption of the world that contradicts ``text`` in one respect ``what`` (one of
    :data:`CONTRADICTIONS`), drawn with ``rng``."""
    objects, background = parse_caption(text)
    what = CONTRADICTIONS[int(rng.integers(len(CONTRADICTIONS)))]
    k = int(rng.integers(len(objects)))
    unused = [c for c in COLOURS if c not in {colour for colour, _ in objects}]
    if what == "colour":
        objects[k] = (unused[int(rng.integers(len(unused)))], objects[k][1])
    elif what == "shape":
        others = [s for s in SHAPES if s != objects[k][1]]
        objects[k] = (objects[k][0], others[int(rng.integers(len(others)))])
    elif what == "count" and len(objects) == 2:
        del objects[k]
    elif what == "count":
        objects.append((unused[int(rng.integers(len(unused)))], SHAPES[int(rng.integers(len(SHAPES)))]))
    else:
        others = [b for b in BACKGROUNDS if b != background]
        background = others[int(rng.integers(len(others)))]
    return caption_of(objects, background), what


def png_bytes(image) -> bytes:
    """A ``[3, H, W]`` float image in ``[0, 1]`` as PNG bytes (8-bit RGB)."""
    import io

    from PIL import Image

    pixels = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def make_world_preferences(out: Path, pairs: int, ties: int, seed: int) -> list[dict]:
    """Write the dataset (see the module docstring) into ``out``; returns its rows."""
    rng = np.random.default_rng(seed)
    train, _ = split_captions()  # the captions the shipped model was pretrained on
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in range(pairs + ties):
        text = train[int(rng.integers(len(train)))]
        tie = n >= pairs
        other, what = (text, "tie") if tie else contradicting_caption(text, rng)
        scenes = [sample_scene(rng, text), sample_scene(rng, other)]
        first_preferred = bool(rng.integers(2))
        if not first_preferred:
            scenes.reverse()
        images = render(scenes)
        names = [f"{n:03d}_0.png", f"{n:03d}_1.png"]
        for name, image in zip(names, images):
            (out / name).write_bytes(png_bytes(image))
        label = 0.5 if tie else (1.0 if first_preferred else 0.0)
        rows.append(
            {"caption": text, "jpg_0": names[0], "jpg_1": names[1], "label_0": label, "rejected_caption": other,
             "contradiction": what}
        )  # fmt: skip
    (out / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write metadata.jsonl and the images into")
    parser.add_argument("--pairs", type=int, default=32, help="pairs with a preference (default 32)")
    parser.add_argument("--ties", type=int, default=4, help="further rows with label_0 = 0.5 (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every draw (default 0)")
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.ties < 0:
        parser.error(f"--pairs must be >= 1 and --ties >= 0; got {args.pairs} and {args.ties}")
    rows = make_world_preferences(args.out, args.pairs, args.ties, args.seed)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {len(rows)} rows ({args.pairs} pairs, {args.ties} ties) to {args.out} ({size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
