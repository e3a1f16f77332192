"""An estimator's own keys (``Estimator.own_keys``) are validated only when that estimator is chosen, and
a key of another estimator set to other than its default is refused, whatever its value: it would do nothing."""

from __future__ import annotations

import pytest

from ddpo.training.config import ConfigError, build_config
from ddpo.training.estimators import ESTIMATORS
from ddpo.training.estimators.registry import own_keys


def test_each_estimator_declares_its_own_keys():
    assert own_keys(ESTIMATORS["ddpo_is"]) == {} and own_keys(ESTIMATORS["ddpo_sf"]) == {}
    assert set(own_keys(ESTIMATORS["rwr"])) == {"train.rwr_temperature"}
    assert set(own_keys(ESTIMATORS["rwr_sparse"])) == {"train.rwr_quantile"}
    old_policy = {"train.old_policy_flat", "train.old_policy_uprate", "train.old_policy_uphold"}
    assert set(own_keys(ESTIMATORS["awm"])) == {"train.awm_ema_kl", *old_policy}
    assert set(own_keys(ESTIMATORS["nft"])) == {"train.nft_beta", "train.nft_sample_policy", *old_policy}


@pytest.mark.parametrize(
    "algorithm, override, range_message",
    [
        ("rwr", "train.rwr_temperature=0", "train.rwr_temperature must be > 0; got 0.0"),
        ("rwr_sparse", "train.rwr_quantile=5", "train.rwr_quantile must be in [0, 1); got 5.0"),
        ("awm", "train.awm_ema_kl=-1", "train.awm_ema_kl must be >= 0; got -1.0"),
        ("nft", "train.nft_beta=0", "train.nft_beta must be > 0; got 0.0"),
        ("nft", "train.nft_sample_policy=ema", "train.nft_sample_policy must be old or current; got 'ema'"),
        ("nft", "train.old_policy_uphold=1", "train.old_policy_uphold must be in [0, 1); got 1.0"),
        ("awm", "train.old_policy_flat=-1", "train.old_policy_flat must be >= 0; got -1"),
    ],
)
def test_an_own_key_is_range_checked_only_when_its_estimator_is_chosen(algorithm, override, range_message):
    flow = ["sample.scheduler=euler"] if algorithm in ("awm", "nft") else []
    with pytest.raises(ConfigError) as out_of_range:
        build_config(preset="tiny", overrides=[f"train.algorithm={algorithm}", *flow, override])
    assert str(out_of_range.value) == range_message
    # with another estimator the bad value is not range-checked: the key is refused as doing nothing
    with pytest.raises(ConfigError) as refused:
        build_config(preset="tiny", overrides=["train.algorithm=ddpo_is", override])
    key = override.split("=")[0]
    assert str(refused.value).startswith(f"{key} is ") and " must be " not in str(refused.value)
    assert "does nothing with train.algorithm=ddpo_is: set it back to " in str(refused.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["train.nft_beta=0.5"],
            "train.nft_beta is DiffusionNFT's distance b of its implicit policies and does nothing with "
            "train.algorithm=ddpo_is: set it back to 1 or use train.algorithm=nft",
        ),
        (
            ["train.algorithm=rwr", "train.rwr_quantile=0.5"],
            "train.rwr_quantile is sparse RWR's quantile and does nothing with train.algorithm=rwr: set it back to 0.9 "
            "or use train.algorithm=rwr_sparse",
        ),
        (
            ["train.algorithm=awm", "sample.scheduler=euler", "train.nft_sample_policy=current"],
            "train.nft_sample_policy is DiffusionNFT's choice of sampling weights and does nothing with "
            "train.algorithm=awm: set it back to old or use train.algorithm=nft",
        ),
        (
            ["train.old_policy_uprate=0.01"],
            "train.old_policy_uprate is the old (EMA) policy's schedule and does nothing with train.algorithm=ddpo_is: "
            "set it back to 0.001 or use train.algorithm=awm or nft",
        ),
        (  # the refusal that was already there, word for word
            ["train.algorithm=nft", "train.awm_ema_kl=1"],
            "train.awm_ema_kl is AWM's stabiliser and does nothing with train.algorithm=nft: set it back to 0 or use "
            "train.algorithm=awm",
        ),
    ],
)
def test_another_estimators_key_is_refused_naming_the_key_the_algorithm_and_the_fix(overrides, message):
    with pytest.raises(ConfigError) as refused:
        build_config(preset="tiny", overrides=overrides)
    assert str(refused.value) == message


def test_keys_shared_by_the_chosen_estimator_and_defaults_pass():
    """AWM (with its proximal term) and NFT share the old policy's keys; a key at its default (as presets write them)
    is no setting."""
    assert build_config(preset="tiny", overrides=["train.nft_beta=1", "train.nft_sample_policy=old"])
    awm = ["train.algorithm=awm", "sample.scheduler=euler", "train.awm_ema_kl=1"]
    assert build_config(preset="tiny", overrides=[*awm, "train.old_policy_uphold=0.9"])
    assert build_config(
        preset="tiny", overrides=["train.algorithm=nft", "sample.scheduler=euler", "train.old_policy_uphold=0.9"]
    )


def test_a_registered_estimator_needs_no_edit_of_the_check():
    """A new estimator's ``own_keys`` take part in the check without touching the registry's code."""
    from ddpo.training.estimators import register_estimator, unregister_estimator

    class Toy(ESTIMATORS["ddpo_is"]):
        own_keys = {"train.kl_form": "the toy's KL"}

    register_estimator("toy_keys", Toy)
    try:
        with pytest.raises(ConfigError, match="^train.kl_form is the toy's KL and does nothing with train.algorithm="):
            build_config(
                preset="tiny",
                overrides=["model.pretrained=tiny_sd3", "sample.scheduler=flow_sde", "train.kl_form=flow_grpo"],
            )
        config = build_config(
            preset="tiny",
            overrides=[
                "train.algorithm=toy_keys",
                "model.pretrained=tiny_sd3",
                "sample.scheduler=flow_sde",
                "train.kl_form=flow_grpo",
            ],
        )
        assert config.train.kl_form == "flow_grpo"
    finally:
        unregister_estimator("toy_keys")


def test_awm_without_its_proximal_term_refuses_an_old_policy_schedule():
    """AWM keeps an old policy only with ``train.awm_ema_kl > 0``; without it the old policy's schedule would do
    nothing, and is refused; with it, accepted."""
    flow = ["train.algorithm=awm", "sample.scheduler=euler"]
    with pytest.raises(ConfigError, match="train.old_policy_uprate schedules the old \\(EMA\\) policy") as refused:
        build_config(preset="tiny", overrides=[*flow, "train.old_policy_uprate=0.01"])
    assert "set train.awm_ema_kl > 0, or train.old_policy_uprate back to 0.001" in str(refused.value)
    config = build_config(preset="tiny", overrides=[*flow, "train.old_policy_uprate=0.01", "train.awm_ema_kl=1"])
    assert config.train.old_policy_uprate == 0.01


def test_a_shared_key_the_estimator_does_not_read_gets_a_note_not_an_error():
    """The world preset sets train.advantage, train.batch_size and train.timestep_fraction for NFT; under draft they
    do nothing, which start-up says (ddpo.training.run_inputs prints these notes) instead of dropping them silently.
    At their defaults nothing is said."""
    from ddpo.training.estimators import unused_key_notes

    draft = build_config(
        preset="world",
        overrides=[
            "train.algorithm=draft",
            "sample.scheduler=ddim",
            "train.gradient_accumulation_steps=4",
            "reward.name=brightness",
        ],
    )
    assert unused_key_notes(draft) == [
        "train.batch_size=16 plays no part in train.algorithm=draft (each prompt batch, sample.batch_size, is one "
        "minibatch): it is unused",
        "train.advantage=group_center plays no part in train.algorithm=draft (there are no advantages: the reward's "
        "gradient trains the model): it is unused",
        "train.timestep_fraction=0.5 plays no part in train.algorithm=draft (the back-propagated steps are the last K "
        "of each chain): it is unused",
    ]
    online = build_config(preset="world", overrides=["train.algorithm=online_dpo"])
    assert [note.split(" plays")[0] for note in unused_key_notes(online)] == ["train.advantage=group_center"]
    assert unused_key_notes(build_config(preset="world")) == []  # nft reads them all
    draft.train.batch_size, draft.train.advantage, draft.train.timestep_fraction = 8, "per_prompt", 1.0
    assert unused_key_notes(draft) == []  # at their defaults: nothing to say
