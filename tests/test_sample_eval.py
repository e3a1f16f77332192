"""``ddpo sample`` and ``ddpo eval`` on a tiny real pipeline, against plain diffusers called image by image, and the
load code printed at the end of a run."""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from PIL import Image

from ddpo.cli import main
from ddpo.models import add_lora, load_code, lora_state_dict

STEPS = 2


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished run directory made by hand: config.yaml naming the tiny base model and a final/ LoRA whose B
    matrices are non-zero (so the fine-tuned images differ from the base's)."""
    run = tmp_path_factory.mktemp("lora_run") / "run"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    add_lora(pipe.unet, 4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    StableDiffusionPipeline.save_lora_weights(run / "final", unet_lora_layers=lora_state_dict(pipe.unet))
    config = {
        "prompts": "simple_animals",
        "eval_prompts": "simple_animals",
        "model": {"pretrained": str(tiny_model_dir), "revision": None, "use_lora": True},
        "sample": {"scheduler": "ddim", "num_steps": STEPS, "eta": 1.0, "guidance_scale": 5.0, "negative_prompt": ""},
        "reward": {"name": "brightness", "options": {}},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


@functools.lru_cache(maxsize=4)
def plain_pipeline(model_dir: Path, lora: Path | None) -> StableDiffusionPipeline:
    from diffusers import DDIMScheduler

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(lora)
    return pipe


def plain_diffusers(model_dir: Path, prompt: str, seed: int, lora: Path | None = None) -> Image.Image:
    """One image, alone in its batch, through StableDiffusionPipeline.__call__ with the DDIM scheduler."""
    pipe = plain_pipeline(model_dir, lora)
    generator = torch.Generator().manual_seed(seed)
    out = pipe(prompt, generator=generator, num_inference_steps=STEPS, guidance_scale=5.0, eta=1.0)
    return out.images[0]  # PIL


def luma(image: Image.Image) -> float:
    """Mean Rec. 709 luma of an 8-bit image, in [0, 1] (the brightness reward, by hand)."""
    rgb = np.asarray(image, dtype=np.float64) / 255.0
    return float((rgb @ np.array([0.2126, 0.7152, 0.0722])).mean())


def test_sample_writes_each_image_as_plain_diffusers_draws_it_alone(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "samples"
    args = ["sample", "--model", str(tiny_model_dir), "--prompt", "a cat", "--prompt", "a dog", "--seeds", "3", "7"]
    assert main([*args, "--steps", str(STEPS), "--batch-size", "3", "--out", str(out)]) == 0
    names = sorted(p.name for p in out.glob("0*.png"))
    assert names == ["0000_seed3.png", "0001_seed7.png", "0002_seed3.png", "0003_seed7.png"]
    table = (out / "prompts.tsv").read_text().splitlines()[1:]
    assert [line.split("\t")[2] for line in table] == ["a cat", "a cat", "a dog", "a dog"]
    # Image 2 (a dog, seed 3) was drawn in a batch of 3 with others; alone in plain diffusers it is the same image.
    reference = np.asarray(plain_diffusers(tiny_model_dir, "a dog", 3), dtype=np.int16)
    ours = np.asarray(Image.open(out / "0002_seed3.png"), dtype=np.int16)
    assert ours.shape == reference.shape == (16, 16, 3)
    assert np.abs(ours - reference).max() <= 1  # 8-bit rounding
    assert Image.open(out / "grid.png").size == (2 * 16, 2 * 16)  # one column per seed
    assert "4 images" in capsys.readouterr().out


def test_sample_from_a_run_loads_its_base_and_final(lora_run, tiny_model_dir, tmp_path):
    out = tmp_path / "from_run"
    assert main(["sample", "--run", str(lora_run), "--prompt", "a cat", "--seeds", "5", "--out", str(out)]) == 0
    ours = np.asarray(Image.open(out / "0000_seed5.png"), dtype=np.int16)
    after = np.asarray(plain_diffusers(tiny_model_dir, "a cat", 5, lora_run / "final"), dtype=np.int16)
    before = np.asarray(plain_diffusers(tiny_model_dir, "a cat", 5), dtype=np.int16)
    assert np.abs(ours - after).max() <= 1
    assert np.abs(before - after).max() > 5  # the LoRA changes the image: the comparison above can fail


def test_eval_scores_base_and_run_on_the_same_noise(lora_run, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["eval", str(lora_run), "--prompt", "a cat", "--prompt", "a red bird", "--seeds", "0", "1"]
    assert main([*args, "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert [(r["prompt"], r["seed"]) for r in rows] == [
        ("a cat", "0"),
        ("a cat", "1"),
        ("a red bird", "0"),
        ("a red bird", "1"),
    ]
    # Every image has its own noise: the two prompts do not share x_T under a seed.
    noise = [int(r["noise_seed"]) for r in rows]
    assert len(set(noise)) == 4
    # Independent reference: each image drawn alone by plain diffusers from its noise seed (base, then base + final/),
    # luma by hand.
    for row in rows:
        prompt, seed = row["prompt"], int(row["noise_seed"])
        before = luma(plain_diffusers(tiny_model_dir, prompt, seed))
        after = luma(plain_diffusers(tiny_model_dir, prompt, seed, lora_run / "final"))
        assert float(row["before"]) == pytest.approx(before, abs=3e-3)  # 8-bit rounding of the reference
        assert float(row["after"]) == pytest.approx(after, abs=3e-3)
    diff = np.array([float(r["after"]) - float(r["before"]) for r in rows])
    assert np.abs(diff).max() > 3e-4  # the LoRA changes the scores
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 4 and summary["prompts"] == 2 and summary["reward"] == "brightness"
    assert summary["change"] == pytest.approx(diff.mean(), abs=1e-6)
    # The standard error is over prompts (each prompt's mean change over its seeds), by hand:
    per_prompt = diff.reshape(2, 2).mean(1)
    assert summary["change_se"] == pytest.approx(per_prompt.std(ddof=1) / np.sqrt(2), rel=1e-4)
    printed = capsys.readouterr().out
    assert f"paired change {summary['change']:+.4f} +- {summary['change_se']:.2g}" in printed
    assert Image.open(out / "before_after.png").size == (4 * 16, 2 * 16)  # base row above fine-tuned row


def test_eval_noise_of_a_prompt_and_seed_is_the_same_in_every_evaluation(lora_run, tmp_path):
    """The noise of (prompt, seed) depends on nothing else: not on the other prompts, their order or the count."""
    rows = {}
    for name, prompts in [("two", ["a cat", "a red bird"]), ("one", ["a red bird"])]:
        args = ["eval", str(lora_run), *[x for p in prompts for x in ("--prompt", p)], "--seeds", "0", "3"]
        assert main([*args, "--out", str(tmp_path / name)]) == 0
        rows[name] = [
            {k: v for k, v in r.items() if k != "index"}
            for r in csv.DictReader((tmp_path / name / "scores.csv").open())
        ]
    assert rows["one"] == [r for r in rows["two"] if r["prompt"] == "a red bird"]


def test_eval_noise_seeds_of_a_repeated_prompt_differ():
    """A prompt listed twice (``--count`` beyond the set cycles it) gets new noise the second time, and the seeds are
    a function of (prompt, seed, repeat) alone."""
    from ddpo.tools.sample import noise_seeds
    from ddpo.training.evaluation import image_noise_seed

    seeds = noise_seeds(["a", "b", "a", "a"], [0, 0, 0, 1])
    assert len(set(seeds)) == 4
    assert seeds == [
        image_noise_seed(0, "a"),
        image_noise_seed(0, "b"),
        image_noise_seed(0, "a", 1),
        image_noise_seed(1, "a"),
    ]
    assert image_noise_seed(0, "a") != image_noise_seed(1, "a") != image_noise_seed(0, "b")


def test_clustered_change_is_over_prompts():
    from ddpo.training.evaluation import clustered_change

    before = [0.0, 1.0, 0.5, 0.5, 0.0, 0.0]
    after = [1.0, 1.0, 0.5, 1.5, 0.0, 0.3]
    prompts = ["x", "x", "y", "y", "z", "z"]
    # by hand: per-prompt mean changes 0.5, 0.5, 0.15; mean 0.38333; sample std 0.202073; se 0.116667
    mean, se = clustered_change(before, after, prompts)
    assert mean == pytest.approx(0.383333333, abs=1e-8)
    assert se == pytest.approx(0.2020725942 / 3**0.5, abs=1e-8)
    assert clustered_change([0.0, 1.0], [1.0, 1.0], ["x", "x"]) is None


def test_eval_reports_each_component_of_a_weighted_reward(lora_run, tmp_path):
    out = tmp_path / "eval"
    components = "{components: {brightness: 1.0, contrast: 2.0}}"
    args = ["eval", str(lora_run), "--prompt", "a cat", "--seeds", "0", "1", "2", "--out", str(out)]
    assert main([*args, "--reward", "weighted", "--reward-options", components]) == 0
    rows = list(csv.DictReader((out / "scores.csv").open()))
    for row in rows:
        for which in ("before", "after"):
            total = float(row[f"brightness_{which}"]) + 2.0 * float(row[f"contrast_{which}"])
            assert float(row[which]) == pytest.approx(total, abs=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    brightness = np.mean([float(r["brightness_after"]) for r in rows])
    assert summary["component/brightness"]["after"] == pytest.approx(brightness, abs=1e-6)


@pytest.mark.parametrize(
    "args, message",
    [
        (["sample", "--prompt", "a cat"], "give a base model (--model"),
        (["sample", "--model", "tiny"], "no prompts: give --prompt"),
        (["eval", "nowhere", "--prompt", "x"], "nowhere is not a run directory"),
        (["sample", "--model", "tiny", "--prompt", "a", "--prompts", "simple_animals"], "not both"),
    ],
)
def test_sample_and_eval_bad_input_is_named(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_load_code_runs_and_loads_the_lora(lora_run, tiny_model_dir):
    code = load_code(str(tiny_model_dir), lora_run / "final")
    assert str(Path(tiny_model_dir).resolve()) in code and str((lora_run / "final").resolve()) in code
    namespace: dict = {}
    exec(code, namespace)
    pipe = namespace["pipe"]
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())


def test_sample_uses_the_runs_sampler_or_the_one_asked_for(lora_run, tiny_model_dir, tmp_path):
    """A run trained with dpmsolver++ is sampled with DPM-Solver++ (not the DDIM the pipeline is loaded with), as
    plain diffusers draws with DPMSolverMultistepScheduler; --scheduler ddim draws it with DDIM."""
    from diffusers import DPMSolverMultistepScheduler

    run = tmp_path / "dpm_run"
    run.mkdir()
    (run / "final").symlink_to(lora_run / "final")
    config = yaml.safe_load((lora_run / "config.yaml").read_text())
    config["sample"].update(scheduler="dpmsolver++", eta=0.0, guidance_scale=1.0)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lora_run / "final")
    out = pipe("a cat", generator=torch.Generator().manual_seed(5), num_inference_steps=STEPS, guidance_scale=1.0)
    reference = np.asarray(out.images[0], dtype=np.int16)
    images = {}
    for name, extra in (("run", []), ("ddim", ["--scheduler", "ddim"])):
        folder = tmp_path / name
        args = ["sample", "--run", str(run), "--prompt", "a cat", "--seeds", "5", "--out", str(folder), *extra]
        assert main(args) == 0
        images[name] = np.asarray(Image.open(folder / "0000_seed5.png"), dtype=np.int16)
    assert np.abs(images["run"] - reference).max() <= 1
    assert np.abs(images["ddim"] - reference).max() > 5  # DDIM eta 0 draws another image: the check above can fail
