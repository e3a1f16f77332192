"""Guards, early stopping and the best checkpoint, through ``ddpo train`` on the tiny pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from ddpo.cli import main
from ddpo.training.runlog import read_jsonl

GUARDS = ["eval_rewards.brightness={}", "eval_rewards.contrast={}", "eval_rewards.saturation={}"]
EVAL = ["eval_prompts=simple_animals", "eval_samples=4", "eval_every=1"]


def _lora(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "pytorch_lora_weights.safetensors"))


def test_a_falling_guard_stops_the_run_at_the_first_evaluation_that_breaks_the_rule(fast_overrides, tmp_path, capsys):
    """The guards are logged at every evaluation; the run stops at the first one where a guard is more than
    the fraction ``stop.guard_drop`` of its base value (found here from eval.jsonl), checkpoints there, writes final/ with a
    model card that says so, and a resume with the same rules trains no further."""
    drop = 1e-6
    overrides = [*fast_overrides, "num_epochs=6", *EVAL, *GUARDS, f"stop.guard_drop={drop}"]
    assert main(["train", "--preset", "tiny", *overrides]) == 0
    run = tmp_path / "runs" / "run"
    evals = read_jsonl(run / "eval.jsonl")
    names = ("brightness", "contrast", "saturation")
    assert all(f"guard/{n}_mean" in e for e in evals for n in names)
    base = {n: evals[0][f"guard/{n}_mean"] for n in names}
    breaking = [e["epoch"] for e in evals[1:] if any((base[n] - e[f"guard/{n}_mean"]) / base[n] > drop for n in names)]
    assert breaking, "no guard fell at all: the test shows nothing"
    assert evals[-1]["epoch"] == breaking[0] < 6
    assert len(read_jsonl(run / "metrics.jsonl")) == breaking[0]
    assert (run / "checkpoints" / f"checkpoint_{breaking[0]:06d}").is_dir()
    assert f"stopping early after epoch {breaking[0]}: guard" in capsys.readouterr().out
    card = ModelCard.load(run / "final" / "README.md")
    assert (
        f"The run stopped early after epoch {breaking[0]}: guard" in card.text and "| brightness (guard) |" in card.text
    )
    before = _lora(run)
    assert main(["train", "--resume", str(run)]) == 0
    assert len(read_jsonl(run / "metrics.jsonl")) == breaking[0]
    assert "this run stopped early" in capsys.readouterr().out
    assert all(torch.equal(before[k], v) for k, v in _lora(run).items())


def test_final_is_the_best_evaluation_and_equals_a_run_stopped_there(fast_overrides, tmp_path):
    """With ``final_checkpoint=best`` final/ holds the weights of the evaluation with the highest held-out reward:
    the same tensors as a run of that many epochs with ``final_checkpoint=last`` (evaluations touch no training
    stream)."""
    overrides = [*fast_overrides, "num_epochs=3", *EVAL]
    assert main(["train", "--preset", "tiny", *overrides, "final_checkpoint=best"]) == 0
    run = tmp_path / "runs" / "run"
    evals = read_jsonl(run / "eval.jsonl")
    best = max(evals, key=lambda e: e["reward_mean"])["epoch"]  # the first of equal maxima, as the rules keep it
    chosen = _lora(run)
    card = ModelCard.load(run / "final" / "README.md")
    assert f"those of epoch {best}, the best held-out `reward_mean`" in card.text
    if best == 0:
        assert all(torch.count_nonzero(v) == 0 for k, v in chosen.items() if "lora_B" in k or "lora.up" in k)
        return
    short = [o for o in overrides if not o.startswith("run_name")] + ["run_name=short", f"num_epochs={best}"]
    assert main(["train", "--preset", "tiny", *short]) == 0
    reference = _lora(tmp_path / "runs" / "short")
    assert chosen.keys() == reference.keys()
    assert all(torch.equal(chosen[k], reference[k]) for k in chosen)
    state = json.loads((run / "checkpoints" / "checkpoint_000003" / "state.json").read_text())
    assert state["guards"]["best_epoch"] == best


def test_the_report_draws_each_guard_as_its_change_from_the_base(tmp_path):
    """``plot_rewards`` gets a "held-out guards" panel whose lines are each guard's held-out mean minus its first."""
    import yaml

    from ddpo.tools.report.runs import load_run, plot_rewards

    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"reward": {"name": "world"}, "eval_prompts": "world_heldout"}))
    lines = [{"epoch": e, "samples": 8 * (e + 1), "reward_mean": 0.5, "reward_std": 0.1} for e in range(2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    evals = [{"epoch": e, "reward_mean": 0.5, "guard/aes_mean": g} for e, g in ((0, 5.0), (2, 4.5))]
    (run / "eval.jsonl").write_text("".join(json.dumps(x) + "\n" for x in evals))
    fig = plot_rewards(load_run(run))
    (panel,) = [ax for ax in fig.axes if ax.get_title() == "held-out guards"]
    (line,) = [ln for ln in panel.get_lines() if ln.get_label() == "aes"]
    assert list(line.get_ydata()) == [0.0, -0.5]
    assert list(line.get_xdata()) == [0, 16]


def test_guards_change_no_training_tensor(fast_overrides, tmp_path):
    """A run with guards trains the same weights as one without: loading a guard's model (here the world CLIP, whose
    construction draws random numbers) leaves the streams that initialise and train the LoRA untouched."""
    plain = [o for o in fast_overrides if not o.startswith("run_name")] + ["num_epochs=1", *EVAL]
    guard = ["eval_rewards.clip_score={model: ddpo-world-clip, pretrained: world}"]
    assert main(["train", "--preset", "tiny", *plain, "run_name=plain"]) == 0
    assert main(["train", "--preset", "tiny", *plain, *guard, "run_name=guarded"]) == 0
    a, b = _lora(tmp_path / "runs" / "plain"), _lora(tmp_path / "runs" / "guarded")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "guard/clip_score_mean" in read_jsonl(tmp_path / "runs" / "guarded" / "eval.jsonl")[0]


def test_a_resume_between_evaluations_keeps_the_kl_of_the_epochs_before_it(fast_overrides, tmp_path):
    """``kl_to_base`` at an evaluation is the mean training KL of the epochs since the previous one, also when the run
    was resumed in between: the resumed run (from the checkpoint after epoch 1, as after a crash in epoch 2) logs the
    same value as the uninterrupted one."""
    import shutil

    overrides = [*fast_overrides, "num_epochs=2", "eval_prompts=simple_animals", "eval_samples=4", "eval_every=2"]
    overrides += ["train.kl_coef=0.5", "save_every=1", "keep_checkpoints=2"]
    assert main(["train", "--preset", "tiny", *overrides]) == 0
    run = tmp_path / "runs" / "run"
    whole = read_jsonl(run / "eval.jsonl")[-1]
    kls = [m["kl"] for m in read_jsonl(run / "metrics.jsonl")]
    assert whole["epoch"] == 2 and whole["kl_to_base"] == pytest.approx(sum(kls) / 2, rel=1e-12) and kls[1] > 0
    crashed = tmp_path / "crashed"
    shutil.copytree(run, crashed, ignore=shutil.ignore_patterns("checkpoint_000002", "final"))
    for name in ("metrics.jsonl", "eval.jsonl"):  # what a crash during epoch 2 leaves
        lines = (crashed / name).read_text().splitlines(keepends=True)
        (crashed / name).write_text("".join(lines[:1]))
    assert main(["train", "--resume", str(crashed)]) == 0
    assert read_jsonl(crashed / "eval.jsonl")[-1]["kl_to_base"] == whole["kl_to_base"]
