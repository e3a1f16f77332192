"""scripts/gpu_bench.sh (the GPU measurement of `ddpo bench`) runs end to end at toy size on the CPU, and the SD 1.5
architecture it builds from the published configs has the published parameter counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_sd15_architecture_matches_the_published_parameter_counts():
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ddpo.models.stable_diffusion import SD15_TEXT_ENCODER, SD15_UNET, SD15_VAE
    from world.pipeline import CLIP_TEXT_IDS

    with init_empty_weights():
        modules = (
            UNet2DConditionModel(**SD15_UNET),
            AutoencoderKL(**SD15_VAE),
            CLIPTextModel(CLIPTextConfig(**CLIP_TEXT_IDS, **SD15_TEXT_ENCODER)),
        )
    counts = [sum(p.numel() for p in m.parameters()) for m in modules]
    assert counts == [859_520_964, 83_653_863, 123_060_480]  # runwayml / stable-diffusion-v1-5 unet, vae, text


def test_gpu_bench_script_runs_at_toy_size(tmp_path):
    env = {**os.environ, "DDPO_SKIP_INSTALL": "1", "OUT": str(tmp_path)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # python3 of this environment
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_bench.sh"), "--toy"], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    config = result["config"]
    assert config["sample"]["num_steps"] == 4 and config["model"]["pretrained"] == "tiny"
    ours, reference = result["ours"], result["reference"]
    # Both modes trained the same epoch at the run's resolution (16 px, not the UNet's native size): 2 images x 4
    # steps = 8 pairs, all in one optimiser step (2 pairs x 4 accumulated), with the same gradient and update. (The
    # loss is 0 in both: two samples' normalised advantages are +1 and -1 and every ratio is 1.)
    assert ours["optimizer_steps"] == reference["optimizer_steps"] == 1
    assert result["max_abs_loss_difference"] == abs(ours["loss"] - reference["loss"]) < 1e-4
    assert ours["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-3) and ours["grad_norm"] > 0
    assert result["weight_update_difference"] < 1e-2
    assert result["ratio_total"] == ours["total_seconds"] / reference["total_seconds"]
    assert ours["pairs_per_second"] == 8 / ours["training_seconds"]
    mfu = result["mfu"]
    # The counted FLOPs of a pair are at least one multiply-add (2 FLOPs) of every UNet weight matrix or kernel per
    # CFG row (2 rows a pair: guidance 5) in the forward pass alone.
    assert mfu["training_flops_per_pair"] >= 2 * 2 * _unet_weights()
    assert mfu["training_tflops"] == mfu["training_flops_per_pair"] * ours["pairs_per_second"] / 1e12
    assert mfu["training_mfu"] == mfu["training_tflops"] / mfu["peak_matmul_tflops"]
    assert "model-FLOPs utilisation" in (tmp_path / "gpu_bench.txt").read_text()


def _unet_weights() -> int:
    """Entries of the tiny UNet's weight matrices and convolution kernels (biases and norms left out)."""
    from ddpo.models import load_model

    _, family = load_model("tiny")
    return sum(p.numel() for p in family.denoiser().parameters() if p.ndim >= 2)
