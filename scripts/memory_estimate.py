"""GPU memory per shipped preset, COMPUTED (no GPU): parameter counts and activation bytes on the meta device.

How the numbers are obtained (docs/gpu-memory.md explains the model and the tables):

* **Parameters are counted**: each preset's denoiser (Stable Diffusion 1.5 or SDXL base UNet, SD3.5 Medium or
  FLUX.1-dev transformer), VAE and text encoders (CLIP ViT-L/14, OpenCLIP bigG, T5 v1.1 XXL) are built from their
  published configs (Stable Diffusion 1.5's ``SD15_UNET``, ... in ``ddpo.models.stable_diffusion``, which builds
  from them; the others, ``SDXL_BASE_UNET``, ``SD35_MEDIUM_TRANSFORMER``, ``FLUX1_DEV_TRANSFORMER``,
  ``T5_XXL_ENCODER``, ..., in ``scripts/memory_tables.py`` beside this script) on ``torch.device("meta")`` (no weights, no memory, no
  download) and their parameters (and stored buffers: SD3's positional table) summed; LoRA parameters are counted
  by adding the preset's peft adapter to that denoiser (``ddpo.models.lora.add_lora``).
* **Activations are counted at full size on the meta device**: one denoiser call (and one VAE decode) runs on meta
  tensors, which carry shapes and dtypes but no data, while a dispatch mode tracks every tensor the kernels would
  allocate and when its last reference dies: the peak of live bytes is the call's activation memory (forward and
  backward for a training call, forward under ``no_grad`` for sampling and decoding). Two GPU behaviours are
  emulated: attention runs through the memory-efficient SDPA kernel (no ``N x N`` attention map stored, as
  ``F.scaled_dot_product_attention`` does on CUDA), and ``mixed_precision=bf16`` follows CUDA autocast's rules
  (matmuls and convolutions in bf16, group/layer norm and softmax in fp32). Not counted: the CUDA context,
  cuBLAS/cuDNN workspaces and allocator fragmentation (a fixed overhead and a margin are added for those).

Run: ``python scripts/memory_estimate.py`` (about 4 minutes on 2 CPU cores: 3 min 39 s measured for every preset); ``--json FILE`` writes every number;
``--presets NAME ...`` limits it to some presets.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ddpo.models.stable_diffusion import SD15_TEXT_ENCODER, SD15_UNET, SD15_VAE
from world.pipeline import CLIP_TEXT_IDS

sys.path.insert(0, str(Path(__file__).resolve().parent))  # memory_tables.py beside this script, however it is loaded
from memory_tables import (  # noqa: E402
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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GIB = 1024**3

# Published configs of Stable Diffusion 1.5 (unet/, vae/, text_encoder/ config.json): one copy, in the package.
TEXT_TOKENS = 77

CUDA_OVERHEAD_GIB = 1.0
"""CUDA context, cuBLAS/cuDNN workspaces and kernels: not tensors, so not counted; a fixed allowance."""
MARGIN = 1.15
"""Allocator fragmentation and caching: the counted tensor peak is multiplied by this."""
CARDS_GIB = (12, 16, 24, 80)


# ----------------------------------------------------------------------------------------------- parameter counts


def build_unet(config: dict, device: str = "meta"):
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(**config)


def build_vae(config: dict, device: str = "meta"):
    from diffusers import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL(**config)


def build_text_encoder(config: dict, device: str = "meta"):
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device):
        return CLIPTextModel(CLIPTextConfig(**{**CLIP_TEXT_IDS, **config}))


def build_denoiser(family: str, config: dict, device: str = "meta"):
    """The family's denoiser: a ``UNet2DConditionModel`` (sd, sdxl), ``SD3Transformer2DModel`` or
    ``FluxTransformer2DModel``."""
    if family in ("sd", "sdxl"):
        return build_unet(config, device)
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel
    with torch.device(device):
        return cls(**config)


def build_text_model(kind: str, config: dict, device: str = "meta"):
    """A text encoder: ``clip`` (``CLIPTextModel``), ``clip_proj`` (``CLIPTextModelWithProjection``) or ``t5``
    (``T5EncoderModel``)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.device(device):
        if kind == "t5":
            return T5EncoderModel(T5Config(**config))
        cls = CLIPTextModelWithProjection if kind == "clip_proj" else CLIPTextModel
        return cls(CLIPTextConfig(**{**CLIP_TEXT_IDS, **config}))


def count_buffers(module: torch.nn.Module) -> int:
    """Values of the floating-point buffers (SD3's positional table): on the GPU with the weights, in their dtype."""
    return sum(b.numel() for b in module.buffers() if b.is_floating_point())


def count_params(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def add_lora_adapter(unet, rank: int, targets: list[str]) -> None:
    """The trainer's own LoRA (``ddpo.models.lora.add_lora``): freezes the UNet and adds the peft adapter."""
    from ddpo.models.lora import add_lora

    add_lora(unet, rank, float(rank), targets)


def lora_params(unet_config: dict, rank: int, targets: list[str]) -> int:
    """Trainable parameters of the preset's LoRA, counted by peft on the real module names."""
    unet = build_unet(unet_config)
    add_lora_adapter(unet, rank, targets)
    return count_params(unet, trainable_only=True)


def lora_params_by_hand(unet, rank: int, targets: list[str]) -> int:
    """``rank * (in + out)`` summed over the Linear/Conv modules whose name ends with a target (the formula)."""
    total = 0
    for name, module in unet.named_modules():
        if any(name == t or name.endswith("." + t) for t in targets):
            if isinstance(module, torch.nn.Linear):
                total += rank * (module.in_features + module.out_features)
            elif isinstance(module, torch.nn.Conv2d):
                k = module.kernel_size[0] * module.kernel_size[1]
                total += rank * (module.in_channels * k + module.out_channels)
    return total


def open_clip_params(name: str) -> int | None:
    """Parameters of an open_clip architecture (both towers, as the aesthetic reward loads it), or None."""
    try:
        import open_clip
    except ImportError:
        return None
    with torch.device("meta"):
        model = open_clip.create_model(name, pretrained=None, device="meta")
    return count_params(model)


# ------------------------------------------------------------------------------------ activation bytes, on meta


def _efficient_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """SDPA through the memory-efficient kernel (what CUDA picks): saves q, k, v, out and the log-sum-exp only."""
    if attn_mask is not None or dropout_p or is_causal:
        raise NotImplementedError("memory estimate: masked/dropout attention is not modelled")
    return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, None, True, scale=scale)[0]


_LOW = ("linear", "conv2d", "scaled_dot_product_attention")
_FP32 = ("group_norm", "layer_norm", "softmax", "log_softmax")


@contextlib.contextmanager
def gpu_like(low: torch.dtype | None):
    """CUDA autocast's casting rules (``low``: matmuls and convolutions in that dtype, norms and softmax in fp32;
    None: no autocast) and CUDA's memory-efficient attention, for the meta device, which has neither.

    The functions of ``torch.nn.functional`` that diffusers and peft call are replaced while the block runs, so the
    casts are recorded by autograd as real autocast's are, and checkpointed blocks recompute the same way.
    """
    originals = {name: getattr(F, name) for name in _LOW + _FP32}

    def wrap(name, dtype):
        func = _efficient_sdpa if name == "scaled_dot_product_attention" else originals[name]

        def cast(x):
            return x.to(dtype) if dtype is not None and isinstance(x, torch.Tensor) and x.is_floating_point() else x

        def wrapped(*args, **kwargs):
            return func(*(cast(a) for a in args), **{k: cast(v) for k, v in kwargs.items()})

        return wrapped

    try:
        for name in _LOW:
            setattr(F, name, wrap(name, low))
        for name in _FP32:
            setattr(F, name, wrap(name, torch.float32 if low is not None else None))
        yield
    finally:
        for name, func in originals.items():
            setattr(F, name, func)


class LiveBytes(TorchDispatchMode):
    """Tracks the bytes of every storage allocated by the ops run under it, freed when its last tensor dies. Views of
    storages that existed before (a frozen weight's ``t()`` that ``linear`` saves for backward) allocate nothing and
    are not counted."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            a.untyped_storage()._cdata
            for a in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(a, torch.Tensor)
        }
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.live and key in inputs:
                    continue  # a view of (or in-place on) a tensor allocated before: a weight, an input; not new
                if key not in self.live:
                    self.live[key] = [storage.nbytes(), 0]
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                self.live[key][1] += 1
                weakref.finalize(t, self._release, key)
        return out


def _peak(run) -> int:
    tracker = LiveBytes()
    with tracker:
        run()
    return tracker.peak


def unet_call_bytes(
    unet, rows: int, latent: int, context_dim: int, dtype: torch.dtype, train: bool, tokens: int = TEXT_TOKENS
) -> int:
    """Peak bytes of one UNet call on ``rows`` rows: forward + backward (``train``) or forward under ``no_grad``.

    ``dtype`` is the autocast dtype (float32: none). The UNet's frozen weights must already be in ``dtype`` (as the
    trainer stores them with LoRA and mixed precision) and trainable ones in float32.
    """
    low = None if dtype == torch.float32 else dtype

    def run():
        x = torch.empty(rows, unet.config.in_channels, latent, latent, device="meta")
        ctx = torch.empty(rows, tokens, context_dim, device="meta")
        t = torch.full((rows,), 500, device="meta", dtype=torch.long)
        with gpu_like(low), contextlib.nullcontext() if train else torch.no_grad():
            out = unet(x, t, encoder_hidden_states=ctx).sample.float()
            if train:
                out.square().mean().backward()
        del out

    return _peak(run)


def denoiser_call_bytes(model, arch: dict, rows: int, latent: int, dtype: torch.dtype, train: bool) -> int:
    """Peak bytes of one call of ``arch``'s denoiser on ``rows`` rows, called as its family calls it
    (``ddpo.models``: SDXL's pooled embedding and time ids; SD3's pooled projections; FLUX's packed 2x2 patches, its
    guidance input and position ids). ``dtype`` and ``train`` as in :func:`unet_call_bytes`."""
    family = arch["family"]
    if family == "sd":
        return unet_call_bytes(model, rows, latent, arch["context"], dtype, train, arch["tokens"])
    low = None if dtype == torch.float32 else dtype

    def run():
        ctx = torch.empty(rows, arch["tokens"], arch["context"], device="meta")
        pooled = torch.empty(rows, arch["pooled"], device="meta")
        if family == "sdxl":
            x = torch.empty(rows, 4, latent, latent, device="meta")
            t = torch.full((rows,), 500, device="meta", dtype=torch.long)
            extra = {"text_embeds": pooled, "time_ids": torch.empty(rows, 6, device="meta")}
            call = lambda: model(x, t, encoder_hidden_states=ctx, added_cond_kwargs=extra).sample  # noqa: E731
        elif family == "sd3":
            x = torch.empty(rows, 16, latent, latent, device="meta")
            t = torch.full((rows,), 500.0, device="meta")
            call = lambda: model(  # noqa: E731
                hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled, return_dict=False
            )[0]
        else:  # flux: packed [rows, (h/2)(w/2), 64]
            patches = (latent // 2) ** 2
            x = torch.empty(rows, patches, 64, device="meta")
            t = torch.full((rows,), 0.5, device="meta")
            call = lambda: model(  # noqa: E731
                hidden_states=x,
                timestep=t,
                guidance=torch.full((rows,), 3.5, device="meta"),
                pooled_projections=pooled,
                encoder_hidden_states=ctx,
                txt_ids=torch.zeros(arch["tokens"], 3, device="meta"),
                img_ids=torch.zeros(patches, 3, device="meta"),
                return_dict=False,
            )[0]
        with gpu_like(low), contextlib.nullcontext() if train else torch.no_grad():
            out = call().float()
            if train:
                out.square().mean().backward()
        del out

    return _peak(run)


def vae_decode_bytes(vae, images: int, latent: int, dtype: torch.dtype) -> int:
    low = None if dtype == torch.float32 else dtype

    def run():
        z = torch.empty(images, vae.config.latent_channels, latent, latent, device="meta")
        with gpu_like(low), torch.no_grad():
            out = vae.decode(z).sample.float()
        del out

    return _peak(run)


def vae_decode_train_bytes(vae, images: int, latent: int, dtype: torch.dtype) -> int:
    """Peak bytes of a VAE decode with gradients w.r.t. the latents (forward + backward, frozen weights): reward
    backpropagation's decode."""
    low = None if dtype == torch.float32 else dtype

    def run():
        z = torch.empty(images, vae.config.latent_channels, latent, latent, device="meta", requires_grad=True)
        with gpu_like(low):
            out = vae.decode(z).sample.float()
            out.square().mean().backward()
        del out, z

    return _peak(run)


def clip_image_train_bytes(name: str, images: int, size: int = 224) -> int | None:
    """Peak bytes of an open_clip image tower's forward + backward w.r.t. ``images`` input pictures (frozen weights,
    float32 as the aesthetic reward runs it): what a differentiable CLIP reward adds in reward backpropagation; None
    without open_clip."""
    try:
        import open_clip
    except ImportError:
        return None
    with torch.device("meta"):
        visual = open_clip.create_model(name, pretrained=None, device="meta").visual.requires_grad_(False)

    def run():
        x = torch.empty(images, 3, size, size, device="meta", requires_grad=True)
        with gpu_like(None):
            out = visual(x).float()
            out.square().mean().backward()
        del out, x

    return _peak(run)


def linear_fit(measure, sizes=(1, 2)) -> tuple[float, float]:
    """``(a, b)`` with bytes = a + b * size, from two measurements (activations are linear in the batch)."""
    y0, y1 = (measure(s) for s in sizes)
    b = (y1 - y0) / (sizes[1] - sizes[0])
    return y0 - b * sizes[0], b


# --------------------------------------------------------------------------------------------------- the models

ARCH_CACHE: dict = {}


def _sd(name: str, unet: dict, vae: dict, text: dict) -> dict:
    return {
        "name": name,
        "family": "sd",
        "unet": unet,
        "vae": vae,
        "texts": [("clip", text)],
        "tokens": TEXT_TOKENS,
        "context": unet["cross_attention_dim"],
        "pooled": 0,
    }


FAMILY_ARCHITECTURES: dict[str, dict] = {
    "sdxl": {
        "name": "sdxl_base",
        "family": "sdxl",
        "unet": SDXL_BASE_UNET,
        "vae": SDXL_VAE,
        "texts": [("clip", SDXL_TEXT_ENCODER), ("clip_proj", CLIP_BIGG_TEXT_ENCODER)],
        "tokens": TEXT_TOKENS,
        "context": SDXL_BASE_UNET["cross_attention_dim"],
        "pooled": CLIP_BIGG_TEXT_ENCODER["projection_dim"],
        "vae_fp32": True,  # SDXL's VAE is kept float32 (ModelFamily.vae_force_upcast)
    },
    "sd3": {
        "name": "sd35_medium",
        "family": "sd3",
        "unet": SD35_MEDIUM_TRANSFORMER,
        "vae": SD3_VAE,
        "texts": [("clip_proj", SDXL_TEXT_ENCODER), ("clip_proj", CLIP_BIGG_TEXT_ENCODER), ("t5", T5_XXL_ENCODER)],
        "tokens": TEXT_TOKENS + 256,  # CLIP's 77 then T5's 256 (StableDiffusion3Family.max_sequence_length)
        "context": SD35_MEDIUM_TRANSFORMER["joint_attention_dim"],
        "pooled": SD35_MEDIUM_TRANSFORMER["pooled_projection_dim"],
    },
    "flux": {
        "name": "flux1_dev",
        "family": "flux",
        "unet": FLUX1_DEV_TRANSFORMER,
        "vae": FLUX1_VAE,
        "texts": [("clip", SDXL_TEXT_ENCODER), ("t5", T5_XXL_ENCODER)],
        "tokens": 512,  # T5 tokens (FluxFamily.max_sequence_length)
        "context": FLUX1_DEV_TRANSFORMER["joint_attention_dim"],
        "pooled": FLUX1_DEV_TRANSFORMER["pooled_projection_dim"],
        "guidance_embedded": True,
    },
}
"""The published architecture each model family's presets name (SDXL base 1.0, SD3.5 Medium, FLUX.1-dev)."""


def architecture(pretrained: str, family: str = "auto") -> dict | None:
    """Configs of a preset's model: the shipped world model, the tiny test model, the published model of a
    ``model.family`` (SDXL base 1.0, SD3.5 Medium, FLUX.1-dev), SD 1.5 for other hub ids; None for a model this
    script has no configs for (the world's flow twin, the families' tiny test pipelines)."""
    if pretrained == "world":
        from world.model import WORLD_TEXT_ENCODER, WORLD_UNET, WORLD_VAE

        return _sd("world", WORLD_UNET, WORLD_VAE, WORLD_TEXT_ENCODER)
    if pretrained == "tiny":
        from ddpo.models.stable_diffusion import TINY_TEXT_ENCODER, TINY_UNET, TINY_VAE

        return _sd("tiny", {**TINY_UNET, "sample_size": 32}, {**TINY_VAE, "sample_size": 64}, TINY_TEXT_ENCODER)
    if pretrained.startswith(("world_", "tiny_")):
        return None
    if family in FAMILY_ARCHITECTURES:
        return FAMILY_ARCHITECTURES[family]
    return _sd("sd15", SD15_UNET, SD15_VAE, SD15_TEXT_ENCODER)


def native_latent(arch: dict) -> int:
    """The latent side of the model's native resolution (FLUX has no ``sample_size``: its VAE's, over 8)."""
    if "sample_size" in arch["unet"]:
        return arch["unet"]["sample_size"]
    return arch["vae"]["sample_size"] // vae_factor(arch)


def vae_factor(arch: dict) -> int:
    return 2 ** (len(arch["vae"]["block_out_channels"]) - 1)


def model_numbers(arch: dict, rank: int, targets: list[str], resolution: int | None = None) -> dict:
    """Parameter counts and per-row activation fits of one architecture at ``resolution`` pixels (None: native),
    cached per architecture, resolution and LoRA."""
    factor = vae_factor(arch)
    latent = resolution // factor if resolution else native_latent(arch)
    key = (arch["name"], latent, rank, tuple(targets))
    if key in ARCH_CACHE:
        return ARCH_CACHE[key]
    family = arch["family"]
    denoiser = build_denoiser(family, arch["unet"])
    texts = [count_params(build_text_model(kind, config)) for kind, config in arch["texts"]]
    n = {
        "architecture": arch["name"],
        "family": family,
        "latent": latent,
        "latent_channels": arch["vae"]["latent_channels"],
        "unet_params": count_params(denoiser),
        "fsdp_units": fsdp_units(denoiser),
        "unet_buffers": count_buffers(denoiser),
        "vae_params": count_params(build_vae(arch["vae"])),
        "text_params": sum(texts),
        "text_params_each": texts,
        "resolution": latent * factor,
        # a sample's stored conditioning: sequence states, pooled embedding (and SDXL's 6 time ids)
        "cond_elems": arch["tokens"] * arch["context"] + arch["pooled"] + (6 if family == "sdxl" else 0),
        "vae_fp32": bool(arch.get("vae_fp32")),
    }
    del denoiser
    vae = build_vae(arch["vae"])
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        unet = build_denoiser(family, arch["unet"])
        add_lora_adapter(unet, rank, targets)
        n["lora_params"] = count_params(unet, trainable_only=True)
        if dtype != torch.float32:  # the trainer's layout: frozen weights in bf16, LoRA in fp32
            for p in unet.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(dtype)
            if not arch.get("vae_fp32"):
                for p in vae.parameters():
                    p.data = p.data.to(dtype)

        def call(r, d=dtype, train=True, u=unet):
            return denoiser_call_bytes(u, arch, r, latent, d, train)

        n[f"train_{dtype_name}"] = linear_fit(call)
        n[f"sample_{dtype_name}"] = linear_fit(lambda r, d=dtype: call(r, d, False))
        n[f"decode_{dtype_name}"] = linear_fit(lambda r, d=dtype: vae_decode_bytes(vae, r, latent, d))
        n[f"decode_train_{dtype_name}"] = linear_fit(lambda r, d=dtype: vae_decode_train_bytes(vae, r, latent, d))
        unet.enable_gradient_checkpointing()
        n[f"train_ckpt_{dtype_name}"] = linear_fit(call)
    ARCH_CACHE[key] = n
    return n


REWARD_PARAMS_CACHE: dict = {}


def reward_model(reward: dict) -> tuple[str, int, int]:
    """``(description, parameters, bytes per parameter)`` of the reward model kept on the GPU."""
    name = reward.get("name", "")
    options = reward.get("options") or {}
    if name == "aesthetic":
        arch = options.get("clip_model", "ViT-L-14")
        if arch not in REWARD_PARAMS_CACHE:
            REWARD_PARAMS_CACHE[arch] = open_clip_params(arch) or 427_616_513
        head = 768 * 1024 + 1024 + 1024 * 128 + 128 + 128 * 64 + 64 + 64 * 16 + 16 + 16 + 1
        size = {"float32": 4, "float16": 2, "bfloat16": 2}[options.get("dtype", "float32")]
        return f"open_clip {arch} (both towers) + LAION MLP head", REWARD_PARAMS_CACHE[arch] + head, size
    if name == "clip_score" and options.get("pretrained") == "world":
        return "tiny world CLIP", 3_500_000, 4
    if name == "discriminator":
        return "small CNN discriminator (+ AdamW state)", 200_000, 16
    return "none (computed on the CPU from pixels)", 0, 4


# ------------------------------------------------------------------------------------------------ memory model


def preset_memory(cfg: dict, n: dict) -> dict:
    """GiB per process of one preset's settings (``cfg``: the merged preset dict) on the architecture numbers ``n``."""
    model, sample, train = cfg["model"], cfg["sample"], cfg["train"]
    bf16 = cfg.get("mixed_precision", "no") == "bf16"
    half = cfg.get("mixed_precision", "no") in ("bf16", "fp16")  # frozen text encoders: the trainer casts them
    lora = model.get("use_lora", True)
    wbytes = 2 if (bf16 and lora) else 4
    d = "bf16" if bf16 else "fp32"
    guidance_embedded = n.get("family") == "flux"  # FLUX.1-dev: guidance is an input, no CFG rows
    cfg_rows = 2 if sample.get("guidance_scale", 5.0) > 1 and not guidance_embedded else 1
    opt_bytes = 2 if train.get("optimizer", "adamw") == "adamw8bit" else 8
    trainable = n["lora_params"] if lora else n["unet_params"]
    frozen_unet = n["unet_params"] - (0 if lora else n["unet_params"]) + n.get("unet_buffers", 0)
    ckpt = train.get("gradient_checkpointing", False)
    fit = n[f"train_ckpt_{d}" if ckpt else f"train_{d}"]
    sfit, dfit = n[f"sample_{d}"], n[f"decode_{d}"]
    reward_desc, reward_p, reward_b = reward_model(cfg.get("reward", {}))
    samples = sample["batch_size"] * sample["num_batches_per_epoch"]
    latent_elems = n.get("latent_channels", 4) * n["latent"] ** 2
    steps = sample["num_steps"]
    cond = n.get("cond_elems", TEXT_TOKENS * 768)
    trajectories = samples * ((steps + 1) * latent_elems * 4 + steps * 4 * 2 + cond * 4)
    # The forward-process estimators (awm, nft) and Diffusion-DPO (dpo, online_dpo) keep only each sample's clean
    # latents (ddpo.policy.sampling.CleanSamples), not its chain and log-probs. DPO's training call runs a pair's two
    # rows (conditional, no CFG), and its full fine-tuning keeps the reference, a frozen float32 copy of the base
    # denoiser. (The epoch's decoded images, [B, 3, H, W] float32 in both kinds, are not counted: 3 MiB a 512 px sample.)
    preference = train.get("algorithm") in ("dpo", "online_dpo")
    if preference or train.get("algorithm") in ("awm", "nft"):
        trajectories = samples * (latent_elems * 4 + cond * 4)
    vae_bytes = 4 if n.get("vae_fp32") else wbytes
    parts = {
        "unet_frozen": frozen_unet * wbytes,
        "trainable_weights": trainable * 4,
        "gradients": trainable * 4,
        "optimizer_state": trainable * opt_bytes,
        "vae": n["vae_params"] * vae_bytes,
        "text_encoder": n["text_params"] * (2 if half else 4),  # the trainer casts them to the run's precision
        "reward_model": reward_p * reward_b,
        "trajectories": trajectories,
    }
    if not lora and bf16:  # autocast keeps a bf16 copy of every fp32 weight during a forward
        parts["autocast_weight_cache"] = n["unet_params"] * 2
    if preference and not lora:
        parts["reference_copy"] = n["unet_params"] * 4
    rows_train = 2 * train["batch_size"] if preference else cfg_rows * train["batch_size"]
    rows_sample = cfg_rows * sample["batch_size"]
    chunk = min(sample.get("decode_chunk_size", 8), sample["batch_size"])
    phases = {
        "training_call": fit[0] + fit[1] * rows_train,
        "sampling_call": sfit[0] + sfit[1] * rows_sample,
        "vae_decode": dfit[0] + dfit[1] * chunk,
    }
    if train.get("algorithm") in REWARD_BACKPROP:  # no stored trajectories; the chain's phases instead
        del parts["trajectories"]
        phases = reward_backprop_phases(cfg, n, d, cfg_rows)
    if train.get("algorithm") == "dpo":  # a minibatch's 2 x batch images encoded, counted as a decode of as many
        phases["vae_encode"] = dfit[0] + dfit[1] * 2 * train["batch_size"]
    static = sum(parts.values())
    tensors = static + max(phases.values())
    total = tensors * MARGIN + CUDA_OVERHEAD_GIB * GIB
    return {
        "parts_gib": {k: v / GIB for k, v in parts.items()},
        "phases_gib": {k: v / GIB for k, v in phases.items()},
        "reward": reward_desc,
        "static_gib": static / GIB,
        "tensors_gib": tensors / GIB,
        "total_gib": total / GIB,
        "rows": {"train": rows_train, "sample": rows_sample, "decode": chunk},
        "reward_backprop": train.get("algorithm") in REWARD_BACKPROP,
    }


REWARD_BACKPROP = ("draft", "alignprop")
"""The reward-backpropagation algorithms: their memory is that of the chain (:func:`reward_backprop_phases`)."""
STEP_TENSORS = 4
"""Latent-sized float32 tensors a checkpointed gradient step keeps until the backward pass: its input latents (the
checkpoint's), the guided output and the two the step's arithmetic saves (an upper bound for DDIM and flow steps)."""
REWARD_TRAIN_CACHE: dict = {}


def reward_train_fit(reward: dict) -> tuple[float, float]:
    """``(a, b)``: bytes ``a + b * images`` of the reward model's forward and backward w.r.t. the images (the aesthetic
    reward's open_clip image tower at 224 px; 0 for a pixel rule)."""
    if reward.get("name") != "aesthetic":
        return 0.0, 0.0
    arch = (reward.get("options") or {}).get("clip_model", "ViT-L-14")
    if arch not in REWARD_TRAIN_CACHE:
        measured = clip_image_train_bytes(arch, 1) is not None
        REWARD_TRAIN_CACHE[arch] = linear_fit(lambda r: clip_image_train_bytes(arch, r)) if measured else (0.0, 0.0)
    return REWARD_TRAIN_CACHE[arch]


def reward_backprop_phases(cfg: dict, n: dict, d: str, cfg_rows: int) -> dict:
    """Peak bytes of the phases of one reward-backpropagation minibatch (``train.algorithm=draft|alignprop``).

    The chain samples ``sample.batch_size`` images: steps without gradient are sampling calls; the ``K`` gradient
    steps (``draft_k``; ``alignprop_k_max``, the largest draw; DRaFT-LV: ``draft_lv_samples`` last steps) keep, with
    ``train.gradient_checkpointing``, only :data:`STEP_TENSORS` latents each (``torch.utils.checkpoint`` around each
    step's denoiser call), and their backward recomputes one call at a time (a checkpointed training call, the UNet's
    blocks also checkpointed); without it every gradient call's activations stay until the backward (counted as
    ``K`` training calls: an upper bound, each call's backward transient is counted ``K`` times). Then the VAE decode
    with gradient (DRaFT-LV: ``draft_lv_samples`` times the images; with checkpointing recomputed in the backward one
    ``sample.decode_chunk_size`` chunk at a time, else all stored from the forward) and the reward model's forward and
    backward w.r.t. the images."""
    sample, train = cfg["sample"], cfg["train"]
    batch = sample["batch_size"]
    lv = train["algorithm"] == "draft" and train.get("draft_lv", False)
    images = batch * (train.get("draft_lv_samples", 2) if lv else 1)
    if train["algorithm"] == "draft":
        k = train.get("draft_lv_samples", 2) if lv else train.get("draft_k", 1)
    else:
        k = train.get("alignprop_k_max", 50)
    rows = cfg_rows * batch
    ckpt = train.get("gradient_checkpointing", False)
    fit = n[f"train_ckpt_{d}" if ckpt else f"train_{d}"]
    sfit, dec = n[f"sample_{d}"], n[f"decode_train_{d}"]
    call = fit[0] + fit[1] * rows
    chunk = min(sample.get("decode_chunk_size", 8), images) if ckpt else images  # one checkpointed chunk at a time
    decode = dec[0] + dec[1] * chunk
    ra, rb = reward_train_fit(cfg.get("reward", {}))
    reward = ra + rb * images
    latent_bytes = n.get("latent_channels", 4) * n["latent"] ** 2 * 4
    chain = k * batch * latent_bytes * STEP_TENSORS if ckpt else k * call
    return {
        "sampling_call": sfit[0] + sfit[1] * rows,
        "chain_and_reward": chain + (0 if ckpt else decode) + reward,
        "chain_and_decode_backward": chain + decode,
        "chain_and_step_backward": chain + (call if ckpt else 0),
    }


# ---------------------------------------------------------------------------------- sharded full fine-tuning

FSDP_GPUS = (1, 2, 4, 8)
"""GPU counts of the sharded full fine-tuning table (docs/gpu-memory.md#full-fine-tuning-sharded-over-n-gpus-fsdp2)."""


def fsdp_units(model: torch.nn.Module) -> tuple[int, int]:
    """``(largest unit, root unit)``: parameters of the largest FSDP unit and of the root unit of ``model`` wrapped as
    accelerate's ``TRANSFORMER_BASED_WRAP`` wraps it: one unit per module whose class the model names in
    ``_no_split_modules``, holding its parameters that no unit inside it holds; the root unit holds the rest."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    taken: set[int] = set()
    largest = 0
    for module in reversed(list(model.modules())):  # a module's descendants come before it
        if type(module).__name__ in names:
            own = [p for p in module.parameters() if id(p) not in taken]
            taken.update(id(p) for p in own)
            largest = max(largest, sum(p.numel() for p in own))
    root = sum(p.numel() for p in model.parameters() if id(p) not in taken)
    return largest, root


def fsdp_full_memory(cfg: dict, n: dict, gpus: int, checkpointing: bool = False) -> dict:
    """GiB per GPU of the preset ``cfg`` as a full fine-tuning (``model.use_lora=false``) sharded over ``gpus`` GPUs
    with FSDP2 (accelerate's ``TRANSFORMER_BASED_WRAP``), on the architecture numbers ``n`` (with ``fsdp_units``).

    Sharded (divided by ``gpus``): the fp32 weights, their gradients and AdamW state, the frozen KL reference
    (``train.kl_coef > 0``, an fp32 copy) and the old policy (``nft``, ``awm`` with ``awm_ema_kl > 0``: an fp32 EMA).
    Gathered while computing (FSDP2's mixed precision gathers in bf16 under ``mixed_precision=bf16``, else fp32): the
    root unit, which stays gathered from forward to backward, and two of the largest unit (the one computing and the
    one prefetched), each with its unsharded gradient before the reduce-scatter. Replicated on every GPU, as without
    sharding: VAE, text encoders, reward model, the epoch's trajectories and the activations of one call."""
    model, train = {**cfg["model"], "use_lora": False}, dict(cfg["train"])
    if checkpointing:
        train["gradient_checkpointing"] = True
    mem = preset_memory({**cfg, "model": model, "train": train}, n)
    parts = {k: v * GIB for k, v in mem["parts_gib"].items()}
    parts.pop("autocast_weight_cache", None)  # FSDP2 gathers bf16 weights per unit instead
    for key in ("trainable_weights", "gradients", "optimizer_state"):
        parts[key] /= gpus
    copies = (train.get("kl_coef", 0) > 0) + (
        train.get("algorithm") == "nft" or (train.get("algorithm") == "awm" and train.get("awm_ema_kl", 0) > 0)
    )
    parts["reference_and_old_policy"] = copies * n["unet_params"] * 4 / gpus
    gathered = 2 if cfg.get("mixed_precision", "no") in ("bf16", "fp16") else 4
    largest, root = n["fsdp_units"]
    parts["gathered_units"] = (root + 2 * largest) * gathered * 2  # weights and their unsharded gradients
    static = sum(parts.values())
    phases = {k: v * GIB for k, v in mem["phases_gib"].items()}
    total = (static + max(phases.values())) * MARGIN + CUDA_OVERHEAD_GIB * GIB
    return {"parts_gib": {k: v / GIB for k, v in parts.items()}, "static_gib": static / GIB, "total_gib": total / GIB}


def merged_preset(name: str) -> dict:
    from ddpo.training.config import build_config, to_dict

    return to_dict(build_config(preset=name))


def fitting_settings(cfg: dict, n: dict, card_gib: float) -> tuple[dict, dict]:
    """The least change of ``cfg`` that fits ``card_gib``: the preset's batch sizes halved (the same samples per epoch
    and pairs per optimiser step through ``num_batches_per_epoch`` and ``gradient_accumulation_steps``), each size
    all without gradient checkpointing first (it costs ~30% more training compute; smaller calls cost little on a
    GPU at 512 px), then with it, then the same with the reward model in bf16. Returns (changes, memory)."""
    import copy

    sample, train = cfg["sample"], cfg["train"]
    spp = sample.get("samples_per_prompt", 1)
    owned = train.get("algorithm") in REWARD_BACKPROP  # its minibatch is a prompt batch: train.batch_size unused
    sb0 = sample["batch_size"]
    tb0 = sb0 if owned else train["batch_size"]
    options = []
    factors = []
    f = 1
    while sb0 // f >= 1 and tb0 // f >= 1:
        if sb0 % f == 0 and tb0 % f == 0 and (sb0 // f) % spp == 0:
            factors.append(f)
        f *= 2
    reward_levels = [None]
    if (cfg.get("reward") or {}).get("name") == "aesthetic":
        reward_levels.append("bfloat16")
    for reward_dtype in reward_levels:
        for ckpt in (False, True):
            for f in factors:
                options.append((f, ckpt, reward_dtype))
    for f, ckpt, reward_dtype in options:
        c = copy.deepcopy(cfg)
        changes = {}
        if f > 1:
            c["sample"]["batch_size"] = sb0 // f
            c["sample"]["num_batches_per_epoch"] = sample["num_batches_per_epoch"] * f
            c["train"]["gradient_accumulation_steps"] = train["gradient_accumulation_steps"] * f
            c["sample"]["decode_chunk_size"] = min(sample.get("decode_chunk_size", 8), sb0 // f)
            changes = {
                "sample.batch_size": sb0 // f,
                "sample.num_batches_per_epoch": c["sample"]["num_batches_per_epoch"],
            }
            if not owned:
                c["train"]["batch_size"] = tb0 // f
                changes["train.batch_size"] = tb0 // f
            changes["train.gradient_accumulation_steps"] = c["train"]["gradient_accumulation_steps"]
        if ckpt and not train.get("gradient_checkpointing"):
            c["train"]["gradient_checkpointing"] = True
            changes["train.gradient_checkpointing"] = True
        if reward_dtype:
            c["reward"]["options"] = {**(c["reward"].get("options") or {}), "dtype": reward_dtype}
            changes["reward.options.dtype"] = reward_dtype
        mem = preset_memory(c, n)
        if mem["total_gib"] <= card_gib:
            return changes, mem
    return {"does not fit": True}, mem


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="*", default=None, help="preset names (default: every shipped preset)")
    parser.add_argument("--json", type=Path, default=None, help="write every number to this file")
    args = parser.parse_args(argv)
    from ddpo.training.config import build_config, preset_names

    names = args.presets or preset_names()
    report: dict = {"method": "computed (meta device), no GPU", "presets": {}, "architectures": {}}
    print(f"COMPUTED, not measured on a GPU (overhead {CUDA_OVERHEAD_GIB} GiB + margin x{MARGIN})")
    for name in names:
        cfg = merged_preset(name)
        m = cfg["model"]
        arch = architecture(m["pretrained"], m.get("family", "auto"))
        if arch is None:
            print(f"\n== {name}: not estimated (model.pretrained={m['pretrained']}: no published config here)")
            report["presets"][name] = {"not estimated": m["pretrained"]}
            continue
        n = model_numbers(arch, m["lora_rank"], m["lora_target_modules"], cfg["sample"].get("resolution"))
        report["architectures"][n["architecture"]] = {
            k: (v / GIB if isinstance(v, (int, float)) and k.startswith(("train", "sample", "decode")) else v)
            for k, v in n.items()
        }
        mem = preset_memory(cfg, n)
        cards = {}
        for card in CARDS_GIB:
            changes, fitted = fitting_settings(cfg, n, card)
            if "does not fit" not in changes:  # the recommended overrides are a valid config
                build_config(preset=name, overrides=[f"{k}={str(v).lower()}" for k, v in changes.items()])
            cards[str(card)] = {"changes": changes, "total_gib": fitted["total_gib"]}
        sharded = {
            f"{gpus}{'_ckpt' if ckpt else ''}": fsdp_full_memory(cfg, n, gpus, ckpt)["total_gib"]
            for ckpt in (False, True)
            for gpus in FSDP_GPUS
        }
        report["presets"][name] = {"memory": mem, "cards": cards, "full_fine_tuning_fsdp": sharded}
        print(
            f"\n== {name}: {n['architecture']} {n['resolution']} px, LoRA r{m['lora_rank']} = {n['lora_params']:,} params"
        )
        print(f"   needs {mem['total_gib']:.2f} GiB as configured; rows {mem['rows']}")
        for k, v in {**mem["parts_gib"], **mem["phases_gib"]}.items():
            print(f"   {k:24s} {v:8.3f} GiB")
        for card, c in cards.items():
            print(f"   {card:>3s} GB: {c['total_gib']:6.2f} GiB with {c['changes'] or 'as configured'}")
        for suffix, label in (("", ""), ("_ckpt", " + gradient checkpointing")):
            figures = ", ".join(f"{gpus} GPUs {sharded[f'{gpus}{suffix}']:.1f}" for gpus in FSDP_GPUS)
            print(f"   full fine-tuning, FSDP2{label}: {figures} GiB per GPU")
    for arch, n in report["architectures"].items():
        print(
            f"\n{arch}: denoiser {n['unet_params']:,} params (+{n['unet_buffers']:,} buffer values), "
            f"VAE {n['vae_params']:,}, text {n['text_params']:,} ({' + '.join(f'{t:,}' for t in n['text_params_each'])})"
        )
        for k in (
            "train_fp32",
            "train_bf16",
            "train_ckpt_fp32",
            "train_ckpt_bf16",
            "sample_fp32",
            "sample_bf16",
            "decode_fp32",
            "decode_bf16",
            "decode_train_fp32",
            "decode_train_bf16",
        ):
            a, b = n[k]
            print(f"   {k:16s} {a / GIB:7.3f} + {b / GIB:7.4f} x rows GiB")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
