"""Config building: presets, files, overrides, type checks and suggestions."""

from __future__ import annotations

import re
import time

import pytest
import torch
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
    is refused before anything is imported unless the user opts in (CLI flag or DDPO_TRUST_IMPORT_PATH=1; a config
    cannot: tests/test_trust.py)."""
    marker = tmp_path / "ran"
    overrides = ["reward.name=os:system", f"reward.options={{command: 'touch {marker}'}}"]
    with pytest.raises(ConfigError, match="is an import path.*--trust-import-path.*DDPO_TRUST_IMPORT_PATH=1"):
        build_config(preset="tiny", overrides=overrides)
    weighted = ["reward.name=weighted", "reward.options={components: {'os:system': 1.0}}"]
    with pytest.raises(ConfigError, match="'os:system' is an import path"):
        build_config(preset="tiny", overrides=weighted)
    assert main(["config", "--preset", "tiny", *overrides]) == 2
    assert "--trust-import-path" in capsys.readouterr().err and not marker.exists()
    with pytest.raises(ConfigError, match="cannot opt in"):
        build_config(preset="tiny", overrides=[*overrides, "reward.trust_import_path=true"])
    assert main(["config", "--preset", "tiny", "--trust-import-path", *overrides]) == 0 and not marker.exists()


# ---------------------------------------------------------------------------------------------------------------------
# every bad config input gets one clear line before the model loads
# ---------------------------------------------------------------------------------------------------------------------


def _float_keys() -> list[str]:
    import typing

    from ddpo.training.config import RunConfig

    out = []
    for key in all_keys():
        cls: object = RunConfig
        for part in key.split("."):
            cls = typing.get_type_hints(cls)[part]
        if cls is float:
            out.append(key)
    return out


@pytest.mark.parametrize("key", _float_keys())
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_values_of_every_float_key_are_refused_naming_it(key, value):
    """`train.learning_rate=.inf` passed validation and failed after sampling, blaming the learning rate."""
    with pytest.raises(ConfigError, match=rf"^{key} must be a finite number; got (-?inf|nan)$"):
        build_config(preset="tiny", overrides=[f"{key}={value}"])


def test_float_keys_are_found():
    keys = _float_keys()
    assert {"train.learning_rate", "sample.guidance_scale", "model.lora_alpha", "sample.eta"} <= set(keys)


def test_duplicate_keys_are_refused_naming_the_key_file_and_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("seed: 1\ntrain:\n  learning_rate: 0.1\n  batch_size: 4\n  learning_rate: 0.2\n")
    with pytest.raises(ConfigError) as err:
        build_config(config_file=path)
    assert str(err.value) == (f"config file '{path}' sets train.learning_rate twice (lines 3 and 5); keep one of them")
    path.write_text("seed: 1\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"sets seed twice \(lines 1 and 2\)"):
        build_config(config_file=path)
    with pytest.raises(ConfigError, match=r"override 'reward.options=\{a: 1, a: 2\}'.* sets reward.options.a twice"):
        build_config(preset="tiny", overrides=["reward.options={a: 1, a: 2}"])
    # YAML merge keys are not duplicates: the mapping's own key wins over the merged one, as YAML says
    path.write_text(
        "train: &t\n  learning_rate: 0.1\nsample:\n  num_steps: 4\nreward:\n  options:\n"
        "    <<: {quality: 10}\n    quality: 20\n"
    )
    assert build_config(config_file=path).reward.options == {"quality": 20}


def test_duplicate_key_in_a_run_config_on_resume_is_refused(tmp_path):
    from ddpo.training.trainer import Trainer

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 1\nseed: 2\n")
    with pytest.raises(ConfigError, match=rf"'{run / 'config.yaml'}' sets seed twice"):
        Trainer.resume(run)


def _alias_bomb(levels: int = 9) -> str:
    lines = ["reward:", "  options:", '    l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_refused_in_one_line(tmp_path, capsys):
    """A 'billion laughs' file (9 levels of 9 aliases: 9^9 strings) ended `ddpo config` in a MemoryError."""
    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb())
    with pytest.raises(ConfigError, match=r"expands to more than 100000 values \(its aliases, \*name, followed\)"):
        build_config(config_file=path)
    assert main(["config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"ddpo: error: config file '{path}' expands to more than")
    path.write_text(_alias_bomb(levels=2))  # a few aliases are fine
    assert len(build_config(config_file=path).reward.options["l1"]) == 9
    for loop in ("a: &a [*a]", "a: &a {b: *a}", "a: &a [*a, *a]"):  # recursive aliases: refused, and quickly
        recursive = tmp_path / "loop.yaml"
        recursive.write_text(f"reward:\n  options:\n    {loop}\n")
        start = time.monotonic()
        with pytest.raises(ConfigError, match="expands to more than"):
            build_config(config_file=recursive)
        assert time.monotonic() - start < 10


def test_an_oversized_config_file_is_refused_without_reading_it_whole(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("seed: 1\n" + "# padding\n" * 120_000)
    with pytest.raises(ConfigError, match=r"is larger than 1 MiB"):
        build_config(config_file=path)


def test_config_file_that_is_a_folder_or_not_utf8_is_named(tmp_path):
    with pytest.raises(ConfigError, match=rf"^config file '{tmp_path}' is a folder, not a YAML file$"):
        build_config(config_file=tmp_path)
    path = tmp_path / "latin1.yaml"
    data = b"seed: 1\nrun_name: caf\xe9\n"
    path.write_bytes(data)
    offset = data.index(b"\xe9")
    with pytest.raises(
        ConfigError, match=rf"config file '{path}' is not UTF-8 text \(byte {offset}: invalid continuation"
    ):
        build_config(config_file=path)


def test_yaml_syntax_errors_are_one_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("train: [1, 2\n")
    assert main(["config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "is not valid YAML: while parsing a flow sequence" in err and "(line 2, column 1)" in err
    assert main(["config", "--preset", "tiny", "seed=[1"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_dotted_overrides_of_a_mapping_merge_and_a_whole_mapping_replaces():
    """Two `reward.options.K=...` overrides kept only the second key: each replaced the whole mapping."""
    c = build_config(preset="tiny", overrides=["reward.options.quality=80", "reward.options.other=1"])
    assert c.reward.options == {"quality": 80, "other": 1}
    preset = build_config(preset="world_clip").reward.options
    assert len(preset) >= 1
    c = build_config(preset="world_clip", overrides=["reward.options.extra=2"])
    assert c.reward.options == {**preset, "extra": 2}  # the preset's options stay
    nested = ["reward.options.components.brightness=1.0", "reward.options.components.contrast=2.0"]
    c = build_config(preset="tiny", overrides=nested)
    assert c.reward.options == {"components": {"brightness": 1.0, "contrast": 2.0}}
    c = build_config(preset="world_clip", overrides=["reward.options.extra=2", "reward.options={a: 1}"])
    assert c.reward.options == {"a": 1}  # a whole mapping replaces
    assert build_config(preset="world_clip").reward.options == preset  # the preset itself is untouched
    with pytest.raises(ConfigError, match=r"reward.options.a is 1, not a mapping: cannot set reward.options.a.b"):
        build_config(preset="tiny", overrides=["reward.options.a=1", "reward.options.a.b=2"])
    with pytest.raises(ConfigError, match="train.learning_rate: expected a number"):
        build_config(preset="tiny", overrides=["train.learning_rate.x=1"])


@pytest.mark.parametrize("name", ["..:x", ":x", "a b:c", "pkg.:fn", "pkg:fn:g", "pkg:fn.x"])
def test_malformed_import_paths_are_refused_in_config(name, monkeypatch):
    """`reward.name=..:x` (trusted) ended in a TypeError from importlib; the config now names the form it needs."""
    monkeypatch.setenv("DDPO_TRUST_IMPORT_PATH", "1")
    with pytest.raises(ConfigError, match=rf"^reward.name={re.escape(repr(name))} is not an import path of the form"):
        build_config(preset="tiny", overrides=[f"reward.name={name}"])
    components = ["reward.name=weighted", f"reward.options={{components: {{'{name}': 1.0}}}}"]
    with pytest.raises(ConfigError, match="is not an import path of the form"):
        build_config(preset="tiny", overrides=components)
    import rewards  # `ddpo eval --reward` and `ddpo serve-reward` build it directly

    with pytest.raises(ValueError, match=rf"^reward {re.escape(repr(name))} is not an import path of the form"):
        rewards.get_reward(name)


@pytest.mark.parametrize(
    "key, value",
    [
        ("adam_beta1", 1.0),
        ("adam_beta1", -0.1),
        ("adam_beta1", 0.0),
        ("adam_beta2", 1.5),
        ("adam_beta2", 0.999),
        ("adam_epsilon", -1e-8),
        ("adam_epsilon", 0.0),
        ("adam_weight_decay", -1e-4),
        ("adam_weight_decay", 0.0),
    ],
)
def test_optimizer_numbers_are_checked_as_torch_checks_them(key, value):
    """The reference: torch's AdamW refuses exactly these values ("Invalid beta parameter at index 0", naming no
    key); the config refuses the same ones before the model loads, naming the key."""
    import torch

    names = {"adam_beta1": "betas", "adam_beta2": "betas", "adam_epsilon": "eps", "adam_weight_decay": "weight_decay"}
    kwargs = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-4}
    if key == "adam_beta1":
        kwargs["betas"] = (value, 0.999)
    elif key == "adam_beta2":
        kwargs["betas"] = (0.9, value)
    else:
        kwargs[names[key]] = value
    try:
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3, **kwargs)
        torch_accepts = True
    except ValueError:
        torch_accepts = False
    if torch_accepts:
        assert getattr(build_config(preset="tiny", overrides=[f"train.{key}={value}"]).train, key) == value
    else:
        with pytest.raises(ConfigError, match=rf"^train.{key} must be"):
            build_config(preset="tiny", overrides=[f"train.{key}={value}"])


def _rwr(temperature: float):
    from ddpo.policy.losses import rwr_weights

    return rwr_weights(torch.zeros(4), temperature)


def _sparse_rwr(quantile: float):
    from ddpo.policy.losses import sparse_rwr_weights

    return sparse_rwr_weights(torch.zeros(4), quantile)


def _tracker(buffer_size: int, min_count: int):
    from ddpo.policy.advantages import PerPromptStatTracker

    return PerPromptStatTracker(buffer_size, min_count)


@pytest.mark.parametrize(
    "override, policy_refuses",
    [
        ("train.algorithm=rwr train.rwr_temperature=0", lambda: _rwr(0.0)),
        ("train.algorithm=rwr train.rwr_temperature=-1", lambda: _rwr(-1.0)),
        ("train.algorithm=rwr_sparse train.rwr_quantile=5", lambda: _sparse_rwr(5.0)),
        ("train.algorithm=rwr_sparse train.rwr_quantile=1", lambda: _sparse_rwr(1.0)),
        ("train.per_prompt_buffer_size=-1", lambda: _tracker(-1, 16)),
        ("train.per_prompt_min_count=0", lambda: _tracker(16, 0)),
    ],
)
def test_rule_values_the_policy_refuses_are_refused_by_the_config(override, policy_refuses):
    """These were refused only after the model loaded (by the policy maths); the config now refuses the same values
    before, naming the key (an estimator's own key when that estimator is chosen)."""
    with pytest.raises(ValueError):
        policy_refuses()
    overrides = override.split()
    key = overrides[-1].split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key} must be"):
        build_config(preset="tiny", overrides=overrides)


def test_flow_cps_eta_above_one_is_refused_by_the_config():
    """flow_cps_step_with_logprob refuses eta > 1 after the model loads; the config now refuses it before."""
    flow = ["model.pretrained=tiny_sd3", "sample.eta=1.5"]
    with pytest.raises(ConfigError, match="sample.eta must be <= 1"):
        build_config(preset="tiny", overrides=[*flow, "sample.scheduler=flow_cps"])
    assert build_config(preset="tiny", overrides=[*flow, "sample.scheduler=flow_sde"]).sample.eta == 1.5


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_reward_options_are_refused_before_the_reward_is_built(value):
    """`reward.options.target=.nan` passed every check and made the reward return NaN at the first scoring, after
    sampling; a number option of a declared reward must be finite."""
    import rewards

    with pytest.raises(ValueError, match=r"^reward 'brightness': option 'target' must be a finite number; got"):
        rewards.get_reward("brightness", target=value)
    assert rewards.get_reward("brightness", target=0.5) is not None
