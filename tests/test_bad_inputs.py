"""Issue 18, item 6: every bad input of ``ddpo train`` ends in one clear message, exit code 2, and no traceback.

One row per bad input of the table in docs/errors.md: the command line (and environment) that provokes it, the key
phrase of its message, and whether it must fail before the model is loaded (``early``: no pipeline is read; the
others can only be found by a model or a run and fail before the first optimiser step). Each row runs through the
real CLI, ``ddpo.cli.main``, in process on the tiny pipeline.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ddpo.cli import main

TRUST = "--trust-import-path"
T = ["--preset", "tiny"]
NON_UTF8 = b"a cat\n\xff\xfe dog\n"
BLANK = "  \n\n# only a comment\n"

BAD_REWARDS = """
import torch
import rewards

@rewards.reward_function
def nan(images, prompts):
    out = torch.zeros(len(prompts))
    out[1] = float("nan")
    return out

@rewards.reward_function
def wrong_shape(images, prompts):
    return torch.zeros(len(prompts), 2)

@rewards.reward_function
def float64(images, prompts):
    return torch.zeros(len(prompts), dtype=torch.float64)

@rewards.reward_function
def raises(images, prompts):
    raise KeyError("no score for this prompt")

def undeclared(images, prompts):
    return torch.zeros(len(prompts))
"""


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _pipeline_with(tiny_model_dir: Path, tmp: Path, prediction_type: str) -> Path:
    folder = tmp / "pipe"
    shutil.copytree(tiny_model_dir, folder)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace('"epsilon"', f'"{prediction_type}"'))
    return folder


def _finished_run(fast: list[str]) -> Path:
    assert main(["train", "--preset", "tiny", "num_epochs=1", "log_images=false", *fast]) == 0
    return Path(next(o for o in fast if o.startswith("output_dir=")).split("=", 1)[1]) / "run"


# (id, builder(tmp, fast overrides, tiny model dir) -> (argv, env), key phrase of the message, early)
CASES = [
    (
        "unknown key",
        lambda t, f, m: (["train", *T, *f, "train.learnig_rate=1e-3"], {}),
        "unknown config key 'train.learnig_rate'. Did you mean 'train.learning_rate'?",
        True,
    ),
    ("unknown section", lambda t, f, m: (["train", *T, *f, "optim.lr=1"], {}), "unknown config key 'optim'", True),
    (
        "wrong type (int)",
        lambda t, f, m: (["train", *T, *f, "train.batch_size=four"], {}),
        "train.batch_size: expected an integer, got str 'four'",
        True,
    ),
    (
        "wrong type (bool)",
        lambda t, f, m: (["train", *T, *f, "model.use_lora=maybe"], {}),
        "model.use_lora: expected true or false",
        True,
    ),
    (
        "wrong type (list)",
        lambda t, f, m: (["train", *T, *f, "model.lora_target_modules=to_q"], {}),
        "model.lora_target_modules: expected a list",
        True,
    ),
    (
        "reward options not a mapping",
        lambda t, f, m: (["train", *T, *f, "reward.options=5"], {}),
        "reward.options: expected a mapping",
        True,
    ),
    (
        "override without =",
        lambda t, f, m: (["train", *T, *f, "num_epochs"], {}),
        "is not of the form key.sub=value",
        True,
    ),
    (
        "out of range (eta > 1)",
        lambda t, f, m: (["train", *T, *f, "sample.eta=1.5"], {}),
        "sample.eta must be <= 1",
        True,
    ),
    ("out of range (epochs)", lambda t, f, m: (["train", *T, *f, "num_epochs=0"], {}), "num_epochs must be >= 1", True),
    (
        "out of range (lr)",
        lambda t, f, m: (["train", *T, *f, "train.learning_rate=-1"], {}),
        "train.learning_rate must be > 0",
        True,
    ),
    ("batch layout", lambda t, f, m: (["train", *T, *f, "train.batch_size=3"], {}), "which is not a multiple of", True),
    (
        "bad mixed precision",
        lambda t, f, m: (["train", *T, *f, "mixed_precision=fp8"], {}),
        "mixed_precision must be no, bf16 or fp16; got 'fp8'",
        True,
    ),
    (
        "unsupported scheduler",
        lambda t, f, m: (["train", *T, *f, "sample.scheduler=euler"], {}),
        "needs a sampler with per-step log-probabilities",
        True,
    ),
    (
        "unknown scheduler",
        lambda t, f, m: (["train", *T, *f, "train.algorithm=awm", "sample.scheduler=heun2"], {}),
        "sample.scheduler='heun2' is not a sampler",
        True,
    ),
    (
        "unknown algorithm",
        lambda t, f, m: (["train", *T, *f, "train.algorithm=ppo"], {}),
        "train.algorithm must be one of",
        True,
    ),
    ("unknown preset", lambda t, f, m: (["train", "--preset", "tinyy", *f], {}), "Did you mean 'tiny'", True),
    (
        "missing config file",
        lambda t, f, m: (["train", "--config", str(t / "nope.yaml"), *f], {}),
        "does not exist",
        True,
    ),
    (
        "YAML syntax error",
        lambda t, f, m: (["train", "--config", str(_write(t / "bad.yaml", "train: [1, 2\n")), *f], {}),
        "is not valid YAML",
        True,
    ),
    (
        "YAML not a mapping",
        lambda t, f, m: (["train", "--config", str(_write(t / "list.yaml", "- 1\n- 2\n")), *f], {}),
        "must hold a mapping of keys",
        True,
    ),
    (
        "missing model path",
        lambda t, f, m: (["train", *T, *f, f"model.pretrained={t / 'no_such_model'}"], {}),
        "does not exist; give an existing local pipeline folder or a hub id",
        True,
    ),
    (
        "folder not a pipeline",
        lambda t, f, m: (["train", *T, *f, f"model.pretrained={_write(t / 'x' / 'a.txt', '').parent}"], {}),
        "is a folder without model_index.json",
        True,
    ),
    (
        "hub id while offline",
        lambda t, f, m: (["train", *T, *f, "model.pretrained=nobody-ddpo/no-such-model"], {"HF_HUB_OFFLINE": "1"}),
        "HF_HUB_OFFLINE=1 is set and it is not in the local cache",
        True,
    ),
    (
        "unsupported prediction type",
        lambda t, f, m: (["train", *T, *f, f"model.pretrained={_pipeline_with(m, t, 'flow_prediction')}"], {}),
        "prediction_type 'flow_prediction' is not supported",
        False,
    ),
    (
        "missing prompt file",
        lambda t, f, m: (["train", *T, *f, f"prompts={t / 'none.txt'}"], {}),
        "is neither a file nor a shipped prompt set",
        True,
    ),
    (
        "empty prompt file",
        lambda t, f, m: (["train", *T, *f, f"prompts={_write(t / 'p.txt', '')}"], {}),
        "holds no prompt",
        True,
    ),
    (
        "blank-only prompt file",
        lambda t, f, m: (["train", *T, *f, f"prompts={_write(t / 'p.txt', BLANK)}"], {}),
        "holds no prompt",
        True,
    ),
    (
        "non-UTF-8 prompt file",
        lambda t, f, m: (["train", *T, *f, f"prompts={_write(t / 'p.txt', NON_UTF8)}"], {}),
        "is not UTF-8 text",
        True,
    ),
    (
        "missing eval prompt file",
        lambda t, f, m: (["train", *T, *f, f"eval_prompts={t / 'none.txt'}"], {}),
        "error: eval_prompts=",
        True,
    ),
    (
        "unknown reward",
        lambda t, f, m: (["train", *T, *f, "reward.name=jpeg_compresibility"], {}),
        "Did you mean 'jpeg_compressibility'",
        True,
    ),
    (
        "import path without opt-in",
        lambda t, f, m: (["train", *T, *f, "reward.name=os:system"], {}),
        "is an import path: loading it imports and runs that module's code",
        True,
    ),
    (
        "import path of a non-reward",
        lambda t, f, m: (["train", TRUST, *T, *f, "reward.name=os:system", "reward.options.command=true"], {}),
        "not a declared reward",
        True,
    ),
    (
        "undeclared user function",
        lambda t, f, m: (["train", TRUST, *T, *f, "reward.name=bad_rewards_18:undeclared"], {}),
        "not a declared reward",
        True,
    ),
    (
        "import path: no module",
        lambda t, f, m: (["train", TRUST, *T, *f, "reward.name=no_such_pkg_18:fn"], {}),
        "cannot import module 'no_such_pkg_18'",
        True,
    ),
    (
        "import path: no attribute",
        lambda t, f, m: (["train", TRUST, *T, *f, "reward.name=bad_rewards_18:missing"], {}),
        "has no attribute 'missing'",
        True,
    ),
    (
        "reward option of the wrong type",
        lambda t, f, m: (["train", *T, *f, "reward.name=brightness", "reward.options.target=bright"], {}),
        "option 'target' must be a number or null; got str 'bright'",
        True,
    ),
    (
        "unknown reward option",
        lambda t, f, m: (["train", *T, *f, "reward.options.qualty=80"], {}),
        "has no option 'qualty'. Did you mean 'quality'?",
        True,
    ),
    (
        "reference folder without images",
        lambda t, f, m: (
            [
                "train",
                *T,
                *f,
                "reward.name=discriminator",
                f"reward.options.reference_dir={_write(t / 'ref' / 'notes.txt', '').parent}",
            ],
            {},
        ),
        "holds no images",
        True,
    ),
    (
        "unwritable output folder",
        lambda t, f, m: (["train", *T, *f, "output_dir=/sys/ddpo_runs"], {}),
        "cannot write the run directory",
        True,
    ),
    (
        "output folder under a regular file",
        lambda t, f, m: (["train", *T, *f, f"output_dir={_write(t / 'file', '')}/runs"], {}),
        "which is a regular file, not a folder",
        True,
    ),
    (
        "output folder holding a run",
        lambda t, f, m: (["train", *T, *f], {}) if _finished_run(f) else None,
        "already holds a run; continue it with `ddpo train --resume",
        True,
    ),
    (
        "resume of a folder without a run",
        lambda t, f, m: (["train", "--resume", str(t)], {}),
        "is not a run directory: it has no config.yaml",
        True,
    ),
    (
        "resume with --preset",
        lambda t, f, m: (["train", "--resume", str(t), "--preset", "tiny"], {}),
        "--resume takes the run's own config.yaml",
        True,
    ),
    (
        "LoRA keys that do not load (rank)",
        lambda t, f, m: (["train", "--resume", str(_finished_run(f)), "num_epochs=2", "model.lora_rank=8"], {}),
        "trained weights do not fit the model's shapes",
        False,
    ),
    (
        "LoRA keys that do not load (modules)",
        lambda t, f, m: (
            ["train", "--resume", str(_finished_run(f)), "num_epochs=2", "model.lora_target_modules=[to_q]"],
            {},
        ),
        "trained weights do not match the model",
        False,
    ),
    (
        "reward returns NaN",
        lambda t, f, m: (["train", TRUST, *T, *f, "reward.name=bad_rewards_18:nan"], {}),
        "returned non-finite values at sample indices [1]",
        False,
    ),
    (
        "reward returns the wrong shape",
        lambda t, f, m: (["train", TRUST, *T, *f, "reward.name=bad_rewards_18:wrong_shape"], {}),
        "returned shape (2, 2); expected (2,)",
        False,
    ),
    (
        "reward returns float64",
        lambda t, f, m: (["train", TRUST, *T, *f, "reward.name=bad_rewards_18:float64"], {}),
        "returned dtype torch.float64; it must return torch.float32",
        False,
    ),
    (
        "reward raises",
        lambda t, f, m: (["train", TRUST, *T, *f, "reward.name=bad_rewards_18:raises"], {}),
        "raised KeyError: 'no score for this prompt' (epoch 0, batch 0: samples 0-1 of process 0)",
        False,
    ),
    (
        "flow sampler on a diffusion model",
        lambda t, f, m: (["train", *T, *f, "sample.scheduler=flow_sde", "sample.eta=0.7"], {}),
        "is a flow-matching sampler but model.family=sd is a diffusion model: use ddim or ddpm",
        True,
    ),
    (
        "DDPM-style sampler on a flow model",
        lambda t, f, m: (["train", *T, *f, "model.pretrained=tiny_sd3", "sample.scheduler=ddim"], {}),
        "model.family=sd3 is a flow-matching model; sample.scheduler='ddim' is a DDPM-style sampler",
        True,
    ),
    (
        "unknown model family",
        lambda t, f, m: (["train", *T, *f, "model.family=sdxxl"], {}),
        "model.family='sdxxl' is not a model family; use one of sd, sdxl, flux, sd3 (or auto)",
        True,
    ),
    (
        "SDE window without a flow SDE sampler",
        lambda t, f, m: (["train", *T, *f, "sample.sde_window=[0,2]"], {}),
        "sample.sde_window (Flow-GRPO-Fast) needs a flow SDE sampler",
        True,
    ),
    (
        "SDE window out of range",
        lambda t, f, m: (
            ["train", *T, *f, "model.pretrained=tiny_sd3", "sample.scheduler=flow_sde", "sample.sde_window=[3,2]"],
            {},
        ),
        "sample.sde_window must be [first, end] with 0 <= first < end <= sample.num_steps (4); got [3, 2]",
        True,
    ),
]


@pytest.mark.parametrize(("build", "phrase", "early"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_message(
    build, phrase, early, fast_overrides, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    _write(tmp_path / "mods" / "bad_rewards_18.py", BAD_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    argv, env = build(tmp_path, fast_overrides, tiny_model_dir)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("DDPO_DEBUG", raising=False)
    capsys.readouterr()
    loads = []
    if early:  # no pipeline may be read before the error
        from diffusers import StableDiffusionPipeline

        original = StableDiffusionPipeline.from_pretrained.__func__
        monkeypatch.setattr(
            StableDiffusionPipeline,
            "from_pretrained",
            classmethod(lambda cls, *a, **k: loads.append(a) or original(cls, *a, **k)),
        )
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    assert err.count("ddpo: error:") == 1 or err.startswith("ddpo: give either"), err[-2000:]
    assert phrase in err, err[-2000:]
    assert loads == []
