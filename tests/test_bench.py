"""The bench's reference mode (the straightforward ddpo-pytorch way) and ours compute the same maths: same sampled
trajectories, same per-pair losses and gradients, same epoch losses, optimiser steps and trained weights; the
trainer's public hooks that bench measures through (a timed decode, snapshot / restore) change nothing they measure;
and ``ddpo bench --json`` writes results consistent with its own runs. Timings are never compared with a number."""

from __future__ import annotations

import json
import time

import pytest
import torch

from ddpo.cli import main
from ddpo.policy.sampling import SamplerSettings, encode_prompts, sample_trajectories
from ddpo.tools.bench import PHASES, EpochBench, reference_minibatch_loss, reference_sample
from ddpo.training.config import build_config
from ddpo.training.streams import Stream, derive_seed


def _overrides(model_dir) -> list[str]:
    return [
        f"model.pretrained={model_dir}",
        "sample.num_steps=4",
        "sample.batch_size=2",
        "sample.num_batches_per_epoch=2",
        "train.batch_size=4",
        "train.timestep_fraction=1.0",
        "train.advantage=batch",
        "train.learning_rate=0.01",
    ]


@pytest.fixture(scope="module")
def bench(tiny_model_dir, tmp_path_factory) -> EpochBench:
    config = build_config(preset="tiny", overrides=_overrides(tiny_model_dir))
    bench = EpochBench(config, tmp_path_factory.mktemp("bench") / "run")
    # LoRA B starts at zero, which makes the gradients of A zero: give every adapter weight a value so that all
    # trainable tensors get a gradient to compare.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in bench.trainer.params:
            param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    bench.set_initial()
    return bench


def _sample(bench: EpochBench, reference: bool):
    tr, s = bench.trainer, bench.config.sample
    prompts = ["a cat", "a dog"]
    embeds = encode_prompts(tr.pipe.tokenizer, tr.pipe.text_encoder, prompts, tr.accelerator.device)
    generator = torch.Generator().manual_seed(derive_seed(0, Stream.SAMPLING_NOISE, 0, 0, 0))
    tr.denoiser.eval()
    args = (s.num_steps, s.guidance_scale, s.eta, generator)
    if reference:
        return reference_sample(tr.denoiser, tr.scheduler, embeds, tr.negative_cond, *args)
    settings = SamplerSettings("ddim", s.num_steps, s.guidance_scale, s.eta, "no", 8)
    out = sample_trajectories(
        tr.denoiser, tr.pipe.vae, tr.scheduler, embeds, tr.negative_cond, prompts, generator, settings
    )
    return out.latents, out.log_probs, out.timesteps


def test_reference_sampler_draws_the_same_trajectories(bench):
    ours, reference = _sample(bench, reference=False), _sample(bench, reference=True)
    torch.testing.assert_close(reference[2], ours[2])  # timesteps
    torch.testing.assert_close(reference[0], ours[0], rtol=1e-5, atol=1e-5)  # latents x_T .. x_0
    torch.testing.assert_close(reference[1], ours[1], rtol=1e-5, atol=1e-4)  # log-probs (~ -1 per latent dim)


def _grads(bench: EpochBench) -> list[torch.Tensor]:
    grads = [p.grad.detach().clone() for p in bench.trainer.params]
    bench.trainer.optimizer.zero_grad(set_to_none=True)
    return grads


def test_one_call_and_per_minibatch_calls_give_the_same_loss_and_gradients(bench):
    """Ours: 8 pairs in one UNet call. Reference: the same 8 pairs in 4 calls of 2, gradients accumulated."""
    bench.reset()
    tr = bench.trainer
    from ddpo.policy.sampling import Trajectories

    latents, log_probs, timesteps = _sample(bench, reference=False)
    samples = Trajectories(["a cat", "a dog"], None, tr.negative_cond, latents, log_probs, timesteps, None)
    samples.cond = encode_prompts(tr.pipe.tokenizer, tr.pipe.text_encoder, samples.prompts, latents.device)
    weights = torch.tensor([1.5, -0.7])
    i = torch.tensor([0, 1, 1, 0, 0, 1, 0, 1])
    j = torch.tensor([3, 0, 2, 1, 0, 3, 2, 1])
    tr.denoiser.train()
    tr.optimizer.zero_grad(set_to_none=True)

    loss_ours, info = tr.minibatch_loss(samples, weights, i, j)
    loss_ours.backward()
    grads_ours = _grads(bench)
    # Unchanged weights re-score their own samples: the importance ratio is 1 (the recomputation is faithful).
    assert abs(info["ratio_mean"].item() - 1) < 1e-5

    loss_ref = 0.0
    for start in range(0, 8, 2):
        loss, _ = reference_minibatch_loss(tr, samples, weights, i[start : start + 2], j[start : start + 2])
        loss = loss * 2 / 8
        loss.backward()
        loss_ref += loss.item()
    grads_ref = _grads(bench)

    assert loss_ours.item() == pytest.approx(loss_ref, abs=1e-6)
    assert any(g.abs().max() > 0 for g in grads_ours)
    # Float32 tolerance: each tensor's error is small next to its largest entry (the sum over pairs cancels).
    for g_ours, g_ref in zip(grads_ours, grads_ref):
        assert (g_ref - g_ours).norm() <= 1e-4 * g_ours.norm() + 1e-12
        torch.testing.assert_close(g_ref, g_ours, rtol=1e-3, atol=1e-4 * g_ours.abs().max().item())


def _pairs_and_steps(config) -> tuple[int, int]:
    """Training pairs of one epoch and its optimiser steps, counted from the config alone."""
    s, t = config.sample, config.train
    pairs = s.batch_size * s.num_batches_per_epoch * s.num_steps * t.num_inner_epochs  # timestep_fraction=1.0
    return pairs, pairs // (t.batch_size * t.gradient_accumulation_steps)


def test_a_whole_epoch_gives_the_same_losses_steps_and_weights_both_ways(bench):
    initial = [p.detach().clone() for p in bench.trainer.params]
    ours, reference = bench.run("ours"), bench.run("reference")
    assert set(PHASES) <= set(ours) and set(PHASES) <= set(reference)
    assert ours["loss"] == pytest.approx(reference["loss"], rel=1e-3, abs=1e-6)
    assert ours["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-3)
    # The same optimiser steps, as many as the config says: 2 batches x 2 images x 4 steps = 16 pairs, 8 per step.
    pairs, steps = _pairs_and_steps(bench.config)
    assert (pairs, steps) == (16, 2)
    assert ours["optimizer_steps"] == reference["optimizer_steps"] == steps
    assert ours["pairs_per_second"] == pytest.approx(pairs / ours["training_seconds"])
    # Both modes move the weights, and to the same place: the difference is float32 noise next to the update.
    trained_ours, trained_ref = bench.trained["ours"], bench.trained["reference"]
    update = max((trained_ours[n] - p).abs().max().item() for n, p in zip(bench.trainer.trainable_names, initial))
    assert update > 1e-3  # lr 0.01, 2 Adam steps
    difference = max((trained_ours[n] - trained_ref[n]).abs().max().item() for n in trained_ours)
    assert difference < 1e-2 * update  # Adam's normalised steps magnify float32 noise of tiny gradients
    assert bench.weight_update_difference < 1e-2
    # Each mode decodes once per sampling batch, and its decoding is timed apart from the denoising loop.
    assert ours["decode_calls"] == reference["decode_calls"] == bench.config.sample.num_batches_per_epoch
    assert ours["decoding_seconds"] > 0 and reference["decoding_seconds"] > 0


def test_snapshot_and_restore_repeat_an_epoch_exactly(bench):
    """Two epochs of ours from the same restored state are bit-identical, and restore brings back the exact weights,
    optimiser state and global step of the snapshot."""
    tr = bench.trainer
    first = bench.run("ours")
    after_first = {k: v.clone() for k, v in tr.trainable_state().items()}
    assert tr.global_step == first["optimizer_steps"] > 0
    second = bench.run("ours")
    assert second["loss"] == first["loss"] and second["grad_norm"] == first["grad_norm"]
    assert all(torch.equal(after_first[k], v) for k, v in tr.trainable_state().items())
    tr.restore(bench.initial)
    assert tr.global_step == 0
    assert all(torch.equal(p, q) for p, q in zip(tr.params, bench.initial.params, strict=True))
    assert tr.optimizer.state_dict()["state"] == {}  # the initial optimiser had taken no step


def test_a_timed_decode_is_part_of_sampling_and_changes_no_image(bench):
    """sample_and_score's ``decode`` hook runs the sampler's decoding (the same images, bit for bit); the time it
    takes is inside ``sampling_seconds``."""
    from ddpo.policy.sampling import decode_latents

    tr, s = bench.trainer, bench.config.sample
    bench.reset()
    with tr.scoring_executor():
        plain, plain_rewards, _, _ = tr.sample_and_score(0)
        calls = []

        def slow_decode(vae, latents, *args, **kwargs):
            calls.append(latents.shape[0])
            time.sleep(0.25)
            return decode_latents(vae, latents, *args, **kwargs)

        timed, timed_rewards, _, timings = tr.sample_and_score(0, decode=slow_decode)
    assert calls == [s.batch_size] * s.num_batches_per_epoch
    assert torch.equal(timed.images, plain.images) and torch.equal(timed_rewards, plain_rewards)
    assert timings["sampling_seconds"] >= 0.25 * s.num_batches_per_epoch


def test_ddpo_bench_writes_the_documented_json(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "bench.json"
    args = ["bench", "--preset", "tiny", "--json", str(path), "--repeats", "1", "--warmup", "0", "--threads", "1"]
    assert main([*args, *_overrides(tiny_model_dir), "sample.num_batches_per_epoch=1", "train.batch_size=2"]) == 0
    result = json.loads(path.read_text())
    for mode in ("ours", "reference"):
        keys = set(PHASES) | {"images_per_second", "pairs_per_second", "peak_memory_mib", "loss"}
        assert keys <= set(result[mode]), mode
        (run,) = result["runs"][mode]  # one repeat: the median is that run
        assert result[mode] == run
        # The phases are parts of the epoch: they add up to no more than its total.
        phases = sum(run[k] for k in PHASES if k != "total_seconds")
        assert 0 < phases <= run["total_seconds"] * (1 + 1e-9)
        # 1 batch x 2 images x 4 steps = 8 pairs, 4 per optimiser step (train.batch_size=2, 2 accumulated).
        assert run["optimizer_steps"] == 2 and run["decode_calls"] == 1
        assert run["images_per_second"] == pytest.approx(2 / (run["sampling_seconds"] + run["decoding_seconds"]))
    assert result["ratio_total"] == pytest.approx(
        result["ours"]["total_seconds"] / result["reference"]["total_seconds"]
    )
    assert result["max_abs_loss_difference"] == abs(result["ours"]["loss"] - result["reference"]["loss"]) < 1e-5
    assert result["weight_update_difference"] < 1e-2
    out = capsys.readouterr().out
    assert "ratio_total" in out and "training (s)" in out


def test_bench_refuses_what_the_reference_does_not_implement(tiny_model_dir, capsys):
    args = ["bench", "--preset", "tiny", "--repeats", "1", *_overrides(tiny_model_dir), "sample.scheduler=ddpm"]
    args += ["sample.eta=1.0"]
    assert main([*args, "train.timestep_fraction=1.0", "train.batch_size=3"]) == 2
    assert "sample.scheduler=ddim or --mode ours" in capsys.readouterr().err


def test_memory_and_speed_options_keep_the_maths(bench, tiny_model_dir, tmp_path):
    """Channels-last weights and gradient checkpointing change how, not what: the epoch's loss is unchanged."""
    overrides = [*_overrides(tiny_model_dir), "model.channels_last=true", "train.gradient_checkpointing=true"]
    other = EpochBench(build_config(preset="tiny", overrides=overrides), tmp_path / "run")
    with torch.no_grad():
        for param, value in zip(other.trainer.params, bench.initial.params):
            param.copy_(value)
    other.set_initial()
    assert other.trainer.accelerator.unwrap_model(other.trainer.denoiser).is_gradient_checkpointing
    loss = bench.run("ours")["loss"]
    assert other.run("ours")["loss"] == pytest.approx(loss, rel=1e-3, abs=1e-6)
    # The reference mode runs the plain UNet and gives the options back afterwards.
    assert other.run("reference")["loss"] == pytest.approx(loss, rel=1e-3, abs=1e-6)
    assert other.trainer.accelerator.unwrap_model(other.trainer.denoiser).is_gradient_checkpointing


def test_8bit_optimizer_without_bitsandbytes_says_how_to_install(fast_overrides, capsys):
    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    assert main(["train", "--preset", "tiny", *fast_overrides, "train.optimizer=adamw8bit"]) == 2
    assert "pip install bitsandbytes" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", *fast_overrides, "train.optimizer=sgd"]) == 2
    assert "train.optimizer must be adamw or adamw8bit" in capsys.readouterr().err


def test_calibrate_times_the_candidates_recommends_the_fastest_and_caches(fast_settings, tmp_path, monkeypatch, capsys):
    from ddpo.tools.bench import calibrate_main

    monkeypatch.setenv("DDPO_CACHE", str(tmp_path / "cache"))
    overrides = [f"{k}={v}" for k, v in fast_settings.items()]
    config = build_config(preset="tiny", overrides=[*overrides, f"output_dir={tmp_path}"])
    result = calibrate_main(config, repeats=1)
    choices = [row["choice"] for row in result["rows"]]
    assert "train.batch_size=2" in choices and "train.batch_size=4" in choices  # sample.batch_size and train's
    assert choices[-1].endswith("model.channels_last=true")
    sizes = [row for row in result["rows"] if "channels_last" not in row["choice"]]
    assert result["recommended"][0] == min(sizes, key=lambda row: row["seconds_per_pair"])["choice"]
    assert all(row["seconds_per_pair"] > 0 for row in result["rows"])
    out = capsys.readouterr().out
    assert "recommended overrides: train.batch_size=" in out
    assert calibrate_main(config, repeats=1) == result  # read back from the cache, not measured again
    assert "cached calibration" in capsys.readouterr().out
