"""Typed run configuration: dataclasses, YAML presets and files, dotted ``key.sub=value`` overrides, validation.

Every hyper-parameter is named once, here, with its meaning. Unknown keys and values of the wrong type are
rejected before anything is loaded, with the closest valid key suggested; so are non-finite numbers and every value
outside its range (:func:`validate`). YAML is read safely and bounded (:func:`load_yaml`: a key given twice and an
alias bomb are refused), and an override sets only the key it names (:func:`apply_override`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from . import trust

if typing.TYPE_CHECKING:
    from ..policy.sampling import SamplerSettings

# The policy maths (and torch) are imported inside the functions that need them, so that reading and validating
# configs, the CLI's help and the reports stay light.

DEFAULT_PRESET = "world"
"""The preset ``ddpo train`` (and ``bench``, ``config``) uses when none is given: the embedded world."""


@dataclass
class ModelConfig:
    pretrained: str = "tiny"
    """Hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``), local pipeline folder, ``world`` / ``world_flow``
    (the embedded pretrained models: UNet and flow-matching twin) or a random-weight test model: ``tiny`` (Stable
    Diffusion), ``tiny_sdxl``, ``tiny_sd3``, ``tiny_flux``."""
    family: str = "auto"
    """Model family: ``sd`` (Stable Diffusion 1.x/2.x), ``sdxl``, ``sd3`` (SD3 / SD3.5), ``flux`` (FLUX.1), or
    ``auto``: the family of the pipeline class in ``model_index.json`` (docs/model-families.md)."""
    drop_t5: bool = False
    """SD3: load without the T5 text encoder (``text_encoder_3=None``), as diffusers allows; saves ~9 GB of memory at
    some cost in prompt following."""
    text_encoder_precision: str = "auto"
    """``auto``: under ``mixed_precision=bf16|fp16`` the frozen text encoders are stored and run in that half
    precision (T5-XXL: 8.9 instead of 17.7 GiB), as diffusers' pipelines run them; ``fp32``: they stay float32 (the
    conditioning is then the same as in a ``mixed_precision=no`` run). The conditioning is stored in float32 either
    way and reused as is in training, so the PPO ratio is 1 at the first step in both."""
    vae_path: str | None = None
    """SDXL: a replacement VAE (hub id or local folder), e.g. the fp16-fix VAE ``madebyollin/sdxl-vae-fp16-fix``."""
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
    """``ddim`` (stochastic DDIM with ``eta``) or ``ddpm`` (ancestral DDPM; its last step is deterministic): the
    samplers with a per-step log-probability, which DDPO and RWR need. The forward-process estimators
    (``train.algorithm=awm|nft``) take any diffusers sampler: also ``dpmsolver++``, ``euler``, ``euler_a``, ``unipc``
    or a diffusers scheduler class name (e.g. ``DPMSolverMultistepScheduler``), and DDIM with ``eta=0``."""
    num_steps: int = 20
    """Denoising steps per trajectory (T)."""
    eta: float = 1.0
    """DDIM stochasticity in (0, 1]: > 0 so that every step has a log-probability, <= 1 because above 1 the DDIM
    variance exceeds what the step's mean leaves room for (1.0 = DDPM posterior variance). The forward-process
    estimators (``awm`` / ``nft``) need no log-probability and also take 0 (deterministic DDIM)."""
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
    resolution: int | None = None
    """Image side in pixels (square); a multiple of the VAE's downsampling factor (8 for Stable Diffusion; 16 for
    SD3 / FLUX, whose transformers patchify by 2). Empty (null): the model's native size (512 for SD 1.5, 1024 for
    SDXL, SD3.5 and FLUX)."""
    sde_window: list[int] | None = None
    """Flow-GRPO-Fast: ``[first, end]``: only denoising steps ``first <= k < end`` are stochastic (SDE, with
    log-probabilities, trained on); the others take the deterministic ODE step. Empty (null): every step. Only with
    the flow samplers ``flow_sde`` / ``flow_cps``."""


@dataclass
class TrainConfig:
    algorithm: str = "ddpo_is"
    """``ddpo_is`` (PPO clip), ``ddpo_sf`` (REINFORCE), ``rwr`` (exponentiated weights) or ``rwr_sparse`` (top
    quantile) on per-step log-probs; ``awm`` (advantage-weighted denoising loss) or ``nft`` (DiffusionNFT) on the
    forward process of clean samples (see :mod:`ddpo.policy.forward`)."""
    learning_rate: float = 3e-4
    """AdamW learning rate."""
    lr_warmup_steps: int = 0
    """Optimiser steps of linear learning-rate warm-up from ``learning_rate / lr_warmup_steps`` (0: none). Adam's
    first update moves every coordinate by the full learning rate whatever the gradient's noise
    (:func:`ddpo.training.optim.learning_rate_at`)."""
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
    (normalised within each prompt's samples, GRPO), ``group_center`` (centred within each prompt's samples, scaled
    by the batch std of the centred values) or ``global_std`` (Flow-GRPO's ``global_std=True``: centred within each
    prompt's samples, divided by the batch std of the raw rewards + 1e-4)."""
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
    """Weight of the per-step KL to the frozen base model (0 disables; for LoRA the base is the adapter-off UNet).
    For ``awm`` / ``nft`` the KL term is the mean squared distance of the model outputs in its pretraining space:
    velocities for a flow-matching model, noise predictions for an epsilon UNet (v for a v-prediction one)."""
    kl_form: str = "gaussian"
    """Which per-step KL ``kl_coef`` weighs (log-prob algorithms): ``gaussian``, the true KL between the policy's and
    the base model's step Gaussians; or ``flow_grpo`` (flow SDE samplers only), Flow-GRPO's: with ``flow_sde`` it
    divides by ``2 s^2`` without the step's ``-dt`` (the true KL times ``-dt``, 1/25 to 1/4 on SD3.5's 10 steps), with
    ``flow_cps`` it is the true KL. Use ``flow_grpo`` to give a Flow-GRPO ``beta`` its published meaning."""
    ratio_form: str = "gaussian"
    """The PPO ratio of ``ddpo_is``: ``gaussian``, from the true Gaussian log-probs; or ``flow_grpo`` (flow SDE
    samplers only), Flow-GRPO's: with ``flow_cps`` its log-prob is ``-mean |x' - mean|^2`` (no ``1 / (2 std^2)``),
    so its log-ratio is the true one times ``2 std^2`` and ``clip_range`` bounds another trust region at each step;
    with ``flow_sde`` it is the Gaussian ratio. Use ``flow_grpo`` to give a Flow-GRPO ``clip_range`` its meaning."""
    awm_ema_kl: float = 0.0
    """AWM's stabiliser: weight of the proximal term ``mean |pred - pred_old|^2`` to the old (EMA) policy, in the
    model's pretraining space (0 disables it). The old policy follows ``old_policy_*``. At ``awm_ema_kl >=
    adv_clip_max`` each pair's loss is a convex quadratic in the prediction, so negative advantages cannot drive the
    model away without bound (:mod:`ddpo.policy.forward`)."""
    nft_beta: float = 1.0
    """DiffusionNFT: how far the implicit positive and negative policies sit from the old one (``b``; > 0)."""
    nft_sample_policy: str = "old"
    """DiffusionNFT: which weights collect the training samples: ``old`` (the old EMA policy its implicit policies
    are built around, as the reference implementation does) or ``current`` (the trained weights)."""
    old_policy_flat: int = 0
    """DiffusionNFT (and AWM's ``awm_ema_kl``): optimiser steps during which the old policy is the current one (EMA
    decay 0)."""
    old_policy_uprate: float = 0.001
    """DiffusionNFT: the old policy's EMA decay grows by this per optimiser step after ``old_policy_flat``."""
    old_policy_uphold: float = 0.5
    """DiffusionNFT: the largest EMA decay of the old policy (updated once per epoch; in [0, 1))."""
    optimizer: str = "adamw"
    """``adamw`` (torch) or ``adamw8bit`` (bitsandbytes 8-bit AdamW: ~4x smaller optimiser state, for full fine-tuning)."""
    old_log_probs: str = "auto"
    """Where the PPO ratio's old log-probs come from: ``sampled`` (recorded while sampling), ``recompute`` (re-scored
    without gradient in the training call's exact minibatch shapes before the epoch's first optimiser step) or
    ``auto`` (recompute when ``train.batch_size != sample.batch_size``). Kernels give different outputs for the same
    rows at different batch sizes (bf16 on CPUs and GPUs: up to 1e-2 in log-prob, far above ``clip_range``; float32:
    about 1e-6), so only equal layouts or a recomputation make the ratio exactly 1 at the first step. ``sampled`` with
    unequal batch sizes is refused; recomputing costs one no-grad forward pass per trained pair."""
    gradient_checkpointing: bool = False
    """Recompute UNet activations in the backward pass instead of storing them: less memory, ~30% more compute."""


@dataclass
class RewardConfig:
    name: str = "jpeg_compressibility"
    """Registered reward name (``ddpo rewards`` lists them) or import path ``package.module:function``."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the reward. A reward given by import path (in ``name`` or a ``weighted`` component) runs
    that module's code when imported, so only the user opts in: ``--trust-import-path`` or ``DDPO_TRUST_IMPORT_PATH=1``,
    never a config file (:mod:`ddpo.training.trust`)."""


@dataclass
class RunConfig:
    num_epochs: int = 5
    """Epochs of sample -> score -> train."""
    output_dir: str = "runs"
    """Parent folder of run directories: any path, relative or absolute."""
    run_name: str = ""
    """Run directory name under output_dir (empty: a timestamp): one folder name, no ``/``, ``\\`` or ``..``."""
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
    process_timeout_seconds: int = 600
    """Several processes: how long one waits for the others in a collective (gather, gradient all-reduce, barrier)
    before the run stops with an error saying another process died or hung; the last checkpoint stays intact."""
    log_images: bool = True
    """Write an image grid per epoch under samples/ (and to the trackers of `log_with`)."""
    log_with: str = "tensorboard"
    """Trackers: `tensorboard` (under the run directory), `wandb` (project `ddpo`, needs `pip install wandb`),
    `tensorboard,wandb`, or `none`."""
    overlap_scoring: bool = True
    """Score batch k in a worker thread while batch k+1 is sampled, where that helps: on an accelerator, or for a
    reward that waits on I/O (``remote``). On a CPU device a local reward runs inline instead
    (:func:`ddpo.training.trainer.overlap_scoring`; the run's start-up line says which)."""
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


_NO_KEYS = ("mixed_precision",)
"""String keys whose value ``no`` YAML 1.1 reads as ``false`` (``mixed_precision: no`` means the string)."""


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
        if value is False and key.rsplit(".", 1)[-1] in _NO_KEYS:
            return "no"  # YAML 1.1 reads an unquoted `no` as false
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
        if key == trust.FORMER_KEY:  # read in older runs' config.yaml (false); true is refused: only the user opts in
            if (message := trust.former_key_refusal(value)) is not None:
                raise ConfigError(message)
            continue
        if name not in types_:
            raise _unknown(key)
        annotation = types_[name]
        if dataclasses.is_dataclass(annotation):
            _apply(getattr(obj, name), value, f"{key}.")
        else:
            setattr(obj, name, _check_type(value, annotation, key))


def apply_override(config: RunConfig, key: str, value: Any) -> None:
    """Set the one key an override names. A key inside a mapping-valued field (``reward.options.quality=80``) is set
    inside that mapping, keeping its other keys, at any depth (``reward.options.components.brightness=1``); a whole
    mapping (``reward.options={quality: 80}``) replaces the field's value; a section (``train={...}``) sets the keys
    it gives, as a config file does."""
    parts = key.split(".")
    obj: Any = config
    for i, part in enumerate(parts[:-1]):
        annotation = _field_types(type(obj)).get(part)
        if typing.get_origin(annotation) is dict:
            field_key = ".".join(parts[: i + 1])
            merged = _set_in(getattr(obj, part), parts[i + 1 :], value, field_key)
            setattr(obj, part, _check_type(merged, annotation, field_key))
            return
        if not dataclasses.is_dataclass(annotation):
            break  # an unknown key or a plain value: _apply names the problem
        obj = getattr(obj, part)
    _apply(config, _nest(key, value))


def _set_in(mapping: dict[str, Any], path: list[str], value: Any, key: str) -> dict[str, Any]:
    """A copy of ``mapping`` with ``value`` at ``path`` (nested mappings created or copied on the way)."""
    out = dict(mapping)
    node = out
    for depth, part in enumerate(path[:-1]):
        child = node.get(part, {})
        if not isinstance(child, dict):
            inner = ".".join([key, *path[: depth + 1]])
            raise ConfigError(
                f"{inner} is {child!r}, not a mapping: cannot set {'.'.join([key, *path])} inside it; set the "
                f"whole value instead ({inner}={{...}})"
            )
        node[part] = dict(child)
        node = node[part]
    node[path[-1]] = value
    return out


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
    value = load_yaml(raw, f"override {text!r}: the value", key_prefix=key) if raw.strip() else ""
    if isinstance(value, (bool, int, float)) and _annotation(key) in (str, str | None):
        value = raw.strip()  # a string key takes the text as written: mixed_precision=no, run_name=007
    return key, value


def _annotation(key: str) -> Any:
    """The type annotation of a dotted key (None for an unknown key)."""
    cls: Any = RunConfig
    for part in key.split("."):
        hints = _field_types(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            return None
        cls = hints[part]
    return cls


def preset_names() -> list[str]:
    """Names of the presets shipped in ``ddpo/presets``."""
    return sorted(p.name[:-5] for p in resources.files("ddpo.presets").iterdir() if p.name.endswith(".yaml"))


MAX_CONFIG_BYTES = 1 << 20
"""Largest config, grid or run ``config.yaml`` file read (1 MiB; a preset is a few KiB)."""
MAX_YAML_VALUES = 100_000
"""Largest number of values (mappings, lists, scalars) a YAML document may hold once its aliases are followed: a
"billion laughs" document of nested aliases stops here instead of exhausting memory."""


def load_yaml(text: str, source: str, key_prefix: str = "") -> Any:
    """``text`` parsed as YAML, safely (PyYAML's safe constructors only); raises :class:`ConfigError`, one line naming
    ``source`` (``"config file 'x.yaml'"``), for a syntax error, a key given twice in one mapping (its dotted path,
    after ``key_prefix``) or a document larger than :data:`MAX_YAML_VALUES` values with its aliases followed."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_yaml_node(node, source, key_prefix)
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML: {_yaml_problem(err)}") from None
    finally:
        loader.dispose()


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A PyYAML error on one line: ``while parsing ...: expected ..., but got ... (line L, column C)``."""
    if not isinstance(err, yaml.MarkedYAMLError):
        return " ".join(str(err).split())
    text = ": ".join(part for part in (err.context, err.problem) if part)
    mark = err.problem_mark or err.context_mark
    return f"{text} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else text


def _check_yaml_node(root: yaml.Node, source: str, key_prefix: str) -> None:
    """Walk the composed document, following aliases: refuse a key given twice in a mapping (YAML keeps the last one
    silently) and a document of more than :data:`MAX_YAML_VALUES` values (a recursive alias never ends). A node's
    key path is kept as a link to its parent's, and written out only for an error."""
    root_path = (None, key_prefix.rstrip(".")) if key_prefix else None
    stack: list[tuple[yaml.Node, tuple | None]] = [(root, root_path)]
    seen = 0
    while stack:
        node, path = stack.pop()
        seen += 1
        if seen > MAX_YAML_VALUES:
            raise ConfigError(
                f"{source} expands to more than {MAX_YAML_VALUES} values (its aliases, *name, followed); a config "
                "holds a few hundred: use fewer aliases"
            )
        if isinstance(node, yaml.SequenceNode):
            stack += [(item, (path, f"[{i}]")) for i, item in enumerate(node.value)]
        elif isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], yaml.Mark] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden here
                    stack.append((value_node, path))
                    continue
                name = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
                if isinstance(key_node, yaml.ScalarNode):
                    if (key_node.tag, name) in first:
                        raise ConfigError(
                            f"{source} sets {_key_path((path, name))} twice "
                            f"({_lines(first[key_node.tag, name], key_node.start_mark)}); keep one of them"
                        )
                    first[key_node.tag, name] = key_node.start_mark
                stack.append((value_node, (path, name)))


def _key_path(path: tuple | None) -> str:
    """``((None, "train"), "learning_rate")`` -> ``"train.learning_rate"`` (list items as ``[i]``)."""
    parts: list[str] = []
    while path is not None:
        path, name = path
        parts.append(name)
    return "".join(part if part.startswith("[") or i == 0 else f".{part}" for i, part in enumerate(reversed(parts)))


def _lines(a: yaml.Mark, b: yaml.Mark) -> str:
    if a.line == b.line:
        return f"line {a.line + 1}, columns {a.column + 1} and {b.column + 1}"
    return f"lines {a.line + 1} and {b.line + 1}"


def read_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file holding a mapping (a config, a grid, a run's ``config.yaml``), read with :func:`load_yaml`; at
    most :data:`MAX_CONFIG_BYTES` are read. Every problem is one :class:`ConfigError` line naming the file."""
    path = Path(path)
    source = f"{what} {str(path)!r}"
    if path.is_dir():
        raise ConfigError(f"{source} is a folder, not a YAML file")
    if not path.exists():
        raise ConfigError(f"{source} does not exist")
    if not path.is_file():
        raise ConfigError(f"{source} is not a regular file (a device or a pipe); give a YAML file")
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"cannot read {source} ({err.strerror or err})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{source} is larger than {MAX_CONFIG_BYTES >> 20} MiB; a config is a few KiB: is it the right file?"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{source} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None
    data = load_yaml(text, source)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a mapping of keys, got {type(data).__name__}")
    return data


def preset_data(name: str) -> dict[str, Any]:
    names = preset_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown preset {name!r}.{hint} Available: {', '.join(names)}")
    text = resources.files("ddpo.presets").joinpath(f"{name}.yaml").read_text()
    return load_yaml(text, f"preset {name!r}") or {}


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
        apply_override(config, *parse_override(text))
    validate(config)
    return config


def to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


MAX_PROCESS_TIMEOUT_SECONDS = 365 * 24 * 3600
"""Largest ``process_timeout_seconds`` (a year); far larger values overflow Python's and torch's timeouts."""


def plain_folder_name(name: str) -> bool:
    """Whether ``name`` names one folder inside its parent (``run_name``): no separator, not ``.``/``..``, not
    blank, not absolute. Empty is allowed (``run_name``'s default: a timestamp)."""
    if name == "":
        return True
    return name.strip() != "" and name not in (".", "..") and not any(c in name for c in "/\\\0")


IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
"""The form of a reward given by import path: ``package.module:attribute``."""


def eta_problem(eta: float, scheduler: str, key: str = "sample.eta") -> str | None:
    """What is wrong with the sampler noise ``eta`` for ``scheduler`` (None: nothing), the rule of both ``ddpo train``
    and ``ddpo sample`` / ``eval`` (``key`` names the setting: ``--eta``). Finite, >= 0 and, except for the flow SDE
    sampler, <= 1: above 1 the DDIM variance exceeds what its step leaves room for (the images come out black), and
    CPS's noise ``sin(eta pi / 2)`` peaks at 1. A log-prob algorithm also needs eta > 0 (:func:`validate`)."""
    if not math.isfinite(eta):
        return f"{key} must be a finite number; got {eta}"
    if eta < 0:
        return f"{key} must be >= 0; got {eta}"
    if eta > 1 and scheduler == "flow_cps":
        return f"{key} must be <= 1 with the CPS sampler (its noise is sigma' sin(eta pi / 2)); got {eta}"
    if eta > 1 and not scheduler.startswith("flow"):
        return (
            f"{key} must be <= 1 (above 1 the DDIM variance exceeds 1 - alpha_bar_prev and the step's direction term "
            f"would be clamped to zero); got {eta}"
        )
    return None


def guidance_problem(scale: float, key: str = "sample.guidance_scale") -> str | None:
    """What is wrong with the classifier-free guidance scale ``scale`` (None: nothing), for ``ddpo train`` and
    ``ddpo sample`` / ``eval`` (``key``: ``--guidance``): a finite number >= 1 (1 disables CFG; diffusers also turns it
    off silently for any value below 1 and for NaN)."""
    if not math.isfinite(scale):
        return f"{key} must be a finite number; got {scale}"
    if scale < 1:
        return f"{key} must be >= 1 (1 disables CFG); got {scale}"
    return None


def _float_keys() -> list[str]:
    """The dotted keys whose values are floats."""
    return [key for key in all_keys() if _annotation(key) is float]


def _value(config: RunConfig, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def validate(config: RunConfig) -> None:
    """Check values and their combinations; raise :class:`ConfigError` naming the key and the fix."""
    from ..policy.advantages import ADVANTAGES
    from .estimators import validate_estimators

    s, t = config.sample, config.train

    def need(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(message)

    for key in _float_keys():  # before any range rule: inf passes `> 0`, and every comparison with nan is false
        value = _value(config, key)
        need(math.isfinite(value), f"{key} must be a finite number; got {value}")
    need(config.num_epochs >= 1, f"num_epochs must be >= 1; got {config.num_epochs}")
    need(config.save_every >= 1, f"save_every must be >= 1; got {config.save_every}")
    need(config.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1; got {config.keep_checkpoints}")
    need(
        config.process_timeout_seconds >= 1,
        f"process_timeout_seconds must be >= 1; got {config.process_timeout_seconds}",
    )
    need(  # a timedelta (and torch's collective timeout) overflows far above this
        config.process_timeout_seconds <= MAX_PROCESS_TIMEOUT_SECONDS,
        f"process_timeout_seconds must be <= {MAX_PROCESS_TIMEOUT_SECONDS} (365 days); "
        f"got {config.process_timeout_seconds}",
    )
    need(
        plain_folder_name(config.run_name),
        f"run_name={config.run_name!r} must be a single folder name (no /, \\, .. or absolute path): the run "
        f"directory is output_dir/run_name; output_dir={config.output_dir!r} chooses where it goes",
    )
    need(
        config.mixed_precision in ("no", "bf16", "fp16"),
        f"mixed_precision must be no, bf16 or fp16; got {config.mixed_precision!r}",
    )
    flow_sde = s.scheduler in ("flow_sde", "flow_cps")
    for key, what in (("kl_form", "KL"), ("ratio_form", "PPO ratio")):
        value = getattr(t, key)
        need(value in ("gaussian", "flow_grpo"), f"train.{key} must be gaussian or flow_grpo; got {value!r}")
        need(
            value == "gaussian" or flow_sde,
            f"train.{key}=flow_grpo is Flow-GRPO's {what} of a flow SDE step: it needs sample.scheduler=flow_sde or "
            f"flow_cps; got {s.scheduler!r} (use train.{key}=gaussian)",
        )
    # The chosen estimator's needs (its sampler first), and every estimator's own settings.
    estimator = validate_estimators(config, need)
    eta_error = eta_problem(s.eta, s.scheduler)
    need(eta_error is None, str(eta_error))
    need(s.num_steps >= 2, f"sample.num_steps must be >= 2; got {s.num_steps}")
    need(
        s.resolution is None or s.resolution >= 8,
        f"sample.resolution must be a pixel size >= 8 (or null for the model's native size); got {s.resolution}",
    )
    need(s.scheduler != "ddpm" or s.eta == 1.0, "sample.eta must be 1.0 with sample.scheduler=ddpm")
    if s.sde_window is not None:
        need(
            flow_sde and estimator.uses_log_probs,
            f"sample.sde_window (Flow-GRPO-Fast) needs a flow SDE sampler, sample.scheduler=flow_sde or flow_cps, and "
            f"a log-prob algorithm; got sample.scheduler={s.scheduler!r}, train.algorithm={estimator.name}",
        )
        need(
            len(s.sde_window) == 2 and 0 <= s.sde_window[0] < s.sde_window[1] <= s.num_steps,
            f"sample.sde_window must be [first, end] with 0 <= first < end <= sample.num_steps ({s.num_steps}); "
            f"got {s.sde_window}",
        )
        from ..policy.schedulers import trainable_steps

        last = trainable_steps(s.scheduler, s.num_steps)  # CPS: the last step is deterministic (std 0)
        need(
            s.sde_window[0] < last,
            f"sample.sde_window={s.sde_window} holds no stochastic step: with sample.scheduler={s.scheduler} the last "
            f"step ({last}) is deterministic (std 0, no log-probability), so nothing would be trained; start the "
            f"window before step {last}, e.g. sample.sde_window=[{last - 1}, {s.num_steps}]",
        )
    guidance_error = guidance_problem(s.guidance_scale)
    need(guidance_error is None, str(guidance_error))
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
    untrusted = trust.refusal(config.reward.name, config.reward.options)
    need(untrusted is None, str(untrusted))
    for path in trust.reward_import_paths(config.reward.name, config.reward.options):
        where = "reward.name" if path == config.reward.name else "a reward.options.components name"
        need(
            IMPORT_PATH.fullmatch(path) is not None,
            f"{where}={path!r} is not an import path of the form package.module:attribute (a registered reward's "
            "name has no ':'; `ddpo rewards` lists them)",
        )
    need(t.learning_rate > 0, f"train.learning_rate must be > 0; got {t.learning_rate}")
    for key in ("adam_beta1", "adam_beta2"):  # torch.optim.AdamW's own checks, which name no key
        need(0 <= getattr(t, key) < 1, f"train.{key} must be in [0, 1) (an Adam moment's decay); got {getattr(t, key)}")
    need(t.adam_epsilon >= 0, f"train.adam_epsilon must be >= 0; got {t.adam_epsilon}")
    need(t.adam_weight_decay >= 0, f"train.adam_weight_decay must be >= 0; got {t.adam_weight_decay}")
    for key in ("per_prompt_buffer_size", "per_prompt_min_count"):
        need(getattr(t, key) >= 1, f"train.{key} must be >= 1; got {getattr(t, key)}")
    need(t.lr_warmup_steps >= 0, f"train.lr_warmup_steps must be >= 0 (0: no warm-up); got {t.lr_warmup_steps}")
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
        t.advantage not in ("group", "group_center", "global_std") or s.samples_per_prompt > 1,
        f"train.advantage={t.advantage} needs sample.samples_per_prompt > 1 (several samples of each prompt per batch)",
    )
    need(t.adv_clip_max > 0, f"train.adv_clip_max must be > 0; got {t.adv_clip_max}")
    need(t.kl_coef >= 0, f"train.kl_coef must be >= 0; got {t.kl_coef}")
    need(
        t.old_log_probs in ("auto", "sampled", "recompute"),
        f"train.old_log_probs must be auto, sampled or recompute; got {t.old_log_probs!r}",
    )
    need(
        t.old_log_probs != "sampled" or t.batch_size == s.batch_size,
        f"train.old_log_probs=sampled needs train.batch_size == sample.batch_size (now {t.batch_size} and "
        f"{s.batch_size}): at different batch sizes the UNet's kernels give different outputs for the same rows, so "
        "the PPO ratio would not be 1 at the first step. Use train.old_log_probs=auto (recomputes them in the "
        "training shapes) or equal batch sizes",
    )
    need(t.optimizer in ("adamw", "adamw8bit"), f"train.optimizer must be adamw or adamw8bit; got {t.optimizer!r}")
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
    need(
        config.model.lora_alpha > 0,
        f"model.lora_alpha must be > 0 (the adapter's output is scaled by lora_alpha / lora_rank); got "
        f"{config.model.lora_alpha}",
    )
    need(
        config.model.text_encoder_precision in ("auto", "fp32"),
        f"model.text_encoder_precision must be auto or fp32; got {config.model.text_encoder_precision!r}",
    )
    from ..models.family import FAMILIES, unknown_family_message

    need(config.model.family == "auto" or config.model.family in FAMILIES, unknown_family_message(config.model.family))
    trackers = [name.strip() for name in config.log_with.split(",")]
    need(
        trackers == ["none"] or (all(name in ("tensorboard", "wandb") for name in trackers) and trackers),
        f"log_with must be tensorboard, wandb, 'tensorboard,wandb' or none; got {config.log_with!r}",
    )


def recomputes_old_log_probs(config: RunConfig) -> bool:
    """Whether the old log-probs are re-scored in the training shapes (``train.old_log_probs``, ``auto`` resolved;
    never for an estimator without log-probs)."""
    from .estimators import estimator_for

    return estimator_for(config).recomputes_old_log_probs(config)


def train_steps_per_trajectory(config: RunConfig) -> int:
    """Steps of each trajectory trained on per inner epoch: ``round(timestep_fraction * window steps)``, >= 1."""
    return max(1, round(config.train.timestep_fraction * train_window_steps(config)))


def train_window_steps(config: RunConfig) -> int:
    """The first ``round(timestep_window * stochastic steps)`` (>= 1) denoising steps, the ones training draws from
    (counted from ``sample.sde_window``'s first step when it is set, see :func:`train_step_offset`)."""
    from ..policy.schedulers import trainable_steps

    s = config.sample
    if s.sde_window is not None:
        stochastic = min(s.sde_window[1], trainable_steps(s.scheduler, s.num_steps)) - s.sde_window[0]
    else:
        stochastic = trainable_steps(s.scheduler, s.num_steps)
    return max(1, round(config.train.timestep_window * stochastic))


def train_step_offset(config: RunConfig) -> int:
    """Index of the first step training may draw: ``sample.sde_window``'s first step, else 0."""
    return config.sample.sde_window[0] if config.sample.sde_window is not None else 0


def model_options(config: RunConfig) -> dict[str, Any]:
    """The ``model.*`` settings a model family reads while loading (:func:`ddpo.models.load_model`)."""
    from ..models.family import LOAD_OPTIONS

    return {key: getattr(config.model, key) for key in LOAD_OPTIONS}


def sampler_settings(
    config: RunConfig,
    share_initial_noise: bool | None = None,
    latent_size: int | None = None,
    latent_channels: int | None = None,
    schedule_kwargs: tuple = (),
) -> SamplerSettings:
    """The :class:`~ddpo.policy.sampling.SamplerSettings` of a run (sampling and training-time recomputation).

    ``share_initial_noise`` overrides ``sample.share_initial_noise`` (held-out evaluation never shares ``x_T``);
    ``latent_size`` is ``sample.resolution`` in latent pixels (:func:`ddpo.models.latent_size`; None: the UNet's
    ``sample_size``).
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
        latent_size=latent_size,
        latent_channels=latent_channels,
        schedule_kwargs=schedule_kwargs,
        sde_window=tuple(s.sde_window) if s.sde_window is not None else None,
    )
