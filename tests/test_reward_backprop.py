"""Reward backpropagation (``train.algorithm=draft|alignprop``): the gradient through the sampling chain against
finite differences, DRaFT with every step against AlignProp without truncation, the refusals before a model loads,
and training and resuming exactly through the CLI on the tiny SD pipeline and the tiny SD3 flow family.

The finite-difference check runs the tiny model's UNet and VAE in float64 (the step maths stay float32 by contract,
:mod:`ddpo.policy.gaussian`): for a random direction ``d`` over the LoRA weights, the central difference
``(L(w + e d) - L(w - e d)) / 2e`` of the reward of the full 3-step chain, with the same noise, matches
``<grad L, d>`` from back-propagation.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file

from ddpo.cli import main
from ddpo.models import add_lora, build_tiny_pipeline
from ddpo.policy.reward_backprop import (
    alignprop_first_gradient_step,
    draft_first_gradient_step,
    reward_backprop_loss,
    sample_with_reward_gradient,
)
from ddpo.policy.sampling import SamplerSettings, encode_prompts, vae_decode
from ddpo.training.config import ConfigError, build_config
from rewards.rules import LUMA_WEIGHTS

PROMPTS = ["a red circle", "a blue square"]


class Float64VAE:
    """The real VAE run in float64 behind the float32 interface :func:`vae_decode` calls."""

    def __init__(self, vae):
        self.vae, self.config = vae.double(), vae.config

    def decode(self, latents: torch.Tensor):
        return self.vae.decode(latents.double())


def test_draft_gradient_through_three_steps_matches_finite_differences():
    """Full DRaFT (K = all 3 steps, DDIM with eta = 1 and CFG, the same noise): the back-propagated directional
    derivative of the mean brightness equals the central difference of the float64 networks within 0.2%; DRaFT-1's
    (gradients through the last step only) is another number."""
    pipe = build_tiny_pipeline(seed=0, sample_size=8)
    unet = pipe.unet
    add_lora(unet, 4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
    unet.double()
    params = [p for p in unet.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero (no gradient reaches A): give every weight a value
        for param in params:
            param.copy_(0.3 * torch.randn(param.shape, generator=generator, dtype=torch.float64))
    vae = Float64VAE(pipe.vae)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    settings = SamplerSettings(
        scheduler="ddim", num_steps=3, guidance_scale=3.0, eta=1.0, latent_size=8, latent_channels=4
    )
    cond = encode_prompts(pipe.tokenizer, pipe.text_encoder, PROMPTS, torch.device("cpu"))
    negative = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""], torch.device("cpu"))
    luma = torch.tensor(LUMA_WEIGHTS, dtype=torch.float64)

    def denoiser(latents, t, c):
        return unet(latents.double(), t, encoder_hidden_states=c.embeds.double()).sample

    def loss(first_gradient_step: int) -> torch.Tensor:
        """Minus the mean brightness (the ``brightness`` reward's Rec. 709 luma, summed in float64)."""
        noise = torch.Generator().manual_seed(1)
        chain = sample_with_reward_gradient(
            denoiser, scheduler, cond, negative, PROMPTS, noise, settings, first_gradient_step
        )
        images = vae_decode(vae, chain.latents)
        return -(images.double().mean(dim=(2, 3)) @ luma).mean()

    def derivative(first_gradient_step: int) -> float:
        grads = torch.autograd.grad(loss(first_gradient_step), params)
        return sum((g * d).sum() for g, d in zip(grads, direction, strict=True)).item()

    def central_difference(eps: float) -> float:
        values = []
        with torch.no_grad():
            for sign in (1, -1):
                for p, d in zip(params, direction, strict=True):
                    p.add_(sign * eps * d)
                values.append(loss(3).item())
                for p, d in zip(params, direction, strict=True):
                    p.sub_(sign * eps * d)
        return (values[0] - values[1]) / (2 * eps)

    direction = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in params]
    predicted = derivative(draft_first_gradient_step(3, 3))
    assert abs(predicted) > 1e-3  # far above the float32 rounding of the latents between steps (~1e-9 in the loss)
    # The truncation error is O(eps^2) (measured: 20% at eps 1e-3, 0.6% at 1e-4), rounding ~1e-9 / eps.
    for eps in (3e-5, 1e-5):
        assert central_difference(eps) == pytest.approx(predicted, rel=2e-3)
    assert abs(derivative(draft_first_gradient_step(3, 1)) - predicted) > 0.01 * abs(predicted)  # truncated: another


def test_truncation_draws():
    """DRaFT-K starts the gradient K steps before the end; AlignProp's K is uniform on [k_min, k_max] (every value
    drawn, no other); a reward above the clamp gives no gradient."""
    assert [draft_first_gradient_step(5, k) for k in (1, 3, 5)] == [4, 2, 0]
    generator = torch.Generator().manual_seed(0)
    draws = [5 - alignprop_first_gradient_step(5, 2, 4, generator) for _ in range(200)]
    assert set(draws) == {2, 3, 4}
    rewards = torch.tensor([0.2, 0.9], requires_grad=True)
    reward_backprop_loss(rewards, clip_max=0.5).backward()
    assert rewards.grad.tolist() == [-0.5, 0.0]


# ---------------------------------------------------------------------- the config and the reward


def _refused(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as err:
        build_config(preset="tiny", overrides=overrides)
    return str(err.value)


def test_bad_settings_are_refused_by_the_config():
    """A non-differentiable reward by name (the message names the differentiable ones), a sampler without a
    differentiable step, DRaFT's K out of range or DRaFT-LV with K > 1, AlignProp's range, another algorithm's key."""
    base = ["reward.name=brightness", "sample.num_steps=4"]
    message = _refused(["train.algorithm=draft", "sample.num_steps=4"])  # the preset's jpeg_compressibility
    assert "reward 'jpeg_compressibility' is not differentiable" in message
    assert "aesthetic" in message and "brightness" in message and "jpeg_compressibility," not in message
    assert "sample.scheduler must be one of ddim" in _refused(
        ["train.algorithm=draft", *base, "sample.scheduler=euler"]
    )
    for k in (0, 5):
        assert "train.draft_k must be in [1, sample.num_steps=4]" in _refused(
            ["train.algorithm=draft", *base, f"train.draft_k={k}"]
        )
    assert "needs train.draft_k=1" in _refused(
        ["train.algorithm=draft", *base, "train.draft_k=2", "train.draft_lv=true"]
    )
    assert "does nothing without train.draft_lv=true" in _refused(
        ["train.algorithm=draft", *base, "train.draft_lv_samples=4"]
    )
    assert "1 <= k_min <= k_max <= sample.num_steps=4" in _refused(
        ["train.algorithm=alignprop", *base, "train.alignprop_k_min=3", "train.alignprop_k_max=2"]
    )
    assert "train.draft_k is DRaFT's" in _refused(
        ["train.algorithm=alignprop", *base, "train.alignprop_k_max=4", "train.draft_k=2"]
    )
    assert "does nothing with train.algorithm=ddpo_is" in _refused([*base, "train.reward_clip_max=0.5"])
    config = build_config(preset="tiny", overrides=["train.algorithm=draft", *base, "train.draft_k=4"])
    assert config.train.draft_k == 4


def test_a_non_differentiable_reward_known_only_once_loaded_is_refused_before_the_model(tmp_path, capsys):
    """A weighted reward with a non-differentiable component is refused at reward load, before the model loads: the
    model path does not exist, and the error is the reward's."""
    args = ["train", "--preset", "tiny", "train.algorithm=draft", "sample.num_steps=4",
            f"model.pretrained={tmp_path / 'no_model_here'}", f"output_dir={tmp_path}", "reward.name=weighted",
            'reward.options={"components": {"brightness": 1.0, "jpeg_compressibility": 1.0}}']  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "reward 'weighted' is not differentiable" in err and "brightness" in err and "no_model_here" not in err


# ---------------------------------------------------------------------- training through the CLI


def _train(fast_overrides, tmp_path, name: str, *extra: str, resume: bool = False) -> int:
    if resume:
        return main(["train", "--resume", str(tmp_path / "runs" / name), *extra])
    overrides = [o.replace("run_name=run", f"run_name={name}") for o in fast_overrides]
    one_batch = "sample.num_batches_per_epoch=1"  # one minibatch (and optimiser step) an epoch: cheap
    return main(["train", "--preset", "tiny", *overrides, "reward.name=brightness", one_batch, *extra])


def _trained(tmp_path, name: str, epochs: int) -> dict[str, torch.Tensor]:
    path = tmp_path / "runs" / name / "checkpoints" / f"checkpoint_{epochs:06d}" / "trainable.safetensors"
    return load_file(str(path))


def _metrics(tmp_path, name: str) -> list[dict]:
    rows = [json.loads(line) for line in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.endswith("_seconds")} for row in rows]


def test_draft_with_every_step_equals_alignprop_without_truncation(fast_overrides, tmp_path):
    """DRaFT with K = all 4 steps and AlignProp with k_min = k_max = 4 train to the same weights, bit for bit."""
    assert _train(fast_overrides, tmp_path, "draft", "num_epochs=1", "train.algorithm=draft", "train.draft_k=4") == 0
    k = ("train.alignprop_k_min=4", "train.alignprop_k_max=4")
    assert _train(fast_overrides, tmp_path, "alignprop", "num_epochs=1", "train.algorithm=alignprop", *k) == 0
    draft, alignprop = _trained(tmp_path, "draft", 1), _trained(tmp_path, "alignprop", 1)
    assert draft.keys() == alignprop.keys() and all(torch.equal(draft[k], alignprop[k]) for k in draft)
    assert any(v.abs().sum() > 0 for k, v in draft.items() if "lora_B" in k)


@pytest.mark.parametrize(
    "extra",
    [
        ("train.algorithm=draft", "train.draft_lv=true", "train.kl_coef=0.1", "train.gradient_checkpointing=true"),
        ("train.algorithm=alignprop", "train.alignprop_k_max=3", "train.reward_clip_max=0.9"),
        (
            "model.pretrained=tiny_sd3",
            "sample.scheduler=flow_euler",
            "sample.eta=0",
            "train.algorithm=draft",
            "train.draft_k=2",
        ),
        (
            "model.pretrained=tiny_sd3",
            "sample.scheduler=flow_sde",
            "train.algorithm=alignprop",
            "train.alignprop_k_max=4",
            "train.kl_coef=0.1",
        ),
    ],  # fmt: skip
    ids=["sd-draft-lv-kl-checkpointing", "sd-alignprop-clip", "sd3-draft-euler", "sd3-alignprop-sde-kl"],
)
def test_trains_and_resumes_exactly_through_the_cli(fast_overrides, tmp_path, extra):
    """Two epochs straight equal one epoch and a resumed one: the trained weights and every metric; the reward's
    gradient moved the adapters; metrics.jsonl has the trainer's keys and the estimator's diagnostics."""
    extra = (*extra, "sample.resolution=16") if "model.pretrained=tiny_sd3" in extra else extra
    assert _train(fast_overrides, tmp_path, "straight", "num_epochs=2", *extra) == 0
    assert _train(fast_overrides, tmp_path, "resumed", "num_epochs=1", *extra) == 0
    assert _train(fast_overrides, tmp_path, "resumed", "num_epochs=2", resume=True) == 0
    straight, resumed = _trained(tmp_path, "straight", 2), _trained(tmp_path, "resumed", 2)
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert any(v.abs().sum() > 0 for k, v in straight.items() if "lora_B" in k)
    rows = _metrics(tmp_path, "straight")
    assert rows == _metrics(tmp_path, "resumed")
    assert [row["global_step"] for row in rows] == [1, 2]  # one optimiser step per prompt batch
    for row in rows:
        assert {"reward_mean", "reward_std", "loss", "grad_norm", "reward_backprop_steps"} <= row.keys()
        assert ("kl" in row) == ("train.kl_coef=0.1" in extra)
    assert (tmp_path / "runs" / "straight" / "samples" / "epoch_0001.png").is_file()


def test_alignprop_defaults_fit_any_number_of_steps():
    """``train.alignprop_k_max`` defaults to all the sampler's steps, so the algorithm runs on a 10-step preset without
    a further key; an explicit ``k_max`` above the steps is refused."""
    overrides = ["train.algorithm=alignprop", "reward.name=brightness", "sample.scheduler=ddim"]
    overrides += ["train.gradient_accumulation_steps=4"]
    config = build_config(preset="world", overrides=overrides)
    assert config.train.alignprop_k_max is None and config.sample.num_steps == 10
    with pytest.raises(ConfigError, match="k_max <= sample.num_steps=10"):
        build_config(preset="world", overrides=[*overrides, "train.alignprop_k_max=11"])
