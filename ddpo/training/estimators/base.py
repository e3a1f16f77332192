"""The estimator interface: what the trainer asks of a policy-gradient estimator, and what an estimator works on.

An estimator turns an epoch's samples and their per-trajectory weights into a loss on minibatches of
``(sample i, step j)`` pairs. The trainer samples, scores, computes advantages, draws the pairs, steps the optimiser,
evaluates and checkpoints; it never asks which estimator it runs. Each estimator owns:

* what it needs from sampling (:attr:`Estimator.uses_log_probs`): trajectories with per-step log-probs from a
  log-prob sampler, or clean samples from any sampler (and which weights sample them,
  :meth:`Estimator.sampling_weights`);
* its part of the config validation (:meth:`Estimator.validate`);
* the per-trajectory weights it takes (:meth:`Estimator.trajectory_weights`) and its minibatch loss
  (:meth:`Estimator.loss`);
* its per-epoch hooks (:meth:`Estimator.prepare_epoch`, :meth:`Estimator.begin_inner_epoch`,
  :meth:`Estimator.end_epoch`);
* its extra state (an old policy, an EMA), saved and loaded with checkpoints (:meth:`Estimator.state_dict`,
  :meth:`Estimator.load_state_dict`).

An estimator whose epoch is not "sample, score without gradient, train on (sample, step) pairs" (reward
backpropagation through the sampling chain, an offline preference loss on a dataset) owns its epoch instead
(:attr:`Estimator.owns_epoch`): the trainer hands it an :class:`EpochRun` (this process's prompt batches with their
noise seeds, the reward with and without gradient, the optimiser step, the sampler) and it returns an
:class:`EpochResult` (the images and rewards to log); logging, evaluation, guards and checkpoints stay the trainer's.

Adding an estimator is one module with one subclass of :class:`Estimator` plus one entry in
:data:`ddpo.training.estimators.registry.ESTIMATORS` (or a call of
:func:`~ddpo.training.estimators.registry.register_estimator`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..sharding import reshard

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ...models.family import ModelFamily
    from ...policy.sampling import SamplerSettings

RunConfig = Any
"""A run's :class:`~ddpo.training.config.RunConfig` (not imported: the config imports the estimators to validate)."""

Samples = Any
"""An epoch's samples: :class:`~ddpo.policy.sampling.Trajectories` (log-prob estimators) or
:class:`~ddpo.policy.sampling.CleanSamples` (forward-process estimators)."""

Need = Callable[[bool, str], None]
"""``need(condition, message)``: raises :class:`~ddpo.training.config.ConfigError` with ``message`` when
``condition`` is false."""


@dataclass
class Policy:
    """The trained policy as estimators see it: the denoiser being trained, its trainable parameters and the frozen
    base model (the KL reference).

    Attributes:
        config: the run's config.
        family: the model family (calling convention, latent shape, flow matching or not).
        scheduler: the run's diffusers scheduler (after ``set_timesteps`` when sampling).
        settings: the run's sampler settings (CFG scale, eta, autocast), also those of training-time recomputation.
        accelerator: the run's ``accelerate`` accelerator (autocast, unwrapping a DDP model).
        model: the trained denoiser (UNet or transformer) as prepared by ``accelerate``: call it for gradients.
        params: its trainable parameters, in :attr:`trainable_names` order.
        trainable_names: their names (checkpoint keys).
        reference: a frozen copy of the base denoiser (full fine-tuning with ``train.kl_coef > 0``, or an estimator
            whose loss always compares with the base model), or None: with LoRA the base model is the denoiser with its
            adapters off.
        inputs: what the estimator read before the model loaded (:meth:`Estimator.read_inputs`, e.g. a preference
            dataset), or None.
    """

    config: RunConfig
    family: ModelFamily
    scheduler: Any
    settings: SamplerSettings
    accelerator: Accelerator
    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    trainable_names: list[str]
    reference: torch.nn.Module | None = None
    inputs: Any = None

    def unwrapped(self) -> torch.nn.Module:
        """The trained denoiser without its DDP wrapper (no gradient synchronisation)."""
        return self.accelerator.unwrap_model(self.model)

    def weights_changed(self) -> None:
        """Say that :attr:`params` were changed in place outside an optimiser step (an old policy swapped in or out):
        a sharded (FSDP2) model then drops the full weights it may still hold gathered from its last call, so that its
        next call gathers the new ones (:func:`~ddpo.training.sharding.reshard`). Nothing to do otherwise."""
        reshard(self.unwrapped())

    @contextlib.contextmanager
    def base_model(self) -> Iterator[torch.nn.Module]:
        """The frozen base model, the KL reference: with LoRA the denoiser with its adapters off (restored on exit),
        for full fine-tuning the frozen copy."""
        if self.reference is not None:
            yield self.reference
            return
        model = self.unwrapped()
        model.disable_adapters()
        try:
            yield model
        finally:
            model.enable_adapters()


LossFunction = Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""``loss_fn() -> (loss, info)``: one minibatch's differentiable scalar loss and its detached scalar diagnostics."""


@dataclass(frozen=True)
class PromptBatch:
    """One of this process's sampling batches of an epoch, exactly as the trainer's own epoch would sample it
    (:func:`ddpo.training.epoch_sampling.epoch_batches`).

    Attributes:
        index: the batch's index ``b`` in the epoch (``0 <= b < sample.num_batches_per_epoch``).
        prompts: its ``sample.batch_size`` prompts (:func:`ddpo.training.prompts.draw_prompts`).
        noise_seed: the seed of its sampling noise, ``derive_seed(seed, Stream.SAMPLING_NOISE, epoch, b, process)``.
        where: the batch named for error messages (``"epoch 3, batch 1: samples 2-3 of process 0"``).
    """

    index: int
    prompts: list[str]
    noise_seed: int
    where: str


@dataclass
class EpochRun:
    """What the trainer gives an estimator that owns its epoch (:meth:`Estimator.train_epoch`). An estimator takes
    what it needs: one that trains on a dataset may ignore :attr:`batches` and the rewards.

    Attributes:
        epoch: the epoch (0-based).
        batches: this process's prompt batches of the epoch with their noise seeds (the trainer's own draws).
        encode: ``encode(prompts) -> Conditioning [B, ...]`` float32 of the run's model family on the device.
        negative_cond: the negative prompt's conditioning ``[1, ...]`` for classifier-free guidance (None without).
        vae: the pipeline's VAE (frozen; its dtype is the run's precision with LoRA).
        score: the checked reward without gradient, as the trainer scores samples: ``score(images [B, 3, H, W],
            prompts, where) ->`` a :class:`ddpo.training.scoring.Scored` ``(values [B] on the device, reward info,
            seconds, components)``, which :func:`ddpo.training.scoring.combine_scores` puts together.
        reward: the reward with gradient (the prompts' metadata passed as for :attr:`score`): ``reward(images
            [B, 3, H, W] in [0, 1], prompts) -> values [B]`` float32, differentiable w.r.t. the images when the reward
            declares ``differentiable`` (:func:`rewards.is_differentiable`); its output is checked as :attr:`score`'s.
        step: one training minibatch, ``step(loss_fn)``: calls ``loss_fn`` inside the accumulation context, back-
            propagates, and at every ``train.gradient_accumulation_steps``-th call clips, sets the learning rate,
            refuses a non-finite gradient norm and steps the optimiser, exactly as the trainer's own minibatches
            (:class:`ddpo.training.optimise.MinibatchSteps`). Returns ``loss_fn``'s diagnostics; their epoch means
            (and ``grad_norm``) are logged.
        sample_and_score: the trainer's own epoch sampling, no gradient: ``() -> (samples, rewards [B], reward
            info, timings)`` of :attr:`batches` with the current weights (e.g. to log the policy's reward when the
            epoch itself samples nothing).
    """

    epoch: int
    batches: list[PromptBatch]
    encode: Callable[[list[str]], Any]
    negative_cond: Any
    vae: torch.nn.Module
    score: Callable[[torch.Tensor, list[str], str], Any]
    reward: Callable[[torch.Tensor, list[str]], torch.Tensor]
    step: Callable[[LossFunction], dict[str, torch.Tensor]]
    sample_and_score: Callable[[], tuple[Any, torch.Tensor, dict[str, float], dict[str, float]]]


@dataclass
class EpochResult:
    """What an estimator that owns its epoch returns (:meth:`Estimator.train_epoch`), for the trainer to log as any
    epoch: ``reward_mean`` / ``reward_std`` over every process's :attr:`rewards`, the sample grid of :attr:`images`.

    Attributes:
        prompts: the ``B`` prompts of :attr:`images`.
        images: ``[B, 3, H, W]`` float32 in ``[0, 1]``, detached: the epoch's images on this process (the grid; an
            online reward learns from them, :meth:`rewards.Reward.update`).
        rewards: ``[B]`` float32 on the device, detached: their rewards (the checked reward, :attr:`EpochRun.score`).
        reward_info: the reward's info, logged as is (averaged over batches).
        timings: ``{"..._seconds": float}``, logged as is.
        extra: further diagnostics, each a 0-d tensor reduced with ``max`` over processes (e.g. a largest value).
    """

    prompts: list[str]
    images: torch.Tensor
    rewards: torch.Tensor
    reward_info: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def differentiable_reward_names() -> list[str]:
    """The registered rewards that are differentiable, as ``ddpo rewards`` lists them (a conditional one with its
    condition)."""
    from rewards import listing

    return [name if said == "yes" else f"{name} ({said})" for name, said in listing() if said != "no"]


def not_differentiable_message(reward: str, algorithm: str) -> str:
    """The refusal of a reward that declares no gradient, naming the differentiable ones."""
    return (
        f"train.algorithm={algorithm} back-propagates the reward's gradient, and reward {reward!r} is not "
        f"differentiable; use a differentiable reward: {', '.join(differentiable_reward_names())} (`ddpo rewards` "
        "lists them), or a log-prob / forward-process algorithm (e.g. train.algorithm=ddpo_is) for this reward"
    )


class Estimator:
    """Base class of every estimator: subclasses set :attr:`uses_log_probs` and implement :meth:`loss`; the other
    hooks default to "nothing to do".

    The registry builds one instance per run, after the model is loaded and prepared:
    ``estimator_for(config)(policy)`` (:mod:`.registry`).
    """

    name: ClassVar[str] = ""
    """The ``train.algorithm`` this class was registered under (set by the registry)."""
    uses_log_probs: ClassVar[bool] = False
    """What it needs from sampling: True for trajectories with per-step log-probs (a sampler of
    :data:`~ddpo.policy.schedulers.STEP_FUNCTIONS`), False for clean samples from any sampler."""
    uses_ppo_ratio: ClassVar[bool] = False
    """Whether the loss clips a PPO ratio (then ``train.ratio_form`` may change it; :meth:`validate` refuses
    ``train.ratio_form=flow_grpo`` for every other estimator)."""
    owns_epoch: ClassVar[bool] = False
    """Whether this estimator runs its epoch itself (:meth:`train_epoch`) instead of the trainer's sample -> score ->
    advantages -> (sample, step) minibatches of :meth:`loss`; then :meth:`loss`, :meth:`trajectory_weights`,
    :meth:`epoch_weights`, :meth:`prepare_epoch` and :meth:`begin_inner_epoch` are not called, :meth:`end_epoch` and
    the checkpoint hooks are."""
    needs_differentiable_reward: ClassVar[bool] = False
    """Whether the loss back-propagates through the reward (then a reward that is not
    :func:`rewards.is_differentiable` is refused before the model loads: by name in :meth:`validate`, an import path
    or a composite once loaded, :func:`ddpo.training.run_inputs.load_run_inputs`)."""
    own_keys: ClassVar[dict[str, str]] = {}
    """The config keys this class adds, which only it (and its subclasses) read, each with what it is
    (``{"train.nft_beta": "DiffusionNFT's ..."}``); a subclass inherits its bases' keys. :meth:`validate` checks their
    values when this estimator is chosen; while another is chosen, a value other than the key's default is refused as
    doing nothing (:func:`~ddpo.training.estimators.registry.validate_estimators`)."""

    unused_keys: ClassVar[dict[str, str]] = {}
    """Shared config keys this estimator does not read, each with why (``{"train.advantage": "there are no
    advantages"}``). A value other than the key's default gets a start-up note, not an error: a preset written for
    another estimator sets them (:func:`~ddpo.training.estimators.registry.unused_key_notes`)."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.config = policy.config

    # ------------------------------------------------------------------ config

    @classmethod
    def validate(cls, config: RunConfig, chosen: type[Estimator], need: Need) -> None:
        """Refuse bad settings of this estimator (``need(condition, message)``): its combination rules (its sampler,
        inner epochs, ...) and the value ranges of its :attr:`own_keys`. Called for the chosen class only (``chosen``,
        the run's estimator class, is ``cls``): an estimator's own keys are validated only when it is chosen."""
        need(
            chosen is not cls or config.train.ratio_form == "gaussian" or cls.uses_ppo_ratio,
            f"train.ratio_form=flow_grpo changes the PPO ratio, which only train.algorithm=ddpo_is uses; got "
            f"{cls.name} (use train.ratio_form=gaussian)",
        )

    @classmethod
    def recomputes_old_log_probs(cls, config: RunConfig) -> bool:
        """Whether the epoch's old log-probs are re-scored in the training shapes (log-prob estimators only)."""
        return False

    @classmethod
    def read_inputs(cls, config: RunConfig, num_processes: int, main_process: bool) -> Any:
        """What this estimator reads from files before the model loads (so that a bad file fails first), kept as
        :attr:`Policy.inputs`; ``num_processes``: the run's processes; ``main_process``: whether to print a note.
        Default: nothing (None)."""
        return None

    def samples_per_epoch(self, sampled: int) -> int:
        """What an epoch's ``samples`` metric counts, over every process: by default the ``sampled`` samples
        (``sample.batch_size * sample.num_batches_per_epoch * processes``); an estimator that trains on a dataset
        counts what it trains on."""
        return sampled

    @classmethod
    def frozen_reference(cls, denoiser: torch.nn.Module, config: RunConfig) -> torch.nn.Module | None:
        """A frozen copy of the base ``denoiser`` (before training), kept as :attr:`Policy.reference`, or None. The
        default keeps one for the KL to the base model of full fine-tuning (``train.kl_coef > 0``,
        ``model.use_lora=false``); with LoRA the denoiser with its adapters off is the base model, no copy needed."""
        if config.train.kl_coef > 0 and not config.model.use_lora:
            import copy

            return copy.deepcopy(denoiser).requires_grad_(False)
        return None

    @classmethod
    def describe_minibatches(cls, config: RunConfig) -> str:
        """What one minibatch of an estimator that owns its epoch is, for the run's start-up lines."""
        return "its own minibatches"

    # ------------------------------------------------------------------ sampling

    def sampling_weights(self) -> contextlib.AbstractContextManager:
        """A context within which the trained parameters hold the weights that collect the training samples (the
        current ones unless an estimator says otherwise)."""
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ one epoch

    def trajectory_weights(self, advantages: torch.Tensor) -> torch.Tensor:
        """The per-trajectory weight the loss takes, from the clipped advantages ``[N] -> [N]`` (default: the
        advantages themselves)."""
        return advantages

    def epoch_weights(self, rewards: torch.Tensor, prompts: list[str], advantages: torch.Tensor) -> torch.Tensor:
        """The per-sample weights ``[N]`` the loss takes, of every process's samples in process order, from their
        rewards ``[N]``, prompts and clipped advantages ``[N]``: :meth:`trajectory_weights` of the advantages unless
        an estimator weighs by the rewards themselves (online DPO pairs samples by reward)."""
        return self.trajectory_weights(advantages)

    def prepare_epoch(
        self, samples: Samples, inner_pairs: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[Samples, dict[str, torch.Tensor]]:
        """Before the epoch's first optimiser step: the samples to train on and diagnostics (reduced with ``max`` over
        processes). ``inner_pairs(k)``: inner epoch ``k``'s ``(pair_traj, pair_step)``, ``[P]`` each, in training
        order."""
        return samples, {}

    def begin_inner_epoch(self, epoch: int, inner: int) -> None:
        """Called before each inner epoch's first minibatch."""

    def loss(
        self, samples: Samples, weights: torch.Tensor, i: torch.Tensor, j: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of ``N`` pairs (sample ``i``, step ``j``, ``[N]`` each) with per-trajectory ``weights``
        ``[num_samples]``: a differentiable scalar and detached scalar diagnostics (averaged over the epoch; an
        ``approx_kl`` of the epoch's first optimiser step is also logged as ``first_step_approx_kl``)."""
        raise NotImplementedError

    def train_epoch(self, run: EpochRun) -> EpochResult:
        """The whole epoch of an estimator that owns it (:attr:`owns_epoch`): train through ``run.step`` and return
        what to log. Random draws come from ``run.batches``' noise seeds or the estimator's own streams
        (:mod:`ddpo.training.streams`), so that a resumed run repeats an uninterrupted one."""
        raise NotImplementedError(f"train.algorithm={self.name} sets owns_epoch but has no train_epoch")

    def end_epoch(self, global_step: int) -> dict[str, float]:
        """After the epoch's last optimiser step (``global_step`` steps done so far): further metrics of the epoch."""
        return {}

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """Extra training state as named tensors (a checkpoint's ``extra.safetensors``), or None."""
        return None

    def load_state_dict(self, state: dict[str, torch.Tensor] | None, source: str) -> None:
        """Restore :meth:`state_dict` from a checkpoint (``state``: its extra tensors, None when it has none;
        ``source``: the checkpoint, for error messages)."""
