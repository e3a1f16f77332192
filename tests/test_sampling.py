"""Sampling records exact trajectories; recomputing them with the unchanged model gives ratio 1."""

import pytest
import torch
from diffusers import DDIMScheduler

from ddpo.models import load_pipeline
from ddpo.policy.sampling import (
    SamplerSettings,
    check_schedule,
    encode_prompts,
    guided_model_output,
    recompute_step,
    sample_trajectories,
)
from ddpo.policy.schedulers import ddim_step_with_logprob


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return load_pipeline(str(tiny_model_dir))


def _sample(pipe, mixed_precision, guidance=5.0, steps=5, batch=3, seed=0):
    device = torch.device("cpu")
    prompts = ["a cat", "a dog", "an owl"][:batch]
    embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts, device)
    negative = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""], device) if guidance > 1 else None
    settings = SamplerSettings("ddim", steps, guidance, 1.0, mixed_precision)
    check_schedule(pipe.scheduler, settings)
    generator = torch.Generator().manual_seed(seed)
    return sample_trajectories(pipe.unet, pipe.vae, pipe.scheduler, embeds, negative, prompts, generator, settings)


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_recomputed_log_probs_give_ratio_one_with_cfg(pipe, mixed_precision):
    traj = _sample(pipe, mixed_precision)
    assert traj.latents.dtype == torch.float32 and traj.log_probs.dtype == torch.float32
    # Shuffled (trajectory, timestep) pairs in one batched call, as the trainer does.
    i = torch.tensor([2, 0, 1, 1, 0, 2, 2])
    j = torch.tensor([0, 4, 2, 3, 1, 1, 3])
    out = recompute_step(
        pipe.unet,
        pipe.scheduler,
        traj.latents[i, j],
        traj.latents[i, j + 1],
        traj.timesteps[j],
        traj.cond[i],
        traj.negative_cond,
        SamplerSettings("ddim", 5, 5.0, 1.0, mixed_precision),
    )
    ratio = torch.exp(out.log_prob - traj.log_probs[i, j])
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)


def test_trajectory_matches_plain_diffusers_ddim_loop(pipe):
    """Our loop equals a hand-written loop over diffusers' own DDIMScheduler.step with the same noise."""
    traj = _sample(pipe, "no", steps=4, batch=2, seed=3)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(4)
    latents = traj.latents[:, 0]
    for k, t in enumerate(scheduler.timesteps):
        with torch.no_grad():
            out = guided_model_output(pipe.unet, latents, t, traj.cond, traj.negative_cond, 5.0)
        # Recover the noise our sampler drew from the recorded step, then let diffusers take the same step.
        ours = ddim_step_with_logprob(scheduler, out, int(t), latents, prev_sample=traj.latents[:, k + 1])
        noise = (traj.latents[:, k + 1] - ours.mean) / ours.std.view(-1, 1, 1, 1)
        latents = scheduler.step(out, t, latents, eta=1.0, variance_noise=noise).prev_sample
        torch.testing.assert_close(latents, traj.latents[:, k + 1], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    torch.testing.assert_close((decoded / 2 + 0.5).clamp(0, 1), traj.images, rtol=1e-4, atol=1e-4)


def test_batched_cfg_equals_two_separate_calls(pipe):
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 8, 8)
    embeds = torch.randn(2, 77, 32)
    negative = torch.randn(1, 77, 32)
    with torch.no_grad():
        guided = guided_model_output(pipe.unet, latents, 500, embeds, negative, 7.0)
        cond = pipe.unet(latents, 500, encoder_hidden_states=embeds).sample
        uncond = pipe.unet(latents, 500, encoder_hidden_states=negative.expand(2, -1, -1)).sample
    torch.testing.assert_close(guided, uncond + 7.0 * (cond - uncond), rtol=1e-4, atol=1e-5)


def test_sampling_is_deterministic_given_the_generator(pipe):
    a = _sample(pipe, "no", steps=3, batch=2, seed=7)
    b = _sample(pipe, "no", steps=3, batch=2, seed=7)
    c = _sample(pipe, "no", steps=3, batch=2, seed=8)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    assert not torch.equal(a.latents, c.latents)


def test_consecutive_groups_by_hand():
    from ddpo.policy.sampling import consecutive_groups

    assert consecutive_groups(["a", "a", "b", "b", "a", "c"]).tolist() == [0, 0, 1, 1, 2, 3]
    assert consecutive_groups(["x"]).tolist() == [0]


def test_shared_initial_noise_is_one_draw_per_prompt_group(pipe):
    """Each group of consecutive equal prompts starts from one x_T (the group's first draw from the generator);
    later steps still draw their own noise, so the samples of a group differ; all-distinct prompts are unchanged."""
    device = torch.device("cpu")
    prompts = ["a cat", "a cat", "a cat", "a dog", "a dog", "an owl"]
    embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts, device)
    negative = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""], device)
    check_schedule(pipe.scheduler, SamplerSettings("ddim", 4, 5.0, 1.0))

    def run(prompt_list, share):
        settings = SamplerSettings("ddim", 4, 5.0, 1.0, share_initial_noise=share)
        generator = torch.Generator().manual_seed(7)
        return sample_trajectories(
            pipe.unet, pipe.vae, pipe.scheduler, embeds[: len(prompt_list)], negative, prompt_list, generator, settings
        )

    shared = run(prompts, True)
    first = torch.randn(3, *shared.latents.shape[2:], generator=torch.Generator().manual_seed(7))
    expected = first[torch.tensor([0, 0, 0, 1, 1, 2])] * pipe.scheduler.init_noise_sigma
    assert torch.equal(shared.latents[:, 0], expected)
    assert not torch.allclose(shared.latents[0, 1], shared.latents[1, 1])  # step noise still differs
    independent = run(prompts, False)
    assert not torch.equal(independent.latents[0, 0], independent.latents[1, 0])
    distinct = ["a cat", "a dog", "an owl"]
    embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, distinct, device)
    assert torch.equal(run(distinct, True).latents, run(distinct, False).latents)
