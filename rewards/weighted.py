"""A weighted sum of other rewards, each checked and logged by name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .base import (
    Reward,
    accepts_metadata,
    check_images,
    check_reward_output,
    get_reward,
    is_differentiable,
    register,
)


def _parse_component(name: str, spec: Any) -> tuple[float, dict[str, Any]]:
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return float(spec), {}
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"weight", "options"}
        if unknown or "weight" not in spec:
            raise ValueError(
                f"weighted reward: component {name!r} must be a number or {{weight: w, options: {{...}}}}; "
                f"got keys {sorted(spec)}"
            )
        options = spec.get("options") or {}
        if not isinstance(options, Mapping):
            raise ValueError(f"weighted reward: options of component {name!r} must be a mapping; got {options!r}")
        return float(spec["weight"]), dict(options)
    raise ValueError(f"weighted reward: component {name!r} must be a number or {{weight, options}}; got {spec!r}")


@register("weighted")
class WeightedReward(Reward):
    """``sum_k weight_k * reward_k(images, prompts)``.

    Options:
        components: ``{name: weight}`` or ``{name: {"weight": w, "options": {...}}}``; a name is a registered
            reward or an import path ``"my_pkg.my_module:my_reward"``. Example (YAML)::

                reward:
                  name: weighted
                  options:
                    components:
                      jpeg_compressibility: 1.0
                      aesthetic: {weight: 0.5, options: {head_path: /models/sac+logos+ava1-l14-linearMSE.pth}}

    Every component's output is validated by name (``weighted/<name>``) before it is summed, so a NaN, a wrong
    shape or dtype stops the run naming the component and the bad sample indices. :meth:`last_info` returns
    ``{"reward/<name>_mean": float}`` for every component of the last call (plus the components' own info);
    :meth:`last_components` its per-sample values (``train.advantage=per_component`` normalises each on its own).
    :meth:`update`, :meth:`state_dict` and :meth:`load_state_dict` are forwarded to the components (state keyed by
    component name). The sum is :attr:`~rewards.Reward.differentiable` when every component is, and its gradient is
    then the weighted sum of the components' gradients.
    """

    name = "weighted"

    #: Per instance: differentiable when every component is (set in ``__init__``; the class says False).
    differentiable = False
    #: How ``ddpo rewards`` words the condition (:func:`rewards.differentiability`).
    differentiable_when = "if all its components are"

    def __init__(self, components: Mapping[str, Any]):
        if not isinstance(components, Mapping) or not components:
            raise ValueError("weighted reward: 'components' must be a non-empty mapping {name: weight}")
        self.weights: dict[str, float] = {}
        self.components: dict[str, Reward] = {}
        for name, spec in components.items():
            if name == "weighted":
                raise ValueError("weighted reward: a component cannot itself be 'weighted'")
            weight, options = _parse_component(name, spec)
            self.weights[name] = weight
            self.components[name] = get_reward(name, **options)
        # The sum is a tensor op on the components' values (nothing detached but the logged means), so the whole is
        # differentiable exactly when every part is; one non-differentiable part makes the sum's gradient wrong.
        self.differentiable = all(is_differentiable(reward) for reward in self.components.values())
        self._last: dict[str, torch.Tensor] = {}
        self._last_values: dict[str, torch.Tensor] = {}
        self._last_component_info: dict[str, float] = {}

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        """``images [B, 3, H, W]`` in ``[0, 1]`` -> ``float32 [B]``; ``metadata`` goes to the components that take it."""
        check_images(images)
        batch_size = images.shape[0]
        total = torch.zeros(batch_size, dtype=torch.float32, device=images.device)
        means: dict[str, torch.Tensor] = {}
        per_sample: dict[str, torch.Tensor] = {}
        component_info: dict[str, float] = {}
        for name, reward in self.components.items():
            if metadata is not None and accepts_metadata(reward.__call__):
                values = reward(images, prompts, metadata=metadata)
            else:
                values = reward(images, prompts)
            values = check_reward_output(values, batch_size, f"weighted/{name}")
            total = total + self.weights[name] * values.to(total.device)
            means[name] = values.detach().mean()
            per_sample[name] = values.detach()
            component_info.update(reward.last_info())
        self._last, self._last_values, self._last_component_info = means, per_sample, component_info
        return total

    def last_components(self) -> dict[str, torch.Tensor]:
        """Each component's checked values of the last call, unweighted and detached: ``{name: float32 [B]}``, in
        the order of ``components``."""
        return dict(self._last_values)

    def last_info(self) -> dict[str, float]:
        info = {f"reward/{name}_mean": float(mean) for name, mean in self._last.items()}
        info.update(self._last_component_info)
        return info

    def update(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        info: dict[str, float] = {}
        for reward in self.components.values():
            info.update(reward.update(images, prompts))
        return info

    def state_dict(self) -> dict[str, Any]:
        state = {}
        for name, reward in self.components.items():
            component_state = reward.state_dict()
            if component_state:
                state[name] = component_state
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - set(self.components)
        if unknown:
            raise ValueError(f"weighted reward: checkpoint holds state for unknown components {sorted(unknown)}")
        for name, reward in self.components.items():
            reward.load_state_dict(state.get(name, {}))
