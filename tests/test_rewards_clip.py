"""CLIP-based rewards (aesthetic, clip_score) on real, tiny open_clip models and the real LAION aesthetic head file.

The tiny models are registered open_clip configs with random weights, saved to a checkpoint file and loaded back
through each reward's local-checkpoint option: the real loading path, no mocks.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transform import image_transform
from PIL import Image
from safetensors.torch import save_file
from torch import nn

import rewards
from rewards._clip import preprocess_images, register_tiny_open_clip_config
from rewards.aesthetic import HEAD_FILENAME, HEAD_SHA256, AestheticReward, load_aesthetic_head

SHARED = Path(__file__).resolve().parents[2] / "shared"
HEAD_FILE = SHARED / "fixtures" / "laion-aesthetic" / HEAD_FILENAME
needs_head = pytest.mark.skipif(
    not HEAD_FILE.is_file(), reason=f"aesthetic head fixture not found at {HEAD_FILE} (../shared is absent)"
)

TINY_768 = "ddpo-test-tiny-clip-768"
TINY_64 = "ddpo-test-tiny-clip-64"


def _save_random_checkpoint(name: str, path: Path, seed: int, fmt: str) -> Path:
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Register two tiny open_clip configs and save random weights for each (safetensors and torch formats)."""
    directory = tmp_path_factory.mktemp("tiny_open_clip")
    register_tiny_open_clip_config(directory, TINY_768, embed_dim=768)
    register_tiny_open_clip_config(directory, TINY_64, embed_dim=64)
    return {
        TINY_768: _save_random_checkpoint(TINY_768, directory / "tiny768.safetensors", 1, "safetensors"),
        TINY_64: _save_random_checkpoint(TINY_64, directory / "tiny64.pt", 2, "torch"),
    }


def _smooth_images(batch: int, height: int, width: int, seed: int = 0, low: float = 0.0, high: float = 1.0):
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 6, 6, generator=generator) * (high - low) + low
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)


def _reference_model(name: str, checkpoint: Path, quick_gelu: bool = False) -> nn.Module:
    """The same weights loaded with open_clip's plain API, independently of the reward code."""
    model = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu)
    if checkpoint.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(checkpoint))
    else:
        state = torch.load(checkpoint, weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def _offline(monkeypatch) -> None:
    """Make any hub download fail at once (huggingface_hub reads HF_HUB_OFFLINE at import time)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# -- preprocessing ---------------------------------------------------------------------------------------------------


def test_preprocess_matches_open_clip_eval_transform_on_tensors():
    """Same numbers as open_clip's own eval transform (torchvision Resize/CenterCrop/Normalize) on a tensor."""
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    transform = image_transform(32, is_train=False, mean=mean, std=std, interpolation="bicubic")
    cfg = {"size": (32, 32), "mean": mean, "std": std, "interpolation": "bicubic", "resize_mode": "shortest"}
    for height, width in [(48, 80), (80, 48), (32, 32), (20, 28)]:
        images = _smooth_images(2, height, width, low=0.25, high=0.75)  # no bicubic overshoot past [0, 1]
        expected = torch.stack([transform(image) for image in images])
        out = preprocess_images(images, cfg)
        assert out.shape == (2, 3, 32, 32)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_preprocess_close_to_open_clip_pil_pipeline():
    """Close to the PIL pipeline the CLIP models were trained with (8-bit image, PIL bicubic resize)."""
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    transform = image_transform(32, is_train=False, mean=mean, std=std, interpolation="bicubic")
    cfg = {"size": (32, 32), "mean": mean, "std": std, "interpolation": "bicubic", "resize_mode": "shortest"}
    images = (_smooth_images(1, 96, 128, seed=3) * 255).round() / 255
    pil = Image.fromarray((images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    expected = transform(pil)[None]
    out = preprocess_images(images, cfg)
    assert (out - expected).abs().max() < 0.03  # ~2/255 in pixel units: PIL's and torch's bicubic kernels differ


# -- aesthetic -------------------------------------------------------------------------------------------------------


@needs_head
def test_aesthetic_head_file_loads_into_reference_layers():
    assert hashlib.sha256(HEAD_FILE.read_bytes()).hexdigest() == HEAD_SHA256
    state = torch.load(HEAD_FILE, map_location="cpu", weights_only=True)
    assert sorted(state) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    # Hand-built reference of the published architecture (dropouts are identity in eval mode).
    reference = nn.Sequential(
        nn.Linear(768, 1024), nn.Identity(), nn.Linear(1024, 128), nn.Identity(), nn.Linear(128, 64), nn.Identity()
    )
    reference.append(nn.Linear(64, 16))
    reference.append(nn.Linear(16, 1))
    reference.load_state_dict({key.removeprefix("layers."): value for key, value in state.items()})
    head = load_aesthetic_head(HEAD_FILE)
    assert not any(p.requires_grad for p in head.parameters())
    embeddings = torch.nn.functional.normalize(torch.randn(5, 768, generator=torch.Generator().manual_seed(0)), dim=-1)
    torch.testing.assert_close(head(embeddings), reference(embeddings))
    # A scale sanity check of the real weights: unit-norm inputs give scores of the published order (1..10).
    assert head(embeddings).abs().max() < 20


def test_aesthetic_head_loader_rejects_other_files(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"weight": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="not a LAION aesthetic head"):
        load_aesthetic_head(bad)
    with pytest.raises(FileNotFoundError, match="head_path"):
        load_aesthetic_head(tmp_path / "missing.pth")


@needs_head
def test_aesthetic_reward_matches_independent_computation(tiny_checkpoints):
    checkpoint = tiny_checkpoints[TINY_768]
    reward = rewards.get_reward(
        "aesthetic", clip_model=TINY_768, clip_pretrained=str(checkpoint), head_path=str(HEAD_FILE)
    )
    assert reward.name == "aesthetic"
    images = _smooth_images(3, 48, 64, seed=1, low=0.2, high=0.8)
    scores = reward(images, ["a", "b", "c"])
    assert scores.shape == (3,) and scores.dtype == torch.float32

    # Independent path: open_clip's own loading and eval transform, the hand-built head.
    model = _reference_model(TINY_768, checkpoint, quick_gelu=True)  # OpenAI CLIP's activation, the default
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    transform = image_transform(32, is_train=False, mean=mean, std=std, interpolation="bicubic")
    state = torch.load(HEAD_FILE, map_location="cpu", weights_only=True)
    weights = [(state[f"layers.{i}.weight"], state[f"layers.{i}.bias"]) for i in (0, 2, 4, 6, 7)]
    with torch.no_grad():
        embeddings = model.encode_image(torch.stack([transform(image) for image in images]))
        x = embeddings / embeddings.norm(dim=-1, keepdim=True)
        for weight, bias in weights:
            x = x @ weight.T + bias
    torch.testing.assert_close(scores, x.squeeze(-1), atol=1e-4, rtol=1e-4)
    # The weights really came from the checkpoint (not a fresh random init).
    torch.testing.assert_close(reward.model.visual.conv1.weight, model.visual.conv1.weight)


@needs_head
def test_aesthetic_reward_is_differentiable_and_runs_in_bfloat16(tiny_checkpoints):
    checkpoint = str(tiny_checkpoints[TINY_768])
    reward = AestheticReward(clip_model=TINY_768, clip_pretrained=checkpoint, head_path=str(HEAD_FILE))
    images = _smooth_images(2, 40, 40, seed=2).requires_grad_()
    reward(images, ["x", "y"]).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert not any(p.grad is not None for p in reward.model.parameters())

    low = AestheticReward(clip_model=TINY_768, clip_pretrained=checkpoint, head_path=str(HEAD_FILE), dtype="bfloat16")
    out = low(images.detach(), ["x", "y"])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert next(low.model.parameters()).dtype == torch.bfloat16


@needs_head
def test_aesthetic_rejects_backbone_with_wrong_embedding_size(tiny_checkpoints):
    with pytest.raises(ValueError, match="768"):
        AestheticReward(clip_model=TINY_64, clip_pretrained=str(tiny_checkpoints[TINY_64]), head_path=str(HEAD_FILE))


def test_aesthetic_offline_without_cached_head_names_file_and_option(tmp_path, monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(FileNotFoundError) as info:
        rewards.get_reward("aesthetic", cache_dir=str(tmp_path))
    message = str(info.value)
    assert HEAD_FILENAME in message and "head_path" in message and str(tmp_path) in message


@needs_head
def test_aesthetic_offline_backbone_error_names_model_and_option(monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(FileNotFoundError) as info:
        rewards.get_reward("aesthetic", head_path=str(HEAD_FILE))  # default ViT-L-14 / openai, not cached
    message = str(info.value)
    assert "ViT-L-14" in message and "'openai'" in message and "clip_pretrained" in message
    assert "timm/vit_large_patch14_clip_224.openai" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no download stack trace chained


def test_unknown_tag_or_missing_checkpoint_is_a_clear_error(tiny_checkpoints, tmp_path):
    with pytest.raises(ValueError, match="neither an open_clip pretrained tag"):
        rewards.get_reward("clip_score", model=TINY_64, pretrained=str(tmp_path / "nowhere.safetensors"))
    with pytest.raises(ValueError, match="unknown open_clip model"):
        rewards.get_reward("clip_score", model="no-such-model", pretrained="openai")


# -- clip_score ------------------------------------------------------------------------------------------------------


def test_clip_score_matches_independent_computation(tiny_checkpoints):
    checkpoint = tiny_checkpoints[TINY_64]
    reward = rewards.get_reward("clip_score", model=TINY_64, pretrained=str(checkpoint), scale=2.5)
    images = _smooth_images(4, 32, 48, seed=4, low=0.2, high=0.8)
    prompts = ["a red cat", "a blue dog", "a red cat", "a green tree"]
    scores = reward(images, prompts)
    assert scores.shape == (4,) and scores.dtype == torch.float32

    model = _reference_model(TINY_64, checkpoint)
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    transform = image_transform(32, is_train=False, mean=mean, std=std, interpolation="bicubic")
    tokenizer = open_clip.get_tokenizer(TINY_64)
    with torch.no_grad():
        image_features = model.encode_image(torch.stack([transform(image) for image in images]))
        text_features = model.encode_text(tokenizer(prompts))
    expected = 2.5 * torch.nn.functional.cosine_similarity(image_features, text_features, dim=-1)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)

    # Text embeddings are cached per distinct prompt, and the cache gives the same answer.
    assert set(reward._text_cache) == set(prompts)
    torch.testing.assert_close(reward(images, prompts), scores)

    clamped = rewards.get_reward(
        "clip_score", model=TINY_64, pretrained=str(checkpoint), scale=2.5, clamp_negative=True
    )
    torch.testing.assert_close(clamped(images, prompts), expected.clamp(min=0), atol=1e-5, rtol=1e-4)


def test_clip_score_is_differentiable_and_thread_safe(tiny_checkpoints):
    reward = rewards.get_reward("clip_score", model=TINY_64, pretrained=str(tiny_checkpoints[TINY_64]))
    images = _smooth_images(3, 32, 32, seed=5).requires_grad_()
    prompts = ["one", "two", "three"]
    reward(images, prompts).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0

    # Scoring from a worker thread (as the trainer does) gives the main thread's answer.
    expected = reward(images.detach(), prompts)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda _: reward(images.detach(), prompts), range(4)))
    for result in results:
        torch.testing.assert_close(result, expected)


def test_clip_score_offline_error_names_model_and_option(monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(FileNotFoundError) as info:
        rewards.get_reward("clip_score", model="ViT-B-32", pretrained="openai")
    message = str(info.value)
    assert "ViT-B-32" in message and "'pretrained'" in message and "local path" in message
