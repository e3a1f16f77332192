"""Scoring time of every reward per 64 images, with tiny open_clip backbones (no downloads).

    python scripts/bench_rewards.py                      # 64 images of 512 px, CPU
    python scripts/bench_rewards.py --resolution 64 --device cuda --dtype bfloat16

The CLIP rewards use a registered tiny open_clip config (random weights saved to a temporary checkpoint and loaded
through the rewards' local-checkpoint option); ``aesthetic`` uses the real LAION head file when ../shared/fixtures
is present (else a random head in the same format). Times are for scoring as the trainer does it (under
``torch.no_grad``), median over ``--repeats`` calls after one warm-up call; ``discriminator update`` is one
:meth:`update` with its default 10 steps. The tiny backbones measure the reward code, not ViT-L/14: the real
aesthetic and CLIP models are orders of magnitude heavier.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rewards  # noqa: E402
from rewards._clip import register_tiny_open_clip_config  # noqa: E402
from rewards.aesthetic import HEAD_FILENAME, AestheticHead  # noqa: E402

SHARED_HEAD = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "laion-aesthetic" / HEAD_FILENAME


def _tiny_checkpoint(directory: Path, name: str, embed_dim: int, image_size: int) -> str:
    import open_clip

    register_tiny_open_clip_config(directory, name, embed_dim=embed_dim, image_size=image_size, patch_size=16)
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    path = directory / f"{name}.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def build_rewards(directory: Path, clip_size: int, dtype: str, device: str | None) -> dict[str, rewards.Reward]:
    """Every registered reward (plus a weighted combination), with tiny backbones."""
    aesthetic_ckpt = _tiny_checkpoint(directory, "bench-tiny-clip-768", 768, clip_size)
    clip_ckpt = _tiny_checkpoint(directory, "bench-tiny-clip-64", 64, clip_size)
    head_path = SHARED_HEAD
    if not head_path.is_file():
        head_path = directory / HEAD_FILENAME
        torch.save(AestheticHead().state_dict(), head_path)
    generator = torch.Generator().manual_seed(0)
    reference = torch.rand(64, 3, 64, 64, generator=generator)
    model_options = {"dtype": dtype, "device": device}
    built = {
        "aesthetic": rewards.get_reward(
            "aesthetic",
            clip_model="bench-tiny-clip-768",
            clip_pretrained=aesthetic_ckpt,
            head_path=str(head_path),
            **model_options,
        ),
        "clip_score": rewards.get_reward(
            "clip_score", model="bench-tiny-clip-64", pretrained=clip_ckpt, **model_options
        ),
        "discriminator": rewards.get_reward("discriminator", reference_images=reference, device=device),
        "jpeg_compressibility": rewards.get_reward("jpeg_compressibility"),
        "jpeg_incompressibility": rewards.get_reward("jpeg_incompressibility"),
        "brightness": rewards.get_reward("brightness"),
        "contrast": rewards.get_reward("contrast"),
        "saturation": rewards.get_reward("saturation"),
        "colorfulness": rewards.get_reward("colorfulness"),
        "target_color": rewards.get_reward("target_color", color="red"),
        "weighted (jpeg 1 + brightness 0.5)": rewards.get_reward(
            "weighted", components={"jpeg_compressibility": 1.0, "brightness": 0.5}
        ),
    }
    missing = set(rewards.available()) - set(built) - {"weighted"}
    if missing:
        print(f"note: not benchmarked (no bench setup): {sorted(missing)}", file=sys.stderr)
    return built


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: lazy device placement, tokenizer caches, kernel selection
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64, help="images per scoring call (default 64)")
    parser.add_argument("--resolution", type=int, default=512, help="side of the square input images (default 512)")
    parser.add_argument("--clip-size", type=int, default=224, help="input size of the tiny CLIP backbones")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="precision of the CLIP backbones")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    images = torch.rand(
        args.batch_size, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(1)
    )
    images = images.to(device)
    prompts = [f"a photo of object number {i % 8}" for i in range(args.batch_size)]

    with tempfile.TemporaryDirectory() as tmp:
        built = build_rewards(Path(tmp), args.clip_size, args.dtype, args.device)
        rows = []
        with torch.no_grad():
            for name, reward in built.items():
                seconds = time_call(lambda reward=reward: reward(images, prompts), device, args.repeats)
                rows.append((name, seconds))
        update_seconds = time_call(lambda: built["discriminator"].update(images, prompts), device, args.repeats)
        rows.append(("discriminator update (10 steps, batch 16+16)", update_seconds))

    print(
        f"\nreward scoring time, {args.batch_size} images of {args.resolution}x{args.resolution}, device {device}, "
        f"backbone dtype {args.dtype}, torch threads {torch.get_num_threads()}, tiny CLIP backbones at "
        f"{args.clip_size} px, median of {args.repeats}\n"
    )
    print(f"| reward | seconds per {args.batch_size} images | images / s |")
    print("|---|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.4f} | {args.batch_size / seconds:,.0f} |")


if __name__ == "__main__":
    main()
