"""What a run reads before any model loads (so that a bad input fails first): its training and held-out prompts,
the prompt tables' metadata, the reward and the guard rewards (:func:`load_run_inputs`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rewards import accepts_metadata, get_reward, is_differentiable

from .config import ConfigError, RunConfig
from .estimators import estimator_for, not_differentiable_message, unused_key_notes
from .evaluation import eval_prompt_list
from .prompts import load_prompts_and_metadata


@dataclass
class RunInputs:
    prompts: list[str]
    """The training prompts (``prompts``)."""
    eval_prompts: list[str]
    """The held-out evaluation's ``eval_samples`` prompts in their fixed order (empty without ``eval_prompts``)."""
    reward: Any
    """The training reward (``reward.name`` with ``reward.options``)."""
    prompt_metadata: dict[str, dict]
    """``{prompt: its row's other columns}`` of the prompt tables (training and held-out), for a reward that takes
    ``metadata``; empty for text prompt files and shipped sets."""
    guards: dict[str, Any]
    """The guard rewards of ``eval_rewards`` by name (none without a held-out evaluation to score them on)."""
    estimator_inputs: Any = None
    """What the run's estimator reads from files (:meth:`~ddpo.training.estimators.Estimator.read_inputs`: offline
    DPO's preference pairs), or None."""


def load_run_inputs(config: RunConfig, num_processes: int = 1, main_process: bool = True) -> RunInputs:
    """Load the run's prompts, reward, guards and the estimator's own inputs (read for ``num_processes``
    processes); on the main process, a note for what a setting cannot act on (a prompt table's columns with a reward
    that takes no metadata, guards without ``eval_prompts``, a shared key the estimator does not read)."""
    c = config
    prompts, metadata = load_prompts_and_metadata(c.prompts)  # a prompt table is read once
    eval_prompts = []
    if c.eval_prompts:
        held_out, eval_metadata = load_prompts_and_metadata(c.eval_prompts, "eval_prompts")
        eval_prompts = eval_prompt_list(held_out, c.eval_samples)
        metadata = {**metadata, **eval_metadata}
    reward = get_reward(c.reward.name, **c.reward.options)
    estimator = estimator_for(c)
    if estimator.needs_differentiable_reward and not is_differentiable(reward):
        # an import path or a composite (weighted) is known to be differentiable or not only once loaded
        raise ConfigError(not_differentiable_message(c.reward.name, estimator.name))
    with torch.random.fork_rng(devices=[]):  # a guard's model init must not move the stream that initialises LoRA
        guards = {n: get_reward(n, **(opts or {})) for n, opts in (c.eval_rewards if eval_prompts else {}).items()}
    if main_process and metadata and not accepts_metadata(reward):
        print(f"ddpo: note: reward {reward.name!r} takes no metadata: the prompt file's other columns are unused")
    if main_process and c.eval_rewards and not eval_prompts:
        print(
            f"ddpo: note: eval_rewards ({', '.join(c.eval_rewards)}) are scored at held-out evaluations only, and "
            "eval_prompts is empty: they are not scored"
        )
    if main_process:
        for note in unused_key_notes(c):
            print(f"ddpo: note: {note}")
    estimator_inputs = estimator.read_inputs(c, num_processes, main_process)
    return RunInputs(prompts, eval_prompts, reward, metadata, guards, estimator_inputs)
