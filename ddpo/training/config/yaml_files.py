"""YAML read safely and bounded: :func:`load_yaml` (a key given twice and an alias bomb are refused) and
:func:`read_yaml` (a file of at most :data:`MAX_CONFIG_BYTES`); every problem is one :class:`ConfigError` line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .schema import ConfigError

MAX_CONFIG_BYTES = 1 << 20
"""Largest config, grid or run ``config.yaml`` file read (1 MiB; a preset is a few KiB)."""
MAX_YAML_VALUES = 100_000
"""Largest number of values (mappings, lists, scalars) a YAML document may hold once its aliases are followed: a
"billion laughs" document of nested aliases stops here instead of exhausting memory."""


def load_yaml(text: str, source: str, key_prefix: str = "") -> Any:
    """``text`` parsed as YAML, safely (PyYAML's safe constructors only); raises :class:`ConfigError`, one line naming
    ``source`` (``"config file 'x.yaml'"``), for a syntax error, a key given twice in one mapping (its dotted path,
    after ``key_prefix``) or a document larger than :data:`MAX_YAML_VALUES` values with its aliases followed."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_yaml_node(node, source, key_prefix)
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML: {_yaml_problem(err)}") from None
    finally:
        loader.dispose()


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A PyYAML error on one line: ``while parsing ...: expected ..., but got ... (line L, column C)``."""
    if not isinstance(err, yaml.MarkedYAMLError):
        return " ".join(str(err).split())
    text = ": ".join(part for part in (err.context, err.problem) if part)
    mark = err.problem_mark or err.context_mark
    return f"{text} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else text


def _check_yaml_node(root: yaml.Node, source: str, key_prefix: str) -> None:
    """Walk the composed document, following aliases: refuse a key given twice in a mapping (YAML keeps the last one
    silently) and a document of more than :data:`MAX_YAML_VALUES` values (a recursive alias never ends). A node's
    key path is kept as a link to its parent's, and written out only for an error."""
    root_path = (None, key_prefix.rstrip(".")) if key_prefix else None
    stack: list[tuple[yaml.Node, tuple | None]] = [(root, root_path)]
    seen = 0
    while stack:
        node, path = stack.pop()
        seen += 1
        if seen > MAX_YAML_VALUES:
            raise ConfigError(
                f"{source} expands to more than {MAX_YAML_VALUES} values (its aliases, *name, followed); a config "
                "holds a few hundred: use fewer aliases"
            )
        if isinstance(node, yaml.SequenceNode):
            stack += [(item, (path, f"[{i}]")) for i, item in enumerate(node.value)]
        elif isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], yaml.Mark] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden here
                    stack.append((value_node, path))
                    continue
                name = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
                if isinstance(key_node, yaml.ScalarNode):
                    if (key_node.tag, name) in first:
                        raise ConfigError(
                            f"{source} sets {_key_path((path, name))} twice "
                            f"({_lines(first[key_node.tag, name], key_node.start_mark)}); keep one of them"
                        )
                    first[key_node.tag, name] = key_node.start_mark
                stack.append((value_node, (path, name)))


def _key_path(path: tuple | None) -> str:
    """``((None, "train"), "learning_rate")`` -> ``"train.learning_rate"`` (list items as ``[i]``)."""
    parts: list[str] = []
    while path is not None:
        path, name = path
        parts.append(name)
    return "".join(part if part.startswith("[") or i == 0 else f".{part}" for i, part in enumerate(reversed(parts)))


def _lines(a: yaml.Mark, b: yaml.Mark) -> str:
    if a.line == b.line:
        return f"line {a.line + 1}, columns {a.column + 1} and {b.column + 1}"
    return f"lines {a.line + 1} and {b.line + 1}"


def read_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file holding a mapping (a config, a grid, a run's ``config.yaml``), read with :func:`load_yaml`; at
    most :data:`MAX_CONFIG_BYTES` are read. Every problem is one :class:`ConfigError` line naming the file."""
    path = Path(path)
    source = f"{what} {str(path)!r}"
    if path.is_dir():
        raise ConfigError(f"{source} is a folder, not a YAML file")
    if not path.exists():
        raise ConfigError(f"{source} does not exist")
    if not path.is_file():
        raise ConfigError(f"{source} is not a regular file (a device or a pipe); give a YAML file")
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"cannot read {source} ({err.strerror or err})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{source} is larger than {MAX_CONFIG_BYTES >> 20} MiB; a config is a few KiB: is it the right file?"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{source} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None
    data = load_yaml(text, source)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a mapping of keys, got {type(data).__name__}")
    return data
