"""End to end through the CLI on a tiny real pipeline: the run-directory contract, reloading in plain diffusers,
exact resume, and failures that must stop a run early and leave its checkpoints intact."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from ddpo.cli import main
from ddpo.training import checkpoint
from ddpo.training.runlog import read_jsonl

TIMING = {"sampling_seconds", "scoring_seconds", "training_seconds", "epoch_seconds", "reward_compute_seconds"}
TIMING |= {"eval_seconds"}


def read_metrics(run: Path) -> list[dict]:
    return read_jsonl(run / "metrics.jsonl")


def test_two_epochs_write_the_whole_contract_and_final_loads_in_diffusers(fast_overrides, tiny_model_dir, tmp_path):
    assert main(["train", "--preset", "tiny", "num_epochs=2", "keep_checkpoints=1", *fast_overrides]) == 0
    run = tmp_path / "runs" / "run"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["num_epochs"] == 2 and config["model"]["pretrained"] == str(tiny_model_dir)
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [0, 1]
    required = {"epoch", "global_step", "samples", "reward_mean", "reward_std", "loss", "approx_kl", "clipfrac"}
    required |= {"ratio_mean", "grad_norm", "sampling_seconds", "scoring_seconds", "training_seconds"}
    assert required <= set(metrics[0])
    # 4 samples x 4 steps = 16 pairs per epoch, 4 per optimiser step.
    assert metrics[0]["samples"] == 4 and metrics[1]["global_step"] == 8
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    assert (run / "samples" / "epoch_0000.png").is_file() and (run / "samples" / "epoch_0001.txt").is_file()
    assert list((run / "tensorboard").rglob("events.out.tfevents*")), "no TensorBoard events written"
    # newest-1 kept, and the last one is the end of the run
    assert [p.name for p in checkpoint.list_checkpoints(run / "checkpoints")] == ["checkpoint_000002"]
    assert not list((run / "checkpoints").glob(".tmp-*"))

    # final/ loads into a fresh plain diffusers pipeline, every LoRA tensor lands, and the output changes.
    saved = load_file(str(run / "final" / "pytorch_lora_weights.safetensors"))
    assert saved and all(k.startswith("unet.") for k in saved)
    base = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    base.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=4, guidance_scale=5.0, output_type="pt", height=16, width=16)
    before = base("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    base.load_lora_weights(run / "final")
    lora_params = {n: p for n, p in base.unet.named_parameters() if "lora" in n}
    assert len(lora_params) == len(saved), "some LoRA tensors did not load"
    after = base("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (after - before).abs().max() > 1e-4


def _reference_folder(path: Path) -> Path:
    """Eight flat orange 16-px PNGs: the discriminator's reference style."""
    from PIL import Image

    path.mkdir()
    for i in range(8):
        Image.new("RGB", (16, 16), (255, 128 + i, 0)).save(path / f"{i}.png")
    return path


def test_resume_matches_an_uninterrupted_run(fast_overrides, tmp_path):
    """Weights, metrics and the online discriminator's state all continue exactly across a resume."""
    reference = _reference_folder(tmp_path / "reference")
    options = {"reference_dir": str(reference), "image_size": 16, "steps_per_epoch": 2, "batch_size": 4}
    components = {"jpeg_compressibility": 1.0, "discriminator": {"weight": 0.5, "options": options}}
    reward = "reward.options=" + json.dumps({"components": components})  # JSON is YAML
    straight = [o for o in fast_overrides if not o.startswith("run_name")] + ["reward.name=weighted", reward]
    straight += ["eval_prompts=simple_animals", "eval_samples=3", "eval_every=1"]  # 3 images: chunks of 2 and 1
    assert main(["train", "--preset", "tiny", "num_epochs=4", "run_name=straight", *straight]) == 0
    assert main(["train", "--preset", "tiny", "num_epochs=2", "run_name=split", *straight]) == 0
    split = tmp_path / "runs" / "split"
    assert main(["train", "--resume", str(split), "num_epochs=4"]) == 0
    a = load_file(str(tmp_path / "runs" / "straight" / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(split / "final" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    strip = lambda ms: [{k: v for k, v in m.items() if k not in TIMING} for m in ms]  # noqa: E731
    metrics = strip(read_metrics(tmp_path / "runs" / "straight"))
    assert metrics == strip(read_metrics(split))
    assert {"reward/jpeg_compressibility_mean", "reward/discriminator_mean", "reward/discriminator_loss"} <= set(
        metrics[-1]
    )
    assert (split / "checkpoints" / "checkpoint_000004" / "reward.pt").is_file()
    evals = [strip(read_jsonl(run / "eval.jsonl")) for run in (tmp_path / "runs" / "straight", split)]
    assert [e["epoch"] for e in evals[0]] == [0, 1, 2, 3, 4] and evals[0] == evals[1]
    assert all(e["samples"] == 3 and "reward/jpeg_compressibility_mean" in e for e in evals[0])
    assert yaml.safe_load((split / "config.yaml").read_text())["num_epochs"] == 4


def test_held_out_evaluation_is_paired_across_runs_and_reported(fast_overrides, tiny_model_dir, tmp_path, capsys):
    """The evaluation set (prompts and noise) is fixed: runs with different seeds score the same base-model images
    before training, and the same images again in a fresh evaluation of the base pipeline."""
    from ddpo.training.evaluation import eval_prompt_list
    from ddpo.training.prompts import load_prompts

    common = [o for o in fast_overrides if not o.startswith("run_name")]
    common += ["eval_prompts=simple_animals", "eval_samples=4", "num_epochs=2"]
    for seed in (0, 1):
        assert main(["train", "--preset", "tiny", f"seed={seed}", f"run_name=s{seed}", *common]) == 0
    out = capsys.readouterr().out
    assert "held-out (simple_animals, the same 4 prompts and noise each time)" in out
    runs = [tmp_path / "runs" / f"s{seed}" for seed in (0, 1)]
    evals = [read_jsonl(run / "eval.jsonl") for run in runs]
    assert [[e["epoch"] for e in ev] for ev in evals] == [[0, 2], [0, 2]]
    assert evals[0][0]["reward_mean"] == evals[1][0]["reward_mean"]  # same base images, whatever the seed
    grids = [(run / "samples" / "epoch_0000.png").read_bytes() for run in runs]
    assert grids[0] != grids[1]  # while the seeds' training samples differ
    assert evals[0][1]["reward_mean"] != evals[0][0]["reward_mean"]  # the fine-tuned policy draws other images
    # Per-image rewards, paired: the summary's change and its standard error, by hand.
    before, after = (evals[1][k]["rewards"] for k in (0, 1))
    assert len(before) == 4 and sum(before) / 4 == pytest.approx(evals[1][0]["reward_mean"], abs=1e-12)
    diff = [a - b for a, b in zip(after, before)]
    mean = sum(diff) / 4
    se = (sum((d - mean) ** 2 for d in diff) / 3) ** 0.5 / 2
    assert f"paired change {mean:+.4f} +- {se:.2g} (standard error over the 4 images" in out
    # Held-out reward against samples seen: 4 samples an epoch (2 batches of 2), evaluations after 0 and 2 epochs.
    assert (
        f"held-out reward against samples seen: 0 -> {evals[1][0]['reward_mean']:.4g}, "
        f"8 -> {evals[1][1]['reward_mean']:.4g}"
    ) in out
    # The prompts are a fixed draw of the set (distinct while the set is large enough); the grid shows chunk 0.
    prompts = eval_prompt_list(load_prompts("simple_animals"), 4)
    assert len(set(prompts)) == 4 and set(prompts) <= set(load_prompts("simple_animals"))
    table = (runs[0] / "samples" / "eval_epoch_0000.txt").read_text().splitlines()[1:]
    assert [line.split("\t")[2] for line in table] == prompts[:2]  # chunk 0 = sample.batch_size images
    assert (runs[0] / "samples" / "eval_epoch_0002.png").is_file()
    # The summary prints the code that loads the result with its base model; it runs as printed.
    block = out.rsplit("load them with their base model", 1)[1].split("  or sample and compare")[0]
    code = "\n".join(line.removeprefix("    ") for line in block.splitlines()[1:])
    assert str(runs[1] / "final") in code and str(tiny_model_dir.resolve()) in code
    namespace: dict = {}
    exec(code, namespace)
    assert any("lora" in name for name, _ in namespace["pipe"].unet.named_parameters())


def test_resume_drops_metrics_of_epochs_after_the_checkpoint(fast_overrides, tmp_path):
    assert main(["train", "--preset", "tiny", "num_epochs=2", "save_every=5", *fast_overrides]) == 0
    run = tmp_path / "runs" / "run"
    # Simulate a crash after epoch 3's metrics were written but before its checkpoint: the checkpoint is at 2.
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "reward_mean": 123.0}) + "\n")
    assert main(["train", "--resume", str(run), "num_epochs=3"]) == 0
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [0, 1, 2] and metrics[2]["reward_mean"] != 123.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.learning_rat=1e-3", "Did you mean 'train.learning_rate'"),
        ("train.learning_rate=fast", "train.learning_rate: expected a number"),
        ("sample.num_stepz=3", "Did you mean 'sample.num_steps'"),
        ("train.batch_size=2.5", "train.batch_size: expected an integer"),
        ("model.pretrained=/no/such/model", "does not exist"),
        ("sample.eta=0", "sample.eta must be > 0"),
        ("train.batch_size=3", "not a multiple of train.batch_size"),
        ("reward.name=jpeg_compressibilty", "Did you mean 'jpeg_compressibility'"),
    ],
)
def test_bad_config_gives_a_clear_error(fast_overrides, override, message, capsys):
    assert main(["train", "--preset", "tiny", *fast_overrides, override]) == 2
    assert message in capsys.readouterr().err


def test_empty_prompt_file_gives_a_clear_error(fast_overrides, tmp_path, capsys):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n# only a comment\n")
    assert main(["train", "--preset", "tiny", *fast_overrides, f"prompts={empty}"]) == 2
    err = capsys.readouterr().err
    assert "holds no prompt" in err and str(empty) in err


def test_unknown_preset_and_run_dir_reuse(fast_overrides, capsys):
    assert main(["train", "--preset", "tinyy", *fast_overrides]) == 2
    assert "Did you mean 'tiny'" in capsys.readouterr().err


def test_nan_reward_stops_before_any_update_and_keeps_the_checkpoint(fast_overrides, tmp_path, monkeypatch, capsys):
    assert main(["train", "--preset", "tiny", "num_epochs=1", *fast_overrides]) == 0
    run = tmp_path / "runs" / "run"
    before = load_file(str(run / "checkpoints" / "checkpoint_000001" / "trainable.safetensors"))
    module = tmp_path / "bad_reward.py"
    module.write_text(
        "import torch\n"
        "import rewards\n"
        "@rewards.reward_function\n"
        "def nan_reward(images, prompts):\n"
        "    out = torch.zeros(len(prompts))\n"
        "    out[1] = float('nan')\n"
        "    return out\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(
        ["train", "--resume", str(run), "--trust-import-path", "num_epochs=2", "reward.name=bad_reward:nan_reward"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert re.search(r"non-finite values at sample indices \[1\].*\(epoch 1, batch 0: samples 0-1 of process 0\)", err)
    after = load_file(str(run / "checkpoints" / "checkpoint_000001" / "trainable.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.name for p in checkpoint.list_checkpoints(run / "checkpoints")] == ["checkpoint_000001"]


def test_a_raising_user_reward_is_one_message_naming_it_and_the_samples(fast_overrides, tmp_path, capsys, monkeypatch):
    """An exception inside the user's reward: one line naming the reward, the exception and the batch's sample
    indices, exit code 2, no traceback; with DDPO_DEBUG=1 (or --debug) also the traceback into the user's code."""
    (tmp_path / "raising_reward.py").write_text(
        "import rewards\n"
        "@rewards.reward_function\n"
        "def boom(images, prompts):\n"
        "    raise ZeroDivisionError('my reward failed')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["train", "--preset", "tiny", "--trust-import-path", "num_epochs=1", "reward.name=raising_reward:boom"]
    assert main([*args, *fast_overrides]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("ddpo: error:") == 1
    assert (
        "ddpo: error: reward 'raising_reward:boom' raised ZeroDivisionError: my reward failed (epoch 0, batch 0: "
        "samples 0-1 of process 0)" in err
    )
    monkeypatch.setenv("DDPO_DEBUG", "1")
    overrides = [o for o in fast_overrides if not o.startswith("run_name")] + ["run_name=debug"]
    assert main([*args, *overrides]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "raise ZeroDivisionError('my reward failed')" in err


def test_resume_of_a_run_without_checkpoint_starts_it_over_and_says_so(fast_overrides, tmp_path, capsys):
    """A run killed before its first checkpoint has a config.yaml and nothing to continue: --resume starts it from
    the beginning (and prints its process layout, as every run does) instead of refusing."""
    assert main(["train", "--preset", "tiny", "num_epochs=1", "sample.resolution=24", *fast_overrides]) == 0
    run = tmp_path / "runs" / "run"
    first = read_metrics(run)
    out = capsys.readouterr().out
    assert "ddpo: 1 process; per epoch 4 samples (4 per process" in out
    assert "per optimiser step 4 (trajectory, timestep) pairs" in out and "4 optimiser steps an epoch" in out
    assert "ddpo: 1 process on cpu; 24 px images" in out
    import shutil

    shutil.rmtree(run / "checkpoints")
    shutil.rmtree(run / "final")
    assert main(["train", "--resume", str(run)]) == 0
    assert "has no checkpoint yet; starting the run from the beginning (epoch 0)" in capsys.readouterr().out
    again = read_metrics(run)
    assert [m["epoch"] for m in again] == [0]
    assert {k: v for k, v in again[0].items() if k not in TIMING} == {
        k: v for k, v in first[0].items() if k not in TIMING
    }
    from PIL import Image

    assert Image.open(run / "samples" / "epoch_0000.png").size[1] > 24  # grids of 24-px images (plus captions)
