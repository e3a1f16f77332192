"""Building a config: defaults <- a resolved config <- preset <- config file <- dotted ``key.sub=value`` overrides
(:func:`build_config`), each value type-checked against the schema, an unknown key refused with the closest valid
key suggested, then :func:`~ddpo.training.config.validation.validate`."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

from .. import trust
from .schema import ConfigError, RunConfig, _annotation, _field_types, all_keys
from .validation import validate
from .yaml_files import load_yaml, read_yaml

DEFAULT_PRESET = "world"
"""The preset ``ddpo train`` (and ``bench``, ``config``) uses when none is given: the embedded world."""


_NO_KEYS = ("mixed_precision",)
"""String keys whose value ``no`` YAML 1.1 reads as ``false`` (``mixed_precision: no`` means the string)."""


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    """Return ``value`` converted to ``annotation`` where lossless (int -> float), else raise ConfigError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(annotation)
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if annotation is str:
        if value is False and key.rsplit(".", 1)[-1] in _NO_KEYS:
            return "no"  # YAML 1.1 reads an unquoted `no` as false
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    return value


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    if not close:  # try the last component alone (e.g. 'lr' under train)
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in all_keys() if k.rsplit(".", 1)[-1] == leaf][:1]
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}.{hint} (`ddpo config` prints every key with its default)")


def _apply(obj, data: dict[str, Any], prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    types_ = _field_types(type(obj))
    for name, value in data.items():
        key = f"{prefix}{name}"
        if key == trust.FORMER_KEY:  # read in older runs' config.yaml (false); true is refused: only the user opts in
            if (message := trust.former_key_refusal(value)) is not None:
                raise ConfigError(message)
            continue
        if name not in types_:
            raise _unknown(key)
        annotation = types_[name]
        if dataclasses.is_dataclass(annotation):
            _apply(getattr(obj, name), value, f"{key}.")
        else:
            setattr(obj, name, _check_type(value, annotation, key))


def apply_override(config: RunConfig, key: str, value: Any) -> None:
    """Set the one key an override names. A key inside a mapping-valued field (``reward.options.quality=80``) is set
    inside that mapping, keeping its other keys, at any depth (``reward.options.components.brightness=1``); a whole
    mapping (``reward.options={quality: 80}``) replaces the field's value; a section (``train={...}``) sets the keys
    it gives, as a config file does."""
    parts = key.split(".")
    obj: Any = config
    for i, part in enumerate(parts[:-1]):
        annotation = _field_types(type(obj)).get(part)
        if typing.get_origin(annotation) is dict:
            field_key = ".".join(parts[: i + 1])
            merged = _set_in(getattr(obj, part), parts[i + 1 :], value, field_key)
            setattr(obj, part, _check_type(merged, annotation, field_key))
            return
        if not dataclasses.is_dataclass(annotation):
            break  # an unknown key or a plain value: _apply names the problem
        obj = getattr(obj, part)
    _apply(config, _nest(key, value))


def _set_in(mapping: dict[str, Any], path: list[str], value: Any, key: str) -> dict[str, Any]:
    """A copy of ``mapping`` with ``value`` at ``path`` (nested mappings created or copied on the way)."""
    out = dict(mapping)
    node = out
    for depth, part in enumerate(path[:-1]):
        child = node.get(part, {})
        if not isinstance(child, dict):
            inner = ".".join([key, *path[: depth + 1]])
            raise ConfigError(
                f"{inner} is {child!r}, not a mapping: cannot set {'.'.join([key, *path])} inside it; set the "
                f"whole value instead ({inner}={{...}})"
            )
        node[part] = dict(child)
        node = node[part]
    node[path[-1]] = value
    return out


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.learning_rate=1e-4"`` -> ``("train.learning_rate", 1e-4)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    value = load_yaml(raw, f"override {text!r}: the value", key_prefix=key) if raw.strip() else ""
    if isinstance(value, (bool, int, float)) and _annotation(key) in (str, str | None):
        value = raw.strip()  # a string key takes the text as written: mixed_precision=no, run_name=007
    return key, value


def preset_names() -> list[str]:
    """Names of the presets shipped in ``ddpo/presets``."""
    return sorted(p.name[:-5] for p in resources.files("ddpo.presets").iterdir() if p.name.endswith(".yaml"))


def preset_data(name: str) -> dict[str, Any]:
    names = preset_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown preset {name!r}.{hint} Available: {', '.join(names)}")
    text = resources.files("ddpo.presets").joinpath(f"{name}.yaml").read_text()
    return load_yaml(text, f"preset {name!r}") or {}


def build_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> RunConfig:
    """Defaults <- ``base`` (a resolved config dict) <- preset <- config file <- overrides, then validation."""
    config = RunConfig()
    if base is not None:
        _apply(config, base)
    if preset is not None:
        _apply(config, preset_data(preset))
    if config_file is not None:
        _apply(config, read_yaml(config_file))
    for text in overrides or []:
        apply_override(config, *parse_override(text))
    validate(config)
    return config


def to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
