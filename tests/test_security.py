"""No code path deserialises user data with pickle, evaluates it, or reads YAML unsafely; weights
are read from safetensors, and any torch.load (legacy .pt/.pth state dicts, optimiser state) passes weights_only=True.

A source scan over every Python file of the packages and scripts: a new unsafe call fails here with its file and line.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for folder in ("ddpo", "rewards", "world", "scripts") for p in sorted((ROOT / folder).rglob("*.py"))]

UNSAFE = {
    "pickle / dill / joblib / marshal": re.compile(
        r"^\s*(import|from)\s+(c?pickle|dill|joblib|marshal)\b|pickle\.loads?\("
    ),
    "eval / exec of a string": re.compile(r"(?<![\w.])(eval|exec)\s*\("),
    "unsafe YAML": re.compile(
        r"yaml\.(load|unsafe_load|full_load|load_all)\s*\(|Loader\s*=\s*yaml\.(Loader|UnsafeLoader)"
    ),
    "torch.load without weights_only=True": re.compile(r"torch\.load\((?![^)]*weights_only=True)[^)]*\)"),
}


def _findings(paths: list[Path], root: Path = ROOT) -> list[str]:
    found = []
    for path in paths:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for what, pattern in UNSAFE.items():
                if pattern.search(line):
                    found.append(f"{path.relative_to(root)}:{number}: {what}: {line.strip()}")
    return found


def test_no_unsafe_deserialisation_in_the_code_base():
    assert len(SOURCES) > 50
    assert _findings(SOURCES) == []


def test_the_scan_catches_each_unsafe_call(tmp_path):
    """The patterns are not vacuous: each unsafe form is found, the safe forms are not."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle\n"
        "x = eval(text)\n"
        "exec(code)\n"
        "data = yaml.load(f, Loader=yaml.Loader)\n"
        "state = torch.load(path)\n"
        "state = torch.load(path, weights_only=False)\n"
    )
    good = tmp_path / "good.py"
    good.write_text(
        "model.eval()\n"
        "data = yaml.safe_load(text)\n"
        "state = torch.load(path, map_location='cpu', weights_only=True)\n"
        "weights = safetensors.torch.load_file(path)\n"
    )
    assert len(_findings([bad], tmp_path)) == 6
    assert _findings([good], tmp_path) == []
