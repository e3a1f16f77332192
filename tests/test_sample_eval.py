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


# ---------------------------------------------------------------------------------------------------------------------
# bad sampler options and output folders are refused before any model loads, by the rules of `ddpo train`
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_pipeline_loads(monkeypatch):
    """Fail the test if any pipeline is read: the error must come before the expensive part."""

    def refuse(cls, *args, **kwargs):
        raise AssertionError(f"a pipeline was loaded: {args}")

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", classmethod(refuse))


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ddpo: error: ") and "Traceback" not in err, err
    return err[len("ddpo: error: ") :].rstrip("\n")


@pytest.mark.parametrize(
    "flag, value, key",
    [
        ("--eta", "5", "sample.eta"),
        ("--eta", "nan", "sample.eta"),
        ("--eta", "inf", "sample.eta"),
        ("--guidance", "nan", "sample.guidance_scale"),
        ("--guidance", "inf", "sample.guidance_scale"),
        ("--guidance", "0.5", "sample.guidance_scale"),
    ],
)
def test_sample_and_eval_refuse_the_eta_and_guidance_train_refuses(
    flag, value, key, tiny_model_dir, lora_run, no_pipeline_loads, capsys
):
    """`ddpo sample --eta 5` drew black images where `ddpo train` refuses eta > 1, and `--guidance nan` turned CFG off:
    the same rule now refuses both, with train's message (the flag in place of the key), before a model loads."""
    from ddpo.training.config import ConfigError, build_config

    with pytest.raises(ConfigError) as train_error:
        build_config(preset="tiny", overrides=[f"{key}={value}"])
    expected = str(train_error.value).replace(key, flag)
    assert main(["sample", "--model", str(tiny_model_dir), "--prompt", "a", flag, value]) == 2
    assert _one_error_line(capsys) == expected
    assert main(["eval", str(lora_run), "--prompt", "a", flag, value]) == 2
    assert _one_error_line(capsys) == expected


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "--steps must be at least 1; got 0"),
        (["--batch-size", "0"], "--batch-size must be at least 1; got 0"),
        (["--scheduler", "heun2"], "--scheduler 'heun2' is not a sampler"),
        (["--seeds", str(2**64)], f"--seeds must be integers in [-2**63, 2**64) (torch.Generator's); got {2**64}"),
    ],
)
def test_sample_options_are_checked_before_the_model_loads(args, message, tiny_model_dir, no_pipeline_loads, capsys):
    assert main(["sample", "--model", str(tiny_model_dir), "--prompt", "a", *args]) == 2
    assert message in _one_error_line(capsys)


def _out_cases(tmp_path: Path) -> list[tuple[Path, str]]:
    a_file = tmp_path / "file.txt"
    a_file.write_text("")
    return [
        (a_file, f"--out {a_file} is a file, not a folder"),
        (a_file / "out", f"--out {a_file / 'out'} would be under {a_file}, which is a file, not a folder"),
        (Path("/sys/ddpo-samples"), "cannot write --out /sys/ddpo-samples"),
    ]


def test_a_bad_out_is_found_before_the_model_loads(tiny_model_dir, lora_run, tmp_path, no_pipeline_loads, capsys):
    """A bad --out was found only after every image was sampled (and, for eval, scored)."""
    for out, message in _out_cases(tmp_path):
        assert main(["sample", "--model", str(tiny_model_dir), "--prompt", "a", "--out", str(out)]) == 2
        assert message in _one_error_line(capsys)
        assert main(["eval", str(lora_run), "--prompt", "a", "--out", str(out)]) == 2
        assert message in _one_error_line(capsys)
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # the check leaves nothing behind


@pytest.mark.parametrize(
    "args, message",
    [
        (["--count", "0"], "--count must be at least 1; got 0"),
        (["--pass-at", "0"], "--pass-at takes one or more k >= 1"),
        (["--pass-at", "4", "--seeds", "1", "2"], "--pass-at 4 needs at least 4 samples per prompt"),
        (["--steps", "-3"], "--steps must be at least 1; got -3"),
    ],
)
def test_eval_arguments_are_checked_before_the_reward_and_the_model(
    args, message, lora_run, no_pipeline_loads, monkeypatch, capsys
):
    import rewards

    def no_reward(*a, **k):
        raise AssertionError("the reward was built before the arguments were checked")

    monkeypatch.setattr(rewards, "get_reward", no_reward)
    assert main(["eval", str(lora_run), "--prompts", "simple_animals", *args]) == 2
    assert message in _one_error_line(capsys)


# ---------------------------------------------------------------------------------------------------------------------
# `ddpo eval` of a run samples with the run's sampler and scores with the run's trained reward
# ---------------------------------------------------------------------------------------------------------------------


def _plain_images(model_dir: Path, lora: Path | None, scheduler, prompts: list[str], seeds: list[int], **call):
    """Each image alone through plain StableDiffusionPipeline.__call__ with ``scheduler``'s class, float in [0, 1]."""
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(lora)
    images = []
    for prompt, seed in zip(prompts, seeds):
        generator = torch.Generator().manual_seed(seed)
        images.append(pipe(prompt, generator=generator, output_type="pt", **call).images.float())
    return torch.cat(images)


def test_eval_of_a_ddpm_run_samples_with_ddpm(lora_run, tiny_model_dir, tmp_path):
    """A run trained with sample.scheduler=ddpm is evaluated (base and run) with diffusers' DDPMScheduler, as plain
    diffusers draws it; DDIM (what the pipeline loads with) draws other images."""
    from diffusers import DDIMScheduler, DDPMScheduler

    run = tmp_path / "ddpm_run"
    run.mkdir()
    (run / "final").symlink_to(lora_run / "final")
    config = yaml.safe_load((lora_run / "config.yaml").read_text())
    config["sample"].update(scheduler="ddpm", eta=1.0)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "eval"
    assert main(["eval", str(run), "--prompt", "a cat", "--prompt", "a dog", "--seeds", "0", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "scores.csv").open()))
    prompts, seeds = [r["prompt"] for r in rows], [int(r["noise_seed"]) for r in rows]
    call = {"num_inference_steps": STEPS, "guidance_scale": 5.0}
    from rewards import get_reward

    brightness = get_reward("brightness")
    for which, lora in (("before", None), ("after", lora_run / "final")):
        reference = brightness(_plain_images(tiny_model_dir, lora, DDPMScheduler, prompts, seeds, **call), prompts)
        ddim = brightness(_plain_images(tiny_model_dir, lora, DDIMScheduler, prompts, seeds, eta=1.0, **call), prompts)
        ours = torch.tensor([float(r[which]) for r in rows])
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)  # measured: 6e-8
        # DDIM with eta 1 is the DDPM posterior but for the last step (measured: 1.5e-5 apart): the check can fail.
        assert (ours - ddim).abs().max() > 5e-6


DISCRIMINATOR = (
    "{reference_images: world, image_size: 16, channels: 8, depth: 2, steps_per_epoch: 10, batch_size: 4, "
    "learning_rate: 0.01}"
)


def test_eval_scores_with_the_runs_trained_discriminator(fast_overrides, tiny_model_dir, tmp_path, capsys):
    """A `discriminator` run's reward is trained during the run; `ddpo eval RUN` scores with that trained state (the
    reward.pt of the run's last checkpoint, written with final/), not with a freshly initialised discriminator.
    Independent reference: the reward built by hand, its saved state loaded with torch.load, scoring the images plain
    diffusers draws with the run's sampler. `ddpo report` scores its before/after samples the same way."""
    from diffusers import DDIMScheduler

    import rewards

    train = ["train", "--preset", "tiny", *fast_overrides, "num_epochs=1", "reward.name=discriminator"]
    assert main([*train, f"reward.options={DISCRIMINATOR}"]) == 0
    run = tmp_path / "runs" / "run"
    out = tmp_path / "eval"
    prompts = ["--prompt", "a cat", "--prompt", "a dog"]
    assert main(["eval", str(run), *prompts, "--seeds", "0", "1", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "scores.csv").open()))
    prompts, seeds = [r["prompt"] for r in rows], [int(r["noise_seed"]) for r in rows]
    config = yaml.safe_load((run / "config.yaml").read_text())
    trained = rewards.get_reward("discriminator", **config["reward"]["options"])
    state = torch.load(run / "checkpoints" / "checkpoint_000001" / "reward.pt", weights_only=True)
    trained.load_state_dict(state)
    assert state["updates"] == 10
    fresh = rewards.get_reward("discriminator", **config["reward"]["options"])
    s = config["sample"]
    call = {"num_inference_steps": s["num_steps"], "guidance_scale": s["guidance_scale"], "eta": s["eta"]}
    for which, lora in (("before", None), ("after", run / "final")):
        images = _plain_images(tiny_model_dir, lora, DDIMScheduler, prompts, seeds, **call)
        ours = torch.tensor([float(r[which]) for r in rows])
        with torch.no_grad():
            torch.testing.assert_close(ours, trained(images, prompts), rtol=0, atol=1e-5)
            assert (ours - fresh(images, prompts)).abs().max() > 0.05  # an untrained one scores otherwise
    # `ddpo report`'s before/after samples are scored with the same trained state.
    from ddpo.tools.report import load_run, sample_before_after

    result = sample_before_after(load_run(run), ["a cat"], seeds=[3])
    with torch.no_grad():
        assert result.after_rewards == pytest.approx(trained(result.after, ["a cat"]).tolist(), abs=1e-6)
    # Without the checkpoint written with final/, the trained state is gone: one clear line, not an untrained score.
    (run / "checkpoints" / "checkpoint_000001" / "reward.pt").write_bytes(b"damaged")
    capsys.readouterr()
    assert main(["eval", str(run), "--prompt", "a cat", "--out", str(tmp_path / "eval2")]) == 2
    assert "is trained during the run, so it is scored with its trained state, which cannot be read" in (
        _one_error_line(capsys)
    )


def test_eval_and_sample_of_a_run_draw_at_its_resolution(lora_run, tiny_model_dir, tmp_path):
    """A run trained at sample.resolution (the flow presets: 512 px on 1024-px models) is sampled at that size, as
    plain diffusers draws it with height=width=resolution, not at the pipeline's native size."""
    from diffusers import DDIMScheduler

    run = tmp_path / "run_32px"
    run.mkdir()
    (run / "final").symlink_to(lora_run / "final")
    config = yaml.safe_load((lora_run / "config.yaml").read_text())
    config["sample"]["resolution"] = 32  # the tiny model's native size is 16
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "eval"
    assert main(["eval", str(run), "--prompt", "a cat", "--seeds", "0", "--out", str(out)]) == 0
    assert Image.open(out / "before_after.png").size == (32, 2 * 32)
    (row,) = csv.DictReader((out / "scores.csv").open())
    call = {"num_inference_steps": STEPS, "guidance_scale": 5.0, "eta": 1.0, "height": 32, "width": 32}
    seeds = [int(row["noise_seed"])]
    images = _plain_images(tiny_model_dir, lora_run / "final", DDIMScheduler, ["a cat"], seeds, **call)
    from rewards import get_reward

    assert float(row["after"]) == pytest.approx(get_reward("brightness")(images, ["a cat"]).item(), abs=1e-6)
    assert main(["sample", "--run", str(run), "--prompt", "a cat", "--out", str(tmp_path / "samples")]) == 0
    assert Image.open(tmp_path / "samples" / "0000_seed0.png").size == (32, 32)


def test_eval_of_a_flow_run_calls_the_pipeline_with_its_ode(fast_overrides, tmp_path):
    """A flow-matching run (trained with the flow_sde SDE) is evaluated as docs/commands.md says: its family's
    pipeline class (StableDiffusion3Pipeline) with the pipeline's own FlowMatchEulerDiscreteScheduler (the ODE, no
    eta), CFG at the run's guidance_scale, at the run's resolution; `ddpo report` draws its before/after the same way."""
    from diffusers import StableDiffusion3Pipeline

    from ddpo.models import load_pipeline
    from ddpo.tools.report import load_run, sample_before_after
    from rewards import get_reward

    flow = ["model.pretrained=tiny_sd3", "sample.scheduler=flow_sde", "sample.eta=0.7", "sample.resolution=32"]
    assert main(["train", "--preset", "tiny", *fast_overrides, *flow, "num_epochs=1", "reward.name=brightness"]) == 0
    run = tmp_path / "runs" / "run"
    out = tmp_path / "eval"
    assert main(["eval", str(run), "--prompt", "a cat", "--seeds", "0", "--out", str(out)]) == 0
    (row,) = csv.DictReader((out / "scores.csv").open())
    pipe = load_pipeline("tiny_sd3", None, "flow_euler")  # the random-weight test model, as the run loaded it
    assert type(pipe) is StableDiffusion3Pipeline and type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(run / "final")
    s = yaml.safe_load((run / "config.yaml").read_text())["sample"]
    generator = torch.Generator().manual_seed(int(row["noise_seed"]))
    call = {"num_inference_steps": s["num_steps"], "guidance_scale": s["guidance_scale"], "height": 32, "width": 32}
    image = pipe("a cat", generator=generator, output_type="pt", **call).images.float()
    assert float(row["after"]) == pytest.approx(get_reward("brightness")(image, ["a cat"]).item(), abs=1e-5)
    result = sample_before_after(load_run(run), ["a cat"], seeds=[0])
    assert result.after.shape[-2:] == (32, 32) and len(result.after_rewards) == 1
