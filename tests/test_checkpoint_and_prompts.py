"""Atomic checkpoints and prompt sets."""

from __future__ import annotations

import pytest
import torch

from ddpo.training import checkpoint
from ddpo.training.prompts import available_prompt_sets, draw_prompts, load_prompts


def _write(folder, epoch, value, keep=2):
    tmp = checkpoint.begin(folder)
    checkpoint.write_payload(tmp, {"w": torch.full((3,), float(value))}, {"state": {}, "param_groups": []}, None)
    checkpoint.write_json(tmp / "rng_0.json", checkpoint.rng_state())
    return checkpoint.commit(tmp, folder, epoch, {"epoch": epoch}, keep=keep)


def test_a_crash_while_writing_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    _write(folder, 1, 1.0)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    tmp = checkpoint.begin(folder)
    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.write_payload(tmp, {"w": torch.zeros(3)}, {}, None)
    monkeypatch.undo()
    # The half-written folder is invisible to resume; the previous checkpoint loads unchanged.
    assert checkpoint.latest(folder).name == "checkpoint_000001"
    assert torch.equal(checkpoint.load(checkpoint.latest(folder))["trainable"]["w"], torch.ones(3))
    # The next complete write cleans the debris up and prunes to the newest `keep`.
    _write(folder, 2, 2.0)
    _write(folder, 3, 3.0)
    assert [p.name for p in checkpoint.list_checkpoints(folder)] == ["checkpoint_000002", "checkpoint_000003"]
    assert not list(folder.glob(".tmp-*"))


def test_rng_state_round_trips():
    import random

    import numpy as np

    state = checkpoint.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    checkpoint.set_rng_state(state)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def test_prompt_sets_and_files(tmp_path):
    assert {"simple_animals", "imagenet_animals"} <= set(available_prompt_sets())
    animals = load_prompts("simple_animals")
    assert 40 <= len(animals) <= 60 and "cat" in animals
    assert len(load_prompts("imagenet_animals")) > 200
    path = tmp_path / "p.txt"
    path.write_text("# comment\n a red fox \n\nan owl\n")
    assert load_prompts(str(path)) == ["a red fox", "an owl"]
    with pytest.raises(ValueError, match="neither a file nor a shipped prompt set"):
        load_prompts(str(tmp_path / "nope.txt"))


def test_prompt_draws_are_a_pure_function_of_seed_epoch_batch_process():
    prompts = [f"p{i}" for i in range(100)]
    a = draw_prompts(prompts, 8, 2, seed=0, epoch=3, batch=1, process=0)
    assert a == draw_prompts(prompts, 8, 2, seed=0, epoch=3, batch=1, process=0)
    assert a[0::2] == a[1::2]  # samples_per_prompt = 2: each drawn prompt repeated
    others = [draw_prompts(prompts, 8, 2, 0, 3, 1, 1), draw_prompts(prompts, 8, 2, 0, 4, 1, 0)]
    assert all(o != a for o in others)
