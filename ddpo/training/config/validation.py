"""Validation: :func:`validate` checks values and their combinations, one function per section, and raises
:class:`~ddpo.training.config.schema.ConfigError` naming the key and the fix.

Every float must be finite before any range rule runs (:func:`validate_finite`). The sections follow:
:func:`validate_run` (run-level keys), :func:`validate_algorithm` (``train.algorithm``, the estimator's own rules),
:func:`validate_sample`, :func:`validate_reward`, :func:`validate_train` and :func:`validate_model`. Each rule is one
``need(condition, message)``.
"""

from __future__ import annotations

import math
from typing import Any

from .. import trust
from .derived import train_steps_per_trajectory
from .rules import IMPORT_PATH, MAX_PROCESS_TIMEOUT_SECONDS, eta_problem, guidance_problem, plain_folder_name
from .schema import ConfigError, RunConfig, _annotation, all_keys


def need(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` when ``condition`` is false."""
    if not condition:
        raise ConfigError(message)


def validate(config: RunConfig) -> None:
    """Check values and their combinations; raise :class:`ConfigError` naming the key and the fix."""
    validate_finite(config)
    validate_run(config)
    estimator = validate_algorithm(config)
    validate_sample(config, estimator)
    validate_reward(config)
    validate_train(config, estimator)
    validate_model(config)
    validate_guards(config)


def _float_keys() -> list[str]:
    """The dotted keys whose values are floats."""
    return [key for key in all_keys() if _annotation(key) is float]


def _value(config: RunConfig, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def validate_finite(config: RunConfig) -> None:
    """Every float key is a finite number: before any range rule, as inf passes ``> 0`` and every comparison with nan
    is false."""
    for key in _float_keys():
        value = _value(config, key)
        need(math.isfinite(value), f"{key} must be a finite number; got {value}")


def validate_run(config: RunConfig) -> None:
    """The run-level keys: epochs, checkpoints, the run directory, precision, evaluation and trackers."""
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
    need(config.eval_samples >= 1, f"eval_samples must be >= 1; got {config.eval_samples}")
    need(config.eval_every >= 0, f"eval_every must be >= 0 (0: before and after the run only); got {config.eval_every}")
    trackers = [name.strip() for name in config.log_with.split(",")]
    need(
        trackers == ["none"] or (all(name in ("tensorboard", "wandb") for name in trackers) and trackers),
        f"log_with must be tensorboard, wandb, 'tensorboard,wandb' or none; got {config.log_with!r}",
    )


def validate_algorithm(config: RunConfig) -> type:
    """``train.kl_form`` / ``train.ratio_form``, then the estimators' rules (:func:`~ddpo.training.estimators.
    validate_estimators`: ``train.algorithm`` is registered, the chosen one's needs, its sampler first, and its own
    keys; another estimator's key is refused when set). Returns the chosen estimator class."""
    from ..estimators import validate_estimators

    s, t = config.sample, config.train
    flow_sde = s.scheduler in ("flow_sde", "flow_cps")
    for key, what in (("kl_form", "KL"), ("ratio_form", "PPO ratio")):
        value = getattr(t, key)
        need(value in ("gaussian", "flow_grpo"), f"train.{key} must be gaussian or flow_grpo; got {value!r}")
        need(
            value == "gaussian" or flow_sde,
            f"train.{key}=flow_grpo is Flow-GRPO's {what} of a flow SDE step: it needs sample.scheduler=flow_sde or "
            f"flow_cps; got {s.scheduler!r} (use train.{key}=gaussian)",
        )
    return validate_estimators(config, need)


def validate_sample(config: RunConfig, estimator: type) -> None:
    """The ``sample`` section: the sampler's noise, steps, resolution, the Flow-GRPO-Fast window (which needs the
    chosen ``estimator`` to use log-probs), guidance and batch layout."""
    s = config.sample
    flow_sde = s.scheduler in ("flow_sde", "flow_cps")
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
        from ...policy.schedulers import trainable_steps

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


def validate_reward(config: RunConfig) -> None:
    """The ``reward`` section: an import path needs the user's opt-in and the form ``package.module:attribute``."""
    untrusted = trust.refusal(config.reward.name, config.reward.options)
    need(untrusted is None, str(untrusted))
    for path in trust.reward_import_paths(config.reward.name, config.reward.options):
        where = "reward.name" if path == config.reward.name else "a reward.options.components name"
        need(
            IMPORT_PATH.fullmatch(path) is not None,
            f"{where}={path!r} is not an import path of the form package.module:attribute (a registered reward's "
            "name has no ':'; `ddpo rewards` lists them)",
        )


def validate_train(config: RunConfig, estimator: type) -> None:
    """The ``train`` section's shared keys: optimiser, advantages, minibatches, old log-probs, and that every
    optimiser step of the trainer's epoch is full (an ``estimator`` that owns its epoch checks its own layout)."""
    from ...policy.advantages import ADVANTAGES

    s, t = config.sample, config.train
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
        t.advantage not in ("group", "group_center", "global_std", "per_component") or s.samples_per_prompt > 1,
        f"train.advantage={t.advantage} needs sample.samples_per_prompt > 1 (several samples of each prompt per batch)",
    )
    need(
        t.advantage != "per_component" or config.reward.name == "weighted",
        f"train.advantage=per_component normalises each component of a weighted reward on its own; reward.name is "
        f"{config.reward.name!r}: use reward.name=weighted with reward.options.components, or another train.advantage",
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
    if estimator.owns_epoch:  # its minibatches are its own: it checks their layout (Estimator.validate)
        return
    pairs = s.batch_size * s.num_batches_per_epoch * train_steps_per_trajectory(config)
    per_step = t.batch_size * t.gradient_accumulation_steps
    need(
        pairs % per_step == 0 or getattr(estimator, "owns_epoch", False),
        f"each epoch trains on {pairs} (trajectory, timestep) pairs per process (sample.batch_size * "
        f"sample.num_batches_per_epoch * steps trained per trajectory), which is not a multiple of train.batch_size * "
        f"train.gradient_accumulation_steps = {per_step}; change one of them so every optimiser step is full",
    )


def validate_model(config: RunConfig) -> None:
    """The ``model`` section: LoRA, text-encoder precision and a known family."""
    from ...models.family import FAMILIES, unknown_family_message

    m = config.model
    need(m.lora_rank >= 1, f"model.lora_rank must be >= 1; got {m.lora_rank}")
    need(
        m.lora_alpha > 0,
        f"model.lora_alpha must be > 0 (the adapter's output is scaled by lora_alpha / lora_rank); got {m.lora_alpha}",
    )
    need(
        m.text_encoder_precision in ("auto", "fp32"),
        f"model.text_encoder_precision must be auto or fp32; got {m.text_encoder_precision!r}",
    )
    need(m.family == "auto" or m.family in FAMILIES, unknown_family_message(m.family))


def validate_guards(config: RunConfig) -> None:
    """The guards and the rules over evaluations: ``eval_rewards`` (opt-in for import paths, as ``reward.name``),
    ``stop.*``, ``final_checkpoint`` and ``best_metric``; each needs a held-out evaluation to act on."""
    stop = config.stop
    need(
        isinstance(config.eval_rewards, dict),
        f"eval_rewards must be a mapping {{name: options}}; got {config.eval_rewards!r}",
    )
    for name, options in config.eval_rewards.items():
        need(
            options is None or isinstance(options, dict),
            f"eval_rewards.{name} must be the reward's options (a mapping, or empty); got {options!r}",
        )
        untrusted = trust.refusal(name, options or {}, where="eval_rewards: ")
        need(untrusted is None, str(untrusted))
        need(
            ":" not in name or IMPORT_PATH.fullmatch(name) is not None,
            f"eval_rewards name {name!r} is not an import path of the form package.module:attribute (a registered "
            "reward's name has no ':'; `ddpo rewards` lists them)",
        )
    for key in ("guard_drop", "kl_limit", "min_delta"):
        need(getattr(stop, key) >= 0, f"stop.{key} must be >= 0 (0: off); got {getattr(stop, key)}")
    need(stop.patience >= 0, f"stop.patience must be >= 0 (0: off); got {stop.patience}")
    need(
        config.final_checkpoint in ("last", "best"),
        f"final_checkpoint must be last or best; got {config.final_checkpoint!r}",
    )
    metric = config.best_metric
    guards = [f"guard/{name.split(':')[-1]}_mean" for name in config.eval_rewards]
    need(
        metric == "reward_mean" or metric in guards or (metric.startswith("reward/") and metric.endswith("_mean")),
        f"best_metric must be reward_mean, a guard's guard/<name>_mean ({', '.join(guards) or 'no eval_rewards'}) or a "
        f"reward component's reward/<name>_mean; got {metric!r}",
    )
    uses = [
        what
        for what, on in (
            ("stop.guard_drop", stop.guard_drop > 0),
            ("stop.kl_limit", stop.kl_limit > 0),
            ("stop.patience", stop.patience > 0),
            ("final_checkpoint=best", config.final_checkpoint == "best"),
        )
        if on
    ]
    need(
        not uses or bool(config.eval_prompts),
        f"{', '.join(uses)} {'acts' if len(uses) == 1 else 'act'} on the held-out evaluations: set eval_prompts (e.g. eval_prompts=world_heldout), and "
        "eval_every to judge during the run",
    )
    need(
        stop.guard_drop == 0 or bool(config.eval_rewards),
        "stop.guard_drop watches the guards: name them in eval_rewards (e.g. eval_rewards.clip_diversity={...})",
    )
    need(
        stop.kl_limit == 0 or config.train.kl_coef > 0,
        "stop.kl_limit reads the KL to the base model that train.kl_coef weighs: set train.kl_coef > 0 (a log-prob "
        "algorithm), or stop.kl_limit=0",
    )
