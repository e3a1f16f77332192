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

Adding an estimator is one module with one subclass of :class:`Estimator` plus one entry in
:data:`ddpo.training.estimators.registry.ESTIMATORS` (or a call of
:func:`~ddpo.training.estimators.registry.register_estimator`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
        reference: a frozen copy of the base denoiser (full fine-tuning with ``train.kl_coef > 0``), or None: with
            LoRA the base model is the denoiser with its adapters off.
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
    own_keys: ClassVar[dict[str, str]] = {}
    """The config keys this class adds, which only it (and its subclasses) read, each with what it is
    (``{"train.nft_beta": "DiffusionNFT's ..."}``); a subclass inherits its bases' keys. :meth:`validate` checks their
    values when this estimator is chosen; while another is chosen, a value other than the key's default is refused as
    doing nothing (:func:`~ddpo.training.estimators.registry.validate_estimators`)."""

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
    def frozen_reference(cls, denoiser: torch.nn.Module, config: RunConfig) -> torch.nn.Module | None:
        """A frozen copy of the base ``denoiser`` (before training), kept as :attr:`Policy.reference`, or None. The
        default keeps one for the KL to the base model of full fine-tuning (``train.kl_coef > 0``,
        ``model.use_lora=false``); with LoRA the denoiser with its adapters off is the base model, no copy needed."""
        if config.train.kl_coef > 0 and not config.model.use_lora:
            import copy

            return copy.deepcopy(denoiser).requires_grad_(False)
        return None

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
