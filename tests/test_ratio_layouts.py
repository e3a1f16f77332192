"""The PPO ratio is exactly 1 at an epoch's first optimiser step in every precision and batch layout (issue 18).

On the CPU these tests were written on (a 2-core Intel Xeon with AMX-BF16) the tiny and the world pipelines give the same bf16 outputs for a row at any batch size, but a UNet with
a 768-d cross-attention (Stable Diffusion 1.5's) does not: its key/value projections of 77 tokens pick another bf16
kernel for one prompt than for several, up to 1e-2 in a step's log-prob. :data:`BATCH_SENSITIVE_UNET` is the
smallest config found that shows it (96/192 channels, 8x8 latents, a 32 -> 768 text projection so the text encoder
stays tiny). Sampling 4 trajectories per UNet call and training on 1 or 2 pairs per call (with gradient
accumulation) then gives a ratio != 1 before any update unless the old log-probs come from the training shapes.
"""

from __future__ import annotations

import pytest

from ddpo.models.stable_diffusion import TINY_TEXT_ENCODER, TINY_VAE
from ddpo.training.config import ConfigError, build_config
from ddpo.training.trainer import Trainer
from world import build_sd_pipeline

BATCH_SENSITIVE_UNET = {
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (96, 192),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "cross_attention_dim": 768,
    "encoder_hid_dim": 32,
    "encoder_hid_dim_type": "text_proj",
    "sample_size": 8,
}


pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")  # these tests switch the mixed precision


@pytest.fixture(scope="module")
def sensitive_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("sensitive") / "pipe"
    vae = {**TINY_VAE, "sample_size": 16}
    build_sd_pipeline(unet=BATCH_SENSITIVE_UNET, vae=vae, text_encoder=TINY_TEXT_ENCODER, seed=0).save_pretrained(path)
    return path


def _first_epoch(model, tmp_path, precision, train_batch, accumulation, guidance=1.0, mode="auto"):
    overrides = [
        f"model.pretrained={model}",
        f"mixed_precision={precision}",
        # float32 text states: with bf16-encoded ones this model's outputs happen not to depend on the batch layout
        # on this CPU, and the test would no longer exercise the effect it guards against
        "model.text_encoder_precision=fp32",
        "sample.num_steps=2",
        f"sample.guidance_scale={guidance}",
        "sample.batch_size=4",
        "sample.num_batches_per_epoch=1",
        f"train.batch_size={train_batch}",
        f"train.gradient_accumulation_steps={accumulation}",
        f"train.old_log_probs={mode}",
        "train.timestep_fraction=1.0",
        "train.advantage=batch",
        "overlap_scoring=false",
        "log_images=false",
        f"output_dir={tmp_path}",
        "run_name=run",
    ]
    trainer = Trainer.from_config(build_config(preset="tiny", overrides=overrides))
    samples, rewards, _, _ = trainer.sample_and_score(0)
    weights = trainer.compute_weights(*trainer.gather(rewards, samples.prompts))
    return trainer.optimise(0, samples, weights)


@pytest.mark.parametrize(
    ("precision", "train_batch", "accumulation", "guidance"),
    [("bf16", 2, 2, 1.0), ("bf16", 1, 4, 1.0), ("bf16", 1, 1, 5.0), ("no", 1, 2, 1.0), ("bf16", 4, 1, 1.0)],
)
def test_ratio_is_one_at_the_first_step(sensitive_model, tmp_path, precision, train_batch, accumulation, guidance):
    info = _first_epoch(sensitive_model, tmp_path, precision, train_batch, accumulation, guidance)
    assert info["first_step_approx_kl"] == 0.0  # every pair of the first optimiser step: log-prob == old log-prob


def test_sampled_log_probs_differ_in_other_shapes_under_bf16(sensitive_model, tmp_path):
    """The effect the recomputation removes is real where the CPU's bf16 kernels depend on the batch layout (the
    2-core Intel Xeon with AMX-BF16 these tests were written on): the recomputation changes the log-probs recorded
    while sampling. Where every layout gives the same bf16 rows (measured on a 2-core AMD EPYC: a change of exactly 0)
    there is no effect to show, and the test says so instead of passing."""
    with pytest.raises(ConfigError, match="train.old_log_probs=sampled needs train.batch_size == sample.batch_size"):
        _first_epoch(sensitive_model, tmp_path, "bf16", 2, 2, mode="sampled")
    info = _first_epoch(sensitive_model, tmp_path, "bf16", 2, 2, mode="recompute")
    if info["old_log_prob_change_max"] == 0.0:
        pytest.skip("this CPU's bf16 kernels give the same rows at every batch size: no layout effect to demonstrate")
    assert info["old_log_prob_change_max"] > 1e-3


@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_later_inner_epochs_use_old_log_probs_from_the_training_shapes(sensitive_model, tmp_path, precision):
    """With ``timestep_fraction < 1`` each inner epoch trains on its own random steps of each trajectory, so the
    second inner epoch trains pairs the first did not. Their old log-probs must come from the training shapes too:
    with a learning rate too small to change any output (the LoRA update of 1e-30 vanishes in every sum), every ratio
    of both inner epochs is then exactly 1. Before, only inner epoch 0's pairs were re-scored and the others kept the
    log-probs recorded while sampling 4 trajectories per call. On the CPU this was written on (2-core AMD EPYC) bf16
    rows do not depend on the batch size but float32 rows do (about 1e-6 in a log-prob), so the float32 case is the
    one that shows it there; on a GPU or an Intel CPU with AMX-BF16 bf16 shows it as well."""
    overrides = [
        f"model.pretrained={sensitive_model}",
        f"mixed_precision={precision}",
        "model.text_encoder_precision=fp32",
        "sample.num_steps=4",
        "sample.guidance_scale=1.0",
        "sample.batch_size=4",
        "sample.num_batches_per_epoch=1",
        "train.batch_size=2",
        "train.gradient_accumulation_steps=2",
        "train.num_inner_epochs=2",
        "train.timestep_fraction=0.5",
        "train.learning_rate=1e-30",
        "train.advantage=batch",
        "overlap_scoring=false",
        "log_images=false",
        f"output_dir={tmp_path}",
        "run_name=run",
    ]
    trainer = Trainer.from_config(build_config(preset="tiny", overrides=overrides))
    samples, rewards, _, _ = trainer.sample_and_score(0)
    first, second = (set(zip(*(p.tolist() for p in trainer.training_pairs(0, k, 4)))) for k in (0, 1))
    assert second - first  # the second inner epoch trains pairs the first did not
    weights = trainer.compute_weights(*trainer.gather(rewards, samples.prompts))
    info = trainer.optimise(0, samples, weights)
    assert info["approx_kl"] == 0.0 and info["ratio_max"] == 1.0  # every pair of both inner epochs: ratio 1
