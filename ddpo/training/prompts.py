"""Prompt sets (plain text, one prompt per line; or a CSV / JSONL / parquet table: :mod:`~ddpo.training.prompt_files`)
and the seeded prompt sampler."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from .prompt_files import is_table, load_prompt_table
from .streams import Stream, derive_seed  # noqa: F401  (derive_seed: imported from here by callers)


def available_prompt_sets() -> list[str]:
    """Names of the prompt sets shipped with the package (files ``prompts/NAME.txt``)."""
    return sorted(p.name[:-4] for p in resources.files("ddpo.prompt_sets").iterdir() if p.name.endswith(".txt"))


def load_prompts(name_or_path: str, key: str = "prompts") -> list[str]:
    """Prompts of a shipped set (by name) or of a text file (one prompt per line; blank lines and ``#`` comments
    are skipped). Raises ``ValueError`` naming the file (and the config ``key`` it came from) when it is missing,
    not UTF-8 or holds no prompt."""
    path = Path(name_or_path).expanduser()
    if path.is_file() and is_table(path):
        return load_prompt_table(path, key).prompts
    if path.is_file():
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(
                f"prompt file {source!r} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8, one "
                "prompt per line"
            ) from None
    elif name_or_path in available_prompt_sets():
        text = resources.files("ddpo.prompt_sets").joinpath(f"{name_or_path}.txt").read_text(encoding="utf-8")
        source = f"prompt set {name_or_path!r}"
    else:
        raise ValueError(
            f"{key}={name_or_path!r} is neither a file nor a shipped prompt set "
            f"({', '.join(available_prompt_sets())}); give a text file with one prompt per line"
        )
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{source} holds no prompt (only blank or # lines): write one prompt per line")
    return prompts


def draw_prompts(
    prompts: list[str], count: int, samples_per_prompt: int, seed: int, epoch: int, batch: int, process: int
) -> list[str]:
    """The prompts of one sampling batch: ``count // samples_per_prompt`` prompts drawn uniformly with replacement,
    each repeated ``samples_per_prompt`` times. A pure function of ``(seed, epoch, batch, process)``, so a resumed
    run draws exactly what an uninterrupted one would."""
    generator = torch.Generator().manual_seed(derive_seed(seed, Stream.PROMPTS, epoch, batch, process))
    index = torch.randint(len(prompts), (count // samples_per_prompt,), generator=generator).tolist()
    return [prompts[i] for i in index for _ in range(samples_per_prompt)]


def load_prompts_and_metadata(name_or_path: str, key: str = "prompts") -> tuple[list[str], dict[str, dict]]:
    """:func:`load_prompts` of one source and ``{prompt: its row's other columns}`` of a prompt table
    (:mod:`~ddpo.training.prompt_files`; empty for a text file, a shipped set or a table without other columns), the
    table read once. A prompt given twice with different metadata is an error (the reward could not tell which row a
    sample came from)."""
    path = Path(name_or_path).expanduser()
    if not (path.is_file() and is_table(path)):
        return load_prompts(name_or_path, key), {}
    table = load_prompt_table(path, key)
    if not table.has_metadata:
        return table.prompts, {}
    out: dict[str, dict] = {}
    for prompt, metadata in zip(table.prompts, table.metadata):
        if out.setdefault(prompt, metadata) != metadata:
            raise ValueError(
                f"{key}: prompt file {str(path)!r} gives the prompt {prompt!r} twice with different metadata "
                f"({out[prompt]} and {metadata}); make each prompt's row unique"
            )
    return table.prompts, out
