"""The procedural world: determinism, pixels against hand-computed ground truth, captions and prompt sets."""

from pathlib import Path

import numpy as np
import pytest
import torch

import world
from world import BACKGROUNDS, COLOURS, Scene, Shape

PROMPTS = Path(__file__).resolve().parents[1] / "prompts"


def test_same_seed_same_pixels_and_captions_different_seed_differs():
    a = world.sample_scenes(64, seed=7)
    b = world.sample_scenes(64, seed=7)
    c = world.sample_scenes(64, seed=8)
    assert a == b
    assert torch.equal(world.render(a), world.render(b))
    assert [world.caption(s) for s in a] == [world.caption(s) for s in b]
    assert [world.caption(s) for s in a] != [world.caption(s) for s in c]
    assert not torch.equal(world.render(a), world.render(c))


def test_render_shape_range_and_ground_truth_pixels():
    scene = Scene(
        shapes=(
            Shape("circle", "red", size=20, x=16, y=16),
            Shape("square", "blue", size=16, x=48, y=16),
        ),
        background="grey",
    )
    tri = Scene(shapes=(Shape("triangle", "yellow", size=24, x=32, y=40),), background="black")
    images = world.render([scene, tri])
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1

    def px(i: int, y: int, x: int) -> tuple[float, ...]:
        return tuple(round(v, 4) for v in images[i, :, y, x].tolist())

    red, blue, yellow = (tuple(round(v, 4) for v in COLOURS[c]) for c in ("red", "blue", "yellow"))
    grey, black = (tuple(round(v, 4) for v in BACKGROUNDS[c]) for c in ("grey", "black"))
    assert px(0, 16, 16) == red  # circle centre
    assert px(0, 16 - 8, 16 - 8) == grey  # inside the circle's bounding box corner, outside the circle (r = 10)
    assert px(0, 9, 41) == blue  # square corner region (square spans 40..56)
    assert px(0, 40, 32) == grey and px(0, 63, 0) == grey
    assert px(1, 50, 21) == yellow  # near the bottom-left of the triangle's base (spans x 20..44, y 28..52)
    assert px(1, 30, 21) == black  # top-left of the bounding box: outside the upright triangle
    assert px(1, 30, 32) == yellow  # just below the apex


def test_scenes_fit_the_image_and_do_not_overlap():
    for scene in world.sample_scenes(500, seed=3):
        assert 1 <= len(scene.shapes) <= 2
        assert len({s.colour for s in scene.shapes}) == len(scene.shapes)
        for s in scene.shapes:
            assert s.size / 2 + world.MARGIN - 1e-6 <= s.x <= 64 - s.size / 2 - world.MARGIN + 1e-6
            assert s.size / 2 + world.MARGIN - 1e-6 <= s.y <= 64 - s.size / 2 - world.MARGIN + 1e-6
        if len(scene.shapes) == 2:
            a, b = scene.shapes
            reach = (a.size + b.size) / 2 + world.GAP
            assert abs(a.x - b.x) >= reach - 1e-6 or abs(a.y - b.y) >= reach - 1e-6
            assert a.x < b.x  # captions list objects left to right


def test_captions_round_trip_and_parse_errors():
    captions = world.all_captions()
    assert len(captions) == len(set(captions)) == 3 * (18 + 18 * 15)
    rng = np.random.default_rng(0)
    for text in captions[::7]:
        objects, background = world.parse_caption(text)
        scene = world.sample_scene(rng, text)
        assert world.caption(scene) == text
        assert [(s.colour, s.kind) for s in scene.shapes] == objects and scene.background == background
    assert world.parse_caption(" A Red Circle on a white background. ") == ([("red", "circle")], "white")
    for bad in [
        "a red circle",
        "a pink circle on a white background",
        "a red circle and a red square on a black background",
        "",
    ]:
        with pytest.raises(ValueError):
            world.parse_caption(bad)


def test_prompt_split_is_fixed_disjoint_and_shipped():
    train, heldout = world.split_captions()
    assert (train, heldout) == world.split_captions()
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(world.all_captions())
    assert 0.15 < len(heldout) / len(world.all_captions()) < 0.25
    assert (PROMPTS / "world_train.txt").read_text().splitlines() == train
    assert (PROMPTS / "world_heldout.txt").read_text().splitlines() == heldout


def test_render_batches_of_any_size_match_one_by_one():
    """Rendering is vectorised over the batch; speed is measured by ``scripts/bench_world.py``, not here."""
    scenes = world.sample_scenes(200, seed=0)
    images = world.render(scenes)
    assert images.shape == (200, 3, 64, 64)
    for k in (0, 57, 199):
        assert torch.equal(images[k], world.render([scenes[k]])[0])
