"""The preference estimators through the CLI: ``online_dpo`` (pairs of the policy's own samples) and ``dpo`` (offline
pairs) train on the tiny UNet pipeline and on the tiny SD3 flow family, resume bit-exactly, start from a loss of
exactly log 2 (the adapter is zero: the policy is the reference), and online DPO's pairs are the best and the worst
sample of one prompt draw. Also their config rules. Runs are 16-px images with 2 sampling steps, so each takes about
a second on 2 cores."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import record_epoch_weights
from safetensors.torch import load_file

from ddpo.cli import main
from ddpo.training.config import ConfigError, build_config
from ddpo.training.estimators import ESTIMATORS
from ddpo.training.estimators.preference import DiffusionDPO, OnlineDPO
from ddpo.training.estimators.registry import own_keys

FIXTURE = Path(__file__).parent / "data" / "world_prefs"
FAMILIES = {  # model family -> its overrides beside the fast settings
    "unet": [],
    "flow": ["model.pretrained=tiny_sd3", "sample.scheduler=flow_euler", "sample.eta=0"],
}


@pytest.fixture
def eight_pairs(tmp_path) -> Path:
    """The first 8 pairs of the world fixture (an epoch of offline DPO is one pass over them)."""
    folder = tmp_path / "prefs"
    shutil.copytree(FIXTURE, folder)
    rows = (folder / "metadata.jsonl").read_text().splitlines()[:8]
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


class Recorder:
    """Watches a run: every epoch's rewards, prompts and the weights the trainer computed (online DPO's roles), and
    for every minibatch of pairs its loss, its clean latents and what the estimator computed from them (the re-noised
    rows, the reference's and the policy's outputs)."""

    def __init__(self, monkeypatch):
        self.epochs = record_epoch_weights(monkeypatch)  # (rewards, prompts, weights) of each epoch
        self.minibatches: list[dict] = []
        self._calls: list | None = None
        for cls in (OnlineDPO, DiffusionDPO):
            self._wrap(monkeypatch, cls, "pair_loss", self._pair_loss)
            for name in ("renoise", "denoise"):
                self._wrap(monkeypatch, cls, name, self._call)

    @staticmethod
    def _wrap(monkeypatch, cls, name, wrapper):
        original = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda est, *a, **k: wrapper(original, est, *a, **k))

    def _call(self, original, est, *args, **kwargs):
        out = original(est, *args, **kwargs)
        if self._calls is not None:
            self._calls.append(tuple(t.detach().double() for t in out))
        return out

    def _pair_loss(self, original, est, x0_w, x0_l, cond, timesteps):
        self._calls = []
        try:
            loss, info = original(est, x0_w, x0_l, cond, timesteps)
        finally:
            calls, self._calls = self._calls, None
        entry = {
            "loss": loss.item(),
            "x0": torch.cat([x0_w, x0_l]).double(),
            "calls": calls,
            "beta": est.config.train.dpo_beta,
        }
        self.minibatches.append(entry)
        return loss, info

    def check(self, entry: dict, flow: bool) -> None:
        """One minibatch against a float64 recomputation: both samples of a pair re-noised with the same noise at the
        same level; the errors on the noise (epsilon UNet) or the velocity ``noise - x0`` (flow); Diffusion-DPO's
        ``-log sigmoid(-beta / 2 * ((mse_w - mse_l) - (ref_w - ref_l)))`` averaged over the pairs."""
        (x_t, noise, level), (_, ref), (_, out) = entry["calls"]
        x0, pairs = entry["x0"], entry["x0"].shape[0] // 2
        assert torch.equal(noise[:pairs], noise[pairs:]) and torch.equal(level[:pairs], level[pairs:])
        s = level.view(-1, 1, 1, 1)
        expected_x_t = (1 - s) * x0 + s * noise if flow else s.sqrt() * x0 + (1 - s).sqrt() * noise
        torch.testing.assert_close(x_t, expected_x_t, rtol=1e-5, atol=1e-5)
        target = noise - x0 if flow else noise
        mse, ref_mse = ((out - target) ** 2).mean(dim=(1, 2, 3)), ((ref - target) ** 2).mean(dim=(1, 2, 3))
        margin = -entry["beta"] / 2 * ((mse[:pairs] - mse[pairs:]) - (ref_mse[:pairs] - ref_mse[pairs:]))
        expected = torch.log1p(torch.exp(-margin)).mean().item()
        assert entry["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-5)


def _run(fast_overrides, tmp_path, name: str, *extra: str, resume: bool = False) -> int:
    if resume:
        return main(["train", "--resume", str(tmp_path / "runs" / name), *extra])
    overrides = [o.replace("run_name=run", f"run_name={name}") for o in fast_overrides]
    small = ["sample.num_steps=2", "sample.num_batches_per_epoch=1", "sample.resolution=16", "log_images=false"]
    return main(["train", "--preset", "tiny", *overrides, *small, "train.learning_rate=0.02", *extra])


def _same_checkpoints(runs: Path, name: str = "trainable.safetensors") -> dict[str, torch.Tensor]:
    straight, resumed = (
        load_file(str(runs / r / "checkpoints" / "checkpoint_000002" / name)) for r in ("straight", "resumed")
    )
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    return straight


def _metrics(runs: Path, run: str) -> list[dict]:
    rows = [json.loads(line) for line in (runs / run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.endswith("_seconds")} for row in rows]


def _check_roles(rewards: torch.Tensor, prompts: list[str], roles: torch.Tensor, group: int) -> int:
    """Each prompt group's roles by hand: +1 on its first highest reward, -1 on its first lowest, else 0; no pair
    when its rewards are all equal. Returns the number of pairs."""
    pairs = 0
    for first in range(0, len(prompts), group):
        values, block = rewards[first : first + group].tolist(), roles[first : first + group].tolist()
        assert len(set(prompts[first : first + group])) == 1  # a group is one prompt draw
        if max(values) == min(values):
            assert block == [0.0] * group
            continue
        expected = [0.0] * group
        expected[values.index(max(values))], expected[values.index(min(values))] = 1.0, -1.0
        assert block == expected
        pairs += 1
    return pairs


@pytest.mark.parametrize("family", list(FAMILIES))
def test_online_dpo_trains_pairs_of_one_prompt_and_resumes_exactly(family, fast_overrides, tmp_path, monkeypatch):
    """Two epochs straight equal one epoch and a resumed one (weights and metrics); every epoch's roles follow the
    best-vs-worst rule within prompt draws; the first minibatch's loss is exactly log 2 (the policy is the
    reference); the adapter trained."""
    recorder = Recorder(monkeypatch)
    extra = ["train.algorithm=online_dpo", "sample.samples_per_prompt=2", "sample.batch_size=4", "train.dpo_beta=50",
             *FAMILIES[family]]  # fmt: skip
    assert _run(fast_overrides, tmp_path, "straight", "num_epochs=2", *extra) == 0
    runs = tmp_path / "runs"
    rows = _metrics(runs, "straight")
    assert len(recorder.epochs) == 2
    for (rewards, prompts, roles), row in zip(recorder.epochs, rows, strict=True):
        assert _check_roles(rewards, prompts, roles, 2) == row["dpo_pairs"] > 0
    assert recorder.minibatches[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for entry in recorder.minibatches:
        recorder.check(entry, flow=family == "flow")
    assert {"dpo_loss", "dpo_margin", "dpo_accuracy", "model_mse", "reference_mse", "dpo_pair_reward_gap"} <= rows[
        0
    ].keys()
    straight = load_file(str(runs / "straight" / "checkpoints" / "checkpoint_000002" / "trainable.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in straight.items() if "lora_B" in k)
    assert _run(fast_overrides, tmp_path, "resumed", "num_epochs=1", *extra) == 0
    assert _run(fast_overrides, tmp_path, "resumed", "num_epochs=2", resume=True) == 0
    _same_checkpoints(runs)
    assert _metrics(runs, "resumed") == rows


@pytest.mark.parametrize("family", list(FAMILIES))
def test_offline_dpo_trains_on_the_pairs_and_resumes_exactly(
    family, fast_overrides, tmp_path, monkeypatch, eight_pairs
):
    """An epoch is one pass over the 8 pairs (2 optimiser steps of 4); ``samples`` counts the pairs; the first loss
    is exactly log 2; two epochs straight equal one epoch and a resumed one."""
    recorder = Recorder(monkeypatch)
    extra = ["train.algorithm=dpo", f"train.preference_data={eight_pairs}", "sample.batch_size=2", "train.dpo_beta=50",
             *FAMILIES[family]]  # fmt: skip
    assert _run(fast_overrides, tmp_path, "straight", "num_epochs=2", *extra) == 0
    runs = tmp_path / "runs"
    rows = _metrics(runs, "straight")
    assert [row["samples"] for row in rows] == [8, 16] and [row["global_step"] for row in rows] == [2, 4]
    assert all(row["dpo_pairs_trained"] == 8 for row in rows)
    assert recorder.minibatches[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and len(recorder.minibatches) == 4
    for entry in recorder.minibatches:
        recorder.check(entry, flow=family == "flow")
    assert recorder.epochs == []  # the trainer's sample -> weights epoch is not run
    assert _run(fast_overrides, tmp_path, "resumed", "num_epochs=1", *extra) == 0
    assert _run(fast_overrides, tmp_path, "resumed", "num_epochs=2", resume=True) == 0
    weights = _same_checkpoints(runs)
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)
    assert _metrics(runs, "resumed") == rows


def test_the_preference_estimators_declare_their_keys_and_rules(tmp_path):
    assert set(own_keys(ESTIMATORS["online_dpo"])) == {"train.dpo_beta"}
    assert set(own_keys(ESTIMATORS["dpo"])) == {"train.dpo_beta", "train.preference_data"}
    online = ["train.algorithm=online_dpo", "sample.samples_per_prompt=2"]
    refusals = [
        (online + ["train.dpo_beta=0"], "train.dpo_beta must be > 0; got 0.0"),
        (["train.algorithm=online_dpo"], "sample.samples_per_prompt must be >= 2"),
        (online + ["train.kl_coef=0.1"], "set train.kl_coef=0"),
        (["train.algorithm=dpo", "sample.resolution=16"], "set train.preference_data to"),
        (["train.algorithm=dpo", f"train.preference_data={FIXTURE}"], "set it (e.g. sample.resolution=512"),
        (online + [f"train.preference_data={FIXTURE}"], "does nothing with train.algorithm=online_dpo"),
        (["train.dpo_beta=100"], "does nothing with train.algorithm=ddpo_is: set it back to 5000"),
    ]
    for overrides, message in refusals:
        with pytest.raises(ConfigError, match=re.escape(message)):
            build_config(preset="tiny", overrides=overrides)
    # an owned epoch lays out its own minibatches: the trainer's (sample, step) layout rule does not apply
    config = build_config(
        preset="tiny",
        overrides=[
            "train.algorithm=dpo",
            f"train.preference_data={FIXTURE}",
            "sample.resolution=16",
            "train.batch_size=3",
        ],  # fmt: skip
    )
    assert config.train.batch_size == 3


def test_full_fine_tuning_keeps_a_frozen_reference_whatever_kl_coef():
    model = torch.nn.Linear(2, 2)
    lora = build_config(preset="tiny", overrides=["train.algorithm=online_dpo", "sample.samples_per_prompt=2"])
    full = build_config(
        preset="tiny", overrides=["train.algorithm=online_dpo", "sample.samples_per_prompt=2", "model.use_lora=false"]
    )
    assert OnlineDPO.frozen_reference(model, lora) is None
    reference = OnlineDPO.frozen_reference(model, full)
    assert reference is not model and not any(p.requires_grad for p in reference.parameters())
    assert torch.equal(reference.weight, model.weight)
