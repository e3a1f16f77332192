"""Every model family through the CLI on its tiny random-weight configuration: it trains, resumes bit-exactly, the
first PPO ratio is exactly 1 (float32 and bf16 autocast), and its ``final/`` loads in the family's own diffusers
pipeline with ``load_lora_weights`` and changes the denoiser's output.

Runs are 16-px images (8x8 latents; 16 tokens for the transformers) so that each takes a few seconds on 2 cores.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_variants import DIMS, LossRecorder, check_log_prob_minibatch, hand_weights

from ddpo.cli import main
from ddpo.models import get_family, load_model
from ddpo.training.config import build_config
from ddpo.training.runlog import read_jsonl

TIMING = {"sampling_seconds", "scoring_seconds", "training_seconds", "epoch_seconds", "reward_compute_seconds"}

FAMILIES = {  # model.pretrained -> (family, log-prob sampler)
    "tiny": ("sd", "ddim"),
    "tiny_sdxl": ("sdxl", "ddim"),
    "tiny_sd3": ("sd3", "flow_sde"),
    "tiny_flux": ("flux", "flow_sde"),
}


def overrides(tmp_path: Path, pretrained: str, name: str, *extra: str) -> list[str]:
    sampler = FAMILIES[pretrained][1]
    return [
        f"model.pretrained={pretrained}",
        f"sample.scheduler={sampler}",
        f"sample.eta={0.7 if sampler.startswith('flow') else 1.0}",
        "sample.resolution=16",
        "sample.num_steps=3",
        "sample.batch_size=2",
        "sample.num_batches_per_epoch=2",
        "sample.guidance_scale=3.0",
        "train.batch_size=2",
        "train.gradient_accumulation_steps=3",
        "train.timestep_fraction=1.0",
        "train.learning_rate=0.02",
        "train.clip_range=0.2",
        "train.advantage=batch",
        "model.lora_alpha=8",  # != rank 4: the export must carry the scale
        "eval_prompts=",
        f"output_dir={tmp_path / 'runs'}",
        f"run_name={name}",
        *extra,
    ]


@pytest.fixture
def recorder(monkeypatch) -> LossRecorder:
    return LossRecorder(monkeypatch)


def lora_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("pretrained", list(FAMILIES))
def test_family_trains_resumes_exactly_and_its_final_loads_in_its_own_pipeline(pretrained, tmp_path):
    family, _ = FAMILIES[pretrained]
    assert main(["train", "--preset", "tiny", "num_epochs=2", *overrides(tmp_path, pretrained, "straight")]) == 0
    assert main(["train", "--preset", "tiny", "num_epochs=1", *overrides(tmp_path, pretrained, "split")]) == 0
    split = tmp_path / "runs" / "split"
    assert main(["train", "--resume", str(split), "num_epochs=2"]) == 0

    straight = tmp_path / "runs" / "straight"
    a, b = lora_weights(straight), lora_weights(split)
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    strip = lambda ms: [{k: v for k, v in m.items() if k not in TIMING} for m in ms]  # noqa: E731
    metrics = strip(read_jsonl(straight / "metrics.jsonl"))
    assert metrics == strip(read_jsonl(split / "metrics.jsonl"))
    # The stored old log-probs come from the training shapes (train.batch_size == sample.batch_size): ratio 1.
    assert all(m["first_step_approx_kl"] == 0.0 for m in metrics)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)

    # final/ in the family's own diffusers pipeline: every tensor lands, the denoiser's output changes, and it is
    # the trained one (the scale lora_alpha / rank = 2 included).
    cls = get_family(family)
    pipe = cls.build_tiny()
    fam = cls(pipe)
    denoiser = fam.denoiser()
    latents = torch.randn(2, fam.latent_channels(), 8, 8, generator=torch.Generator().manual_seed(0))
    cond = fam.encode(["a red circle on a white background"] * 2, torch.device("cpu"), 8)
    fam.schedule_kwargs(3, 8)
    t = 500.0 if cls.flow_matching else 500
    with torch.no_grad():
        before = fam.bind(denoiser, 3.0)(latents, t, cond)
        pipe.load_lora_weights(straight / "final")
        assert sum("lora" in n for n, _ in denoiser.named_parameters()) == len(a), "some LoRA tensors did not load"
        after = fam.bind(denoiser, 3.0)(latents, t, cond)
    assert (after - before).abs().max() > 1e-4

    # ddpo sample --run: the run's base model with final/ through the family's own pipeline __call__.
    out = tmp_path / "samples"
    sample = ["sample", "--run", str(straight), "--prompt", "a red circle", "--seeds", "0", "--steps", "2"]
    assert main([*sample, "--out", str(out)]) == 0
    assert (out / "grid.png").is_file()

    trained, trained_family = load_model(pretrained, scheduler=FAMILIES[pretrained][1])
    assert trained_family.name == family
    from ddpo.models import add_lora

    model = trained_family.denoiser()
    add_lora(model, 4, 8.0, ["to_q", "to_k", "to_v", "to_out.0"])
    state = load_file(str(straight / "checkpoints" / "checkpoint_000002" / "trainable.safetensors"))
    named = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            named[key].copy_(value)
        expected = trained_family.bind(model, 3.0)(latents, t, cond)
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.usefixtures("fresh_accelerator_state")
@pytest.mark.parametrize("pretrained", list(FAMILIES))
def test_first_ratio_is_one_under_bf16_autocast(pretrained, tmp_path):
    """bf16 autocast, training minibatches of a different size than sampling (the old log-probs are recomputed in
    the training shapes): the first optimiser step's ratio is still exactly 1."""
    extra = ("mixed_precision=bf16", "train.batch_size=3", "train.gradient_accumulation_steps=2", "num_epochs=1")
    assert main(["train", "--preset", "tiny", *overrides(tmp_path, pretrained, "bf16", *extra)]) == 0
    (metrics,) = read_jsonl(tmp_path / "runs" / "bf16" / "metrics.jsonl")
    assert metrics["first_step_approx_kl"] == 0.0
    assert torch.isfinite(torch.tensor(metrics["loss"]))


@pytest.mark.parametrize(
    "pretrained, extra",
    [
        ("tiny_sd3", ("train.algorithm=nft", "sample.scheduler=flow_euler", "sample.eta=0", "train.kl_coef=0.1")),
        ("tiny_sd3", ("train.algorithm=awm", "sample.scheduler=flow_euler", "sample.eta=0")),
        ("tiny_flux", ("sample.scheduler=flow_cps", "sample.sde_window=[0,2]", "train.kl_coef=0.04")),
        ("tiny_sd3", ("train.kl_coef=0.04", "sample.samples_per_prompt=2", "train.advantage=group")),
        ("tiny_sd3", ("train.algorithm=ddpo_sf", "sample.scheduler=flow_sde", "sample.sde_window=[1,3]")),
        ("tiny_sd3", ("train.algorithm=rwr", "sample.scheduler=flow_cps")),
        ("tiny_flux", ("train.algorithm=nft", "sample.scheduler=flow_euler", "sample.eta=0")),
        ("tiny_sdxl", ("train.algorithm=nft", "sample.scheduler=dpmsolver++", "sample.eta=0", "train.kl_coef=0.1")),
        ("tiny_sdxl", ("train.algorithm=rwr_sparse", "train.kl_coef=0.04")),
    ],
    ids=[
        "sd3-nft-kl",
        "sd3-awm",
        "flux-fast-cps-kl",
        "sd3-grpo-kl",
        "sd3-sf-window",
        "sd3-rwr-cps",
        "flux-nft",
        "sdxl-nft-kl",
        "sdxl-rwr_sparse-kl",
    ],
)
def test_flow_variants_train(pretrained, extra, tmp_path, recorder):
    """The forward-process estimators (on the flow-matching loss and on an epsilon UNet), Flow-GRPO-Fast (an SDE
    window with CPS) and the KL to the base model train on the flow families: every training pair is used once, every
    minibatch's loss equals its paper's equation computed in float64 (:func:`check_forward_minibatch`,
    ``check_log_prob_minibatch``), the KL is 0 until the first update and positive after, and the weights change."""
    args = overrides(tmp_path, pretrained, "variant", "num_epochs=1", *extra)
    if any("sde_window" in e for e in extra):  # 2 SDE steps x 4 samples = 8 pairs = 2 x 4
        args += ["train.batch_size=2", "train.gradient_accumulation_steps=2"]
    if any("awm" in e or "nft" in e for e in extra):
        args += ["train.batch_size=2", "train.gradient_accumulation_steps=2"]
    if "sample.scheduler=flow_cps" in extra and not any("sde_window" in e for e in extra):
        args += ["train.batch_size=2", "train.gradient_accumulation_steps=2"]  # CPS: the last step is deterministic
    assert main(["train", "--preset", "tiny", *args]) == 0
    (metrics,) = read_jsonl(tmp_path / "runs" / "variant" / "metrics.jsonl")
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    config = build_config(preset="tiny", overrides=args)
    t = config.train
    flow = FAMILIES[pretrained][0] in ("sd3", "flux")
    forward = t.algorithm in ("awm", "nft")

    ((rewards, prompts, weights),) = recorder.epochs
    torch.testing.assert_close(weights.double(), hand_weights(config, rewards, prompts), rtol=1e-4, atol=1e-4)
    batches = recorder.minibatches
    assert len(batches) == t.gradient_accumulation_steps * metrics["global_step"]
    window = next((e.split("=")[1] for e in extra if "sde_window" in e), None)
    steps = {"[0,2]": {0, 1}, "[1,3]": {1, 2}}.get(window, {0, 1} if "flow_cps" in str(extra) else {0, 1, 2})
    pairs = Counter(zip(torch.cat([e["i"] for e in batches]).tolist(), torch.cat([e["j"] for e in batches]).tolist()))
    assert pairs == Counter({(i, j): 1 for i in range(4) for j in steps})  # each stochastic pair once
    for entry in batches:
        if forward:
            check_forward_minibatch(config, recorder, entry, flow)
        else:
            check_log_prob_minibatch(config, recorder, entry)
    if t.kl_coef > 0:
        assert batches[0]["info"]["kl"].item() == 0.0  # LoRA B = 0: the policy is still the base model
        assert all(e["info"]["kl"] > 0 for e in batches[t.gradient_accumulation_steps :])
        assert metrics["kl"] > 0
    weights = lora_weights(tmp_path / "runs" / "variant")
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k or "lora.up" in k)


def check_forward_minibatch(config, rec: LossRecorder, entry: dict, flow: bool) -> None:
    """One minibatch of a forward-process estimator against float64 references: the re-noised input is the forward
    process (flow matching ``(1 - s) x0 + s eps``, DDPM ``sqrt(abar) x0 + sqrt(1 - abar) eps``); the x0 prediction
    follows from the model's output (``x_t - s v``; ``(x_t - sqrt(1 - abar) eps_hat) / sqrt(abar)``); AWM's loss is the
    advantage-weighted pretraining loss (target ``eps - x0`` or ``eps``), DiffusionNFT's the implicit positive /
    negative policies' adaptively weighted errors, ``r = clip(A) / (2 A_max) + 1/2``; plus ``kl_coef`` times the mean
    squared distance of the raw output to the base model's."""
    t = config.train
    ((x_t, noise, level),) = rec.outputs(entry, "renoise")
    x0, eps, x_t = entry["x0"].double(), noise.double(), x_t.double()
    s = level.double().view(-1, 1, 1, 1)
    if flow:
        torch.testing.assert_close(x_t, (1 - s) * x0 + s * eps, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(x_t, s.sqrt() * x0 + (1 - s).sqrt() * eps, rtol=1e-5, atol=1e-5)
    outputs = rec.outputs(entry, "denoise")
    old = outputs.pop(0) if t.algorithm == "nft" or t.awm_ema_kl > 0 else None
    (x0_hat, raw), *base = outputs
    raw = raw.double()
    if flow:
        x0_pred, target = x_t - s * raw, eps - x0
    else:
        assert config.sample.scheduler in ("ddim", "dpmsolver++")  # the tiny SDXL UNet predicts the noise
        x0_pred, target = (x_t - (1 - s).sqrt() * raw) / s.sqrt(), eps
    torch.testing.assert_close(x0_hat.double(), x0_pred, rtol=1e-4, atol=1e-4)
    a = entry["weights"].double()
    if t.algorithm == "awm":
        expected = (a * ((raw - target) ** 2).mean(dim=DIMS)).mean()
    else:
        a_max, b = t.adv_clip_max, t.nft_beta
        r = a.clamp(-a_max, a_max) / (2 * a_max) + 0.5
        x0_old = old[0].double()
        positive, negative = b * x0_pred + (1 - b) * x0_old, (1 + b) * x0_old - b * x0_pred

        def adaptive(prediction: torch.Tensor) -> torch.Tensor:
            error = prediction - x0
            return (error**2).mean(dim=DIMS) / error.abs().mean(dim=DIMS).clamp(min=1e-5)

        expected = a_max * ((r * adaptive(positive) + (1 - r) * adaptive(negative)) / b).mean()
    if t.kl_coef > 0:
        ((_, raw_base),) = base
        kl = ((raw - raw_base.double()) ** 2).mean(dim=DIMS).mean()
        torch.testing.assert_close(entry["info"]["kl"].double(), kl, rtol=1e-4, atol=1e-9)
        expected = expected + t.kl_coef * kl
    else:
        assert not base
    torch.testing.assert_close(entry["loss"].double(), expected, rtol=1e-4, atol=1e-5)


def test_flow_sampler_on_a_diffusion_model_is_refused(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", *overrides(tmp_path, "tiny", "bad", "sample.scheduler=flow_sde")]) == 2
    assert "flow-matching sampler" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", *overrides(tmp_path, "tiny_sd3", "bad2", "sample.scheduler=ddim")]) == 2
    assert "use sample.scheduler=flow_sde" in capsys.readouterr().err
