"""PickScore and HPS v2.1 on tiny models of the same architectures built from configs (nothing downloaded),
against the reference computation of each (transformers' CLIPProcessor + CLIPModel forward; open_clip's forward),
their gradients, and their offline errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rewards import get_reward
from rewards._clip import register_tiny_open_clip_config

PROMPTS = ["a red circle", "two blue squares on a white background", "a cat"]


def eight_bit_images(n: int, size: int) -> torch.Tensor:
    """Images whose values are exact 8-bit levels, so the PIL path of the references sees the same pixels."""
    levels = torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(0))
    return levels.float() / 255


@pytest.fixture(scope="module")
def tiny_pickscore(tmp_path_factory):
    """A transformers CLIPModel + CLIPProcessor (the real CLIP tokenizer, 32-px preprocessing) saved to a folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from world import build_clip_tokenizer

    folder = tmp_path_factory.mktemp("pickscore") / "model"
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=build_clip_tokenizer()).save_pretrained(folder)
    return folder


def test_pickscore_matches_transformers_and_has_gradients(tiny_pickscore):
    from transformers import CLIPModel, CLIPProcessor

    reward = get_reward("pickscore", model=str(tiny_pickscore), processor=str(tiny_pickscore))
    images = eight_bit_images(3, 32)
    values = reward(images, PROMPTS)
    # Reference: the processor on PIL images and the model's own forward (logits_per_image = scale * cosine).
    model, processor = CLIPModel.from_pretrained(tiny_pickscore), CLIPProcessor.from_pretrained(tiny_pickscore)
    pil = [Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for img in images]
    inputs = processor(text=PROMPTS, images=pil, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**inputs).logits_per_image.diagonal()
    torch.testing.assert_close(values, expected, rtol=1e-4, atol=1e-4)
    assert values.std() > 1e-3  # the scores differ between pairs: the comparison can fail
    pixels = images.clone().requires_grad_(True)
    reward(pixels, PROMPTS).sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def tiny_hps(tmp_path_factory):
    """An open_clip model of the ViT-H-14 family's shape (patch 14, separate text tower), tiny, and its weights saved
    as HPS v2 saves them ({'state_dict': ...} in a .pt file)."""
    import open_clip

    folder = tmp_path_factory.mktemp("hps")
    name = register_tiny_open_clip_config(folder, "tiny-ViT-H-14-hps", embed_dim=16, image_size=28, patch_size=14)
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, folder / "hps.pt")
    return name, folder / "hps.pt", model.eval()


def test_hpsv2_matches_open_clip_and_has_gradients(tiny_hps):
    import open_clip

    name, path, model = tiny_hps
    reward = get_reward("hpsv2", checkpoint=str(path), model=name)
    images = eight_bit_images(3, 28)
    values = reward(images, PROMPTS)
    # Reference: open_clip's forward (normalised features) and HPS v2's score, the diagonal of image @ text.T.
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        image_features, text_features, _ = model((images - mean) / std, open_clip.get_tokenizer(name)(PROMPTS))
    torch.testing.assert_close(values, (image_features @ text_features.T).diagonal(), rtol=1e-5, atol=1e-5)
    pixels = images.clone().requires_grad_(True)
    reward(pixels, PROMPTS).sum().backward()
    assert pixels.grad.abs().sum() > 0


def test_hpsv2_pads_non_square_images_like_resize_max_size(tiny_hps):
    from rewards.preference import resize_longest_and_pad

    wide = torch.ones(1, 3, 14, 28)
    out = resize_longest_and_pad(wide, 28)
    assert out.shape == (1, 3, 28, 28)
    assert torch.all(out[..., 7:21, :] == 1) and torch.all(out[..., :7, :] == 0) and torch.all(out[..., 21:, :] == 0)


def test_offline_errors_name_the_file_and_the_option(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # any hub download fails at once (the constant is read at import)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"hpsv2.*does not exist.*HPS_v2.1_compressed.pt.*'checkpoint' option"):
        get_reward("hpsv2", checkpoint=str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match=r"HPS_v2.1_compressed.pt.*xswu/HPSv2.*'checkpoint' option"):
        get_reward("hpsv2")
    with pytest.raises(
        FileNotFoundError, match=r"pickscore.*laion/CLIP-ViT-H-14-laion2B-s32B-b79K.*'processor' option"
    ):
        get_reward("pickscore")
    with pytest.raises(FileNotFoundError, match=r"pickscore.*could not load the model .*'model' option"):
        get_reward("pickscore", model=str(tmp_path / "nowhere"), processor=str(_processor_folder(tmp_path)))


def _processor_folder(tmp_path):
    from transformers import CLIPImageProcessor, CLIPProcessor

    from world import build_clip_tokenizer

    folder = tmp_path / "processor"
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=build_clip_tokenizer()).save_pretrained(folder)
    return folder
