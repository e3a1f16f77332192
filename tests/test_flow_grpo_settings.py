"""The Flow-GRPO presets' numbers mean what they mean in the reference.

Each test computes one step the way yifan123/flow_grpo does, written out here from its formulas
(``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``, ``scripts/train_sd3.py``, ``flow_grpo/stat_tracking.py``),
and checks that the preset's effective value in this package is the same:

* ``sd35_medium_grpo``: ``kl_coef`` times the step's KL (the reference's ``beta * kl_loss`` with
  ``kl_loss = mean |mean - mean_ref|^2 / (2 std_dev_t^2)``, ``std_dev_t`` the SDE's ``s`` without ``sqrt(-dt)``), and
  the advantages of a batch of groups (``global_std=True``: per-prompt mean, ``np.std`` of all rewards + 1e-4);
* ``flux_dev_grpo``: the PPO ratio of a CPS step (the reference's log-prob ``-mean |x' - mean|^2``) at the clip
  boundary, and the advantages of one group (``global_std=False``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ddpo.cli import main
from ddpo.models.flux import FLUX_SCHEDULER
from ddpo.models.sd3 import SD3_SCHEDULER, dynamic_shift_mu
from ddpo.policy.advantages import build_advantage, group_center
from ddpo.policy.flow import (
    flow_cps_step_with_logprob,
    flow_grpo_kl_scale,
    flow_grpo_log_ratio_scale,
    flow_sde_step_with_logprob,
)
from ddpo.policy.losses import ddpo_is_loss, kl_to_reference
from ddpo.training.config import build_config, train_step_offset, train_steps_per_trajectory, train_window_steps
from ddpo.training.runlog import read_jsonl

SHAPE = (3, 16, 8, 8)


def sd35_scheduler(steps: int) -> FlowMatchEulerDiscreteScheduler:
    scheduler = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER)
    scheduler.set_timesteps(steps)
    return scheduler


def flux_scheduler(steps: int, resolution: int) -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1's scheduler set as FluxPipeline sets it: sigmas linspace(1, 1/N), mu from the number of patches."""
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    mu = dynamic_shift_mu(FLUX_SCHEDULER, (resolution // 16) ** 2, max_shift_default=1.15)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps).tolist(), mu=mu)
    return scheduler


# -- the reference, by hand ------------------------------------------------------------------------------------------


def reference_sde_mean_and_std_dev_t(scheduler, index: int, x, v, noise_level: float):
    """``sde_step_with_logprob(sde_type="sde")``'s ``prev_sample_mean`` and ``std_dev_t`` (float64)."""
    sigmas = scheduler.sigmas.double()
    sigma, sigma_prev, sigma_max = sigmas[index], sigmas[index + 1], sigmas[1]
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma))) * noise_level
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, std_dev_t


def reference_cps_mean(scheduler, index: int, x, v, noise_level: float):
    """``sde_step_with_logprob(sde_type="cps")``'s ``prev_sample_mean`` and ``std_dev_t`` (float64)."""
    sigmas = scheduler.sigmas.double()
    sigma, sigma_prev = sigmas[index], sigmas[index + 1]
    std_dev_t = sigma_prev * math.sin(noise_level * math.pi / 2)
    x0, x1 = x - sigma * v, x + v * (1 - sigma)
    return x0 * (1 - sigma_prev) + x1 * torch.sqrt(sigma_prev**2 - std_dev_t**2), std_dev_t


def reference_cps_log_prob(prev_sample, mean):
    """The reference's CPS log-prob: ``-(prev_sample - mean)^2`` averaged over all but the batch dimension."""
    return -((prev_sample - mean) ** 2).mean(dim=(1, 2, 3))


def reference_advantages(prompts: list[str], rewards: np.ndarray, global_std: bool) -> np.ndarray:
    """``PerPromptStatTracker(global_std).update(prompts, rewards)`` on a fresh tracker (it is cleared every epoch)."""
    prompts_a = np.array(prompts)
    out = np.empty_like(rewards)
    for prompt in np.unique(prompts_a):
        group = rewards[prompts_a == prompt]
        std = np.std(rewards) + 1e-4 if global_std else np.std(group) + 1e-4
        out[prompts_a == prompt] = (group - np.mean(group)) / std
    return out


# -- sd35_medium_grpo ------------------------------------------------------------------------------------------------


def test_sd35_preset_trains_the_references_steps():
    """The reference trains ``range(int(num_steps * timestep_fraction))`` = ``range(int(10 * 0.99))``: the first 9
    steps of every trajectory, never the last (0.99 of 10 does not round to 10)."""
    config = build_config(preset="sd35_medium_grpo")
    assert train_step_offset(config) == 0
    assert train_window_steps(config) == train_steps_per_trajectory(config) == int(10 * 0.99) == 9


@pytest.mark.parametrize("index", [0, 4, 8])
def test_sd35_preset_kl_weight_times_the_steps_kl_is_the_references(index):
    config = build_config(preset="sd35_medium_grpo")
    s, t = config.sample, config.train
    scheduler = sd35_scheduler(s.num_steps)
    generator = torch.Generator().manual_seed(index)
    x, v, v_ref = (torch.randn(SHAPE, generator=generator) for _ in range(3))
    timestep = scheduler.timesteps[index].expand(SHAPE[0])
    # Ours, as the trainer computes it (Trainer.minibatch_loss): the true KL, times the kl_form factor, times kl_coef.
    ours = flow_sde_step_with_logprob(scheduler, v, timestep, x, eta=s.eta, generator=generator)
    base = flow_sde_step_with_logprob(scheduler, v_ref, timestep, x, eta=s.eta, prev_sample=ours.prev_sample)
    true_kl = kl_to_reference(ours.mean, base.mean, ours.std)
    assert t.kl_form == "flow_grpo"
    penalty = t.kl_coef * (true_kl * flow_grpo_kl_scale(scheduler, s.scheduler, timestep)).mean()
    # The reference: beta * mean(|mean - mean_ref|^2 / (2 std_dev_t^2)) with its beta, 0.04 (geneval_sd3).
    mean, std_dev_t = reference_sde_mean_and_std_dev_t(scheduler, index, x.double(), v.double(), 0.7)
    mean_ref, _ = reference_sde_mean_and_std_dev_t(scheduler, index, x.double(), v_ref.double(), 0.7)
    kl_loss = (((mean - mean_ref) ** 2).mean(dim=(1, 2, 3)) / (2 * std_dev_t**2)).mean()
    assert penalty.item() == pytest.approx(0.04 * kl_loss.item(), rel=1e-4)
    # The true KL is 1 / |dt| times the reference's: a different factor at every step.
    dt = (scheduler.sigmas[index] - scheduler.sigmas[index + 1]).item()
    assert (t.kl_coef * true_kl.mean()).item() == pytest.approx(0.04 * kl_loss.item() / dt, rel=1e-4)
    assert 1 / dt > 3  # 25x at the first step to 3.7x at the ninth on SD3.5's shifted schedule


def test_sd35_preset_advantages_are_the_references_global_std():
    config = build_config(preset="sd35_medium_grpo")
    group = config.sample.samples_per_prompt
    generator = np.random.default_rng(0)
    # Two prompts of different difficulty: the spread between them counts in the reference's divisor.
    rewards = np.concatenate([generator.normal(5.0, 0.3, group), generator.normal(6.0, 0.5, group)])
    prompts = ["a cat"] * group + ["a dog"] * group
    scheme = build_advantage(config.train.advantage, config.train.per_prompt_buffer_size, 1)
    ours = scheme(torch.tensor(rewards, dtype=torch.float32), prompts).double().numpy()
    expected = reference_advantages(prompts, rewards, global_std=True)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
    # group_center, which the preset used before, divides by the std of the centred values instead: not the same.
    centred = group_center(torch.tensor(rewards, dtype=torch.float32), prompts).double().numpy()
    assert np.abs(centred - expected).max() > 0.5


# -- flux_dev_grpo ---------------------------------------------------------------------------------------------------


def _ppo_pieces(scheduler, index: int, x, v_old, v_new, noise, eta: float, scheduler_name: str, ratio_form: str):
    """Our (log_prob, old_log_prob) of the new and the old velocity at the old step's action, as the trainer passes
    them to the loss with ``train.ratio_form``."""
    timestep = scheduler.timesteps[index].expand(x.shape[0])
    old = flow_cps_step_with_logprob(scheduler, v_old, timestep, x, eta=eta, noise=noise)
    new = flow_cps_step_with_logprob(scheduler, v_new, timestep, x, eta=eta, prev_sample=old.prev_sample)
    log_prob, old_log_prob = new.log_prob, old.log_prob
    if ratio_form == "flow_grpo":
        scale = flow_grpo_log_ratio_scale(scheduler_name, new.std)
        log_prob, old_log_prob = log_prob * scale, old_log_prob * scale
    return log_prob, old_log_prob, old.prev_sample


@pytest.mark.parametrize("index", [0, 1, 2])  # the preset's SDE window
def test_flux_preset_ratio_at_the_clip_boundary_is_the_references(index):
    config = build_config(preset="flux_dev_grpo")
    s, t = config.sample, config.train
    assert s.sde_window[0] <= index < s.sde_window[1] and t.ratio_form == "flow_grpo"
    scheduler = flux_scheduler(s.num_steps, s.resolution)
    generator = torch.Generator().manual_seed(10 + index)
    x, v_old, noise = (torch.randn(SHAPE, generator=generator) for _ in range(3))
    _, _, prev_sample = _ppo_pieces(scheduler, index, x, v_old, v_old, noise, s.eta, s.scheduler, "gaussian")
    mean_old, _ = reference_cps_mean(scheduler, index, x.double(), v_old.double(), s.eta)
    # The mean is affine in v: move v so that the mean moves towards the action (the ratio grows with delta in [0, 1]).
    slope = (
        reference_cps_mean(scheduler, index, x.double(), torch.ones(SHAPE).double(), s.eta)[0]
        - reference_cps_mean(scheduler, index, x.double(), torch.zeros(SHAPE).double(), s.eta)[0]
    )
    direction = ((prev_sample.double() - mean_old) / slope).float()

    def reference_ratio(delta: float) -> float:  # exp(log_prob - old log_prob), the reference's per-row ratio
        mean_new, _ = reference_cps_mean(scheduler, index, x.double(), v_old.double() + delta * direction, s.eta)
        log_ratio = reference_cps_log_prob(prev_sample.double(), mean_new) - reference_cps_log_prob(
            prev_sample.double(), mean_old
        )
        return float(log_ratio.exp()[0])

    def delta_for(target: float) -> float:  # the velocity change that puts row 0's reference ratio at `target`
        low, high = 0.0, 1.0
        assert reference_ratio(high) > target
        for _ in range(80):
            middle = (low + high) / 2
            low, high = (middle, high) if reference_ratio(middle) < target else (low, middle)
        return (low + high) / 2

    advantages = torch.ones(SHAPE[0])
    for multiple, clipped in ((0.5, False), (2.0, True)):
        delta = delta_for(1 + multiple * t.clip_range)
        v_new = v_old + delta * direction
        log_prob, old_log_prob, _ = _ppo_pieces(
            scheduler, index, x, v_old, v_new, noise, s.eta, s.scheduler, "flow_grpo"
        )
        ours = torch.exp(log_prob - old_log_prob)[0].item()
        assert ours - 1 == pytest.approx(multiple * t.clip_range, rel=0.05)  # float32 log-probs
        _, info = ddpo_is_loss(log_prob[:1], old_log_prob[:1], advantages[:1], t.clip_range)
        assert bool(info["clipfrac"] > 0) is clipped
    # The Gaussian ratio of the same update is the reference's log-ratio over 2 std^2, a factor that differs per step:
    # a single clip range on it would bound a different trust region at each step of the window.
    stds = scheduler.sigmas[s.sde_window[0] + 1 : s.sde_window[1] + 1] * math.sin(s.eta * math.pi / 2)
    factors = flow_grpo_log_ratio_scale("flow_cps", stds)
    assert factors.max() / factors.min() > 1.5


def test_flux_preset_advantages_of_one_group_are_the_references():
    config = build_config(preset="flux_dev_grpo")
    group = config.sample.samples_per_prompt
    rewards = np.random.default_rng(1).normal(21.0, 0.4, group)  # PickScore-like values
    prompts = ["a cat"] * group
    scheme = build_advantage(config.train.advantage, config.train.per_prompt_buffer_size, 1)
    ours = scheme(torch.tensor(rewards, dtype=torch.float32), prompts).double().numpy()
    expected = reference_advantages(prompts, rewards, global_std=False)
    # `group` adds 1e-6 to the std where the reference adds 1e-4: a relative difference of ~1e-4 / std.
    np.testing.assert_allclose(ours, expected, rtol=1e-4 / np.std(rewards) + 1e-5, atol=1e-5)


# -- the trainer uses them -------------------------------------------------------------------------------------------


def test_flow_grpo_forms_train_a_tiny_flux_run(fast_overrides, tmp_path):
    """Flow-GRPO's ratio and KL in a real (tiny) run: the first optimiser step's ratio is still exactly 1 and the KL
    is finite and non-negative."""
    extra = [
        "model.pretrained=tiny_flux",
        "sample.scheduler=flow_cps",
        "sample.eta=0.8",
        "sample.sde_window=[0,2]",
        "train.ratio_form=flow_grpo",
        "train.kl_form=flow_grpo",
        "train.kl_coef=0.04",
        "num_epochs=1",
    ]
    assert main(["train", "--preset", "tiny", *fast_overrides, *extra]) == 0
    (metrics,) = read_jsonl(tmp_path / "runs" / "run" / "metrics.jsonl")
    assert metrics["first_step_approx_kl"] == 0.0
    assert math.isfinite(metrics["loss"]) and metrics["kl"] >= 0
