"""The log-prob step against diffusers (the sampled x_{t-1}) and torch.distributions (the density)."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ddpo.policy.schedulers import (
    ddim_step_with_logprob,
    ddpm_step_with_logprob,
    gaussian_log_prob,
    trainable_steps,
)
from ddpo.tools.diagnostics import score_scales

SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)


def make_ddim(prediction_type: str, steps: int = 10) -> DDIMScheduler:
    scheduler = DDIMScheduler(**SD_SCHEDULE, set_alpha_to_one=False, prediction_type=prediction_type)
    scheduler.set_timesteps(steps)
    return scheduler


def reference_log_prob(x, mean, std):
    """torch.distributions reference: per-element Normal log-density averaged over C*H*W (float64)."""
    dist = torch.distributions.Normal(mean.double(), std.double().view(-1, 1, 1, 1))
    return dist.log_prob(x.double()).mean(dim=(1, 2, 3))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_step_matches_diffusers_and_normal(prediction_type, eta):
    torch.manual_seed(0)
    scheduler = make_ddim(prediction_type)
    sample = torch.randn(3, 4, 8, 8)
    model_output = torch.randn(3, 4, 8, 8)
    noise = torch.randn(3, 4, 8, 8)
    for t in scheduler.timesteps[[0, 4, -1]]:
        ours = ddim_step_with_logprob(scheduler, model_output, int(t), sample, eta=eta, noise=noise)
        theirs = scheduler.step(model_output, t, sample, eta=eta, variance_noise=noise).prev_sample
        torch.testing.assert_close(ours.prev_sample, theirs, rtol=1e-5, atol=1e-5)
        # The density of the sampled action under the policy Gaussian, against torch.distributions.
        expected = reference_log_prob(ours.prev_sample, ours.mean, ours.std)
        torch.testing.assert_close(ours.log_prob.double(), expected, rtol=1e-6, atol=1e-5)
        # The std is eta times the DDPM posterior std (hand formula from the DDIM paper).
        a_t = scheduler.alphas_cumprod[int(t)]
        prev = int(t) - 1000 // 10
        a_p = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
        sigma = eta * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)).sqrt()
        torch.testing.assert_close(ours.std, sigma.float().expand(3), rtol=1e-6, atol=0)
        assert ours.log_prob.dtype == torch.float32


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_and_ddpm_steps_with_clip_sample_match_diffusers(prediction_type):
    """With ``clip_sample=True`` diffusers clips the predicted x0 but keeps the model's epsilon (it re-derives epsilon
    from the clipped x0 only with ``use_clipped_model_output=True``, which its pipelines never pass). Random large
    outputs make the clip bite at every step."""
    torch.manual_seed(4)
    config = {**SD_SCHEDULE, "clip_sample": True, "clip_sample_range": 1.0}
    scheduler = DDIMScheduler(**config, set_alpha_to_one=False, prediction_type=prediction_type)
    scheduler.set_timesteps(10)
    sample, model_output, noise = torch.randn(3, 4, 8, 8) * 3, torch.randn(3, 4, 8, 8) * 3, torch.randn(3, 4, 8, 8)
    for t in scheduler.timesteps[[0, 4, -1]]:
        ours = ddim_step_with_logprob(scheduler, model_output, int(t), sample, eta=0.8, noise=noise)
        theirs = scheduler.step(model_output, t, sample, eta=0.8, variance_noise=noise)
        assert theirs.pred_original_sample.abs().max() <= 1.0
        torch.testing.assert_close(ours.prev_sample, theirs.prev_sample, rtol=1e-5, atol=1e-5)
    # DDPM clips x0 and uses the clipped x0 in its posterior mean: so does ours.
    ddpm = DDPMScheduler(**config, prediction_type=prediction_type)
    ddpm.set_timesteps(10)
    for t in ddpm.timesteps[[0, 4, -2]]:
        seed_a, seed_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        ours = ddpm_step_with_logprob(ddpm, model_output, int(t), sample, generator=seed_a)
        theirs = ddpm.step(model_output, t, sample, generator=seed_b)
        torch.testing.assert_close(ours.prev_sample, theirs.prev_sample, rtol=1e-5, atol=1e-5)


def test_ddim_scores_a_given_action_and_handles_per_sample_timesteps():
    torch.manual_seed(1)
    scheduler = make_ddim("epsilon")
    sample = torch.randn(4, 4, 8, 8)
    model_output = torch.randn(4, 4, 8, 8)
    timesteps = scheduler.timesteps[[0, 3, 5, 9]]
    batched = ddim_step_with_logprob(scheduler, model_output, timesteps, sample, eta=1.0, noise=torch.randn(4, 4, 8, 8))
    for i, t in enumerate(timesteps):
        single = ddim_step_with_logprob(
            scheduler, model_output[i : i + 1], int(t), sample[i : i + 1], prev_sample=batched.prev_sample[i : i + 1]
        )
        torch.testing.assert_close(single.log_prob, batched.log_prob[i : i + 1], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(single.mean, batched.mean[i : i + 1])


def test_log_prob_is_float32_under_half_inputs():
    scheduler = make_ddim("epsilon")
    sample = torch.randn(2, 4, 8, 8)
    out = ddim_step_with_logprob(scheduler, torch.randn(2, 4, 8, 8).bfloat16(), 901, sample)
    assert out.log_prob.dtype == torch.float32 and out.prev_sample.dtype == torch.float32


def test_gaussian_log_prob_hand_value():
    # One-dimensional Normal(0, 2) at x = 1: -1/8 - log 2 - log sqrt(2 pi).
    value = gaussian_log_prob(torch.ones(1, 1), torch.zeros(1, 1), torch.full((1,), 2.0))
    expected = -1 / 8 - torch.log(torch.tensor(2.0)) - 0.5 * torch.log(torch.tensor(2 * torch.pi))
    torch.testing.assert_close(value, expected.view(1))


def test_zero_variance_is_rejected():
    scheduler = make_ddim("epsilon")
    with pytest.raises(ValueError, match="eta > 0"):
        ddim_step_with_logprob(scheduler, torch.randn(1, 4, 8, 8), 901, torch.randn(1, 4, 8, 8), eta=0.0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_step_matches_diffusers(prediction_type):
    torch.manual_seed(2)
    scheduler = DDPMScheduler(**SD_SCHEDULE, prediction_type=prediction_type)
    scheduler.set_timesteps(10)
    sample = torch.randn(2, 4, 8, 8)
    model_output = torch.randn(2, 4, 8, 8)
    for t in scheduler.timesteps[[0, 5, -2]]:
        seed_a, seed_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        ours = ddpm_step_with_logprob(scheduler, model_output, int(t), sample, generator=seed_a)
        theirs = scheduler.step(model_output, t, sample, generator=seed_b).prev_sample
        torch.testing.assert_close(ours.prev_sample, theirs, rtol=1e-5, atol=1e-5)
        expected = reference_log_prob(ours.prev_sample, ours.mean, ours.std)
        torch.testing.assert_close(ours.log_prob.double(), expected, rtol=1e-6, atol=1e-5)
    # The last DDPM step is deterministic: the mean, scored 0, and not a trainable step.
    last = scheduler.timesteps[-1]
    ours = ddpm_step_with_logprob(scheduler, model_output, int(last), sample)
    theirs = scheduler.step(model_output, last, sample).prev_sample
    torch.testing.assert_close(ours.prev_sample, theirs, rtol=1e-5, atol=1e-5)
    assert torch.all(ours.log_prob == 0)
    assert trainable_steps("ddpm", 10) == 9 and trainable_steps("ddim", 10) == 10


def test_ddim_eta_one_equals_ddpm_posterior_away_from_the_last_step():
    ddim = make_ddim("epsilon")
    ddpm = DDPMScheduler(**SD_SCHEDULE)
    ddpm.set_timesteps(10)
    sample, model_output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    a = ddim_step_with_logprob(ddim, model_output, 501, sample, eta=1.0, noise=torch.zeros(2, 4, 8, 8))
    b = ddpm_step_with_logprob(ddpm, model_output, 501, sample, noise=torch.zeros(2, 4, 8, 8))
    torch.testing.assert_close(a.mean, b.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.std, b.std, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_score_scales_match_diffusers_ddim_step(eta):
    """|d mean / d eps| from two noise-free diffusers DDIM steps (model output 1 vs 0), over diffusers' std."""
    reference = make_ddim("epsilon")
    ours = score_scales(make_ddim("epsilon"), "ddim", 10, eta=eta)
    expected = []
    sample = torch.zeros(1, 1, 1, 1)
    for t in reference.timesteps.tolist():
        step = reference.config.num_train_timesteps // reference.num_inference_steps
        std = eta * reference._get_variance(t, t - step) ** 0.5
        moved = [
            reference.step(torch.full_like(sample, v), t, sample, eta=eta, variance_noise=torch.zeros_like(sample))
            for v in (0.0, 1.0)
        ]
        slope = (moved[1].prev_sample - moved[0].prev_sample).abs().item()
        expected.append(slope / std.item())
    torch.testing.assert_close(ours, torch.tensor(expected), rtol=1e-4, atol=1e-6)
    # The second-last step of this 10-step schedule (t = 101 -> 1) has a small std and a large scale.
    assert int(ours.argmax()) == 8 and ours[8] > 5 * ours[:8].max()


def test_score_scales_of_ddpm_give_zero_for_the_deterministic_last_step():
    scheduler = DDPMScheduler(**SD_SCHEDULE)
    scales = score_scales(scheduler, "ddpm", 10)
    assert scales.shape == (10,) and scales[-1] == 0 and (scales[:-1] > 0).all()


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddpm_previous_timestep_follows_the_schedule_for_every_spacing(spacing):
    """The DDPM step goes to the next entry of ``scheduler.timesteps`` as ``DDPMScheduler.step`` does; with trailing
    and linspace spacing that is not ``t - 1000 // steps`` (the stride the step used before, off by up to 14)."""
    from ddpo.policy.schedulers import previous_timestep

    scheduler = DDPMScheduler(**{**SD_SCHEDULE, "steps_offset": 0}, timestep_spacing=spacing)
    scheduler.set_timesteps(7)  # 1000 / 7 is not whole: the spacings differ
    torch.manual_seed(4)
    sample, model_output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for t in scheduler.timesteps:
        ours = ddpm_step_with_logprob(
            scheduler, model_output, int(t), sample, generator=torch.Generator().manual_seed(5)
        )
        theirs = scheduler.step(model_output, t, sample, generator=torch.Generator().manual_seed(5)).prev_sample
        torch.testing.assert_close(ours.prev_sample, theirs, rtol=1e-5, atol=1e-5)
        # The same step with one timestep per sample (training-time recomputation) scores the same action.
        per_sample = ddpm_step_with_logprob(scheduler, model_output, t.repeat(2), sample, prev_sample=ours.prev_sample)
        torch.testing.assert_close(per_sample.log_prob, ours.log_prob)
    expected = scheduler.timesteps[1:].tolist() + [-1]
    assert previous_timestep(scheduler, scheduler.timesteps).tolist() == expected
    with pytest.raises(ValueError, match="not all in the scheduler's schedule"):
        previous_timestep(scheduler, torch.tensor([3]))
