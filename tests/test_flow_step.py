"""The flow-matching log-prob steps (Flow-GRPO's SDE and CPS steps) against independent references: diffusers'
``FlowMatchEulerDiscreteScheduler`` (the ODE step, the forward noising), float64 derivations from the papers' equations
(the reverse SDE's drift from the score, the marginals it must keep) and ``torch.distributions`` (densities, KL)."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from ddpo.policy.flow import flow_cps_step_with_logprob, flow_sde_step_with_logprob
from ddpo.policy.forward import flow_add_noise, flow_predictions, flow_sigmas
from ddpo.policy.losses import kl_to_reference
from ddpo.policy.schedulers import STEP_FUNCTIONS, trainable_steps

STEPS = 10
SHAPE = (3, 4, 8, 8)
DIMS = (1, 2, 3)


def make_scheduler(shift: float, steps: int = STEPS) -> FlowMatchEulerDiscreteScheduler:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler


def random_state(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=generator) for _ in range(3))


def reference_sde(sigmas: list[float], index: int, x: torch.Tensor, v: torch.Tensor, a: float):
    """One Euler-Maruyama step of Flow-GRPO's reverse-time SDE (Liu et al. 2025), derived in float64 from the paper's
    form rather than the implementation's grouping: (mean, std) for one step index (the same for every row).

    Flow matching ``x_t = (1 - t) x0 + t eps``, ``v = eps - x0`` gives ``eps_hat = x + (1 - t) v`` and the score
    ``grad log p_t(x) = -eps_hat / t``. The SDE with the ODE's marginals has drift ``v - (s^2 / 2) grad log p_t``,
    diffusion ``s = a sqrt(t / (1 - t))``; one step of size ``dt = t' - t < 0`` has mean ``x + drift dt`` and std
    ``s sqrt(|dt|)``. At ``t = 1`` ``s`` divides by zero: Flow-GRPO uses ``sigmas[1]`` in that denominator."""
    t, t_next = sigmas[index], sigmas[index + 1]
    dt = t_next - t
    s = a * math.sqrt(t / (1 - (sigmas[1] if t == 1 else t)))
    x, v = x.double(), v.double()
    eps_hat = x + (1 - t) * v
    score = -eps_hat / t
    drift = v - s**2 / 2 * score
    return x + drift * dt, s * math.sqrt(abs(dt))


def reference_cps(sigmas: list[float], index: int, x: torch.Tensor, v: torch.Tensor, a: float):
    """Flow-GRPO's "cps" step by hand in float64: (mean, std)."""
    sigma, sigma_next = sigmas[index], sigmas[index + 1]
    std = sigma_next * math.sin(a * math.pi / 2)
    x0_hat = x.double() - sigma * v.double()
    eps_hat = x.double() + (1 - sigma) * v.double()
    return x0_hat * (1 - sigma_next) + eps_hat * math.sqrt(max(sigma_next**2 - std**2, 0.0)), std


def normal_log_prob(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    return torch.distributions.Normal(mean.double(), std).log_prob(x.double()).mean(dim=DIMS)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_eta_zero_is_diffusers_euler_step_at_every_step(shift, as_tensor):
    ours_scheduler, theirs = make_scheduler(shift), make_scheduler(shift)
    x, v, _ = random_state()
    for i, t in enumerate(theirs.timesteps):
        timestep = t.expand(SHAPE[0]).clone() if as_tensor else float(t)
        out = flow_sde_step_with_logprob(ours_scheduler, v, timestep, x, eta=0.0)
        expected = theirs.step(v, t, x).prev_sample
        assert torch.equal(out.prev_sample, expected), f"step {i}"
        assert torch.equal(out.mean, expected) and torch.equal(out.std, torch.zeros(SHAPE[0]))
        assert torch.equal(out.log_prob, torch.zeros(SHAPE[0]))
        x, v = expected, torch.randn_like(v)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_eta_zero_per_row_timesteps_match_per_row_diffusers_steps(shift):
    scheduler = make_scheduler(shift)
    rows = [0, 7, STEPS - 1, 3]
    x, v, _ = random_state(1, (len(rows), 4, 8, 8))
    timesteps = scheduler.timesteps[rows]
    out = flow_sde_step_with_logprob(scheduler, v, timesteps, x, eta=0.0)
    for row, index in enumerate(rows):
        fresh = make_scheduler(shift)  # its step looks the timestep up itself
        expected = fresh.step(v[row : row + 1], fresh.timesteps[index], x[row : row + 1]).prev_sample
        assert torch.equal(out.prev_sample[row : row + 1], expected), f"row {row} (step {index})"


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("eta", [0.3, 0.7, 1.0])
def test_sde_step_matches_hand_formula_and_normal(shift, eta):
    scheduler = make_scheduler(shift)
    sigmas = scheduler.sigmas.tolist()
    assert sigmas[0] == 1.0  # the first step exercises Flow-GRPO's sigma = 1 guard
    x, v, noise = random_state(2)
    for index in range(STEPS):
        t = float(scheduler.timesteps[index])
        mean, std = reference_sde(sigmas, index, x, v, eta)
        out = flow_sde_step_with_logprob(scheduler, v, t, x, eta=eta, noise=noise)
        assert out.prev_sample.dtype == out.log_prob.dtype == torch.float32
        torch.testing.assert_close(out.mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.std.double(), torch.full((SHAPE[0],), std, dtype=torch.float64))
        assert std > 0, f"step {index}: every flow SDE step is stochastic, the last one included"
        assert torch.equal(out.prev_sample, out.mean + out.std.view(-1, 1, 1, 1) * noise)
        torch.testing.assert_close(out.prev_sample.double(), mean + std * noise.double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            out.log_prob.double(), normal_log_prob(out.prev_sample, mean, std), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sde_step_keeps_the_marginals_of_gaussian_data(shift):
    """The defining property of the SDE: it has the probability-flow ODE's marginals. For data ``x0 ~ N(0, c^2)`` the
    marginal at ``t`` is ``N(0, m_t^2)``, ``m_t^2 = (1 - t)^2 c^2 + t^2``, and the exact velocity is linear,
    ``v(x) = x (t - (1 - t) c^2) / m_t^2``. One step from that marginal (a linear map ``x -> k x`` plus noise of std
    ``std``) has variance ``k^2 m_t^2 + std^2``, which must be ``m_{t'}^2`` up to the step's discretisation error
    (under 0.5% with 100 steps; the score term with the wrong sign is off by 8-20%). Any ``s`` keeps them, so ``s``
    itself is pinned by :func:`reference_sde`."""
    scheduler = make_scheduler(shift, steps=100)
    sigmas = scheduler.sigmas.tolist()
    c2 = 0.25
    checked = 0
    for index, t in enumerate(sigmas[:-1]):
        if not 0.05 < t < 0.95:  # away from the ends, where 1 / t and 1 / (1 - t) make the step error large
            continue
        m2, m2_next = (1 - t) ** 2 * c2 + t**2, (1 - sigmas[index + 1]) ** 2 * c2 + sigmas[index + 1] ** 2
        x = torch.ones(1, 1, 1, 1)
        v = x * (t - (1 - t) * c2) / m2
        out = flow_sde_step_with_logprob(
            scheduler, v, float(scheduler.timesteps[index]), x, eta=0.7, noise=torch.zeros_like(x)
        )
        k, std = out.mean.item(), out.std.item()
        assert abs((k**2 * m2 + std**2) / m2_next - 1) < 0.01, f"step {index} (t = {t:.3f})"
        checked += 1
    assert checked > 50


@pytest.mark.parametrize("step", [flow_sde_step_with_logprob, flow_cps_step_with_logprob])
def test_samples_have_the_step_mean_and_std(step):
    scheduler = make_scheduler(3.0)
    index, draws = 4, 20000
    x, v, _ = random_state(3, (1, 2, 2, 2))
    sigmas = scheduler.sigmas.tolist()
    reference = reference_sde if step is flow_sde_step_with_logprob else reference_cps
    mean, std = reference(sigmas, index, x, v, 0.7)
    generator = torch.Generator().manual_seed(0)
    t = float(scheduler.timesteps[index])
    out = step(scheduler, v.expand(draws, -1, -1, -1), t, x.expand(draws, -1, -1, -1), eta=0.7, generator=generator)
    samples = out.prev_sample.double()
    tolerance = 5 * std / math.sqrt(draws)
    assert (samples.mean(dim=0) - mean[0]).abs().max() < tolerance
    assert (samples.std(dim=0) / std - 1).abs().max() < 5 / math.sqrt(2 * draws)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("eta", [0.5, 0.8])
def test_cps_step_matches_hand_formula_and_normal(shift, eta):
    scheduler = make_scheduler(shift)
    sigmas = scheduler.sigmas.tolist()
    x, v, noise = random_state(4)
    for index in range(STEPS - 1):
        mean, std = reference_cps(sigmas, index, x, v, eta)
        out = flow_cps_step_with_logprob(scheduler, v, float(scheduler.timesteps[index]), x, eta=eta, noise=noise)
        torch.testing.assert_close(out.mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.std.double(), torch.full((SHAPE[0],), std, dtype=torch.float64))
        assert torch.equal(out.prev_sample, out.mean + out.std.view(-1, 1, 1, 1) * noise)
        # the true Gaussian log-density, not the reference code's -|x' - mean|^2
        torch.testing.assert_close(
            out.log_prob.double(), normal_log_prob(out.prev_sample, mean, std), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_cps_last_step_is_deterministic_and_lands_on_x0_hat(shift):
    scheduler = make_scheduler(shift)
    x, v, noise = random_state(5)
    sigma = scheduler.sigmas[STEPS - 1]
    out = flow_cps_step_with_logprob(scheduler, v, float(scheduler.timesteps[-1]), x, eta=0.7, noise=noise)
    assert torch.equal(out.std, torch.zeros(SHAPE[0])) and torch.equal(out.log_prob, torch.zeros(SHAPE[0]))
    torch.testing.assert_close(out.prev_sample, x - sigma * v)
    scored = flow_cps_step_with_logprob(scheduler, v, float(scheduler.timesteps[-1]), x, prev_sample=noise, eta=0.7)
    assert torch.equal(scored.log_prob, torch.zeros(SHAPE[0]))  # deterministic rows are never scored


@pytest.mark.parametrize("eta", [0.1, 0.5, 0.9, 1.0])
def test_cps_noise_never_exceeds_the_target_noise_level(eta):
    scheduler = make_scheduler(3.0)
    x, v, _ = random_state(6)
    for index, t in enumerate(scheduler.timesteps):
        out = flow_cps_step_with_logprob(scheduler, v, float(t), x, eta=eta)
        sigma_next = scheduler.sigmas[index + 1]
        assert bool((sigma_next**2 - out.std**2 >= 0).all()), f"step {index}"


def test_cps_eta_zero_is_the_euler_step_up_to_rounding():
    scheduler, theirs = make_scheduler(3.0), make_scheduler(3.0)
    x, v, _ = random_state(7)
    for t in theirs.timesteps:
        out = flow_cps_step_with_logprob(scheduler, v, float(t), x, eta=0.0)
        torch.testing.assert_close(out.prev_sample, theirs.step(v, t, x).prev_sample, rtol=1e-5, atol=1e-5)
        assert torch.equal(out.log_prob, torch.zeros(SHAPE[0]))


@pytest.mark.parametrize("step", [flow_sde_step_with_logprob, flow_cps_step_with_logprob])
def test_rescoring_the_sampled_step_is_bitwise_equal(step):
    scheduler = make_scheduler(3.0)
    x, v, _ = random_state(8)
    rows = [0, 2, 5]
    timesteps = scheduler.timesteps[rows]
    sampled = step(scheduler, v, timesteps, x, eta=0.7, generator=torch.Generator().manual_seed(1))
    rescored = step(scheduler, v, timesteps, x, eta=0.7, prev_sample=sampled.prev_sample, check=False)
    assert torch.equal(rescored.log_prob, sampled.log_prob)
    assert torch.equal(torch.exp(rescored.log_prob - sampled.log_prob), torch.ones(3))
    # one timestep as a Python float (the sampling loop) or as a [B] tensor (training) gives the same bits
    t = scheduler.timesteps[2]
    by_float = step(scheduler, v, float(t), x, eta=0.7, prev_sample=sampled.prev_sample)
    by_tensor = step(scheduler, v, t.expand(3).clone(), x, eta=0.7, prev_sample=sampled.prev_sample)
    assert torch.equal(by_float.log_prob, by_tensor.log_prob) and torch.equal(by_float.mean, by_tensor.mean)


@pytest.mark.parametrize("step", [flow_sde_step_with_logprob, flow_cps_step_with_logprob])
def test_half_precision_model_output_is_computed_in_float32(step):
    scheduler = make_scheduler(3.0)
    x, v, noise = random_state(9)
    t = float(scheduler.timesteps[3])
    half = step(scheduler, v.bfloat16(), t, x.bfloat16(), eta=0.7, noise=noise)
    full = step(scheduler, v.bfloat16().float(), t, x.bfloat16().float(), eta=0.7, noise=noise)
    assert half.mean.dtype == half.log_prob.dtype == torch.float32
    assert torch.equal(half.mean, full.mean) and torch.equal(half.log_prob, full.log_prob)


@pytest.mark.parametrize("step", [flow_sde_step_with_logprob, flow_cps_step_with_logprob])
def test_timestep_not_in_schedule_raises(step):
    scheduler = make_scheduler(3.0)
    x, v, _ = random_state(10)
    with pytest.raises(ValueError, match="not in the scheduler's schedule"):
        step(scheduler, v, float(scheduler.timesteps[1]) + 0.5, x)
    bad = scheduler.timesteps[[0, 1, 2]].clone()
    bad[1] += 0.5
    with pytest.raises(ValueError, match="not all in the scheduler's schedule"):
        step(scheduler, v, bad, x)
    with pytest.raises(ValueError, match="set_timesteps"):
        step(FlowMatchEulerDiscreteScheduler(), v, 1000.0, x)


def test_zero_variance_before_the_last_step_raises():
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(sigmas=[1.0, 0.5, 0.5, 0.2])  # a repeated sigma: dt = 0 at step 1
    x, v, _ = random_state(11)
    with pytest.raises(ValueError, match="zero variance"):
        flow_sde_step_with_logprob(scheduler, v, float(scheduler.timesteps[1]), x, eta=0.7)


def test_eta_out_of_range_raises():
    scheduler = make_scheduler(3.0)
    x, v, _ = random_state(12)
    t = float(scheduler.timesteps[0])
    with pytest.raises(ValueError, match="eta >= 0"):
        flow_sde_step_with_logprob(scheduler, v, t, x, eta=-0.1)
    with pytest.raises(ValueError, match="0 <= eta <= 1"):
        flow_cps_step_with_logprob(scheduler, v, t, x, eta=1.5)


def test_kl_to_reference_is_the_gaussian_kl_of_flow_steps():
    scheduler = make_scheduler(3.0)
    x, v, _ = random_state(13)
    v_ref = v + 0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(14))
    timesteps = scheduler.timesteps[[0, 4, 8]]  # not CPS's last step: it has no policy, so no KL
    for step in (flow_sde_step_with_logprob, flow_cps_step_with_logprob):
        policy = step(scheduler, v, timesteps, x, eta=0.7)
        reference = step(scheduler, v_ref, timesteps, x, eta=0.7)
        assert torch.equal(policy.std, reference.std)  # the std depends only on the schedule and eta
        std = policy.std.double().view(-1, 1, 1, 1)
        expected = torch.distributions.kl_divergence(
            torch.distributions.Normal(policy.mean.double(), std),
            torch.distributions.Normal(reference.mean.double(), std),
        ).mean(dim=DIMS)
        # float32 maths against a float64 reference: float32 tolerances
        actual = kl_to_reference(policy.mean, reference.mean, policy.std).double()
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["flow_sde", "flow_cps"])
def test_trainable_steps_counts_the_stochastic_steps(name):
    scheduler = make_scheduler(3.0)
    x, v, _ = random_state(14)
    stochastic = sum(
        int((STEP_FUNCTIONS[name](scheduler, v, float(t), x, eta=0.7).std > 0).all()) for t in scheduler.timesteps
    )
    assert trainable_steps(name, STEPS) == stochastic == {"flow_sde": STEPS, "flow_cps": STEPS - 1}[name]


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_forward_maths_matches_diffusers_and_round_trips(shift):
    scheduler = make_scheduler(shift)
    x0, noise, _ = random_state(15)
    timesteps = scheduler.timesteps[[0, 5, 9]]
    sigma = flow_sigmas(scheduler, timesteps)
    assert torch.equal(sigma, scheduler.sigmas[[0, 5, 9]])
    x_t = flow_add_noise(x0, noise, sigma)
    torch.testing.assert_close(x_t, scheduler.scale_noise(x0, timesteps, noise))
    x0_hat, eps_hat = flow_predictions(noise - x0, x_t, sigma)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps_hat, noise, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not all in the scheduler's schedule"):
        flow_sigmas(scheduler, timesteps + 0.5)
