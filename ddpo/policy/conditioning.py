"""The text conditioning of a batch, whatever the model family's denoiser takes.

Stable Diffusion 1.x/2.x needs only the text encoder's sequence states; SDXL adds a pooled embedding and its
micro-conditioning ("added time ids": original size, crop corner, target size); SD3 and FLUX add a pooled embedding.
One small dataclass carries all of them, so sampling, recomputation and the trajectories stay family-agnostic: it is
indexed, expanded and concatenated along the batch dimension like a tensor.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    """Conditioning of ``B`` prompts (all float32 tensors on one device).

    Attributes:
        embeds: ``[B, L, D]`` sequence states (SD: CLIP hidden states; SDXL: both CLIP encoders' penultimate states
            concatenated; SD3: CLIP + T5 joint states; FLUX: T5 states).
        pooled: ``[B, P]`` pooled embedding (SDXL ``text_embeds``, SD3/FLUX ``pooled_projections``), or None.
        time_ids: ``[B, K]`` SDXL added time ids (original size, crop top-left, target size), or None.
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.embeds.device

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def _map(self, fn) -> Conditioning:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Conditioning(**{k: (None if v is None else fn(v)) for k, v in values.items()})

    def __getitem__(self, index) -> Conditioning:
        """Rows ``index`` (an int slice, a long tensor ``[N]``...) of every field."""
        return self._map(lambda v: v[index])

    def expand(self, batch: int) -> Conditioning:
        """A batch-1 conditioning (the negative prompt) broadcast to ``batch`` rows (a view, no copy)."""
        return self._map(lambda v: v.expand(batch, *v.shape[1:]))

    def to(self, *args, **kwargs) -> Conditioning:
        return self._map(lambda v: v.to(*args, **kwargs))

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        """Concatenate along the batch dimension (every item has the same fields set)."""
        first = items[0]
        values = {}
        for spec in dataclasses.fields(first):
            parts = [getattr(item, spec.name) for item in items]
            if any(p is None for p in parts) and not all(p is None for p in parts):
                raise ValueError(f"cannot concatenate conditionings where only some have {spec.name!r}")
            values[spec.name] = None if parts[0] is None else torch.cat(parts)
        return Conditioning(**values)


def as_conditioning(value: torch.Tensor | Conditioning | None) -> Conditioning | None:
    """``value`` as a :class:`Conditioning` (a bare ``[B, L, D]`` tensor is Stable Diffusion 1.x/2.x's)."""
    if value is None or isinstance(value, Conditioning):
        return value
    return Conditioning(embeds=value)
