"""``ddpo eval --pass-at``: the unbiased pass@k estimator against an enumeration of subsets, the world reward's
per-check pass/fail against rendered ground truth, and the command on the shipped model and on a run, checked
against its own per-image table."""

from __future__ import annotations

import csv
import itertools
import json
import math

import pytest
import torch
import yaml

import world
from ddpo.cli import main
from ddpo.training.evaluation import pass_at_k
from rewards.world import WorldReward


@pytest.mark.parametrize("n, k", [(1, 1), (4, 1), (4, 2), (5, 3), (6, 6)])
def test_pass_at_k_is_the_share_of_k_subsets_with_a_pass(n, k):
    """pass@k = the fraction of the C(n, k) subsets of a prompt's samples that hold at least one passing sample
    (enumerated), equal to 1 - C(n - c, k) / C(n, k) (Chen et al. 2021) for every count c."""
    rows = torch.tensor([[j < c for j in range(n)] for c in range(n + 1)])
    expected = [
        sum(any(row[i] for i in subset) for subset in itertools.combinations(range(n), k)) / math.comb(n, k)
        for row in rows.tolist()
    ]
    got = pass_at_k(rows, k)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    for c, value in enumerate(got.tolist()):
        assert value == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_1_is_the_pass_rate_and_bad_k_is_refused():
    passed = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(pass_at_k(passed, 1), torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="pass@5 needs at least 5 samples"):
        pass_at_k(passed, 5)
    with pytest.raises(ValueError, match=r"\[prompts, samples\]"):
        pass_at_k(passed.flatten(), 1)


def test_world_pass_fail_on_renders_and_on_contradicting_ones():
    reward = WorldReward()
    captions = ["a red circle on a white background", "a blue square and a yellow triangle on a grey background"]
    images, _ = world.render_captions(captions, seed=0)
    checks = reward.pass_fail(images, captions)
    assert set(checks) == {"colour", "shape", "count", "background", "all"}
    assert all(value.dtype == torch.bool and value.all() for value in checks.values())
    wrong = ["a red circle on a black background", "a blue circle and a yellow triangle on a grey background"]
    checks = reward.pass_fail(images, wrong)
    assert checks["background"].tolist() == [False, True]
    assert checks["shape"].tolist() == [True, False]
    assert checks["colour"].all() and checks["count"].all()
    assert checks["all"].tolist() == [False, False]
    assert not reward.pass_fail(images, ["a dog", "a cat"])["colour"].any()  # outside the grammar: nothing passes


def _check_table(out, ks):
    """The printed/JSON table recomputed from the per-image CSV, per model."""
    rows = list(csv.DictReader((out / "pass_at_k.csv").open()))
    summary = json.loads((out / "pass_at_k.json").read_text())
    for entry in summary:
        mine = [r for r in rows if r["model"] == entry["model"]]
        prompts = list(dict.fromkeys(r["prompt"] for r in mine))
        assert entry["prompts"] == len(prompts)
        for check in ("colour", "shape", "count", "background", "all"):
            for k in ks:
                per_prompt = []
                for prompt in prompts:
                    values = [int(r[check]) for r in mine if r["prompt"] == prompt]
                    n, c = len(values), sum(values)
                    per_prompt.append(1 - math.comb(n - c, k) / math.comb(n, k))
                assert entry["pass_at"][check][str(k)]["mean"] == pytest.approx(sum(per_prompt) / len(per_prompt))
        rewards_mean = sum(float(r["reward"]) for r in mine) / len(mine)
        assert entry["reward_mean"] == pytest.approx(rewards_mean, abs=1e-6)
    return summary, rows


def test_pass_at_k_of_the_shipped_world_model(tmp_path, capsys):
    out = tmp_path / "pass"
    args = ["eval", "--model", "world", "--pass-at", "1", "2", "--count", "3", "--steps", "2", "--out", str(out)]
    assert main(args) == 0
    summary, rows = _check_table(out, [1, 2])
    assert [entry["model"] for entry in summary] == ["world"]
    assert summary[0]["seeds"] == [1000, 1001]  # max(k) seeds from 1000 by default
    assert len(rows) == 6 and {r["prompt"] for r in rows} <= set(world.split_captions()[1])  # world_heldout
    printed = capsys.readouterr().out
    assert "pass@1" in printed and "pass@2" in printed and "3 prompts x 2 noise seeds" in printed


def test_pass_at_k_of_a_run_and_its_base_on_the_same_noise(tiny_model_dir, tmp_path):
    """A run (here: the tiny model with a random LoRA, scored by the world reward) gets its base's table and its own
    from the same seeds."""
    from diffusers import StableDiffusionPipeline

    from ddpo.models import add_lora, lora_state_dict

    run = tmp_path / "run"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    add_lora(pipe.unet, 4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
    StableDiffusionPipeline.save_lora_weights(run / "final", unet_lora_layers=lora_state_dict(pipe.unet))
    config = {
        "prompts": "world_train",
        "eval_prompts": "world_heldout",
        "model": {"pretrained": str(tiny_model_dir), "revision": None, "use_lora": True},
        "sample": {"scheduler": "ddim", "num_steps": 2, "eta": 1.0, "guidance_scale": 5.0, "negative_prompt": ""},
        "reward": {"name": "world", "options": {}},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "pass"
    assert (
        main(["eval", str(run), "--pass-at", "1", "3", "--count", "2", "--seeds", "5", "6", "7", "--out", str(out)])
        == 0
    )
    summary, rows = _check_table(out, [1, 3])
    assert [entry["model"] for entry in summary] == [f"base {tiny_model_dir}", str(run)]
    assert all(entry["seeds"] == [5, 6, 7] for entry in summary)
    base = [(r["prompt"], r["seed"]) for r in rows if r["model"] == summary[0]["model"]]
    tuned = [(r["prompt"], r["seed"]) for r in rows if r["model"] == summary[1]["model"]]
    assert base == tuned and len(base) == 6


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "--model", "world"], "--model needs --pass-at"),
        (["eval", "--model", "world", "--pass-at", "4", "--seeds", "1", "2"], "--pass-at 4 needs at least 4 samples"),
        (["eval", "--model", "world", "--pass-at", "2", "--seeds", "1", "1"], "--seeds must be distinct"),
        (["eval", "--model", "world", "--pass-at", "0"], "k >= 1"),
        (["eval", "--model", "world", "--pass-at", "1", "--reward", "brightness"], "needs a reward with pass/fail"),
        (["eval", "--model", "tiny", "--pass-at", "1"], "name the reward"),
        (["eval"], "give a run (RUN_DIR), two runs, or a base model"),
    ],
)
def test_pass_at_k_bad_input_is_named(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err
