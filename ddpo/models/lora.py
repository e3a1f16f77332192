"""LoRA on the UNet through peft, and its export in the format ``pipe.load_lora_weights`` reads."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel


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


def lora_metadata(model) -> dict:
    """The peft adapter config of ``model`` (rank, ``lora_alpha``, targets) as ``save_lora_weights`` stores it beside
    the weights: without it ``load_lora_weights`` assumes ``lora_alpha == rank`` and scales the adapter wrongly
    whenever they differ."""
    return model.peft_config["default"].to_dict()
