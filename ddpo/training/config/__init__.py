"""Typed run configuration: dataclasses, YAML presets and files, dotted ``key.sub=value`` overrides, validation.

Every hyper-parameter is named once, in :mod:`.schema`, with its meaning. Unknown keys and values of the wrong type
are rejected before anything is loaded, with the closest valid key suggested (:mod:`.loading`); so are non-finite
numbers and every value outside its range (:func:`validate`, one function per section in :mod:`.validation`; the
value rules shared with the command line in :mod:`.rules`). YAML is read safely and bounded (:func:`load_yaml` in
:mod:`.yaml_files`: a key given twice and an alias bomb are refused), and an override sets only the key it names
(:func:`apply_override`). Settings derived from a config (sampler settings, steps trained per trajectory, ...) live
in :mod:`.derived`.

The modules import one way only: ``schema`` (and ``rules``) <- ``derived`` <- ``validation`` <- ``loading`` (with
``yaml_files``); this package re-exports their public names, so ``from ddpo.training.config import X`` is the one
import path.
"""

from __future__ import annotations

from .derived import (
    model_options,
    recomputes_old_log_probs,
    sampler_settings,
    train_step_offset,
    train_steps_per_trajectory,
    train_window_steps,
)
from .loading import (
    DEFAULT_PRESET,
    apply_override,
    build_config,
    parse_override,
    preset_data,
    preset_names,
    to_dict,
)
from .rules import IMPORT_PATH, MAX_PROCESS_TIMEOUT_SECONDS, eta_problem, guidance_problem, plain_folder_name
from .schema import (
    ConfigError,
    ModelConfig,
    RewardConfig,
    RunConfig,
    SampleConfig,
    StopConfig,
    TrainConfig,
    all_keys,
)
from .validation import validate
from .yaml_files import MAX_CONFIG_BYTES, MAX_YAML_VALUES, load_yaml, read_yaml

__all__ = [
    "DEFAULT_PRESET",
    "IMPORT_PATH",
    "MAX_CONFIG_BYTES",
    "MAX_PROCESS_TIMEOUT_SECONDS",
    "MAX_YAML_VALUES",
    "ConfigError",
    "ModelConfig",
    "RewardConfig",
    "RunConfig",
    "SampleConfig",
    "StopConfig",
    "TrainConfig",
    "all_keys",
    "apply_override",
    "build_config",
    "eta_problem",
    "guidance_problem",
    "load_yaml",
    "model_options",
    "parse_override",
    "plain_folder_name",
    "preset_data",
    "preset_names",
    "read_yaml",
    "recomputes_old_log_probs",
    "sampler_settings",
    "to_dict",
    "train_step_offset",
    "train_steps_per_trajectory",
    "train_window_steps",
    "validate",
]
