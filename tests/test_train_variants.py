"""Every algorithm, the KL term (LoRA: adapters off; full fine-tuning: a frozen copy), full fine-tuning's final/
pipeline folder, DDPM sampling, group advantages and several inner epochs each run end to end on the tiny pipeline,
and every minibatch's loss equals the estimator's equation computed independently in float64 from what the trainer
handed the estimator (:class:`LossRecorder`)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from conftest import record_epoch_weights
from diffusers import StableDiffusionPipeline
from torch.distributions import Normal, kl_divergence

from ddpo.cli import main
from ddpo.training.estimators.forward_process import ForwardProcessEstimator
from ddpo.training.estimators.log_prob import LogProbEstimator
from ddpo.training.trainer import Trainer

DIMS = (1, 2, 3)


def _metrics(tmp_path):
    return [json.loads(line) for line in (tmp_path / "runs" / "run" / "metrics.jsonl").read_text().splitlines()]


class LossRecorder:
    """Watches a run without changing it: the rewards the trainer turned into weights, and for every minibatch the
    inner epoch, the pairs ``(i, j)``, their weights, the stored sampling data, the loss and its diagnostics, and the
    model outputs the estimator computed inside ``loss`` (the policy's and the base model's step outputs for the
    per-step log-prob estimators; the re-noised inputs and the old / trained / base predictions for the
    forward-process ones)."""

    def __init__(self, monkeypatch):
        self.epochs = record_epoch_weights(monkeypatch)  # (rewards, prompts, weights) of each epoch
        self.minibatches: list[dict] = []
        self._inner = 0
        self._calls: list | None = None
        for cls in (LogProbEstimator, ForwardProcessEstimator):
            self._wrap(monkeypatch, cls, "begin_inner_epoch", self._begin)
            self._wrap(monkeypatch, cls, "loss", self._loss)
        for cls, name in ((LogProbEstimator, "recompute"), (ForwardProcessEstimator, "renoise")):
            self._wrap(monkeypatch, cls, name, self._call(name))
        self._wrap(monkeypatch, ForwardProcessEstimator, "denoise", self._call("denoise"))

    @staticmethod
    def _wrap(monkeypatch, cls, name, wrapper):
        original = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda est, *a, **k: wrapper(original, est, *a, **k))

    def _begin(self, original, est, epoch, inner):
        self._inner = inner
        return original(est, epoch, inner)

    def _call(self, name):
        def record(original, est, *args, **kwargs):
            out = original(est, *args, **kwargs)
            if self._calls is not None:
                self._calls.append((name, _detached(out)))
            return out

        return record

    def _loss(self, original, est, samples, weights, i, j):
        self._calls = []
        try:
            loss, info = original(est, samples, weights, i, j)
        finally:
            calls, self._calls = self._calls, None
        entry = {"inner": self._inner, "i": i.clone(), "j": j.clone(), "weights": weights[i].detach().clone()}
        entry.update(loss=loss.detach().clone(), info={k: v.clone() for k, v in info.items()}, calls=calls)
        if isinstance(est, LogProbEstimator):
            entry["old_log_prob"] = samples.log_probs[i, j].clone()
            entry["action"] = samples.latents[i, j + 1].clone()
        else:
            entry["x0"] = samples.latents[i].clone()
        self.minibatches.append(entry)
        return loss, info

    def outputs(self, entry: dict, name: str) -> list:
        return [out for call, out in entry["calls"] if call == name]


def _detached(out):
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, tuple):
        return tuple(_detached(o) for o in out)
    return type(out)(**{k: _detached(v) for k, v in vars(out).items()})


@pytest.fixture
def recorder(monkeypatch) -> LossRecorder:
    return LossRecorder(monkeypatch)


def hand_weights(config, rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Per-trajectory weights from the rewards in float64: advantages normalised over the batch (or within each
    prompt's group), clipped to ``adv_clip_max``; DDPO uses them as they are, RWR takes ``N softmax(A / T)``, sparse
    RWR ``1[A >= quantile_q(A)]``."""
    t, r = config.train, rewards.double()
    if t.advantage == "group":
        a = torch.zeros_like(r)
        for prompt in set(prompts):
            rows = [k for k, p in enumerate(prompts) if p == prompt]
            if len(rows) > 1:
                a[rows] = (r[rows] - r[rows].mean()) / (r[rows].std(unbiased=False) + 1e-6)
    else:
        assert t.advantage == "batch", t.advantage
        a = (r - r.mean()) / (r.std(unbiased=False) + 1e-6)
    a = a.clamp(-t.adv_clip_max, t.adv_clip_max)
    if t.algorithm == "rwr":
        return len(a) * torch.softmax(a / t.rwr_temperature, dim=0)
    if t.algorithm == "rwr_sparse":
        return (a >= torch.quantile(a, t.rwr_quantile)).double()
    return a


def check_log_prob_minibatch(config, rec: LossRecorder, entry: dict) -> torch.Tensor:
    """One minibatch of a per-step log-prob estimator against float64 references: the policy's log-prob is the
    ``torch.distributions.Normal`` density of the stored action under the step's mean and std; the loss is DDPO's
    clipped surrogate (IS), ``-mean(A log pi)`` (SF) or ``-mean(w log pi)`` (RWR), plus ``kl_coef`` times the
    Gaussian KL to the base model's step (``kl_divergence`` of two Normals). Returns the pairs' ratios."""
    t = config.train
    policy, *base = rec.outputs(entry, "recompute")
    mean, std = policy.mean.double(), policy.std.double().view(-1, 1, 1, 1)
    assert bool((std > 0).all()), "a deterministic step was trained on"
    log_prob = Normal(mean, std).log_prob(entry["action"].double()).mean(dim=DIMS)
    torch.testing.assert_close(policy.log_prob.double(), log_prob, rtol=0, atol=2e-5)
    a, old = entry["weights"].double(), entry["old_log_prob"].double()
    ratio = (log_prob - old).exp()
    if t.algorithm == "ddpo_is":
        clipped = ratio.clamp(1 - t.clip_range, 1 + t.clip_range)
        expected = torch.maximum(-a * ratio, -a * clipped).mean()
    else:  # REINFORCE and (sparse) RWR: weighted log-likelihood of the actions
        expected = -(a * log_prob).mean()
    if t.kl_coef > 0:
        (reference,) = base
        kl = kl_divergence(Normal(mean, std), Normal(reference.mean.double(), std)).mean(dim=DIMS).mean()
        torch.testing.assert_close(entry["info"]["kl"].double(), kl, rtol=1e-4, atol=1e-9)
        expected = expected + t.kl_coef * kl
    else:
        assert not base, "the base model was evaluated without a KL term"
    torch.testing.assert_close(entry["loss"].double(), expected, rtol=1e-4, atol=2e-5)
    return ratio


def check_run(config, rec: LossRecorder, metrics: dict) -> None:
    """What every run must show: the weights of the epoch's rewards computed by hand; every minibatch's loss by
    hand (:func:`check_log_prob_minibatch`); one optimiser step per ``gradient_accumulation_steps`` minibatches; the
    first minibatch has ratio 1 and, with a KL term, KL 0 (the policy is still the base model)."""
    t = config.train
    ((rewards, prompts, weights),) = rec.epochs
    if t.advantage != "per_prompt":  # the running per-prompt statistics are checked in test_variant_effects.py
        # float32 standardisation of rewards a few 1e-3 apart: relative errors up to 1e-4
        torch.testing.assert_close(weights.double(), hand_weights(config, rewards, prompts), rtol=1e-4, atol=1e-4)
    assert len(rec.minibatches) == t.gradient_accumulation_steps * metrics["global_step"]
    for k, entry in enumerate(rec.minibatches):
        check_log_prob_minibatch(config, rec, entry)
        if k == 0:  # the stored old log-probs are the policy's own: ratio exactly 1
            assert torch.equal(rec.outputs(entry, "recompute")[0].log_prob, entry["old_log_prob"])
            if t.kl_coef > 0:
                assert entry["info"]["kl"].item() == 0.0


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
def test_variants_train_with_the_losses_of_their_equations(fast_overrides, tmp_path, extra, recorder):
    """Each variant's loss, weights, KL and optimiser-step count, minibatch by minibatch, against float64 hand
    computations (16 training pairs a run: 4 samples x 4 steps, or x 3 stochastic DDPM steps in minibatches of 3)."""
    from ddpo.training.config import build_config

    assert main(["train", "--preset", "tiny", "num_epochs=1", *fast_overrides, *extra]) == 0
    (metrics,) = _metrics(tmp_path)
    config = build_config(preset="tiny", overrides=["num_epochs=1", *fast_overrides, *extra])
    assert all(torch.isfinite(torch.tensor(float(v))) for v in metrics.values() if isinstance(v, (int, float)))
    check_run(config, recorder, metrics)
    inner_epochs = config.train.num_inner_epochs
    assert metrics["global_step"] == 4 * inner_epochs  # 16 pairs in minibatches of 4 (12 in 3s for DDPM), per pass
    if "sample.scheduler=ddpm" in extra:  # the last DDPM step is deterministic: never a training pair
        assert all(int(e["j"].max()) < 3 for e in recorder.minibatches)
    if "train.kl_coef=0.5" in extra:
        assert any(e["info"]["kl"] > 0 for e in recorder.minibatches[1:])  # the policy moved away from the base
    if "sample.samples_per_prompt=2" in extra:  # group advantages: +-1 within each group of two (-+ eps / spread)
        ((_, prompts, weights),) = recorder.epochs
        assert prompts[0::2] == prompts[1::2] and bool((weights.abs() > 0.99).all())
        assert bool((weights[0::2] * weights[1::2] < 0).all())
    if inner_epochs == 2:
        # the second pass revisits the same pairs, in another order, against the same old log-probs, with the
        # policy the first pass moved: no ratio of the second pass is 1
        passes = [[e for e in recorder.minibatches if e["inner"] == inner] for inner in (0, 1)]
        assert len(passes[0]) == len(passes[1]) == 4
        pairs = [Counter(zip(*(torch.cat([e[k] for e in p]).tolist() for k in "ij"))) for p in passes]
        assert pairs[0] == pairs[1] and len(pairs[0]) == 16
        order = [torch.stack([torch.cat([e[k] for e in p]) for k in "ij"]) for p in passes]
        assert not torch.equal(order[0], order[1])
        for entry in passes[1]:
            ratio = (entry["calls"][0][1].log_prob - entry["old_log_prob"]).exp()
            assert bool(((ratio - 1).abs() > 1e-7).all())


def test_full_fine_tuning_with_kl_writes_a_pipeline_folder(fast_overrides, tiny_model_dir, tmp_path, recorder):
    """Full fine-tuning with a KL term: the KL reference is a frozen copy (KL 0 at the first minibatch, then the
    Gaussian KL by hand as for LoRA), every UNet weight may move and ``final/`` is a whole pipeline folder."""
    from ddpo.training.config import build_config

    overrides = ["num_epochs=1", "model.use_lora=false", "train.kl_coef=0.1", *fast_overrides]
    assert main(["train", "--preset", "tiny", *overrides]) == 0
    (metrics,) = _metrics(tmp_path)
    check_run(build_config(preset="tiny", overrides=overrides), recorder, metrics)
    assert metrics["kl"] > 0 and any(e["info"]["kl"] > 0 for e in recorder.minibatches[1:])
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
