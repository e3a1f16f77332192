"""Prompt sets (plain text, one prompt per line) and the seeded prompt sampler."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch


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
    generator = torch.Generator().manual_seed(_mix(seed, 1, epoch, batch, process))
    index = torch.randint(len(prompts), (count // samples_per_prompt,), generator=generator).tolist()
    return [prompts[i] for i in index for _ in range(samples_per_prompt)]


def _mix(*values: int) -> int:
    """Combine integers into one 63-bit seed (SplitMix64-style), so nearby seeds give unrelated streams."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value + 0x9E3779B97F4A7C15 + (state << 6) + (state >> 2))) & 0xFFFFFFFFFFFFFFFF
        state = (state * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 31
    return state & 0x7FFFFFFFFFFFFFFF


def derive_seed(*values: int) -> int:
    """A seed for one stream of the run (e.g. sampling noise of epoch e, batch b, process p)."""
    return _mix(*values)


# The stream id (the second value given to derive_seed) of each random stream of training; 1 is the prompt draws
# (draw_prompts), 4, 5 and 7 the held-out evaluation's (evaluation.py).
SAMPLING_NOISE_STREAM = 2
"""Sampling noise of training batches: ``(seed, 2, epoch, batch, process)``."""
SHUFFLE_STREAM = 3
"""The (trajectory, step) pairs of an inner epoch: ``(seed, 3, epoch, inner, process)``."""
FORWARD_NOISE_STREAM = 6
"""The forward-process estimators' re-noising: ``(seed, 6, epoch, inner, process)``."""
