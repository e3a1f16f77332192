"""An adversarial reward: a small image classifier trained online to tell reference images from the policy's samples.

Each epoch the trainer scores the fresh samples with the current discriminator (``__call__``), then calls
:meth:`DiscriminatorReward.update` with them: ``steps_per_epoch`` optimiser steps of binary cross-entropy on
minibatches of reference images (label 1) and samples (label 0). The reward is the discriminator's logit for
"reference" (or ``log D``). Everything random uses the reward's own ``torch.Generator`` (seeded), and the model,
the optimiser and that generator are part of :meth:`state_dict`, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .base import Reward, check_images, register

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

#: A source of reference images: ``source(n, generator) -> [n, 3, H, W]`` float in ``[0, 1]``.
ImageSource = Callable[[int, torch.Generator], torch.Tensor]


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """``[B, 3, H, W]`` -> ``[B, 3, size, size]``: shortest side resized to ``size`` (bilinear, antialiased when
    shrinking), then centre-cropped. Differentiable; used for reference images and samples alike so that the
    resampling itself cannot tell them apart."""
    height, width = images.shape[-2:]
    if (height, width) != (size, size):
        scale = size / min(height, width)
        new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
        shrink = new_h < height or new_w < width
        images = F.interpolate(images, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=shrink)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        images = images[..., top : top + size, left : left + size]
    return images


def load_image_folder(folder: str | os.PathLike, image_size: int) -> torch.Tensor:
    """All images of ``folder`` (png/jpg/jpeg/webp/bmp, sorted by name) as ``float32 [N, 3, S, S]`` in ``[0, 1]``
    (see :func:`resize_center_crop`)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"reward 'discriminator': reference_dir {str(folder)!r} is not a directory")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(
            f"reward 'discriminator': reference_dir {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})"
        )
    images = []
    for path in files:
        with Image.open(path) as image:
            images.append(resize_center_crop(_pil_to_tensor(image)[None], image_size))
    return torch.cat(images)


def _pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> ``float32 [3, H, W]`` in ``[0, 1]``."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class Discriminator(nn.Module):
    """A small convolutional classifier: ``[B, 3, S, S]`` in ``[0, 1]`` -> logits ``[B]`` (reference = positive).

    ``depth`` stride-2 convolutions (``channels * 2**i`` filters, LeakyReLU), global average pooling, a linear layer.
    """

    def __init__(self, channels: int = 32, depth: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for i in range(depth):
            out_channels = channels * 2**i
            layers += [nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_channels, 1)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """PyTorch's default Conv/Linear initialisation, drawn from ``generator`` instead of the global RNG."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
                fan_in = module.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.features(images * 2.0 - 1.0)
        return self.classifier(features.mean(dim=(2, 3))).squeeze(-1)


def world_reference_source(count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` fresh ground-truth renders of the procedural world ``[count, 3, 64, 64]``, seeded by ``generator``."""
    from world import render, sample_scenes

    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    return render(sample_scenes(count, seed))


@register("discriminator")
class DiscriminatorReward(Reward):
    """Reward = the online discriminator's logit (or ``log D``) that an image is a reference image.

    Options:
        reference_dir: folder of reference images (png/jpg/...), resized and centre-cropped to ``image_size``.
        reference_images: instead of a folder (Python API): a tensor ``[N, 3, H, W]`` in ``[0, 1]``, a list of PIL
            images, or a callable ``source(n, generator) -> [n, 3, H, W]`` producing fresh reference images; or
            the string ``"world"`` (also from a config): fresh renders of ddpo's procedural world.
        image_size: side of the square the discriminator sees (images are resized to it, differentiably).
        channels, depth: width of the first convolution and number of stride-2 convolutions.
        steps_per_epoch: optimiser steps per :meth:`update` call.
        learning_rate, betas, weight_decay: AdamW settings.
        batch_size: reference images and samples per optimiser step (each).
        reward: ``"logit"`` (default; unbounded) or ``"log_d"`` (``log sigmoid(logit)``, at most 0).
        seed: seeds the initialisation and every minibatch draw (own ``torch.Generator``).
        device: where the discriminator lives (default: the images' device, chosen on the first call).

    :meth:`update` returns ``reward/discriminator_loss`` (mean over the epoch's steps),
    ``reward/discriminator_accuracy`` (mean accuracy of those steps' minibatches, measured before each step) and
    ``reward/discriminator_updates`` (optimiser steps so far).
    """

    name = "discriminator"

    #: Scoring is the current discriminator applied to the pixels (differentiable resize, convolutions, LeakyReLU)
    #: with its weights used detached (:meth:`logits`), so a gradient reaches the pixels and never the weights. It is
    #: the gradient of *this epoch's* discriminator: :meth:`update` moves it every epoch (a GAN generator's gradient).
    differentiable = True

    def __init__(
        self,
        reference_dir: str | None = None,
        reference_images: torch.Tensor | Sequence[Image.Image] | ImageSource | None = None,
        image_size: int = 64,
        channels: int = 32,
        depth: int = 3,
        steps_per_epoch: int = 10,
        learning_rate: float = 1e-4,
        betas: Sequence[float] = (0.5, 0.999),
        weight_decay: float = 0.0,
        batch_size: int = 16,
        reward: str = "logit",
        seed: int = 0,
        device: str | None = None,
    ):
        if isinstance(reference_images, str) and reference_images == "world":
            reference_images = world_reference_source
        if (reference_dir is None) == (reference_images is None):
            raise ValueError("reward 'discriminator': give exactly one of reference_dir or reference_images")
        if reward not in ("logit", "log_d"):
            raise ValueError(f"reward 'discriminator': reward must be 'logit' or 'log_d'; got {reward!r}")
        if int(steps_per_epoch) < 0 or int(batch_size) < 1 or int(image_size) < 2**depth:
            raise ValueError(
                "reward 'discriminator': need steps_per_epoch >= 0, batch_size >= 1, image_size >= 2**depth"
            )
        self.image_size = int(image_size)
        self.steps_per_epoch = int(steps_per_epoch)
        self.batch_size = int(batch_size)
        self.reward_kind = reward
        self.seed = int(seed)

        self.reference: torch.Tensor | None = None
        self.reference_source: ImageSource | None = None
        if reference_dir is not None:
            self.reference = load_image_folder(reference_dir, self.image_size)
        elif callable(reference_images) and not isinstance(reference_images, torch.Tensor):
            self.reference_source = reference_images
        elif isinstance(reference_images, torch.Tensor):
            check_images(reference_images)
            self.reference = self._resize(reference_images.detach().float().cpu())
        else:
            images = [self._resize(_pil_to_tensor(image)[None]) for image in reference_images]
            if not images:
                raise ValueError("reward 'discriminator': reference_images is empty")
            self.reference = torch.cat(images)
        if self.reference is not None and len(self.reference) == 0:
            raise ValueError("reward 'discriminator': no reference images")

        self.generator = torch.Generator(device="cpu").manual_seed(self.seed)
        with torch.device("meta"):  # no default initialisation: it would draw from the global RNG
            self.model = Discriminator(channels=channels, depth=depth)
        self.model.to_empty(device="cpu")
        self.model.reset_parameters(self.generator)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=float(learning_rate), betas=tuple(betas), weight_decay=float(weight_decay)
        )
        self.device = torch.device(device) if device is not None else None
        self.updates = 0
        self._placed: torch.device | None = None
        self._lock = threading.RLock()

    # -- helpers -------------------------------------------------------------------------------------------------

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        return resize_center_crop(images, self.image_size)

    def _place(self, images: torch.Tensor) -> torch.device:
        device = self.device or images.device
        if self._placed != device:
            with self._lock:
                if self._placed != device:
                    self.model.to(device)
                    if self.reference is not None:
                        self.reference = self.reference.to(device)
                    for state in self.optimizer.state.values():
                        for key, value in state.items():
                            if isinstance(value, torch.Tensor) and key != "step":
                                state[key] = value.to(device)
                    self._placed = device
        return device

    def _reference_batch(self, n: int) -> torch.Tensor:
        if self.reference_source is not None:
            batch = self.reference_source(n, self.generator)
            check_images(batch)
            return self._resize(batch.float())
        index = torch.randint(len(self.reference), (n,), generator=self.generator)
        return self.reference[index.to(self.reference.device)]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Discriminator logits ``[B]`` for ``images [B, 3, H, W]`` with frozen weights (gradients reach the pixels
        only: the weights are used detached, so scoring never touches the discriminator's gradients)."""
        check_images(images)
        with self._lock:  # functional_call swaps the module's parameters for the call: not concurrent with update
            device = self._place(images)
            params = {name: p.detach() for name, p in self.model.named_parameters()}
            pixels = self._resize(images.to(device=device, dtype=torch.float32))
            return torch.func.functional_call(self.model, params, (pixels,))

    # -- the reward protocol -----------------------------------------------------------------------------------------

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        logits = self.logits(images)
        values = logits if self.reward_kind == "logit" else F.logsigmoid(logits)
        return values.to(device=images.device, dtype=torch.float32)

    def update(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        """Train on this epoch's samples (label 0) against reference images (label 1).

        Args:
            images: the epoch's samples ``[B, 3, H, W]`` in ``[0, 1]`` (detached here).
            prompts: unused (the discriminator is unconditional).

        Returns:
            ``{"reward/discriminator_loss", "reward/discriminator_accuracy", "reward/discriminator_updates"}``.
        """
        check_images(images)
        with self._lock:
            device = self._place(images)
            # Train in float32 with gradients, whatever no_grad / autocast context the caller is in.
            with torch.enable_grad(), torch.autocast(device_type=device.type, enabled=False):
                samples = self._resize(images.detach().to(device=device, dtype=torch.float32))
                losses, accuracies = [], []
                self.model.train()
                for _ in range(self.steps_per_epoch):
                    index = torch.randint(len(samples), (self.batch_size,), generator=self.generator)
                    fake = samples[index.to(device)]
                    real = self._reference_batch(self.batch_size).to(device)
                    logits = self.model(torch.cat([real, fake]))
                    labels = torch.cat([torch.ones(len(real), device=device), torch.zeros(len(fake), device=device)])
                    loss = F.binary_cross_entropy_with_logits(logits, labels)
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
                    losses.append(loss.detach())
                    accuracies.append(((logits.detach() > 0).float() == labels).float().mean())
                    self.updates += 1
                self.model.eval()
        if not losses:
            return {"reward/discriminator_updates": float(self.updates)}
        return {
            "reward/discriminator_loss": float(torch.stack(losses).mean()),
            "reward/discriminator_accuracy": float(torch.stack(accuracies).mean()),
            "reward/discriminator_updates": float(self.updates),
        }

    def state_dict(self) -> dict[str, Any]:
        """``{"model", "optimizer", "generator", "updates"}``: tensors and plain Python values only (loadable with
        ``torch.load(weights_only=True)``); tensors are copied to the CPU."""
        with self._lock:

            def to_cpu(value: Any) -> Any:
                if isinstance(value, torch.Tensor):
                    return value.detach().cpu().clone()
                if isinstance(value, dict):
                    return {k: to_cpu(v) for k, v in value.items()}
                if isinstance(value, list):
                    return [to_cpu(v) for v in value]
                return value

            return {
                "model": to_cpu(self.model.state_dict()),
                "optimizer": to_cpu(self.optimizer.state_dict()),
                "generator": self.generator.get_state().clone(),
                "updates": self.updates,
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"model", "optimizer", "generator", "updates"} - set(state)
        if missing:
            raise ValueError(f"reward {self.name!r}: discriminator state is missing {sorted(missing)}")
        with self._lock:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])  # moves the moments to the parameters' device
            self.generator.set_state(state["generator"].cpu())
            self.updates = int(state["updates"])
