"""The reward protocol, the registry and the checks every reward output goes through.

A reward is a callable ``reward(images, prompts) -> torch.Tensor`` where

* ``images`` is a float tensor ``[B, 3, H, W]`` with values in ``[0, 1]`` on any device,
* ``prompts`` is a list of ``B`` strings,
* the result is a float32 tensor ``[B]`` of finite values (higher is better).

A reward may also take a keyword argument ``metadata`` (a list of ``B`` dicts, one per sample); callers pass it
only when they have per-sample metadata, so rewards without that parameter keep working.

Plain functions with that signature are rewards. Classes derived from :class:`Reward` may also

* report per-component statistics of the last call (``last_info``), logged to ``metrics.jsonl``,
* learn online (``update``, called once per epoch with the fresh samples, e.g. a discriminator),
* carry state that must survive a checkpoint (``state_dict`` / ``load_state_dict``),
* declare themselves ``differentiable`` (see :attr:`Reward.differentiable`).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class RewardFn(Protocol):
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor: ...


class Reward:
    """Base class for rewards with optional state, online updates and per-component logging."""

    #: Name used in logs; set by the registry when built through :func:`get_reward`.
    name: str = "reward"

    #: Whether the reward is a differentiable function of the pixels that may be called with gradients: no
    #: ``no_grad`` and nothing that cuts the graph (``detach``, NumPy, PIL) between ``images`` and the returned
    #: values, and no gradient ever reaching the reward's own weights (frozen, ``requires_grad=False``, or used
    #: detached). Such a reward follows torch's ambient grad mode: under ``torch.no_grad()`` (how the trainer scores
    #: for policy gradients) it builds no graph; under ``torch.enable_grad()`` with ``images.requires_grad`` the
    #: returned values carry a gradient to the pixels (direct reward backpropagation: DRaFT, AlignProp). The values
    #: are the same bit for bit in both modes. Default False: a reward is differentiable only if it says so.
    differentiable: bool = False

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def last_info(self) -> dict[str, float]:
        """Scalars describing the last call (e.g. ``{"reward/brightness_mean": 0.4}``)."""
        return {}

    def pass_fail(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor] | None:
        """Whether each sample passes each of the reward's pass/fail checks: bool ``[B]`` per check name, plus
        ``all`` (every check passed), for ``ddpo eval --pass-at``. None (the default) for a reward without checks."""
        return None

    def update(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        """Learn from the epoch's fresh samples (only online rewards do anything). Returns scalars to log."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values needed to resume this reward exactly (empty for stateless rewards)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"reward {self.name!r} is stateless but the checkpoint holds state keys {sorted(state)}")


def is_differentiable(reward: Any) -> bool:
    """Whether ``reward`` (a :class:`Reward` or any reward callable) declares ``differentiable = True``; a reward
    that says nothing (or anything but ``True``) is not differentiable."""
    return getattr(reward, "differentiable", False) is True


def accepts_metadata(fn: Callable) -> bool:
    """Whether ``fn`` takes a ``metadata`` keyword argument (or ``**kwargs``)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "metadata" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


class FunctionReward(Reward):
    """Wraps a plain ``fn(images, prompts) -> Tensor[B]`` into a :class:`Reward`."""

    def __init__(self, fn: Callable[[torch.Tensor, list[str]], torch.Tensor], name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "reward")
        self._takes_metadata = accepts_metadata(fn)
        # A plain function is not differentiable unless it declares it (``fn.differentiable = True``, or
        # ``@reward_function(differentiable=True)``).
        self.differentiable = is_differentiable(fn)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> torch.Tensor:
        if metadata is not None and self._takes_metadata:
            return self.fn(images, prompts, metadata=metadata)
        return self.fn(images, prompts)


_REGISTRY: dict[str, Callable[..., Reward | RewardFn]] = {}


def register(name: str) -> Callable:
    """Decorator: register a reward factory (a class or a function returning a reward) under ``name``. A registered
    factory is also a reward factory by import path (:func:`reward_factory`)."""

    def wrap(factory: Callable) -> Callable:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"reward name {name!r} is already registered")
        _REGISTRY[name] = factory
        if not isinstance(factory, type):
            factory.__ddpo_reward__ = "factory"
        return factory

    return wrap


def reward_function(fn: Callable | None = None, *, differentiable: bool = False) -> Callable:
    """Decorator: declare ``fn(images, prompts) -> float32 Tensor[B]`` a reward, so that it may be given by import
    path (``reward.name: my_pkg.my_module:fn``). It takes no options.

    ``@reward_function(differentiable=True)`` also declares it differentiable (:attr:`Reward.differentiable`): the
    author promises that gradients reach the pixels and that the function follows the ambient grad mode."""

    def wrap(fn: Callable) -> Callable:
        fn.__ddpo_reward__ = "function"
        if differentiable:
            fn.differentiable = True
        return fn

    return wrap if fn is None else wrap(fn)


def reward_factory(fn: Callable) -> Callable:
    """Decorator: declare ``fn(**options)`` a function that builds a reward (a :class:`Reward` or a reward function),
    so that it may be given by import path; it is called with ``reward.options``."""
    fn.__ddpo_reward__ = "factory"
    return fn


HOW_TO_DECLARE = (
    "derive a class from rewards.Reward, or decorate a function with @rewards.reward_function (a reward "
    "fn(images, prompts)) or @rewards.reward_factory (a function that builds one from the options)"
)
"""How user code declares a reward that an import path may name (part of the error messages)."""


def available() -> list[str]:
    """Names of the registered rewards, sorted."""
    return sorted(_REGISTRY)


def differentiability(name: str) -> str:
    """How the registered reward ``name`` declares :attr:`Reward.differentiable`, for ``ddpo rewards``: ``"yes"``,
    ``"no"``, or the condition under which it is (a factory's ``differentiable_when``, e.g. ``weighted``)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; available: {', '.join(available())}")
    factory = _REGISTRY[name]
    condition = getattr(factory, "differentiable_when", None)
    if isinstance(condition, str) and condition:
        return condition
    return "yes" if is_differentiable(factory) else "no"


def listing() -> list[tuple[str, str]]:
    """``[(name, differentiable), ...]`` for every registered reward, sorted by name: the table of ``ddpo rewards``
    (``differentiable`` as :func:`differentiability` words it)."""
    return [(name, differentiability(name)) for name in available()]


IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
"""The form of a reward given by import path: ``package.module:attribute``."""


def _import_path(spec: str) -> Any:
    if not IMPORT_PATH.fullmatch(spec):
        raise ValueError(
            f"reward {spec!r} is not an import path of the form package.module:attribute (a registered reward's "
            "name has no ':'; `ddpo rewards` lists them)"
        )
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r} ({err})") from err
    try:
        return getattr(module, attr)
    except AttributeError as err:
        raise ValueError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}") from err


def _accepts(value: Any, annotation: Any) -> bool | None:
    """Whether ``value`` fits a simple annotation (``float``, ``int``, ``str``, ``bool``, unions with None); None when
    the annotation is not one of those (then the reward checks the value itself)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_accepts(value, arg) for arg in typing.get_args(annotation)]
        return None if None in verdicts else any(verdicts)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return None


_WORDS = {float: "a number", int: "an integer", str: "a string", bool: "true or false", type(None): "null"}


def _describe(annotation: Any) -> str:
    """``float | None`` -> ``"a number or null"``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(annotation))
    return _WORDS.get(annotation, str(annotation))


def check_options(factory: Callable, options: dict[str, Any], name: str) -> None:
    """Raise ValueError, before the reward is built, for an option the factory does not take or whose value has the
    wrong type for the factory's annotation (``reward.options.target: bright`` where a number is expected)."""
    target = factory.__init__ if isinstance(factory, type) else factory
    try:
        parameters = inspect.signature(target).parameters
        hints = typing.get_type_hints(target)
    except (TypeError, ValueError, NameError):
        return
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    for key, value in options.items():
        if key not in parameters:
            if takes_any:
                continue
            known = [p for p in parameters if p not in ("self", "args", "kwargs")]
            hint = difflib.get_close_matches(key, known, n=1)
            suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
            raise ValueError(
                f"reward {name!r} has no option {key!r}.{suggestion} Its options: {', '.join(known) or 'none'}"
            )
        if key in hints and _accepts(value, hints[key]) is False:
            wanted = _describe(hints[key])
            raise ValueError(
                f"reward {name!r}: option {key!r} must be {wanted}; got {type(value).__name__} {value!r} "
                f"(set reward.options.{key})"
            )
        if key in hints and isinstance(value, float) and not math.isfinite(value):  # NaN scores, found after sampling
            raise ValueError(
                f"reward {name!r}: option {key!r} must be a finite number; got {value} (set reward.options.{key})"
            )


def _from_import_path(spec: str, options: dict[str, Any]) -> Reward | RewardFn:
    """The reward named by ``package.module:attribute``: only a :class:`Reward` subclass or instance, or a function
    declared with :func:`reward_function` / :func:`reward_factory` (or :func:`register`) is accepted, so an import
    path cannot call an arbitrary function (``os:system``) with the config's options."""
    obj = _import_path(spec)
    kind = getattr(obj, "__ddpo_reward__", None)
    if isinstance(obj, type) and issubclass(obj, Reward):
        factory = obj
    elif isinstance(obj, Reward):
        factory = None
    elif kind in ("function", "factory") and callable(obj):
        factory = obj if kind == "factory" else None
    else:
        raise ValueError(
            f"reward {spec!r} is of type {type(obj).__name__}, not a declared reward; only a reward can be given by import "
            f"path: {HOW_TO_DECLARE}"
        )
    if factory is None:
        if options:
            raise ValueError(
                f"reward {spec!r} is a reward function and takes no options (got {sorted(options)}); to take options "
                "make it a rewards.Reward subclass or a @rewards.reward_factory"
            )
        return obj
    check_options(factory, options, spec)
    try:
        return factory(**options)
    except TypeError as err:
        raise ValueError(f"reward {spec!r}: bad options {sorted(options)}: {err}") from err


def get_reward(name: str, **options: Any) -> Reward:
    """Build a reward by registry name, or by import path ``"my_pkg.my_module:my_reward"``.

    For an import path the attribute must be a declared reward: a :class:`Reward` subclass (called with
    ``options``), a function decorated with :func:`reward_function` (used as is; no options) or with
    :func:`reward_factory` / :func:`register` (called with ``options``). Anything else is refused.
    """
    if ":" in name:
        reward = _from_import_path(name, options)
    else:
        if name not in _REGISTRY:
            hint = difflib.get_close_matches(name, available(), n=1)
            suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
            raise ValueError(
                f"unknown reward {name!r}.{suggestion} Available: {', '.join(available())}; "
                "or give an import path 'package.module:function'."
            )
        check_options(_REGISTRY[name], options, name)
        try:
            reward = _REGISTRY[name](**options)
        except TypeError as err:
            raise ValueError(f"reward {name!r}: bad options {sorted(options)}: {err}") from err
    if not isinstance(reward, Reward):
        if not callable(reward):
            raise ValueError(f"reward {name!r} is not callable: got {type(reward).__name__}")
        reward = FunctionReward(reward, name=name)
    if reward.name == "reward" or ":" not in name:
        reward.name = name
    return reward


class RewardError(RuntimeError):
    """A reward returned something the trainer cannot use (wrong shape/dtype, NaN or inf)."""


def check_reward_output(values: Any, batch_size: int, name: str) -> torch.Tensor:
    """Validate a reward's output; returns it unchanged (a float32 tensor ``[B]``) or raises :class:`RewardError`."""
    if not isinstance(values, torch.Tensor):
        raise RewardError(f"reward {name!r} returned {type(values).__name__}; it must return a torch.Tensor [B]")
    if values.shape != (batch_size,):
        raise RewardError(f"reward {name!r} returned shape {tuple(values.shape)}; expected ({batch_size},)")
    if values.dtype != torch.float32:
        raise RewardError(f"reward {name!r} returned dtype {values.dtype}; it must return torch.float32")
    bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
    if bad:
        shown = values.detach().cpu()[bad].tolist()
        raise RewardError(
            f"reward {name!r} returned non-finite values at sample indices {bad} (values {shown}); "
            "the run stops before any optimiser step uses them"
        )
    return values


def check_images(images: torch.Tensor) -> None:
    """Raise ValueError unless ``images`` is a float tensor ``[B, 3, H, W]``."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor [B, 3, H, W] in [0, 1]; got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1]; got {images.dtype}")
