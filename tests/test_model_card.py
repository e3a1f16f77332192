"""The model card of ``final/``: hub front matter that huggingface_hub parses, and figures taken from the run's files."""

from __future__ import annotations

import json
import math

from huggingface_hub import ModelCard
from PIL import Image

from ddpo.training.config import build_config
from ddpo.training.model_card import AFTER_IMAGE, BEFORE_IMAGE, hub_base_model, write_model_card


def _run_files(run, before: list[float], after: list[float]) -> None:
    (run / "samples").mkdir(parents=True)
    metrics = [{"epoch": e, "samples": 64, "reward_mean": 0.5} for e in range(3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    evals = [
        {"epoch": 0, "samples": len(before), "reward_mean": sum(before) / 4, "reward/w_colour_mean": 0.25,
         "rewards": before},
        {"epoch": 3, "samples": len(after), "reward_mean": sum(after) / 4, "reward/w_colour_mean": 0.75,
         "rewards": after},
    ]  # fmt: skip
    (run / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    for epoch, colour in ((0, "red"), (3, "blue")):
        Image.new("RGB", (8, 8), colour).save(run / "samples" / f"eval_epoch_{epoch:04d}.png")


def test_card_front_matter_and_figures_come_from_the_run(tmp_path):
    """The card parses as a hub model card (library diffusers, LoRA and family tags, a hub base model), reports the
    samples seen and the paired held-out change with its standard error computed by hand, and carries the first and
    last held-out grids beside it."""
    run, final = tmp_path / "run", tmp_path / "final"
    final.mkdir()
    before, after = [0.0, 0.5, 0.5, 1.0], [0.5, 0.5, 1.0, 1.0]
    _run_files(run, before, after)
    config = build_config(preset="tiny", overrides=["model.pretrained=owner/base-model"])
    card_path = write_model_card(final, run, config, "sd", "world", "nft")

    card = ModelCard.load(card_path)
    assert card.data.library_name == "diffusers"
    assert card.data.base_model == "owner/base-model"
    assert {"lora", "stable-diffusion", "ddpo", "text-to-image"} <= set(card.data.tags)
    assert card.data.get("license") is None  # left to the user
    diffs = [a - b for a, b in zip(after, before)]  # 0.5, 0, 0.5, 0
    mean = sum(diffs) / 4
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3 / 4)
    assert f"Paired change {mean:+.4f} ± {se:.4f}" in card.text
    assert "Samples seen: 192 (3 epochs)" in card.text
    assert "| w_colour | 0.2500 | 0.7500 |" in card.text
    assert 'pipe.load_lora_weights("USER/NAME")' in card.text
    assert "StableDiffusionPipeline.from_pretrained('owner/base-model', safety_checker=None)" in card.text
    assert Image.open(final / BEFORE_IMAGE).getpixel((0, 0)) == (255, 0, 0)
    assert Image.open(final / AFTER_IMAGE).getpixel((0, 0)) == (0, 0, 255)


def test_card_without_evaluations_or_hub_base_says_so(tmp_path):
    """A run without held-out evaluations gets a card that says there is no before/after; a local or shipped base
    model is not put in ``base_model`` (the hub links only hub ids)."""
    run, final = tmp_path / "run", tmp_path / "final"
    final.mkdir()
    (run / "samples").mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "samples": 8, "reward_mean": 0.1}) + "\n")
    config = build_config(preset="tiny", overrides=["model.use_lora=false"])
    card = ModelCard.load(write_model_card(final, run, config, "sd", "jpeg_compressibility", "ddpo_is"))
    assert card.data.get("base_model") is None
    assert "lora" not in card.data.tags
    assert "no before/after" in card.text
    assert not (final / BEFORE_IMAGE).exists()
    assert hub_base_model("world") is None and hub_base_model(str(tmp_path)) is None
    assert hub_base_model("stabilityai/stable-diffusion-2-1") == "stabilityai/stable-diffusion-2-1"
