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
    flow_add_noise,
    flow_predictions,
    matching_target,
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


def test_epsilon_and_v_prediction_models_that_agree_give_nft_the_same_loss_and_awm_their_own():
    """A v-prediction model built from an epsilon model (v = alpha eps_hat - sigma x0_hat at every input) is the
    same denoiser: NFT's x0-space loss agrees. AWM and the KL are each model's pretraining loss, in its own output
    space: since eps_hat - eps = alpha (v_hat - v) at a fixed x_t, the v-space mean squared error is the eps-space one
    divided by alpha_bar, per pair."""
    torch.manual_seed(2)
    x0, eps = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    abar = alpha_bar(torch.linspace(0.999, 0.01, 1000), torch.tensor([10, 500, 990]))
    x_t = add_noise(x0, eps, abar)
    eps_model = torch.randn(3, 4, 4, 4) * 0.3 + eps  # some imperfect epsilon prediction
    old_eps = eps_model + 0.1 * torch.randn(3, 4, 4, 4)
    a, s = abar.sqrt().view(-1, 1, 1, 1), (1 - abar).sqrt().view(-1, 1, 1, 1)

    def as_v(e):
        return a * e - s * (x_t - s * e) / a

    ones = torch.ones(3)
    mse, nft, kl = {}, {}, {}
    for kind, out, old in (("epsilon", eps_model, old_eps), ("v_prediction", as_v(eps_model), as_v(old_eps))):
        assert kind == "epsilon" or not torch.allclose(out, eps_model)
        x0_hat, _ = predictions(out, x_t, abar, kind)
        x0_old, _ = predictions(old, x_t, abar, kind)
        target = matching_target(x0, eps, abar, kind)
        mse[kind] = torch.stack([awm_loss(out[k : k + 1], target[k : k + 1], ones[:1])[0] for k in range(3)])
        nft[kind] = nft_loss(x0_hat, x0_old, x0, torch.tensor([1.0, -2.0, 0.5]), 1.0, 5.0)[0]
        kl[kind] = prediction_kl(out, old)
    torch.testing.assert_close(nft["epsilon"], nft["v_prediction"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mse["v_prediction"], mse["epsilon"] / abar, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(kl["v_prediction"], kl["epsilon"] / abar, rtol=1e-4, atol=1e-6)


def test_matching_targets_by_hand():
    x0 = torch.tensor([[[[1.0, -2.0]]]])
    noise = torch.tensor([[[[0.5, 3.0]]]])
    abar = torch.tensor([0.64])  # alpha 0.8, sigma 0.6
    torch.testing.assert_close(matching_target(x0, noise, abar, "flow"), torch.tensor([[[[-0.5, 5.0]]]]))
    torch.testing.assert_close(matching_target(x0, noise, abar, "epsilon"), noise)
    torch.testing.assert_close(matching_target(x0, noise, abar, "sample"), x0)
    v = torch.tensor([[[[0.8 * 0.5 - 0.6 * 1.0, 0.8 * 3.0 + 0.6 * 2.0]]]])
    torch.testing.assert_close(matching_target(x0, noise, abar, "v_prediction"), v)
    with pytest.raises(ValueError, match="unknown prediction space"):
        matching_target(x0, noise, abar, "velocity")


def test_awm_on_a_flow_model_is_the_velocity_loss_with_gradient_at_sigma_one():
    """On a flow-matching model AWM regresses the velocity ``eps - x0`` (the papers' loss). The epsilon-space loss it
    replaces is ``(1 - sigma)^2`` times it, by hand: eps_hat - eps = (1 - sigma)(v_hat - v); at sigma = 1 that is
    zero, while the velocity loss still has a gradient."""
    torch.manual_seed(3)
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    sigma = torch.tensor([0.2, 0.7, 1.0])
    x_t = flow_add_noise(x0, eps, sigma)
    v_hat = (eps - x0 + 0.5 * torch.randn(3, 4, 2, 2)).requires_grad_(True)
    advantages = torch.tensor([1.0, -0.5, 2.0])
    loss, info = awm_loss(v_hat, matching_target(x0, eps, sigma, "flow"), advantages)
    by_hand = (advantages * ((v_hat.detach() - (eps - x0)) ** 2).mean(dim=(1, 2, 3))).mean()
    torch.testing.assert_close(loss.detach(), by_hand)
    _, eps_hat = flow_predictions(v_hat.detach(), x_t, sigma)
    eps_space = ((eps_hat - eps) ** 2).mean(dim=(1, 2, 3))
    v_space = ((v_hat.detach() - (eps - x0)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(eps_space, (1 - sigma) ** 2 * v_space, rtol=1e-4, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, v_hat)
    assert grad[2].abs().sum() > 0  # sigma = 1: the velocity loss still trains this pair


def test_awm_proximal_term_by_hand_and_bounded_below_when_it_outweighs_the_advantage():
    """``awm_loss(..., prediction_old, ema_kl)`` adds ``c * mean |pred - pred_old|^2``. With ``c > -A`` a pair's loss
    ``A |p - y|^2 + c |p - o|^2`` is a convex quadratic in ``p`` with its minimum at ``(A y + c o) / (A + c)``; below
    that (a negative advantage alone) the loss has no minimum and falls without bound as ``p`` moves away."""
    pred = torch.tensor([[[[1.0, 2.0]]]], requires_grad=True)
    target = torch.tensor([[[[0.0, 0.0]]]])
    old = torch.tensor([[[[1.0, 1.0]]]])
    advantage = torch.tensor([-2.0])
    loss, info = awm_loss(pred, target, advantage, old, ema_kl=3.0)
    # mse (1 + 4) / 2 = 2.5, proximal (0 + 1) / 2 = 0.5: -2 * 2.5 + 3 * 0.5 = -3.5
    assert loss.item() == pytest.approx(-3.5)
    assert info["ema_kl"].item() == pytest.approx(0.5)
    minimum = (advantage * target + 3.0 * old) / (advantage + 3.0)  # (3, 3)
    at_min = minimum.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(awm_loss(at_min, target, advantage, old, ema_kl=3.0)[0], at_min)
    torch.testing.assert_close(grad, torch.zeros_like(grad))
    far = [awm_loss(old * scale, target, advantage, old, ema_kl=1.0)[0].item() for scale in (10.0, 100.0)]
    assert far[1] < far[0] < 0  # c = 1 < -A = 2: unbounded below
    far = [awm_loss(old * scale, target, advantage, old, ema_kl=3.0)[0].item() for scale in (10.0, 100.0)]
    assert far[1] > far[0] > 0  # c = 3 > 2: the proximal term wins
    with pytest.raises(ValueError, match="prediction_old"):
        awm_loss(pred, target, advantage, None, ema_kl=1.0)


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


def test_nft_samples_with_the_old_policy_unless_told_otherwise(fast_overrides, tmp_path):
    """DiffusionNFT's training batches come from the old policy, as in the reference implementation: with the old
    policy set to the base model (LoRA B = 0) and the trained adapter perturbed, the epoch's samples equal the base
    model's own (sampled with the adapters off) and differ from the trained weights'; ``nft_sample_policy=current``
    samples with the trained weights."""
    from ddpo.training.trainer import Trainer

    overrides = [*fast_overrides, "train.algorithm=nft", "sample.scheduler=euler", "overlap_scoring=false"]
    trainer = Trainer.from_config(build_config(preset="tiny", overrides=overrides), tmp_path / "run")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param, old in zip(trainer.trainable_names, trainer.params, trainer.estimator.old_params, strict=True):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
                old.zero_()
    assert trainer.estimator.samples_with_old_policy
    with_old = trainer.sample_and_score(0)[0].latents
    trainer.config.train.nft_sample_policy = "current"
    assert not trainer.estimator.samples_with_old_policy
    with_current = trainer.sample_and_score(0)[0].latents
    with trainer.policy.base_model():
        base = trainer.sample_and_score(0)[0].latents
    assert torch.equal(with_old, base)
    assert not torch.allclose(with_current, base)
    assert any(p.abs().sum() > 0 for n, p in zip(trainer.trainable_names, trainer.params) if "lora_B" in n)  # restored
    with pytest.raises(ConfigError, match="nft_sample_policy must be old or current"):
        build_config(preset="tiny", overrides=["train.algorithm=nft", "train.nft_sample_policy=ema"])


def test_awm_with_its_proximal_term_keeps_an_old_policy_and_resumes_exactly(fast_overrides, tmp_path):
    extra = ["train.algorithm=awm", "sample.scheduler=euler", "train.awm_ema_kl=5.0", "train.old_policy_uprate=0.2"]
    assert _run(fast_overrides, tmp_path, "straight", "num_epochs=2", *extra) == 0
    assert _run(fast_overrides, tmp_path, "resumed", "num_epochs=1", *extra) == 0
    assert _run(fast_overrides, tmp_path, "resumed", "num_epochs=2", resume=True) == 0
    runs = tmp_path / "runs"
    files = [runs / r / "checkpoints" / "checkpoint_000002" for r in ("straight", "resumed")]
    for name in ("trainable.safetensors", "extra.safetensors"):
        a, b = (load_file(str(f / name)) for f in files)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (runs / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["ema_kl"] >= 0 and rows[1]["old_policy_decay"] > 0
    with pytest.raises(ConfigError, match="awm_ema_kl must be >= 0"):
        build_config(preset="tiny", overrides=["train.algorithm=awm", "train.awm_ema_kl=-1"])
    with pytest.raises(ConfigError, match="does nothing with train.algorithm=nft"):
        build_config(preset="tiny", overrides=["train.algorithm=nft", "train.awm_ema_kl=1"])
