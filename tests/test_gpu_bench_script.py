"""scripts/gpu_bench.sh (the GPU measurement of `ddpo bench`) runs end to end at toy size on the CPU, and the SD 1.5
architecture it builds from the published configs has the published parameter counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
    assert result["config"]["sample"]["num_steps"] == 4 and result["config"]["model"]["pretrained"] == "tiny"
    assert result["ratio_total"] > 0 and result["max_abs_loss_difference"] < 1e-4
    mfu = result["mfu"]
    assert mfu["training_flops_per_pair"] > 0 and mfu["peak_matmul_tflops"] > 0
    assert abs(mfu["training_mfu"] - mfu["training_tflops"] / mfu["peak_matmul_tflops"]) < 1e-12
    assert "model-FLOPs utilisation" in (tmp_path / "gpu_bench.txt").read_text()
