"""The config is a package of small modules (schema, YAML files, loading, value rules, validation by section, derived
settings), and every shipped preset (and the defaults) builds to the ``to_dict`` recorded in
``tests/data/preset_configs.json`` (captured from the single-module code, then extended by new keys' defaults only).

A preset or a default changed on purpose: rewrite the file with
``python -c "import json; from ddpo.training import config as c; json.dump({**{n: c.to_dict(c.build_config(n)) for n
in c.preset_names()}, '__default__': c.to_dict(c.build_config())}, open('tests/data/preset_configs.json', 'w'),
indent=1, sort_keys=True)"``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import ddpo.training.config as config_package
from ddpo.training.config import build_config, preset_names, to_dict

SNAPSHOT = json.loads((Path(__file__).parent / "data" / "preset_configs.json").read_text())
PACKAGE = Path(config_package.__file__).parent


def test_the_snapshot_holds_every_shipped_preset():
    assert sorted(SNAPSHOT) == sorted([*preset_names(), "__default__"])


@pytest.mark.parametrize("preset", [*preset_names(), None])
def test_every_preset_builds_as_before_the_split(preset):
    assert to_dict(build_config(preset)) == SNAPSHOT[preset or "__default__"]


def test_config_is_a_package_of_modules_well_under_500_lines():
    modules = sorted(PACKAGE.glob("*.py"))
    assert {m.stem for m in modules} >= {"__init__", "schema", "loading", "validation"}
    assert all(len(m.read_text().splitlines()) < 400 for m in modules), {
        m.name: len(m.read_text().splitlines()) for m in modules
    }


def test_validation_is_split_by_section():
    """One short ``validate`` calls one function per section, in this order (the first bad value found is named)."""
    from ddpo.training.config import validation

    sections = ["finite", "run", "algorithm", "sample", "reward", "train", "model", "guards"]
    assert all(callable(getattr(validation, f"validate_{name}")) for name in sections)
    body = Path(validation.__file__).read_text().split("def validate(config: RunConfig) -> None:")[1]
    body = body.split("\n\n\n")[0]
    assert [line.split("validate_")[1].split("(")[0] for line in body.splitlines() if "validate_" in line] == sections


def test_every_public_name_stays_importable_from_the_package():
    names = (
        "DEFAULT_PRESET ConfigError ModelConfig RewardConfig RunConfig SampleConfig StopConfig TrainConfig all_keys "
        "apply_override "
        "build_config eta_problem guidance_problem load_yaml model_options parse_override preset_data preset_names "
        "read_yaml recomputes_old_log_probs sampler_settings to_dict train_step_offset train_steps_per_trajectory "
        "train_window_steps validate MAX_CONFIG_BYTES MAX_YAML_VALUES MAX_PROCESS_TIMEOUT_SECONDS plain_folder_name "
        "IMPORT_PATH"
    ).split()
    assert all(hasattr(config_package, name) for name in names)
    assert sorted(config_package.__all__) == sorted(names)
