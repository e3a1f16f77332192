"""Typed run configuration: dataclasses, YAML presets and files, dotted ``key.sub=value`` overrides, validation.

Every hyper-parameter is named once, here, with its meaning. Unknown keys and values of the wrong type are
rejected before anything is loaded, with the closest valid key suggested.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

if typing.TYPE_CHECKING:
    from ..policy.sampling import SamplerSettings

# The policy maths (and torch) are imported inside the functions that need them, so that reading and validating
# configs, the CLI's help and the reports stay light.

DEFAULT_PRESET = "world"
"""The preset ``ddpo train`` (and ``bench``, ``config``) uses when none is given: the embedded world."""


@dataclass
class ModelConfig:
    pretrained: str = "tiny"
    """Hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``), local pipeline folder, ``world`` (the embedded
    pretrained model) or ``tiny`` (random-weight test model)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of ``pretrained``."""
    use_lora: bool = True
    """Train a LoRA adapter (peft) instead of every UNet weight."""
    lora_rank: int = 4
    """LoRA rank r."""
    lora_alpha: float = 4.0
    """LoRA scaling numerator: the adapter output is multiplied by lora_alpha / lora_rank."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """UNet module names that get LoRA adapters."""
    channels_last: bool = False
    """Store the UNet in channels-last memory format (often faster convolutions on GPUs; measure on CPUs)."""
    compile: bool = False
    """``torch.compile`` the UNet (the first calls of each shape compile for minutes; pays off on long GPU runs)."""


@dataclass
class SampleConfig:
    scheduler: str = "ddim"
    """``ddim`` (stochastic DDIM with ``eta``) or ``ddpm`` (ancestral DDPM; its last step is deterministic)."""
    num_steps: int = 20
    """Denoising steps per trajectory (T)."""
    eta: float = 1.0
    """DDIM stochasticity; must be > 0 so that every step has a log-probability (1.0 = DDPM posterior variance)."""
    guidance_scale: float = 5.0
    """Classifier-free guidance scale (1.0 disables CFG; then no unconditional rows are computed)."""
    negative_prompt: str = ""
    """Text of the unconditional branch of CFG."""
    batch_size: int = 8
    """Trajectories per sampling UNet call, per process."""
    num_batches_per_epoch: int = 2
    """Sampling batches per epoch, per process: samples per epoch = batch_size * num_batches_per_epoch * processes."""
    samples_per_prompt: int = 1
    """Samples drawn per chosen prompt within a batch (> 1 gives groups for ``train.advantage: group``)."""
    share_initial_noise: bool = False
    """Training samples of one prompt group start from the same ``x_T`` (common random numbers: the group's reward
    differences then come from the policy's steps only). Needs ``samples_per_prompt > 1``; evaluation is unchanged."""
    decode_chunk_size: int = 8
    """Images decoded by the VAE per call (memory bound)."""


@dataclass
class TrainConfig:
    algorithm: str = "ddpo_is"
    """``ddpo_is`` (PPO clip), ``ddpo_sf`` (REINFORCE), ``rwr`` (exponentiated weights) or ``rwr_sparse`` (top quantile)."""
    learning_rate: float = 3e-4
    """AdamW learning rate."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    batch_size: int = 8
    """(trajectory, timestep) pairs per training UNet call, per process."""
    gradient_accumulation_steps: int = 1
    """Training minibatches whose gradients are summed into one optimiser step."""
    num_inner_epochs: int = 1
    """Passes over each epoch's samples (re-shuffled each pass)."""
    timestep_fraction: float = 1.0
    """Fraction of the steps in ``timestep_window`` trained on (a random subset per trajectory and inner epoch)."""
    timestep_window: float = 1.0
    """Train only on the first (noisiest) this fraction of the stochastic denoising steps (1: all of them). The
    log-prob gradient of a step scales as ``|d mean / d model_output| / sigma_t`` (:func:`ddpo.tools.diagnostics.score_scales`;
    ``scripts/diagnostics/score_scales.py`` prints it with measured gradient norms), so late, nearly deterministic steps can
    dominate its norm while deciding little of an image's layout (10 DDIM steps: the step t=101 -> 1 has 8-25x the
    others' gradient norm); a window < 1 leaves them out. Adam then takes full-size steps on the early steps' smaller
    gradients: lower the learning rate with it (on the `world` preset, window 0.5 at the preset's lr 6e-3 degraded
    the model within 10 epochs, window 0.8 at lr 3e-3 within 30)."""
    clip_range: float = 1e-4
    """PPO clip range for ddpo_is, on the ratio of log-probs averaged over latent dimensions."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping threshold (0 disables clipping; the norm is still logged)."""
    advantage: str = "per_prompt"
    """How rewards become advantages: ``per_prompt`` running statistics, ``batch`` normalisation, ``group``
    (normalised within each prompt's samples, GRPO) or ``group_center`` (centred within each prompt's samples, scaled
    by the batch std of the centred values)."""
    per_prompt_buffer_size: int = 16
    """Rewards remembered per prompt by the per-prompt tracker."""
    per_prompt_min_count: int = 16
    """Below this many rewards for a prompt, the tracker uses the batch statistics."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to [-adv_clip_max, adv_clip_max]."""
    rwr_temperature: float = 1.0
    """RWR: weights = N * softmax(advantage / rwr_temperature)."""
    rwr_quantile: float = 0.9
    """Sparse RWR: weight 1 for advantages at or above this batch quantile, else 0."""
    kl_coef: float = 0.0
    """Weight of the per-step KL to the frozen base model (0 disables; for LoRA the base is the adapter-off UNet)."""
    optimizer: str = "adamw"
    """``adamw`` (torch) or ``adamw8bit`` (bitsandbytes 8-bit AdamW: ~4x smaller optimiser state, for full fine-tuning)."""
    gradient_checkpointing: bool = False
    """Recompute UNet activations in the backward pass instead of storing them: less memory, ~30% more compute."""


@dataclass
class RewardConfig:
    name: str = "jpeg_compressibility"
    """Registered reward name (``ddpo rewards`` lists them) or import path ``package.module:function``."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the reward."""


@dataclass
class RunConfig:
    num_epochs: int = 5
    """Epochs of sample -> score -> train."""
    output_dir: str = "runs"
    """Parent folder of run directories."""
    run_name: str = ""
    """Run directory name under output_dir (empty: a timestamp)."""
    seed: int = 0
    """Seed of everything: model init (tiny), prompt draws, sampling noise, shuffles."""
    prompts: str = "simple_animals"
    """A shipped prompt set name (``ddpo prompts`` lists them) or a text file with one prompt per line."""
    mixed_precision: str = "no"
    """UNet autocast dtype: ``no``, ``bf16`` or ``fp16``. Latents and log-probs stay float32."""
    save_every: int = 1
    """Write a checkpoint every this many epochs (and always after the last one)."""
    keep_checkpoints: int = 3
    """Newest checkpoints kept under checkpoints/."""
    log_images: bool = True
    """Write an image grid per epoch under samples/ (and to the trackers of `log_with`)."""
    log_with: str = "tensorboard"
    """Trackers: `tensorboard` (under the run directory), `wandb` (project `ddpo`, needs `pip install wandb`),
    `tensorboard,wandb`, or `none`."""
    overlap_scoring: bool = True
    """Score batch k in a worker thread while batch k+1 is sampled."""
    eval_prompts: str = ""
    """Prompt set of a held-out evaluation (empty: none): the same ``eval_samples`` prompts and initial noise are
    sampled and scored before the first epoch, after the last and every ``eval_every`` epochs, so the numbers are
    paired and their difference is the policy's change, not sampling noise."""
    eval_samples: int = 64
    """Images in each held-out evaluation (split over processes)."""
    eval_every: int = 0
    """Also evaluate after every this many epochs (0: only before the first epoch and after the last)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)


class ConfigError(ValueError):
    """A configuration problem, with a message that says how to fix it."""


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    """Return ``value`` converted to ``annotation`` where lossless (int -> float), else raise ConfigError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(annotation)
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    return value


def all_keys(cls=RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the config (``train.learning_rate``, ...)."""
    keys = []
    for name, annotation in _field_types(cls).items():
        if dataclasses.is_dataclass(annotation):
            keys += all_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    if not close:  # try the last component alone (e.g. 'lr' under train)
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in all_keys() if k.rsplit(".", 1)[-1] == leaf][:1]
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}.{hint} (`ddpo config` prints every key with its default)")


def _apply(obj, data: dict[str, Any], prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    types_ = _field_types(type(obj))
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in types_:
            raise _unknown(key)
        annotation = types_[name]
        if dataclasses.is_dataclass(annotation):
            _apply(getattr(obj, name), value, f"{key}.")
        else:
            setattr(obj, name, _check_type(value, annotation, key))


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.learning_rate=1e-4"`` -> ``("train.learning_rate", 1e-4)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({err})") from err
    return key, value


def preset_names() -> list[str]:
    """Names of the presets shipped in ``ddpo/presets``."""
    return sorted(p.name[:-5] for p in resources.files("ddpo.presets").iterdir() if p.name.endswith(".yaml"))


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}")
    return data


def preset_data(name: str) -> dict[str, Any]:
    names = preset_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown preset {name!r}.{hint} Available: {', '.join(names)}")
    return yaml.safe_load(resources.files("ddpo.presets").joinpath(f"{name}.yaml").read_text()) or {}


def build_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> RunConfig:
    """Defaults <- ``base`` (a resolved config dict) <- preset <- config file <- overrides, then validation."""
    config = RunConfig()
    if base is not None:
        _apply(config, base)
    if preset is not None:
        _apply(config, preset_data(preset))
    if config_file is not None:
        _apply(config, read_yaml(config_file))
    for text in overrides or []:
        key, value = parse_override(text)
        _apply(config, _nest(key, value))
    validate(config)
    return config


def to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def validate(config: RunConfig) -> None:
    """Check values and their combinations; raise :class:`ConfigError` naming the key and the fix."""
    from ..policy.advantages import ADVANTAGES
    from ..policy.losses import ALGORITHMS

    s, t = config.sample, config.train

    def need(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(message)

    need(config.num_epochs >= 1, f"num_epochs must be >= 1; got {config.num_epochs}")
    need(config.save_every >= 1, f"save_every must be >= 1; got {config.save_every}")
    need(config.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1; got {config.keep_checkpoints}")
    need(
        config.mixed_precision in ("no", "bf16", "fp16"),
        f"mixed_precision must be no, bf16 or fp16; got {config.mixed_precision!r}",
    )
    need(s.scheduler in ("ddim", "ddpm"), f"sample.scheduler must be ddim or ddpm; got {s.scheduler!r}")
    need(s.num_steps >= 2, f"sample.num_steps must be >= 2; got {s.num_steps}")
    need(s.eta > 0, f"sample.eta must be > 0 (eta = 0 is deterministic and has no log-probability); got {s.eta}")
    need(s.scheduler != "ddpm" or s.eta == 1.0, "sample.eta must be 1.0 with sample.scheduler=ddpm")
    need(s.guidance_scale >= 1.0, f"sample.guidance_scale must be >= 1 (1 disables CFG); got {s.guidance_scale}")
    for key in ("batch_size", "num_batches_per_epoch", "samples_per_prompt", "decode_chunk_size"):
        need(getattr(s, key) >= 1, f"sample.{key} must be >= 1; got {getattr(s, key)}")
    need(
        s.batch_size % s.samples_per_prompt == 0,
        f"sample.batch_size ({s.batch_size}) must be a multiple of sample.samples_per_prompt ({s.samples_per_prompt})",
    )
    need(
        not s.share_initial_noise or s.samples_per_prompt > 1,
        "sample.share_initial_noise=true needs sample.samples_per_prompt > 1 (a group of samples to share x_T)",
    )
    need(t.algorithm in ALGORITHMS, f"train.algorithm must be one of {', '.join(ALGORITHMS)}; got {t.algorithm!r}")
    need(t.learning_rate > 0, f"train.learning_rate must be > 0; got {t.learning_rate}")
    for key in ("batch_size", "gradient_accumulation_steps", "num_inner_epochs"):
        need(getattr(t, key) >= 1, f"train.{key} must be >= 1; got {getattr(t, key)}")
    need(0 < t.timestep_fraction <= 1, f"train.timestep_fraction must be in (0, 1]; got {t.timestep_fraction}")
    need(0 < t.timestep_window <= 1, f"train.timestep_window must be in (0, 1]; got {t.timestep_window}")
    need(t.clip_range > 0, f"train.clip_range must be > 0; got {t.clip_range}")
    need(t.max_grad_norm >= 0, f"train.max_grad_norm must be >= 0; got {t.max_grad_norm}")
    need(
        t.advantage in ADVANTAGES,
        f"train.advantage must be one of {', '.join(ADVANTAGES)}; got {t.advantage!r}",
    )
    need(
        t.advantage not in ("group", "group_center") or s.samples_per_prompt > 1,
        f"train.advantage={t.advantage} needs sample.samples_per_prompt > 1 (several samples of each prompt per batch)",
    )
    need(t.adv_clip_max > 0, f"train.adv_clip_max must be > 0; got {t.adv_clip_max}")
    need(t.kl_coef >= 0, f"train.kl_coef must be >= 0; got {t.kl_coef}")
    need(t.optimizer in ("adamw", "adamw8bit"), f"train.optimizer must be adamw or adamw8bit; got {t.optimizer!r}")
    need(
        t.algorithm != "ddpo_sf" or t.num_inner_epochs == 1,
        "train.algorithm=ddpo_sf is only unbiased on-policy: set train.num_inner_epochs=1 (or use ddpo_is)",
    )
    pairs = s.batch_size * s.num_batches_per_epoch * train_steps_per_trajectory(config)
    per_step = t.batch_size * t.gradient_accumulation_steps
    need(
        pairs % per_step == 0,
        f"each epoch trains on {pairs} (trajectory, timestep) pairs per process (sample.batch_size * "
        f"sample.num_batches_per_epoch * steps trained per trajectory), which is not a multiple of train.batch_size * "
        f"train.gradient_accumulation_steps = {per_step}; change one of them so every optimiser step is full",
    )
    need(config.eval_samples >= 1, f"eval_samples must be >= 1; got {config.eval_samples}")
    need(config.eval_every >= 0, f"eval_every must be >= 0 (0: before and after the run only); got {config.eval_every}")
    need(config.model.lora_rank >= 1, f"model.lora_rank must be >= 1; got {config.model.lora_rank}")
    trackers = [name.strip() for name in config.log_with.split(",")]
    need(
        trackers == ["none"] or (all(name in ("tensorboard", "wandb") for name in trackers) and trackers),
        f"log_with must be tensorboard, wandb, 'tensorboard,wandb' or none; got {config.log_with!r}",
    )


def train_steps_per_trajectory(config: RunConfig) -> int:
    """Steps of each trajectory trained on per inner epoch: ``round(timestep_fraction * window steps)``, >= 1."""
    return max(1, round(config.train.timestep_fraction * train_window_steps(config)))


def train_window_steps(config: RunConfig) -> int:
    """The first ``round(timestep_window * stochastic steps)`` (>= 1) denoising steps, the ones training draws from."""
    from ..policy.schedulers import trainable_steps

    stochastic = trainable_steps(config.sample.scheduler, config.sample.num_steps)
    return max(1, round(config.train.timestep_window * stochastic))


def sampler_settings(config: RunConfig, share_initial_noise: bool | None = None) -> SamplerSettings:
    """The :class:`~ddpo.policy.sampling.SamplerSettings` of a run (sampling and training-time recomputation).

    ``share_initial_noise`` overrides ``sample.share_initial_noise`` (held-out evaluation never shares ``x_T``).
    """
    from ..policy.sampling import SamplerSettings

    s = config.sample
    return SamplerSettings(
        scheduler=s.scheduler,
        num_steps=s.num_steps,
        guidance_scale=s.guidance_scale,
        eta=s.eta,
        mixed_precision=config.mixed_precision,
        decode_chunk_size=s.decode_chunk_size,
        share_initial_noise=s.share_initial_noise if share_initial_noise is None else share_initial_noise,
    )
