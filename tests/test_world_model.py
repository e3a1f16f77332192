"""The shipped pretrained world model and world CLIP: they load offline with plain diffusers / open_clip, sample
images of the right shape, and carry what they learnt (the CLIP ranks true captions first; the pipeline's
samples beat a prompt-ignoring baseline on the verifiable reward)."""

import json
import math

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

import world
from ddpo.cli import main
from ddpo.training.runlog import read_jsonl
from rewards.world import WorldReward


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(str(world.world_model_path()))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_files_are_safetensors_and_small():
    path = world.world_model_path()
    files = [f for f in path.rglob("*") if f.is_file()]
    assert (path / "model_index.json").is_file()
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    assert {f.parent.name for f in files if f.suffix == ".safetensors"} == {"unet", "vae", "text_encoder"}
    assert sum(f.stat().st_size for f in files) < 25e6
    index = json.loads((path / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["_class_name"] == "StableDiffusionPipeline"


def test_pipeline_config_matches_the_code_and_sd_scheduler(pipe):
    fresh = world.build_world_pipeline()
    for name in ("unet", "vae", "text_encoder"):
        shipped, built = getattr(pipe, name), getattr(fresh, name)
        assert [p.shape for p in shipped.parameters()] == [p.shape for p in built.parameters()], name
    scheduler = pipe.scheduler.config
    assert (scheduler.beta_start, scheduler.beta_end, scheduler.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert scheduler.set_alpha_to_one is False and scheduler.steps_offset == 1 and scheduler.clip_sample is False
    assert pipe.unet.config.sample_size == 16 and pipe.vae_scale_factor == 4
    assert pipe.tokenizer("a red circle").input_ids == world.build_world_pipeline().tokenizer("a red circle").input_ids


def test_samples_have_the_right_shape(pipe):
    prompts = ["a red circle on a white background", "a blue square and a yellow triangle on a black background"]
    out = pipe(
        prompts, num_inference_steps=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="pt"
    ).images
    assert out.shape == (2, 3, 64, 64) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_samples_follow_their_prompts_better_than_chance(pipe):
    _, heldout = world.split_captions()
    rng = np.random.default_rng(0)
    prompts = [heldout[i] for i in rng.integers(len(heldout), size=16)]
    images = pipe(
        prompts,
        num_inference_steps=20,
        guidance_scale=5.0,
        eta=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    reward = WorldReward()
    matched = reward(images, prompts).mean().item()
    matched_info = reward.last_info()
    shuffled = reward(images, prompts[1:] + prompts[:1]).mean().item()
    print(f"world reward: matched prompts {matched:.3f}, shifted prompts {shuffled:.3f}, {matched_info}")
    assert matched > shuffled + 0.1


def test_world_clip_loads_and_ranks_true_captions_first():
    import open_clip

    model, tokenizer, normalize = world.load_world_clip()
    config_path, weights_path = world.world_clip_paths()
    assert json.loads(config_path.read_text()) == world.WORLD_CLIP_CONFIG
    shipped = load_file(str(weights_path))
    state = model.state_dict()
    assert all(torch.equal(state[k], v.float()) for k, v in shipped.items())  # trained weights, not a random init
    assert world.WORLD_CLIP_NAME in open_clip.list_models()

    _, heldout = world.split_captions()
    captions = heldout[:24]
    images, _ = world.render_captions(captions, seed=0)
    with torch.no_grad():
        image_features = torch.nn.functional.normalize(model.encode_image(normalize(images)), dim=-1)
        text_features = torch.nn.functional.normalize(model.encode_text(tokenizer(captions)), dim=-1)
    similarity = image_features @ text_features.T  # [24 images, 24 captions]
    top1 = (similarity.argmax(1) == torch.arange(len(captions))).float().mean().item()
    assert top1 >= 0.6, top1
    # Against a caption that changes one colour of the scene, the true caption wins for nearly every image.
    wrong = []
    for caption in captions:
        objects, background = world.parse_caption(caption)
        other = next(c for c in world.COLOURS if c not in {colour for colour, _ in objects})
        wrong.append(caption.replace(f"a {objects[0][0]} ", f"a {other} ", 1))
    with torch.no_grad():
        wrong_features = torch.nn.functional.normalize(model.encode_text(tokenizer(wrong)), dim=-1)
    wins = (similarity.diagonal() > (image_features * wrong_features).sum(-1)).float().mean().item()
    assert wins >= 0.9, wins


@pytest.mark.parametrize(
    "preset", ["world", "world_ddpo", "world_long", "world_compressibility", "world_clip", "world_discriminator"]
)
def test_world_presets_train_an_epoch_on_the_shipped_model(preset, tmp_path):
    """Each shipped world preset runs as configured (reward options, held-out evaluation) on the shipped model; only
    the sizes are cut down so it takes seconds."""
    small = ["num_epochs=1", "sample.num_steps=3", "sample.batch_size=4", "sample.num_batches_per_epoch=1"]
    small += ["sample.samples_per_prompt=2", "train.batch_size=4", "train.gradient_accumulation_steps=1"]
    small += ["eval_samples=4", f"output_dir={tmp_path}", "run_name=run"]
    assert main(["train", "--preset", preset, *small]) == 0
    run = tmp_path / "run"
    metrics, evals = read_jsonl(run / "metrics.jsonl"), read_jsonl(run / "eval.jsonl")
    assert len(metrics) == 1 and [e["epoch"] for e in evals] == [0, 1]
    assert all(math.isfinite(m) for m in (metrics[0]["reward_mean"], metrics[0]["loss"], evals[1]["reward_mean"]))
