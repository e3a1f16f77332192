"""scripts/pretrain_world.py, cut down to a few steps per phase: every phase runs, the result loads with plain
diffusers / open_clip, and the phases run as separate processes, with the UNet resumed from its checkpoint, end
bit for bit where one uninterrupted process does (the shipped model was built as 1000 UNet steps resumed to 1600)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--vae-steps", "3", "--vae-batch", "2",
    "--decoder-steps", "2", "--decoder-batch", "2",
    "--clip-steps", "2", "--clip-batch", "4",
    "--scale-images", "32", "--batch", "2", "--eval-samples", "16", "--save-every", "1",
]  # fmt: skip
WEIGHTS = [
    "world_model/unet/diffusion_pytorch_model.safetensors",
    "world_model/text_encoder/model.safetensors",
    "world_model/vae/diffusion_pytorch_model.safetensors",
    "world_clip/open_clip_model.safetensors",
]


def pretrain(out: Path, work: Path, *args: str) -> None:
    cmd = [sys.executable, str(ROOT / "scripts" / "pretrain_world.py"), "--out", str(out), "--work", str(work)]
    result = subprocess.run([*cmd, *SMALL, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def assert_same_weights(a: Path, b: Path) -> None:
    for name in WEIGHTS:
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys(), name
        for key in wa:
            assert wa[key].equal(wb[key]), f"{name}: {key} differs"


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, Path]:
    """Every phase in one process: UNet steps 0-4, then the evaluation."""
    root = tmp_path_factory.mktemp("straight")
    pretrain(root / "out", root / "work", "--unet-steps", "4")
    return root / "out", root / "work"


def test_every_phase_writes_a_loadable_model_and_an_evaluation(straight):
    """The saved folders load with plain diffusers / open_clip; the VAE's scaling factor gives latents of unit
    variance on renders it never saw; the evaluation's numbers are the ``world`` reward of its saved samples (the
    grid, re-read from the PNG and re-scored here) on its held-out prompts, and its chance level the same samples
    against the prompts shifted by one."""
    out, work = straight
    import torch
    from torchvision.io import read_image

    import world
    from rewards.world import WorldReward

    pipe = world.load_world_pipeline(out / "world_model")  # plain diffusers from_pretrained on the folder
    images = world.render(world.sample_scenes(32, 12345)) * 2 - 1
    with torch.no_grad():
        latents = pipe.vae.encode(images).latent_dist.mean
    assert abs((latents * pipe.vae.config.scaling_factor).std().item() - 1) < 0.1
    world.load_world_clip(out / "world_clip" / "open_clip_model.safetensors")

    result = json.loads((work / "eval.json").read_text())
    assert result["samples"] == 16
    prompts = (work / "eval_prompts.txt").read_text().splitlines()
    train, heldout = world.split_captions(0)
    assert len(prompts) == 16 and set(prompts) <= set(heldout) and not set(prompts) & set(train)
    grid = read_image(str(work / "eval_samples.png")).float() / 255  # save_image: 8 a row, 2 px padding
    size = world.IMAGE_SIZE
    tiles = [grid[:, 2 + r * (size + 2) :, 2 + c * (size + 2) :][:, :size, :size] for r in range(2) for c in range(8)]
    reward = WorldReward()
    scores = reward(torch.stack(tiles), prompts)
    assert result["reward/world_mean"] == pytest.approx(scores.mean().item(), abs=1e-6)
    for key, value in reward.last_info().items():
        assert result[key] == pytest.approx(value, abs=1e-6), key
    reward(torch.stack(tiles), prompts[1:] + prompts[:1])
    for key, value in reward.last_info().items():
        assert result[f"chance_shifted/{key.split('/')[1]}"] == pytest.approx(value, abs=1e-6), key
    assert (work / "vae_recon.png").exists()


def test_two_processes_and_a_resume_rebuild_the_same_weights(straight, tmp_path):
    """The schedule of scripts/pretrain_world_all.sh at small scale, in two processes: vae, then UNet steps 0-2 with
    the VAE as the vae phase left it (the decoder phase has not run yet: it freezes the encoder, so the latents must
    not change); then decoder + clip, and the UNet resumed from its checkpoint to step 4 and saved with the decoder's
    VAE. Within the warm-up (the first 100-200 steps) the learning rate does not depend on the total, so this must
    equal the straight run bit for bit."""
    out, work = tmp_path / "out", tmp_path / "work"
    pretrain(out, work, "--phases", "vae,unet", "--unet-steps", "2")
    pretrain(out, work, "--phases", "decoder,clip,unet", "--unet-steps", "4")
    assert_same_weights(out, straight[0])
