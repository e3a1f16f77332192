"""Forward-process estimators (AWM, DiffusionNFT): each loss against a hand computation, the equivalence of epsilon-
and v-prediction, NFT's gradient at the old policy, the samplers they accept, and exact resume with the old policy."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ddpo.cli import main
from ddpo.policy.forward import (
    add_noise,
    alpha_bar,
    awm_loss,
    ema_update,
    nft_loss,
    old_policy_decay,
    prediction_kl,
    predictions,
)
from ddpo.training.config import ConfigError, build_config


def test_add_noise_and_predictions_invert_each_other_for_every_prediction_type():
    torch.manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    abar = torch.tensor([0.9, 0.5, 0.05])
    x_t = add_noise(x0, eps, abar)
    a, s = abar.sqrt().view(-1, 1, 1, 1), (1 - abar).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, a * x0 + s * eps)
    exact_outputs = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}
    for prediction_type, output in exact_outputs.items():
        x0_hat, eps_hat = predictions(output, x_t, abar, prediction_type)
        torch.testing.assert_close(x0_hat, x0, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(eps_hat, eps, atol=1e-5, rtol=1e-5)


def test_awm_loss_by_hand():
    eps_pred = torch.tensor([[[[1.0, 2.0]]], [[[0.0, 0.0]]]], requires_grad=True)  # [2, 1, 1, 2]
    eps = torch.tensor([[[[0.0, 0.0]]], [[[1.0, 3.0]]]])
    advantages = torch.tensor([2.0, -1.0])
    loss, info = awm_loss(eps_pred, eps, advantages)
    # per sample mse: (1 + 4) / 2 = 2.5 and (1 + 9) / 2 = 5; loss = (2 * 2.5 - 1 * 5) / 2 = 0
    assert loss.item() == pytest.approx(0.0)
    assert info["denoising_mse"].item() == pytest.approx(3.75)
    loss.backward()
    # d/d eps_pred of A_i * mean((e - eps)^2) / N = A_i * 2 (e - eps) / 2 / 2
    expected = torch.tensor([[[[1.0, 2.0]]], [[[0.5, 1.5]]]])
    torch.testing.assert_close(eps_pred.grad, expected)


def test_nft_loss_by_hand():
    x0 = torch.zeros(1, 1, 1, 2)
    x0_pred = torch.tensor([[[[1.0, -1.0]]]])
    x0_old = torch.tensor([[[[0.5, 0.5]]]])
    beta, a_max = 0.5, 2.0
    advantage = torch.tensor([1.0])  # r = 1 / 2 / 2 + 0.5 = 0.75
    loss, info = nft_loss(x0_pred, x0_old, x0, advantage, beta, a_max)
    positive = beta * x0_pred + (1 - beta) * x0_old  # (0.75, -0.25)
    negative = (1 + beta) * x0_old - beta * x0_pred  # (0.25, 1.25)
    pos = ((0.75**2 + 0.25**2) / 2) / ((0.75 + 0.25) / 2)  # mse / mean|.|
    neg = ((0.25**2 + 1.25**2) / 2) / ((0.25 + 1.25) / 2)
    assert torch.allclose(positive, torch.tensor([[[[0.75, -0.25]]]]))
    assert torch.allclose(negative, torch.tensor([[[[0.25, 1.25]]]]))
    assert info["nft_r_mean"].item() == pytest.approx(0.75)
    assert loss.item() == pytest.approx(a_max * (0.75 * pos + 0.25 * neg) / beta, rel=1e-6)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_nft_gradient_at_the_old_policy_is_the_advantage_weighted_denoising_gradient(beta):
    """At theta = old both implicit policies equal the model, w+ = w- = w, and the gradient of NFT's loss is
    ``A_max (2r - 1) d/dtheta mean(|x0_theta - x0|^2 / w) = clip(A) d/dtheta ...`` whatever b (paper, Sec. 3)."""
    torch.manual_seed(1)
    x0 = torch.randn(4, 2, 3, 3)
    x0_pred = torch.randn(4, 2, 3, 3, requires_grad=True)
    advantages = torch.tensor([3.0, -0.5, 0.0, -7.0])
    a_max = 2.0
    loss, _ = nft_loss(x0_pred, x0_pred.detach(), x0, advantages, beta, a_max)
    (grad,) = torch.autograd.grad(loss, x0_pred)
    weight = (x0_pred.detach() - x0).abs().mean(dim=(1, 2, 3), keepdim=True)
    reference = (advantages.clamp(-a_max, a_max).view(-1, 1, 1, 1) * (x0_pred - x0) ** 2 / weight).mean(dim=(1, 2, 3))
    (expected,) = torch.autograd.grad(reference.mean(), x0_pred)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_epsilon_and_v_prediction_models_that_agree_give_the_same_losses():
    """A v-prediction model built from an epsilon model (v = alpha eps_hat - sigma x0_hat at every input) is the
    same denoiser: every forward-process loss must agree, although the raw outputs differ."""
    torch.manual_seed(2)
    x0, eps = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    abar = alpha_bar(torch.linspace(0.999, 0.01, 1000), torch.tensor([10, 500, 990]))
    x_t = add_noise(x0, eps, abar)
    eps_model = torch.randn(3, 4, 4, 4) * 0.3 + eps  # some imperfect epsilon prediction
    old_eps = eps_model + 0.1 * torch.randn(3, 4, 4, 4)
    a, s = abar.sqrt().view(-1, 1, 1, 1), (1 - abar).sqrt().view(-1, 1, 1, 1)

    def as_v(e):
        return a * e - s * (x_t - s * e) / a

    advantages = torch.tensor([1.0, -2.0, 0.5])
    losses = {}
    for kind, out, old in (("epsilon", eps_model, old_eps), ("v_prediction", as_v(eps_model), as_v(old_eps))):
        assert kind == "epsilon" or not torch.allclose(out, eps_model)
        x0_hat, eps_hat = predictions(out, x_t, abar, kind)
        x0_old, eps_old = predictions(old, x_t, abar, kind)
        losses[kind] = (
            awm_loss(eps_hat, eps, advantages)[0],
            nft_loss(x0_hat, x0_old, x0, advantages, 1.0, 5.0)[0],
            prediction_kl(eps_hat, eps_old).mean(),
        )
    for ours, theirs in zip(losses["epsilon"], losses["v_prediction"]):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_old_policy_decay_schedule_and_ema_update():
    assert [old_policy_decay(s, 0, 0.001, 0.5) for s in (0, 10, 500, 10_000)] == [0.0, 0.01, 0.5, 0.5]
    assert old_policy_decay(50, 75, 0.0075, 0.999) == 0.0
    assert old_policy_decay(175, 75, 0.0075, 0.999) == pytest.approx(0.75)
    old, new = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 6.0])]
    ema_update(old, new, 0.25)
    torch.testing.assert_close(old[0], torch.tensor([0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 6]))


def test_log_prob_estimators_refuse_log_prob_free_samplers():
    with pytest.raises(ConfigError, match="needs a sampler with per-step log-probabilities"):
        build_config(preset="tiny", overrides=["sample.scheduler=dpmsolver++"])
    with pytest.raises(ConfigError, match="sample.eta must be > 0"):
        build_config(preset="tiny", overrides=["sample.eta=0"])
    with pytest.raises(ConfigError, match="is not a sampler"):
        build_config(preset="tiny", overrides=["train.algorithm=awm", "sample.scheduler=no_such_sampler"])
    for sampler in ("dpmsolver++", "euler", "ddim", "EulerDiscreteScheduler"):
        config = build_config(
            preset="tiny", overrides=["train.algorithm=nft", f"sample.scheduler={sampler}", "sample.eta=0"]
        )
        assert config.sample.scheduler == sampler


def _run(fast_overrides, tmp_path, name: str, *extra: str, resume: bool = False) -> int:
    overrides = [o.replace("run_name=run", f"run_name={name}") for o in fast_overrides]
    if resume:
        return main(["train", "--resume", str(tmp_path / "runs" / name), *extra])
    return main(["train", "--preset", "tiny", *overrides, *extra])


@pytest.mark.parametrize(
    "extra",
    [
        ["train.algorithm=awm", "sample.scheduler=dpmsolver++", "sample.eta=0", "sample.guidance_scale=1"],
        ["train.algorithm=nft", "sample.scheduler=euler", "train.kl_coef=0.1", "train.nft_beta=0.5"],
    ],
    ids=["awm-dpmsolver-cfg_free", "nft-euler-kl"],
)
def test_forward_estimators_train_and_resume_exactly(fast_overrides, tmp_path, extra):
    """Two epochs straight equal one epoch then a resumed one: weights, NFT's old policy and every metric."""
    assert _run(fast_overrides, tmp_path, "straight", "num_epochs=2", *extra) == 0
    assert _run(fast_overrides, tmp_path, "resumed", "num_epochs=1", *extra) == 0
    assert _run(fast_overrides, tmp_path, "resumed", "num_epochs=2", resume=True) == 0
    runs = tmp_path / "runs"
    straight = load_file(str(runs / "straight" / "checkpoints" / "checkpoint_000002" / "trainable.safetensors"))
    resumed = load_file(str(runs / "resumed" / "checkpoints" / "checkpoint_000002" / "trainable.safetensors"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert any(v.abs().sum() > 0 for k, v in straight.items() if "lora_B" in k)  # it trained
    if "train.algorithm=nft" in extra:
        old = [
            load_file(str(runs / r / "checkpoints" / "checkpoint_000002" / "extra.safetensors"))
            for r in ("straight", "resumed")
        ]
        assert old[0].keys() == old[1].keys() and all(torch.equal(old[0][k], old[1][k]) for k in old[0])
        assert set(old[0]) == {f"old_policy.{k}" for k in straight}

    def metrics(run):
        rows = [json.loads(line) for line in (runs / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in row.items() if not k.endswith("_seconds")} for row in rows]

    assert metrics("straight") == metrics("resumed")
    assert "denoising_mse" in metrics("straight")[0] or "nft_r_mean" in metrics("straight")[0]
