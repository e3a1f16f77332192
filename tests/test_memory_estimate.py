"""scripts/memory_estimate.py (docs/gpu-memory.md): its parameter counts are those of the real modules, its LoRA
count is peft's, and its meta-device activation tracker agrees with a real CPU run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from ddpo.models.stable_diffusion import TINY_UNET

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "memory_estimate.py"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def me():
    spec = importlib.util.spec_from_file_location("memory_estimate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_meta_counts_equal_real_modules(me):
    """Built on meta (no memory) or on the CPU with real weights: the same parameter count."""
    config = {**TINY_UNET, "sample_size": 8}
    assert me.count_params(me.build_unet(config)) == me.count_params(me.build_unet(config, device="cpu"))
    text = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    te = me.build_text_encoder(text, device="cpu")
    # By hand: token + position embeddings, per layer 4 projections (with bias), 2 MLP layers, 2 layer norms, final norm.
    h, i, n = 32, 37, 2
    by_hand = 49408 * h + 77 * h + n * (4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * 2 * h) + 2 * h
    assert me.count_params(te) == by_hand == me.count_params(me.build_text_encoder(text))


def test_sd15_counts_are_the_published_ones(me):
    unet = me.build_unet(me.SD15_UNET)
    assert abs(me.count_params(unet) - 859.52e6) / 859.52e6 < 1e-3  # SD 1.5 UNet: 859.5 M
    assert me.count_params(me.build_vae(me.SD15_VAE)) == 83_653_863  # SD 1.x AutoencoderKL
    assert me.count_params(me.build_text_encoder(me.SD15_TEXT_ENCODER)) == 123_060_480  # CLIP ViT-L/14 text
    # LoRA r4 on to_q/k/v/out.0: rank * (in + out) over the 16 transformer blocks' two attentions.
    assert me.lora_params_by_hand(unet, 4, TARGETS) == 797_184


def test_lora_count_equals_peft_trainable_parameters(me):
    from peft import LoraConfig

    config = {**TINY_UNET, "sample_size": 8}
    unet = me.build_unet(config, device="cpu")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=3, lora_alpha=3, target_modules=TARGETS))
    peft_count = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    assert peft_count > 0
    assert me.lora_params(config, 3, TARGETS) == peft_count
    assert me.lora_params_by_hand(me.build_unet(config), 3, TARGETS) == peft_count


def test_tracker_counts_a_real_cpu_call_and_frees_everything(me):
    """The live-bytes tracker on a real CPU training call: at least the bytes autograd saves (less the weights),
    scales with the batch, and returns to the LoRA gradients only once the call's tensors are gone."""
    config = {**TINY_UNET, "sample_size": 8}
    torch.manual_seed(0)
    unet = me.build_unet(config, device="cpu")
    me.add_lora_adapter(unet, 4, TARGETS)
    weights = {p.untyped_storage()._cdata for p in unet.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        return t

    tracker = me.LiveBytes()
    with tracker, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = unet(torch.randn(2, 4, 8, 8), torch.tensor([3, 3]), encoder_hidden_states=torch.randn(2, 77, 32)).sample
        after_forward = tracker.current
        out.square().mean().backward()
        del out
    assert after_forward >= sum(saved.values()) > 0
    assert tracker.peak >= after_forward
    lora_grads = sum(p.numel() * 4 for p in unet.parameters() if p.requires_grad)
    assert tracker.current <= lora_grads + 4096


def test_activation_fit_is_linear_in_rows(me):
    unet = me.build_unet({**TINY_UNET, "sample_size": 8})
    me.add_lora_adapter(unet, 4, TARGETS)
    a, b = me.linear_fit(lambda r: me.unet_call_bytes(unet, r, 8, 32, torch.bfloat16, True))
    assert b > 0
    assert me.unet_call_bytes(unet, 4, 8, 32, torch.bfloat16, True) == pytest.approx(a + 4 * b, rel=0.02)
    # checkpointing keeps less
    unet.enable_gradient_checkpointing()
    assert me.unet_call_bytes(unet, 4, 8, 32, torch.bfloat16, True) < a + 4 * b


def test_family_counts_are_the_published_ones(me):
    """SDXL base 1.0, SD3.5 Medium, FLUX.1-dev and their text encoders, built on meta from the published configs kept
    beside the script (scripts/memory_tables.py): the exact counts (docs/model-families.md) and the published round
    figures."""
    from memory_tables import (
        CLIP_BIGG_TEXT_ENCODER,
        FLUX1_DEV_TRANSFORMER,
        FLUX1_VAE,
        SD3_VAE,
        SD35_MEDIUM_TRANSFORMER,
        SDXL_BASE_UNET,
        SDXL_TEXT_ENCODER,
        SDXL_VAE,
        T5_XXL_ENCODER,
    )

    sdxl = me.count_params(me.build_denoiser("sdxl", SDXL_BASE_UNET))
    assert sdxl == 2_567_463_684  # SDXL base UNet: "2.6B" (2.57B)
    assert me.count_params(me.build_vae(SDXL_VAE)) == 83_653_863
    sd35 = me.build_denoiser("sd3", SD35_MEDIUM_TRANSFORMER)
    assert me.count_params(sd35) == 2_243_171_520
    # + the stored sin-cos positional table (384 x 384 x 1536): Stability AI's "2.5 billion" for SD3.5 Medium
    assert me.count_buffers(sd35) == 384 * 384 * 1536
    assert round((me.count_params(sd35) + me.count_buffers(sd35)) / 1e8) == 25
    flux = me.count_params(me.build_denoiser("flux", FLUX1_DEV_TRANSFORMER))
    assert flux == 11_901_408_320  # FLUX.1-dev: "12B" (11.9B)
    assert me.count_params(me.build_vae(SD3_VAE)) == me.count_params(me.build_vae(FLUX1_VAE)) == 83_819_683
    assert me.count_params(me.build_text_model("t5", T5_XXL_ENCODER)) == 4_762_310_656  # T5-XXL encoder: 4.76B
    assert me.count_params(me.build_text_model("clip_proj", CLIP_BIGG_TEXT_ENCODER)) == 694_659_840  # CLIP-G: 695M
    assert me.count_params(me.build_text_model("clip", SDXL_TEXT_ENCODER)) == 123_060_480  # CLIP-L, as SD 1.5
    assert me.count_params(me.build_text_model("clip_proj", SDXL_TEXT_ENCODER)) == 123_060_480 + 768 * 768


def test_reward_backprop_phases_count_the_chain_the_decode_and_the_reward(me):
    """Reward backpropagation's phases, by hand on round per-row numbers: with checkpointing the chain keeps 4
    latents per gradient step and image, the decode's backward one chunk, the step's backward one checkpointed call
    of 2B rows; without, K training calls and the whole decode stay until the backward (a pixel reward: 0)."""
    gib = me.GIB
    n = {"latent": 64, "latent_channels": 4, "train_bf16": (0, 1 * gib), "train_ckpt_bf16": (0, 0.25 * gib),
         "sample_bf16": (0, 0.06 * gib), "decode_train_bf16": (0, 5 * gib)}  # fmt: skip
    cfg = {
        "sample": {"batch_size": 4, "decode_chunk_size": 1},
        "train": {"algorithm": "draft", "draft_k": 3, "gradient_checkpointing": True},
        "reward": {"name": "brightness"},
    }
    latents = 3 * 4 * 4 * (4 * 64 * 64 * 4)  # K x B x 4 tensors x one float32 latent
    phases = me.reward_backprop_phases(cfg, n, "bf16", cfg_rows=2)
    assert phases == {
        "sampling_call": 0.06 * gib * 8,
        "chain_and_reward": latents,
        "chain_and_decode_backward": latents + 5 * gib,
        "chain_and_step_backward": latents + 0.25 * gib * 8,
    }
    cfg["train"]["gradient_checkpointing"] = False
    phases = me.reward_backprop_phases(cfg, n, "bf16", cfg_rows=2)
    assert phases["chain_and_reward"] == 3 * 8 * gib + 4 * 5 * gib
    assert phases["chain_and_decode_backward"] == 3 * 8 * gib + 4 * 5 * gib


def test_fsdp_units_are_the_blocks_accelerate_wraps(me):
    """FLUX.1-dev under TRANSFORMER_BASED_WRAP: one unit per double- and single-stream block (its _no_split_modules),
    the rest (embedders, final norm and projection) in the root unit; counted here from the block lists."""
    from memory_tables import FLUX1_DEV_TRANSFORMER

    flux = me.build_denoiser("flux", FLUX1_DEV_TRANSFORMER)
    blocks = [*flux.transformer_blocks, *flux.single_transformer_blocks]
    largest, root = me.fsdp_units(flux)
    assert largest == max(me.count_params(block) for block in blocks)
    assert root == me.count_params(flux) - sum(me.count_params(block) for block in blocks)
    assert 0 < root < largest  # FLUX's blocks dominate: 19 double (339.8M each) and 38 single (141.6M each)


def test_trajectories_are_the_chain_for_log_probs_and_clean_latents_for_the_forward_process(me):
    """An epoch's stored samples, by hand: DDPO keeps each sample's T + 1 latents, its T log-probs (float32, twice:
    the chain's and the old policy's) and its conditioning; NFT, AWM and the DPOs keep the clean latent and the
    conditioning only (CleanSamples)."""
    n = {"latent": 8, "latent_channels": 4, "cond_elems": 10, "lora_params": 0, "unet_params": 0, "vae_params": 0,
         "text_params": 0, "train_fp32": (0, 0), "sample_fp32": (0, 0), "decode_fp32": (0, 0)}  # fmt: skip
    cfg = {
        "model": {"use_lora": True},
        "sample": {"batch_size": 4, "num_batches_per_epoch": 2, "num_steps": 5, "guidance_scale": 1.0},
        "train": {"algorithm": "ddpo_is", "batch_size": 4},
        "reward": {"name": "brightness"},
    }
    latent, cond = 4 * 8 * 8 * 4, 10 * 4  # bytes of one float32 latent and one conditioning
    assert me.preset_memory(cfg, n)["parts_gib"]["trajectories"] * me.GIB == 8 * (6 * latent + 5 * 8 + cond)
    for algorithm in ("nft", "awm", "online_dpo"):
        cfg["train"]["algorithm"] = algorithm
        assert me.preset_memory(cfg, n)["parts_gib"]["trajectories"] * me.GIB == 8 * (latent + cond)
