"""Every algorithm, the KL term (LoRA: adapters off; full fine-tuning: a frozen copy), full fine-tuning's final/
pipeline folder, DDPM sampling and group advantages each run end to end on the tiny pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from ddpo.cli import main


def _metrics(tmp_path):
    return [json.loads(line) for line in (tmp_path / "runs" / "run" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "extra",
    [
        ["train.algorithm=ddpo_sf"],
        ["train.algorithm=rwr", "train.rwr_temperature=0.5"],
        ["train.algorithm=rwr_sparse", "train.rwr_quantile=0.5"],
        ["train.kl_coef=0.5"],
        ["sample.scheduler=ddpm", "train.batch_size=3"],
        ["sample.samples_per_prompt=2", "train.advantage=group"],
        ["train.advantage=per_prompt", "train.per_prompt_min_count=2", "train.num_inner_epochs=2"],
    ],
)
def test_variants_run_and_log_finite_metrics(fast_overrides, tmp_path, extra):
    assert main(["train", "--preset", "tiny", "num_epochs=1", *fast_overrides, *extra]) == 0
    (metrics,) = _metrics(tmp_path)
    assert all(torch.isfinite(torch.tensor(float(v))) for v in metrics.values() if isinstance(v, (int, float)))
    if "train.kl_coef=0.5" in extra:
        # Before the first update the adapter is zero, so the policy equals the base: the first KL terms are 0,
        # later ones are small but non-negative.
        assert metrics["kl"] >= 0
    if "sample.scheduler=ddpm" in extra:
        # 4 samples x 3 stochastic steps (the last DDPM step is deterministic) = 12 pairs = 4 minibatches of 3.
        assert metrics["global_step"] == 4


def test_full_fine_tuning_with_kl_writes_a_pipeline_folder(fast_overrides, tiny_model_dir, tmp_path):
    assert (
        main(
            ["train", "--preset", "tiny", "num_epochs=1", "model.use_lora=false", "train.kl_coef=0.1", *fast_overrides]
        )
        == 0
    )
    (metrics,) = _metrics(tmp_path)
    assert metrics["kl"] >= 0
    final = tmp_path / "runs" / "run" / "final"
    tuned = StableDiffusionPipeline.from_pretrained(final, safety_checker=None)
    base = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    changed = [
        name
        for (name, a), (_, b) in zip(tuned.unet.named_parameters(), base.unet.named_parameters())
        if not torch.equal(a, b)
    ]
    assert changed, "full fine-tuning left every UNet weight unchanged"
    for (_, a), (_, b) in zip(tuned.vae.named_parameters(), base.vae.named_parameters()):
        assert torch.equal(a, b)  # the VAE is frozen


def test_timestep_window_trains_only_the_first_steps(fast_overrides, tmp_path):
    """With ``timestep_window=0.5`` every training pair comes from the first half of the denoising steps (the
    noisiest), each trajectory contributing ``timestep_fraction`` of that half, distinct steps."""
    from ddpo.training.config import build_config
    from ddpo.training.trainer import Trainer

    overrides = [o for o in fast_overrides if not o.startswith("sample.num_steps")]
    overrides += ["sample.num_steps=8", "train.timestep_window=0.5", "train.timestep_fraction=0.5"]
    trainer = Trainer.from_config(build_config(preset="tiny", overrides=overrides), tmp_path / "run")
    assert trainer.steps_per_trajectory == 2
    for epoch, inner in [(0, 0), (1, 0), (0, 1)]:
        trajs, steps = trainer.training_pairs(epoch, inner, num_samples=6)
        assert trajs.shape == steps.shape == (12,)
        assert int(steps.max()) < 4 and int(steps.min()) >= 0
        for i in range(6):
            mine = steps[trajs == i].tolist()
            assert len(mine) == 2 and len(set(mine)) == 2
    seen = torch.cat([trainer.training_pairs(e, 0, 6)[1] for e in range(20)])
    assert set(seen.tolist()) == {0, 1, 2, 3}  # the whole window is used over epochs


def test_shared_initial_noise_in_training_batches_only(fast_overrides, tmp_path):
    """``sample.share_initial_noise``: the training samples of a prompt group share x_T; the option needs groups."""
    from ddpo.training.config import ConfigError, build_config
    from ddpo.training.trainer import Trainer

    overrides = [*fast_overrides, "sample.samples_per_prompt=2", "sample.share_initial_noise=true"]
    overrides += ["overlap_scoring=false"]  # sample_and_score outside run(): no scoring thread
    trainer = Trainer.from_config(build_config(preset="tiny", overrides=overrides), tmp_path / "run")
    samples, rewards, _, _ = trainer.sample_and_score(0)
    x_t = samples.latents[:, 0]
    assert len(samples.prompts) == 4  # two sampling batches of one prompt x 2 samples
    for a in range(4):
        for b in range(4):
            assert torch.equal(x_t[a], x_t[b]) == (a // 2 == b // 2)
    assert torch.isfinite(rewards).all()
    with pytest.raises(ConfigError, match="samples_per_prompt > 1"):
        build_config(preset="tiny", overrides=["sample.share_initial_noise=true"])
