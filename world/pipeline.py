"""One builder for small Stable-Diffusion-shaped pipelines with random weights, built from configs (no download).

The tiny test pipeline (:func:`ddpo.models.build_tiny_pipeline`) and the architecture of the shipped world model
(:func:`world.model.build_world_pipeline`) are both :func:`build_sd_pipeline` with their own module configs; the
tokenizer is the real 49,408-token CLIP tokenizer, built offline from the BPE file open_clip ships in its wheel.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

SD_DDIM_SCHEDULER: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
}
"""The Stable Diffusion 1.x DDIM scheduler configuration (scaled_linear 0.00085..0.012, 1000 steps, epsilon)."""

CLIP_TEXT_IDS: dict[str, int] = {"vocab_size": 49408, "max_position_embeddings": 77, "bos_token_id": 49406}
CLIP_TEXT_IDS |= {"eos_token_id": 49407, "pad_token_id": 49407}
"""The parts of a ``CLIPTextConfig`` fixed by the CLIP tokenizer (vocabulary, length, special tokens)."""


@lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict[str, int], list[str]]:
    """The 49,408-token CLIP BPE vocabulary and merges, from the file open_clip ships in its wheel."""
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    # The byte-to-unicode table of GPT-2 / CLIP: printable bytes map to themselves, the rest to 256+.
    byte_values = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    byte_values += list(range(ord("®"), ord("ÿ") + 1))
    chars = byte_values[:]
    n = 0
    for b in range(256):
        if b not in byte_values:
            byte_values.append(b)
            chars.append(256 + n)
            n += 1
    units = [chr(c) for c in chars]
    vocab = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, merges


def build_clip_tokenizer(model_max_length: int = 77):
    """The real CLIP tokenizer (same ids as OpenAI CLIP / open_clip), built offline from open_clip's BPE file."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe()
    pairs = [tuple(m.split()) for m in merges]
    return CLIPTokenizer(vocab=dict(vocab), merges=pairs, model_max_length=model_max_length)


def build_sd_pipeline(
    unet: dict[str, Any],
    vae: dict[str, Any],
    text_encoder: dict[str, Any],
    seed: int = 0,
    scheduler: dict[str, Any] | None = None,
    construction_order: tuple[str, str, str] = ("vae", "text_encoder", "unet"),
):
    """A ``StableDiffusionPipeline`` with seeded random weights from module configs (no download).

    Args:
        unet: keyword arguments of ``UNet2DConditionModel``.
        vae: keyword arguments of ``AutoencoderKL``.
        text_encoder: keyword arguments of ``CLIPTextConfig`` besides :data:`CLIP_TEXT_IDS`.
        seed: the weights are a pure function of it; torch's global RNG is restored afterwards.
        scheduler: ``DDIMScheduler`` configuration (default :data:`SD_DDIM_SCHEDULER`).
        construction_order: the order in which the three modules draw their weights from the seeded RNG (it fixes
            which random numbers each module gets; the tiny pipeline was always built UNet first).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        build = {
            "vae": lambda: AutoencoderKL(**vae),
            "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**CLIP_TEXT_IDS, **text_encoder)),
            "unet": lambda: UNet2DConditionModel(**unet),
        }
        modules = {name: build[name]() for name in construction_order}
    finally:
        torch.random.set_rng_state(state)
    return StableDiffusionPipeline(
        vae=modules["vae"],
        text_encoder=modules["text_encoder"],
        tokenizer=build_clip_tokenizer(),
        unet=modules["unet"],
        scheduler=DDIMScheduler(**(scheduler or SD_DDIM_SCHEDULER)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
