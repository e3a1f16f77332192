"""Every model family through the CLI on its tiny random-weight configuration: it trains, resumes bit-exactly, the
first PPO ratio is exactly 1 (float32 and bf16 autocast), and its ``final/`` loads in the family's own diffusers
pipeline with ``load_lora_weights`` and changes the denoiser's output.

Runs are 16-px images (8x8 latents; 16 tokens for the transformers) so that each takes a few seconds on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddpo.cli import main
from ddpo.models import get_family, load_model
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
def test_flow_variants_train(pretrained, extra, tmp_path):
    """The forward-process estimators on the flow-matching loss, Flow-GRPO-Fast (an SDE window with CPS) and the
    KL to the base model train on the flow families and change the weights."""
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
    if any("kl_coef" in e for e in extra):
        assert metrics["kl"] >= 0
    weights = lora_weights(tmp_path / "runs" / "variant")
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k or "lora.up" in k)


def test_flow_sampler_on_a_diffusion_model_is_refused(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", *overrides(tmp_path, "tiny", "bad", "sample.scheduler=flow_sde")]) == 2
    assert "flow-matching sampler" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", *overrides(tmp_path, "tiny_sd3", "bad2", "sample.scheduler=ddim")]) == 2
    assert "use sample.scheduler=flow_sde" in capsys.readouterr().err
