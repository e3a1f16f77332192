"""Loading Stable Diffusion pipelines (hub id or local folder), the tiny test pipeline, and LoRA through peft."""

from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TINY = "tiny"
"""``model.pretrained`` value that builds :func:`build_tiny_pipeline` instead of loading weights."""
WORLD = "world"
"""``model.pretrained`` value for the embedded pretrained model of the procedural world (shipped in the package)."""


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


def build_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """The real CLIP tokenizer (same ids as OpenAI CLIP / open_clip), built offline from open_clip's BPE file."""
    vocab, merges = _clip_bpe()
    pairs = [tuple(m.split()) for m in merges]
    return CLIPTokenizer(vocab=dict(vocab), merges=pairs, model_max_length=model_max_length)


def build_tiny_pipeline(seed: int = 0, sample_size: int = 32) -> StableDiffusionPipeline:
    """A Stable-Diffusion-shaped pipeline with random weights, built from configs (no download).

    UNet ``(32, 64)`` channels with cross-attention, a 2-level AutoencoderKL (``sample_size`` latents decode to
    ``2 * sample_size`` pixels), a 2-layer CLIP text encoder with hidden size 32 and the real CLIP tokenizer,
    and the Stable Diffusion DDIM scheduler configuration. Deterministic for a given ``seed``.
    """
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(32, 64),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=32,
            sample_size=2 * sample_size,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=49407,
            )
        )
    finally:
        torch.random.set_rng_state(generator_state)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        num_train_timesteps=1000,
        prediction_type="epsilon",
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1] or Path(name).exists()


def load_pipeline(pretrained: str, revision: str | None = None, scheduler: str = "ddim") -> StableDiffusionPipeline:
    """Load a Stable Diffusion 1.x/2.x pipeline from a hub id or a local folder, in float32, without safety checker.

    ``pretrained="tiny"`` builds :func:`build_tiny_pipeline`; ``pretrained="world"`` loads the embedded model. The scheduler is replaced by a DDIM (or DDPM)
    scheduler built from the pipeline's own scheduler config, so timesteps and the noise schedule are unchanged.
    Errors name what is missing and how to fix it, instead of surfacing from deep inside a download.
    """
    if pretrained == TINY:
        pipe = build_tiny_pipeline()
    else:
        if pretrained == WORLD:
            from .world import world_model_path

            pretrained = str(world_model_path())
        local = Path(pretrained).expanduser()
        if local.exists():
            if not (local / "model_index.json").is_file():
                raise FileNotFoundError(
                    f"model.pretrained={pretrained!r} is a folder without model_index.json; point it at a diffusers "
                    "pipeline folder (saved with pipe.save_pretrained) or a hub id"
                )
        elif _looks_like_path(pretrained) and not _is_hub_id(pretrained):
            raise FileNotFoundError(
                f"model.pretrained={pretrained!r} does not exist; give an existing local pipeline folder or a hub id "
                "like 'stable-diffusion-v1-5/stable-diffusion-v1-5'"
            )
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                str(local) if local.exists() else pretrained,
                revision=revision,
                dtype=torch.float32,
                safety_checker=None,
                requires_safety_checker=False,
            )
        except OSError as err:
            raise OSError(
                f"could not load the pipeline {pretrained!r}: {err}\n"
                "If this machine is offline, download the model elsewhere (e.g. `hf download "
                f"{pretrained} --local-dir DIR`) and set model.pretrained=DIR."
            ) from err
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif scheduler == "ddpm":
        pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    else:
        raise ValueError(f"sample.scheduler must be 'ddim' or 'ddpm'; got {scheduler!r}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def add_lora(unet: UNet2DConditionModel, rank: int, alpha: float, target_modules: list[str]) -> None:
    """Freeze ``unet`` and add a peft LoRA adapter (B initialised to zero, so the model is unchanged at start)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules))
    try:
        unet.add_adapter(config)
    except ValueError as err:
        raise ValueError(
            f"model.lora_target_modules={list(target_modules)} matched no module of the UNet ({err}); "
            "typical values are to_q, to_k, to_v, to_out.0"
        ) from err


def lora_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The LoRA weights in the diffusers format that ``pipe.load_lora_weights`` reads."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
