"""Every relative link in README.md and docs/**/*.md points at a file or folder that exists; the README stays short."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 300

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.DOTALL)
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.MULTILINE)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def markdown_files(root: Path = ROOT) -> list[Path]:
    """README.md and every Markdown file under docs/."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def link_targets(text: str) -> list[str]:
    """Targets of inline links, image links and reference definitions, outside code blocks and code spans."""
    text = CODE_SPAN.sub("", FENCE.sub("", text))
    targets = [m.group(1) for m in INLINE_LINK.finditer(text)]
    targets += [m.group(1) for m in REFERENCE_DEFINITION.finditer(text)]
    return [t[1:-1] if t.startswith("<") and t.endswith(">") else t for t in targets]


def broken_links(files: list[Path], root: Path = ROOT) -> list[str]:
    """``file: target`` for every relative link whose target does not exist (relative to the file containing it)."""
    broken = []
    for file in files:
        for target in link_targets(file.read_text(encoding="utf-8")):
            if SCHEME.match(target) or target.startswith("#"):
                continue  # http(s), mailto and other URLs; anchors within the same page
            path = unquote(target.split("#", 1)[0].split("?", 1)[0])
            resolved = root / path.lstrip("/") if path.startswith("/") else file.parent / path
            if not resolved.exists():
                broken.append(f"{file.relative_to(root).as_posix()}: {target}")
    return broken


def test_every_relative_link_resolves():
    files = markdown_files()
    assert files[0].is_file(), "README.md is missing"
    assert sum(len(link_targets(f.read_text(encoding="utf-8"))) for f in files) > 0, "no links found at all"
    broken = broken_links(files)
    assert not broken, f"{len(broken)} broken relative link(s):\n" + "\n".join(broken)


def test_readme_is_short():
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move details to docs/"


def test_checker_reports_broken_links_and_ignores_code_and_urls(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "exists.py").write_text("")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "[ok](../exists.py#L1) [bad](../missing.py#section) ![img](figure.png) [web](https://example.org/x)\n"
        "[mail](mailto:a@b.c) [anchor](#top) `[code](nowhere.md)` [abs](/exists.py)\n"
        "```\n[fenced](also_nowhere.md)\n```\n"
        "[ref]: <no such dir/>\n",
        encoding="utf-8",
    )
    (tmp_path / "README.md").write_text("[page](docs/page.md) [gone](docs/gone.md)\n", encoding="utf-8")
    assert broken_links(markdown_files(tmp_path), tmp_path) == [
        "README.md: docs/gone.md",
        "docs/page.md: ../missing.py#section",
        "docs/page.md: figure.png",
        "docs/page.md: no such dir/",
    ]
