"""LoRA on the denoiser (UNet or transformer) through peft, and its export in the format ``pipe.load_lora_weights``
reads."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel


def add_lora(denoiser: torch.nn.Module, rank: int, alpha: float, target_modules: list[str]) -> None:
    """Freeze the ``denoiser`` (a UNet or a transformer) and add a peft LoRA adapter (B initialised to zero, so
    the model is unchanged at start)."""
    from peft import LoraConfig

    denoiser.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules))
    try:
        denoiser.add_adapter(config)
    except ValueError as err:
        raise ValueError(
            f"model.lora_target_modules={list(target_modules)} matched no module of the {type(denoiser).__name__} "
            f"({err}); typical values are to_q, to_k, to_v, to_out.0"
        ) from err


def lora_state_dict(
    denoiser: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The LoRA weights of ``denoiser`` (a UNet or a transformer) in the diffusers format that
    ``pipe.load_lora_weights`` reads; ``state_dict``: its LoRA tensors by parameter name, when they are to be taken
    from there rather than from the module (a sharded module's, gathered in full).

    A UNet's are converted to diffusers' own key names (``to_q.lora.down``, as diffusers' UNet LoRA scripts save
    them); a transformer's (SD3, FLUX) stay in peft's (``to_q.lora_A``), which is what their pipelines' loaders and
    diffusers' transformer LoRA scripts use: the UNet conversion would rename only the ``to_q/k/v/out.0`` keys to
    names those loaders do not know, and they would silently skip them.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(denoiser, state_dict=state_dict)
    return convert_state_dict_to_diffusers(state) if isinstance(denoiser, UNet2DConditionModel) else state


def lora_metadata(model) -> dict:
    """The peft adapter config of ``model`` (rank, ``lora_alpha``, targets) as ``save_lora_weights`` stores it beside
    the weights: without it ``load_lora_weights`` assumes ``lora_alpha == rank`` and scales the adapter wrongly
    whenever they differ."""
    return model.peft_config["default"].to_dict()
