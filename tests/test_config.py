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


# ddpo-pytorch (kvablack/ddpo-pytorch, config/base.py + config/dgx.py at commit 1958463), written out. It counts
# train.batch_size in trajectories and accumulates over every trained timestep: pairs per optimiser step =
# train.batch_size * gradient_accumulation_steps * num_steps * timestep_fraction. Deliberate differences: model
# (SD 1.4 there, the presets are SD 1.5 by name) and mixed precision (fp16 there, bf16 here).
REFERENCE_COMMON = {
    "num_steps": 50,
    "eta": 1.0,
    "guidance_scale": 5.0,
    "sample_batch_size": 8,
    "num_batches_per_epoch": 4,
    "learning_rate": 3e-4,
    "adam": (0.9, 0.999, 1e-4, 1e-8),
    "max_grad_norm": 1.0,
    "num_inner_epochs": 1,
    "adv_clip_max": 5.0,
    "clip_range": 1e-4,
    "timestep_fraction": 1.0,
    "use_lora": True,
    "per_prompt_min_count": 16,
}
REFERENCE = {
    # compressibility(): train.batch_size 4, gradient_accumulation_steps 2 -> (8 * 4) / (4 * 2) = 4 updates per epoch
    "sd15_compressibility": {
        "num_epochs": 100,
        "prompts": "imagenet_animals",
        "reward": "jpeg_compressibility",
        "pairs_per_update": 4 * 2 * 50,
        "updates_per_epoch": 4,
        "per_prompt_buffer_size": 16,
    },
    # aesthetic(): gradient_accumulation_steps 4 -> 2 updates per epoch; per-prompt buffer 32
    "sd15_aesthetic": {
        "num_epochs": 200,
        "prompts": "simple_animals",
        "reward": "aesthetic",
        "pairs_per_update": 4 * 4 * 50,
        "updates_per_epoch": 2,
        "per_prompt_buffer_size": 32,
    },
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_sd15_presets_equal_the_reference_settings(name):
    from ddpo.training.config import train_steps_per_trajectory

    c, want = build_config(preset=name), {**REFERENCE_COMMON, **REFERENCE[name]}
    s, t = c.sample, c.train
    pairs_per_update = t.batch_size * t.gradient_accumulation_steps
    pairs_per_epoch = s.batch_size * s.num_batches_per_epoch * train_steps_per_trajectory(c) * t.num_inner_epochs
    got = {
        "num_steps": s.num_steps,
        "eta": s.eta,
        "guidance_scale": s.guidance_scale,
        "sample_batch_size": s.batch_size,
        "num_batches_per_epoch": s.num_batches_per_epoch,
        "learning_rate": t.learning_rate,
        "adam": (t.adam_beta1, t.adam_beta2, t.adam_weight_decay, t.adam_epsilon),
        "max_grad_norm": t.max_grad_norm,
        "num_inner_epochs": t.num_inner_epochs,
        "adv_clip_max": t.adv_clip_max,
        "clip_range": t.clip_range,
        "timestep_fraction": t.timestep_fraction,
        "use_lora": c.model.use_lora,
        "per_prompt_min_count": t.per_prompt_min_count,
        "num_epochs": c.num_epochs,
        "prompts": c.prompts,
        "reward": c.reward.name,
        "pairs_per_update": pairs_per_update,
        "updates_per_epoch": pairs_per_epoch // pairs_per_update,
        "per_prompt_buffer_size": t.per_prompt_buffer_size,
    }
    assert got == want
    assert t.advantage == "per_prompt" and t.algorithm == "ddpo_is" and s.scheduler == "ddim"


def test_mixed_precision_no_from_the_command_line_and_a_file(tmp_path):
    """YAML 1.1 reads an unquoted ``no`` as false; ``mixed_precision=no`` is the documented value."""
    assert build_config(preset="world_long", overrides=["mixed_precision=no"]).mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("mixed_precision: no\n")
    c = build_config(config_file=path, overrides=["run_name=0042"])
    assert c.mixed_precision == "no" and c.run_name == "0042"  # a string key takes the text as written
    with pytest.raises(ConfigError, match="mixed_precision: expected a string, got bool True"):
        build_config(base={"mixed_precision": True})  # only `no` has a meaning as a boolean


@pytest.mark.parametrize("eta", ["0", "-0.5", "1.01", "2"])
def test_eta_outside_zero_one_is_refused(eta):
    with pytest.raises(ConfigError, match="sample.eta must be"):
        build_config(preset="tiny", overrides=[f"sample.eta={eta}"])
    assert build_config(preset="tiny", overrides=["sample.eta=0.3"]).sample.eta == 0.3


def test_resolution_key_is_checked_against_the_vae_factor(tiny_model_dir):
    from ddpo.models import latent_size, load_pipeline

    pipe = load_pipeline(str(tiny_model_dir))  # 8x8 latents, a 2-level VAE: factor 2
    assert latent_size(pipe, None) == 8  # default: the UNet's sample_size (16 px), as before the key existed
    assert latent_size(pipe, 24) == 12
    with pytest.raises(ValueError, match="sample.resolution=25 is not a multiple of this model's VAE factor 2"):
        latent_size(pipe, 25)
    with pytest.raises(ConfigError, match="sample.resolution must be a pixel size >= 8"):
        build_config(preset="tiny", overrides=["sample.resolution=4"])


def test_reward_by_import_path_needs_an_explicit_opt_in(tmp_path, capsys):
    """`reward.name=os:system` with an option string ran a shell command from a config file; now an import path
    is refused before anything is imported unless the user opts in (config key or CLI flag)."""
    marker = tmp_path / "ran"
    overrides = ["reward.name=os:system", f"reward.options={{command: 'touch {marker}'}}"]
    with pytest.raises(ConfigError, match="is an import path.*reward.trust_import_path=true.*--trust-import-path"):
        build_config(preset="tiny", overrides=overrides)
    weighted = ["reward.name=weighted", "reward.options={components: {'os:system': 1.0}}"]
    with pytest.raises(ConfigError, match="'os:system' is an import path"):
        build_config(preset="tiny", overrides=weighted)
    assert main(["config", "--preset", "tiny", *overrides]) == 2
    assert "reward.trust_import_path=true" in capsys.readouterr().err and not marker.exists()
    assert build_config(preset="tiny", overrides=[*overrides, "reward.trust_import_path=true"]).reward.trust_import_path
    assert main(["config", "--preset", "tiny", "--trust-import-path", *overrides]) == 0 and not marker.exists()
