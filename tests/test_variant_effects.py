"""Each training variant takes effect: the weights, losses and KL terms the trainer computes equal hand
computations on the tiny pipeline (the end-to-end runs of every variant are in test_train_variants.py)."""

from __future__ import annotations

import itertools

import pytest
import torch

from ddpo.training.config import build_config
from ddpo.training.trainer import Trainer

REWARDS = torch.tensor([0.1, 0.5, 0.2, 0.9])
PROMPTS = ["a", "a", "b", "b"]


@pytest.fixture
def make_trainer(fast_overrides, tmp_path):
    counter = itertools.count()

    def make(*extra: str) -> Trainer:
        overrides = [*fast_overrides, "overlap_scoring=false", *extra]
        return Trainer.from_config(build_config(preset="tiny", overrides=overrides), tmp_path / f"run{next(counter)}")

    return make


def _standardised(values: torch.Tensor) -> torch.Tensor:
    return (values - values.mean()) / (values.std(unbiased=False) + 1e-6)


def test_rwr_weights_are_the_softmax_of_the_advantages_not_the_advantages(make_trainer):
    weights = make_trainer("train.algorithm=rwr", "train.rwr_temperature=0.5").compute_weights(REWARDS, PROMPTS)
    advantages = _standardised(REWARDS)
    torch.testing.assert_close(weights, 4 * torch.softmax(advantages / 0.5, dim=0))
    assert not torch.allclose(weights, advantages, atol=1e-2)
    assert weights.min() > 0 and abs(weights.mean().item() - 1) < 1e-5


def test_sparse_rwr_keeps_the_top_quantile(make_trainer):
    trainer = make_trainer("train.algorithm=rwr_sparse", "train.rwr_quantile=0.5")
    assert trainer.compute_weights(REWARDS, PROMPTS).tolist() == [0.0, 1.0, 0.0, 1.0]


@pytest.mark.parametrize("scheme", ["group", "group_center"])
def test_group_advantages_sum_to_zero_within_each_group(make_trainer, scheme):
    trainer = make_trainer("sample.samples_per_prompt=2", f"train.advantage={scheme}")
    weights = trainer.compute_weights(REWARDS, PROMPTS)
    assert abs(weights[:2].sum().item()) < 1e-6 and abs(weights[2:].sum().item()) < 1e-6
    if scheme == "group":  # each group of two normalised to -1, +1
        torch.testing.assert_close(weights, torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-5, rtol=0)
    else:  # centred per group, then divided by the batch std of the centred values: (-.2, .2, -.35, .35) / .2850
        centred = torch.tensor([-0.2, 0.2, -0.35, 0.35])
        torch.testing.assert_close(weights, centred / (centred.std(unbiased=False) + 1e-6))


def test_per_prompt_statistics_switch_from_batch_to_prompt_buffers(make_trainer):
    trainer = make_trainer("train.advantage=per_prompt", "train.per_prompt_min_count=3")
    first = trainer.compute_weights(REWARDS, PROMPTS)  # 2 rewards per prompt < 3: batch statistics
    torch.testing.assert_close(first, _standardised(REWARDS))
    second = trainer.compute_weights(REWARDS + 1, PROMPTS)  # 4 per prompt: each prompt's own buffer
    buffer_a = torch.tensor([0.1, 0.5, 1.1, 1.5], dtype=torch.float64)
    expected_a = (torch.tensor([1.1, 1.5], dtype=torch.float64) - buffer_a.mean()) / (
        buffer_a.std(unbiased=False) + 1e-6
    )
    torch.testing.assert_close(second[:2], expected_a.float())
    assert trainer.advantage_state is not None and sorted(trainer.advantage_state.buffers) == ["a", "b"]


@pytest.mark.parametrize("algorithm", ["ddpo_is", "ddpo_sf"])
def test_first_minibatch_loss_matches_the_estimator_by_hand(make_trainer, algorithm):
    trainer = make_trainer(f"train.algorithm={algorithm}")
    samples, rewards, _, _ = trainer.sample_and_score(0)
    weights = trainer.compute_weights(rewards, samples.prompts)
    i, j = trainer.training_pairs(0, 0, len(samples.prompts))
    i, j = i[:4], j[:4]
    loss, info = trainer.minibatch_loss(samples, weights, i, j)
    if algorithm == "ddpo_is":  # ratio 1 at the first step: the clipped surrogate is -mean(A)
        assert abs(info["ratio_mean"].item() - 1) < 1e-5
        torch.testing.assert_close(loss, -weights[i].mean(), atol=1e-5, rtol=0)
    else:  # REINFORCE: -mean(A * log pi), log pi of the stored actions
        torch.testing.assert_close(loss, -(weights[i] * samples.log_probs[i, j]).mean(), atol=1e-5, rtol=1e-5)


def test_kl_to_the_base_model_matches_gaussians_by_hand(make_trainer):
    """With LoRA the KL reference is the UNet with its adapters off: 0 while the adapter is zero, and then
    ``KL(N(mu, s^2) || N(mu_base, s^2))`` averaged over latent dims, computed here with torch.distributions from the
    step means of two independently built pipelines' UNets."""
    trainer = make_trainer("train.kl_coef=0.5")
    samples, rewards, _, _ = trainer.sample_and_score(0)
    weights = trainer.compute_weights(rewards, samples.prompts)
    i, j = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3])
    _, info = trainer.minibatch_loss(samples, weights, i, j)
    assert info["kl"].item() == 0.0  # LoRA B starts at zero: the policy is the base model
    with torch.no_grad():
        for param in trainer.params:
            param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    _, info = trainer.minibatch_loss(samples, weights, i, j)
    with torch.no_grad():
        policy = trainer.estimator.recompute(trainer.denoiser, samples, i, j)
        base = Trainer(trainer.config, trainer.run_dir.with_name("base"))  # a fresh, unadapted copy of the model
        reference = base.estimator.recompute(base.accelerator.unwrap_model(base.denoiser), samples, i, j)
    std = policy.std.view(-1, 1, 1, 1).expand_as(policy.mean)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(policy.mean, std), torch.distributions.Normal(reference.mean, std)
    ).mean(dim=(1, 2, 3))
    assert expected.mean() > 0
    torch.testing.assert_close(info["kl"], expected.mean(), rtol=1e-4, atol=1e-7)


def test_scoring_overlaps_sampling_only_where_it_helps():
    """On a CPU a scoring thread competes with sampling for the same cores (and slows every later UNet call through
    OpenMP's thread throttling), so local rewards are scored inline there; on a GPU, or for a reward that waits on
    the network, the worker thread overlaps them."""
    from ddpo.training.trainer import overlap_scoring

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert not overlap_scoring(True, cpu)
    assert overlap_scoring(True, cpu, io_bound=True)
    assert overlap_scoring(True, gpu)
    assert not overlap_scoring(False, gpu) and not overlap_scoring(False, cpu, io_bound=True)
    from rewards.remote import RemoteReward

    assert RemoteReward.io_bound is True


def test_start_up_line_says_how_rewards_are_scored(make_trainer, fast_overrides, tmp_path):
    inline = make_trainer()  # overlap_scoring=false
    assert "rewards scored inline (overlap_scoring=false)" in inline.layout()
    overrides = [*fast_overrides, "overlap_scoring=true"]
    on_cpu = Trainer.from_config(build_config(preset="tiny", overrides=overrides), tmp_path / "cpu")
    assert not on_cpu.overlaps_scoring()
    assert "rewards scored inline (on a CPU a scoring thread competes" in on_cpu.layout()
