"""An estimator defined outside the package trains and resumes through the CLI once registered: the trainer, the
config and the checkpoints need no edit for it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ddpo.cli import main
from ddpo.policy.forward import add_noise, alpha_bar
from ddpo.training.config import ConfigError, build_config
from ddpo.training.estimators import Estimator, register_estimator, unregister_estimator
from ddpo.training.prompts import derive_seed

TOY_NOISE_STREAM = 1001


class ToyWeightedDenoising(Estimator):
    """A weighted denoising loss on clean samples: ``mean_i w_i |eps_theta(x_t, t, c) - eps|^2`` with
    ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps``, and a count of its minibatches as extra state (saved in
    checkpoints, logged each epoch)."""

    uses_log_probs = False

    def __init__(self, policy):
        super().__init__(policy)
        self.minibatches = torch.zeros((), dtype=torch.int64)
        self.noise: torch.Generator | None = None

    @classmethod
    def validate(cls, config, chosen, need) -> None:
        need(
            chosen is not cls or config.train.kl_coef == 0,
            f"train.algorithm={cls.name} has no KL term; set train.kl_coef=0",
        )

    def begin_inner_epoch(self, epoch: int, inner: int) -> None:
        self.noise = torch.Generator().manual_seed(derive_seed(self.config.seed, TOY_NOISE_STREAM, epoch, inner))

    def loss(self, samples, weights, i, j):
        p = self.policy
        x0, timesteps = samples.latents[i], samples.timesteps[j]
        noise = torch.randn(x0.shape, generator=self.noise)
        x_t = add_noise(x0, noise, alpha_bar(p.scheduler.alphas_cumprod, timesteps))
        output = p.family.bind(p.model)(x_t, timesteps, samples.cond[i]).float()
        mse = ((output - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (weights[i] * mse).mean()
        self.minibatches += 1
        return loss, {"loss": loss.detach(), "toy_mse": mse.detach().mean()}

    def end_epoch(self, global_step: int) -> dict[str, float]:
        return {"toy_minibatches": int(self.minibatches)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"toy.minibatches": self.minibatches}

    def load_state_dict(self, state, source: str) -> None:
        if state is None or "toy.minibatches" not in state:
            raise ValueError(f"{source} has no toy.minibatches")
        self.minibatches = state["toy.minibatches"].clone()


@pytest.fixture
def toy_estimator():
    register_estimator("toy", ToyWeightedDenoising)
    yield "toy"
    unregister_estimator("toy")


def _train(fast_overrides, tmp_path, name: str, *extra: str, resume: bool = False) -> int:
    if resume:
        return main(["train", "--resume", str(tmp_path / "runs" / name), *extra])
    overrides = [o.replace("run_name=run", f"run_name={name}") for o in fast_overrides]
    return main(["train", "--preset", "tiny", *overrides, "train.algorithm=toy", *extra])


def test_a_registered_estimator_trains_and_resumes_exactly_through_the_cli(fast_overrides, tmp_path, toy_estimator):
    """Two epochs straight equal one epoch and a resumed one: the trained weights, the estimator's own checkpointed
    state and every metric (its minibatch count goes on from the checkpoint: 4 minibatches an epoch)."""
    assert _train(fast_overrides, tmp_path, "straight", "num_epochs=2") == 0
    assert _train(fast_overrides, tmp_path, "resumed", "num_epochs=1") == 0
    assert _train(fast_overrides, tmp_path, "resumed", "num_epochs=2", resume=True) == 0
    runs = tmp_path / "runs"
    for file in ("trainable.safetensors", "extra.safetensors"):
        straight, resumed = (
            load_file(str(runs / r / "checkpoints" / "checkpoint_000002" / file)) for r in ("straight", "resumed")
        )
        assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    trained = load_file(str(runs / "straight" / "checkpoints" / "checkpoint_000002" / "trainable.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)  # the toy loss moved the adapter

    def metrics(run):
        rows = [json.loads(line) for line in (runs / run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in row.items() if not k.endswith("_seconds")} for row in rows]

    assert metrics("straight") == metrics("resumed")
    # 2 samples x 2 batches x 4 steps = 16 pairs an epoch, train.batch_size 4: 4 minibatches an epoch
    assert [row["toy_minibatches"] for row in metrics("straight")] == [4, 8]
    assert "toy_mse" in metrics("straight")[0] and "approx_kl" not in metrics("straight")[0]


def test_an_unregistered_estimator_is_refused_by_the_config(toy_estimator):
    """The registry is the list of valid ``train.algorithm`` values: registering adds one, unregistering removes it."""
    assert build_config(preset="tiny", overrides=["train.algorithm=toy"]).train.algorithm == "toy"
    unregister_estimator("toy")
    with pytest.raises(ConfigError, match="train.algorithm must be one of ddpo_is, .*; got 'toy'"):
        build_config(preset="tiny", overrides=["train.algorithm=toy"])


def test_an_estimators_config_rules_apply_as_it_declares(toy_estimator):
    """A combination rule of an estimator applies only when it is chosen (the toy refuses a KL term, DDPO-SF several
    inner epochs); so does the value range of its own keys. Another estimator's key set to other than its default is
    refused as doing nothing, whatever its value (tests/test_estimator_own_keys.py)."""
    assert build_config(preset="tiny", overrides=["train.kl_coef=0.1"]).train.kl_coef == 0.1
    with pytest.raises(ConfigError, match="^train.algorithm=toy has no KL term; set train.kl_coef=0$"):
        build_config(preset="tiny", overrides=["train.algorithm=toy", "train.kl_coef=0.1"])
    assert build_config(preset="tiny", overrides=["train.num_inner_epochs=2"]).train.num_inner_epochs == 2
    with pytest.raises(ConfigError, match="train.algorithm=ddpo_sf is only unbiased on-policy"):
        build_config(preset="tiny", overrides=["train.algorithm=ddpo_sf", "train.num_inner_epochs=2"])
    with pytest.raises(ConfigError, match="^train.nft_beta must be > 0; got 0.0$"):
        build_config(preset="tiny", overrides=["train.algorithm=nft", "train.nft_beta=0"])
    for algorithm in ("ddpo_is", "toy", "awm"):
        with pytest.raises(ConfigError, match=f"^train.nft_beta is .* does nothing with train.algorithm={algorithm}: "):
            build_config(preset="tiny", overrides=[f"train.algorithm={algorithm}", "train.nft_beta=0"])
