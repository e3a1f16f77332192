"""Config building: presets, files, overrides, type checks and suggestions."""

from __future__ import annotations

import pytest
import yaml

from ddpo.cli import main
from ddpo.training.config import ConfigError, all_keys, build_config, preset_names, to_dict


def test_every_shipped_preset_builds_and_validates():
    names = preset_names()
    assert {"tiny", "sd15_compressibility", "sd15_aesthetic"} <= set(names)
    for name in names:
        build_config(preset=name)


def test_paper_presets_hold_the_paper_settings():
    for name in ("sd15_compressibility", "sd15_aesthetic"):
        c = build_config(preset=name)
        assert (c.sample.num_steps, c.sample.eta, c.sample.guidance_scale) == (50, 1.0, 5.0)
        assert c.train.advantage == "per_prompt" and c.train.clip_range == 1e-4 and c.model.use_lora
    assert build_config(preset="sd15_aesthetic").reward.name == "aesthetic"
    assert build_config(preset="sd15_compressibility").reward.name == "jpeg_compressibility"


def test_precedence_defaults_preset_file_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"seed": 3, "train": {"learning_rate": 0.5, "batch_size": 4}}))
    c = build_config(
        preset="tiny", config_file=path, overrides=["train.learning_rate=1e-4", "reward.options={quality: 80}"]
    )
    assert c.seed == 3 and c.train.batch_size == 4
    assert c.train.learning_rate == pytest.approx(1e-4)  # '1e-4' is a string to PyYAML; accepted for a float
    assert c.reward.options == {"quality": 80}
    assert c.sample.num_steps == 20  # from the preset
    assert to_dict(build_config(base=to_dict(c))) == to_dict(c)  # a resolved config round-trips


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["num_epoch=3"], "Did you mean 'num_epochs'"),
        (["train.lr=1e-3"], "unknown config key 'train.lr'"),
        (["sample.guidance_scale=high"], "sample.guidance_scale: expected a number"),
        (["model.use_lora=1"], "model.use_lora: expected true or false"),
        (["model.lora_target_modules=to_q"], "expected a list"),
        (["train.algorithm=ppo"], "train.algorithm must be one of"),
        (["train.advantage=group"], "samples_per_prompt > 1"),
        (["mixed_precision=fp8"], "mixed_precision must be"),
        (["seed"], "not of the form key.sub=value"),
    ],
)
def test_bad_overrides_are_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config(preset="tiny", overrides=overrides)


def test_bad_config_file_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(config_file=tmp_path / "missing.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        build_config(config_file=path)
    path.write_text("train:\n  learnin_rate: 1.0\n")
    with pytest.raises(ConfigError, match="Did you mean 'train.learning_rate'"):
        build_config(config_file=path)


def test_cli_lists_and_prints(capsys):
    assert main(["presets"]) == 0
    assert "tiny" in capsys.readouterr().out
    assert main(["config", "--preset", "tiny", "seed=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["seed"] == 7 and set(printed) >= {"num_epochs", "output_dir", "seed", "model", "train"}
    assert main(["rewards"]) == 0
    assert "jpeg_compressibility" in capsys.readouterr().out.split()
    assert main(["prompts"]) == 0
    assert "simple_animals" in capsys.readouterr().out
    assert "train.learning_rate" in all_keys()


@pytest.mark.parametrize(
    "scheduler, steps, window, fraction, expected_window, expected_k",
    [
        ("ddim", 10, 1.0, 0.5, 10, 5),  # every step stochastic; half of them
        ("ddim", 10, 0.5, 1.0, 5, 5),  # the first five (noisiest) steps, all of them
        ("ddim", 20, 0.25, 0.4, 5, 2),
        ("ddpm", 10, 1.0, 1.0, 9, 9),  # DDPM's last step is deterministic: 9 stochastic steps
        ("ddim", 4, 0.1, 0.1, 1, 1),  # never fewer than one step
    ],
)
def test_timestep_window_and_fraction_count_the_trained_steps(
    scheduler, steps, window, fraction, expected_window, expected_k
):
    from ddpo.training.config import train_steps_per_trajectory, train_window_steps

    config = build_config(
        overrides=[
            f"sample.scheduler={scheduler}",
            f"sample.num_steps={steps}",
            f"train.timestep_window={window}",
            f"train.timestep_fraction={fraction}",
            "train.batch_size=1",
        ]
    )
    assert train_window_steps(config) == expected_window
    assert train_steps_per_trajectory(config) == expected_k
