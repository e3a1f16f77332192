"""Prompt sets (plain text, one prompt per line) and the seeded prompt sampler."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from .streams import Stream, derive_seed  # noqa: F401  (derive_seed: imported from here by callers)


def available_prompt_sets() -> list[str]:
    """Names of the prompt sets shipped with the package (files ``prompts/NAME.txt``)."""
    return sorted(p.name[:-4] for p in resources.files("ddpo.prompt_sets").iterdir() if p.name.endswith(".txt"))


def load_prompts(name_or_path: str, key: str = "prompts") -> list[str]:
    """Prompts of a shipped set (by name) or of a text file (one prompt per line; blank lines and ``#`` comments
    are skipped). Raises ``ValueError`` naming the file (and the config ``key`` it came from) when it is missing,
    not UTF-8 or holds no prompt."""
    path = Path(name_or_path).expanduser()
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
