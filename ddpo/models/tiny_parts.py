"""Parts of the tiny random-weight pipelines of the transformer families (SD3, FLUX), built from configs offline.

* :func:`build_t5_tokenizer`: a real ``T5TokenizerFast`` (T5's own Unigram / Metaspace / ``$A </s>`` pipeline, built
  by transformers from an in-memory vocabulary) over the words of the world captions; no vocabulary file is needed.
* :func:`build_tiny_t5`: a 2-layer ``T5EncoderModel`` (T5 v1.1's gated-GELU feed-forward, as SD3 and FLUX use).
* :func:`build_tiny_flow_vae`: a 2-level ``AutoencoderKL`` with 16 latent channels and a shift/scaling factor, as
  the SD3 and FLUX VAEs have.
* :func:`seeded`: build modules under ``torch.manual_seed(seed)`` (global RNG restored afterwards), in eval mode.
"""

from __future__ import annotations

import math
import string
from collections import Counter
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch

FLOW_VAE_LATENT_CHANNELS = 16
"""Latent channels of the tiny SD3/FLUX VAE: 16, as the published SD3 and FLUX VAEs (FLUX packs them into 64)."""

T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
"""T5's special tokens, with T5's ids 0, 1 and 2."""


def seeded(seed: int, build: Callable[[], dict[str, torch.nn.Module | None]]) -> dict[str, torch.nn.Module | None]:
    """The modules ``build()`` returns, built with torch's global RNG seeded by ``seed`` (the RNG state is restored
    afterwards), in eval mode as ``from_pretrained`` leaves them (T5's dropout is 0.1: a module fresh from its
    constructor is in training mode and would encode every prompt differently)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        modules = build()
    finally:
        torch.random.set_rng_state(state)
    for module in modules.values():
        if module is not None:
            module.eval()
    return modules


@lru_cache(maxsize=1)
def t5_vocabulary() -> tuple[tuple[str, float], ...]:
    """``(piece, log-probability score)`` of the tiny T5 tokenizer, T5's id layout (pad 0, eos 1, unk 2).

    One SentencePiece word piece (``▁word``) per word of the world captions (:func:`world.all_captions`), scored by
    its log frequency, then every printable ASCII character with and without the word-start mark at a much lower
    score: caption words are one token each, and any other ASCII text is spelled out character by character instead
    of collapsing to ``<unk>``.
    """
    from world import all_captions

    counts = Counter(word for caption in all_captions() for word in caption.split())
    total = sum(counts.values())
    pieces: list[tuple[str, float]] = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), ("▁", -20.0)]
    pieces += [(f"▁{word}", math.log(counts[word] / total)) for word in sorted(counts)]
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces += [(f"▁{c}", -25.0) for c in chars] + [(c, -25.0) for c in chars]
    seen: set[str] = set()
    return tuple(p for p in pieces if not (p[0] in seen or seen.add(p[0])))


def build_t5_tokenizer(model_max_length: int = 512):
    """A real ``T5TokenizerFast`` over :func:`t5_vocabulary`, built offline.

    transformers builds it exactly as it builds T5's published tokenizer (Unigram model, whitespace + Metaspace
    pre-tokenizer, ``</s>`` appended, ``<pad>`` padding), only from a small in-memory vocabulary instead of
    ``spiece.model``; it saves to and loads from ``tokenizer.json`` like any fast tokenizer. No sentinel tokens
    (``extra_ids=0``): the text encoders never see them.
    """
    from transformers import T5TokenizerFast

    return T5TokenizerFast(
        vocab=list(t5_vocabulary()),
        eos_token=T5_EOS,
        unk_token=T5_UNK,
        pad_token=T5_PAD,
        extra_ids=0,
        model_max_length=model_max_length,
    )


def build_tiny_t5(d_model: int, vocab_size: int | None = None):
    """A 2-layer ``T5EncoderModel`` of width ``d_model`` (T5 v1.1 layout: gated GELU, untied, relative buckets)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size or len(t5_vocabulary()),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


TINY_FLOW_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "block_out_channels": (32, 64),
    "latent_channels": FLOW_VAE_LATENT_CHANNELS,
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
"""The tiny SD3/FLUX ``AutoencoderKL`` (2 levels: a latent pixel is 2x2 image pixels); as the published SD3 and FLUX
VAEs it has 16 latent channels and no quant convolutions. Its ``shift_factor``/``scaling_factor`` are the family's."""


def build_tiny_flow_vae(sample_size: int, scaling_factor: float, shift_factor: float):
    """The tiny VAE for ``sample_size`` latents (``2 * sample_size`` pixels); the pipelines decode
    ``latents / scaling_factor + shift_factor``."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        **TINY_FLOW_VAE,
        sample_size=2 * sample_size,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )
