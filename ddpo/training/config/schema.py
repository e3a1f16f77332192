"""The run configuration's schema: its dataclasses, one per section (:class:`RunConfig` holds the run-level keys and
the ``model``, ``sample``, ``train`` and ``reward`` sections), and their dotted keys (:func:`all_keys`).

Every hyper-parameter is named once, here, with its meaning.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any


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
    forward process of clean samples (see :mod:`ddpo.policy.forward`); ``draft`` (DRaFT-K, DRaFT-LV) or ``alignprop``
    (randomised truncation) back-propagate a differentiable reward through the last sampling steps
    (:mod:`ddpo.policy.reward_backprop`); ``dpo`` (Diffusion-DPO on the offline pairs of ``preference_data``) or
    ``online_dpo`` (Diffusion-DPO on the policy's own samples, the best and the worst of each prompt group as a pair;
    see :mod:`ddpo.policy.dpo`)."""
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
    prompt's samples, divided by the batch std of the raw rewards + 1e-4) or ``per_component`` (a ``weighted`` reward:
    each component normalised within each prompt's samples, then weighted and summed, then batch-normalised, as in the
    multi-reward setups of Flow-GRPO; each component's say is logged as ``advantage/<name>_abs_mean`` and
    ``advantage/<name>_corr``)."""
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
    velocities for a flow-matching model, noise predictions for an epsilon UNet (v for a v-prediction one); for
    ``draft`` / ``alignprop`` the same distance of the guided outputs, averaged over the back-propagated steps."""
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
    dpo_beta: float = 5000.0
    """Diffusion-DPO (``dpo``, ``online_dpo``): ``beta``, how strongly the policy is held to the base model; the loss
    is ``-log sigmoid(-beta / 2 * ((mse_w - mse_l) - (ref_mse_w - ref_mse_l)))`` with per-sample mean squared errors
    over the latent dimensions, the reference implementation's scale (its ``beta_dpo``; 5000 for Stable Diffusion 1.5
    and SDXL in the paper). > 0."""
    preference_data: str = ""
    """Diffusion-DPO offline (``dpo``): the preference pairs, in Pick-a-Pic's layout (columns ``caption``, ``jpg_0``,
    ``jpg_1``, ``label_0`` in {0, 0.5, 1}; ties are left out): a ``.parquet`` / ``.jsonl`` / ``.csv`` table or a
    folder with ``metadata.jsonl``, images as bytes or as file names beside the table
    (:mod:`ddpo.training.preference_data`). Read and checked in full before the model loads."""
    old_policy_flat: int = 0
    """DiffusionNFT (and AWM's ``awm_ema_kl``): optimiser steps during which the old policy is the current one (EMA
    decay 0)."""
    old_policy_uprate: float = 0.001
    """DiffusionNFT: the old policy's EMA decay grows by this per optimiser step after ``old_policy_flat``."""
    old_policy_uphold: float = 0.5
    """DiffusionNFT: the largest EMA decay of the old policy (updated once per epoch; in [0, 1))."""
    draft_k: int = 1
    """DRaFT (``algorithm=draft``): back-propagate the reward through the last this many sampling steps (1 to
    ``sample.num_steps``; ``num_steps`` is full DRaFT, 1 the paper's DRaFT-1)."""
    draft_lv: bool = False
    """DRaFT-LV (``algorithm=draft``, ``draft_k=1``): re-noise each clean sample ``draft_lv_samples`` times to the
    last step's noise level and average the reward gradient of the last step taken from each (lower variance)."""
    draft_lv_samples: int = 2
    """DRaFT-LV's number of re-noisings ``n`` of each clean sample (2 in the paper)."""
    alignprop_k_min: int = 1
    """AlignProp (``algorithm=alignprop``): the fewest last sampling steps the reward is back-propagated through; the
    number ``K`` is drawn uniformly from ``[alignprop_k_min, alignprop_k_max]`` for each batch."""
    alignprop_k_max: int | None = None
    """AlignProp: the most last sampling steps back-propagated through (at most ``sample.num_steps``; null: all of
    them, ``sample.num_steps``)."""
    reward_clip_max: float | None = None
    """Reward backpropagation (``draft``, ``alignprop``): each sample's reward is clamped to at most this before the
    mean, so samples above it give no gradient and stop being pushed further (against over-optimisation; null: no
    clamp)."""
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
class StopConfig:
    guard_drop: float = 0.0
    """Stop when a guard's held-out mean (``eval_rewards``) falls by more than this fraction of its first evaluation's
    value, the base model's (0.05: a 5% fall; relative, so guards of any scale share it; 0: off)."""
    kl_limit: float = 0.0
    """Stop when the policy's KL to the base model passes this (0: off). The KL is the one ``train.kl_coef`` weighs
    (the mean over the epochs since the previous evaluation), so it needs ``train.kl_coef > 0``."""
    patience: int = 0
    """Stop when ``best_metric`` has not risen above its best for this many evaluations in a row (0: off)."""
    min_delta: float = 0.0
    """How much ``best_metric`` must rise above its best to count as a rise."""


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
    """A shipped prompt set name (``ddpo prompts`` lists them), a text file with one prompt per line, or a CSV / JSONL
    / parquet table with a ``prompt`` column (its other columns go to the reward as per-sample ``metadata``)."""
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
    (:func:`ddpo.training.processes.overlap_scoring`; the run's start-up line says which)."""
    eval_prompts: str = ""
    """Prompt set of a held-out evaluation (empty: none): the same ``eval_samples`` prompts and initial noise are
    sampled and scored before the first epoch, after the last and every ``eval_every`` epochs, so the numbers are
    paired and their difference is the policy's change, not sampling noise."""
    eval_samples: int = 64
    """Images in each held-out evaluation (split over processes)."""
    eval_every: int = 0
    """Also evaluate after every this many epochs (0: only before the first epoch and after the last)."""
    eval_rewards: dict[str, Any] = field(default_factory=dict)
    """Guard rewards, ``{name: options}``: scored on the held-out images at every evaluation beside the training
    reward (logged as ``guard/<name>_mean``), to see what the training reward does not (a registered reward, e.g.
    ``clip_diversity`` for mode collapse, or an import path behind the same opt-in as ``reward.name``). Without
    ``eval_prompts`` there is no evaluation to score them on: the run says so at its start."""
    stop: StopConfig = field(default_factory=StopConfig)
    """Rules that stop a run early at an evaluation (all off by default)."""
    final_checkpoint: str = "last"
    """What ``final/`` holds: ``last`` (the weights after the last epoch) or ``best`` (those of the held-out
    evaluation with the highest ``best_metric``; the base model's, when no evaluation beat it)."""
    best_metric: str = "reward_mean"
    """The held-out evaluation's key that ``final_checkpoint=best`` and ``stop.patience`` maximise: ``reward_mean``
    (the training reward on the held-out prompts), ``guard/<name>_mean``, or a component ``reward/<name>_mean``."""
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)


class ConfigError(ValueError):
    """A configuration problem, with a message that says how to fix it."""


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def all_keys(cls=RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the config (``train.learning_rate``, ...)."""
    keys = []
    for name, annotation in _field_types(cls).items():
        if dataclasses.is_dataclass(annotation):
            keys += all_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _annotation(key: str) -> Any:
    """The type annotation of a dotted key (None for an unknown key)."""
    cls: Any = RunConfig
    for part in key.split("."):
        hints = _field_types(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            return None
        cls = hints[part]
    return cls
