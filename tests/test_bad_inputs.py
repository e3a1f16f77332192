"""Every bad input of ``ddpo train`` ends in one clear message, exit code 2, and no traceback.

One row per bad input of the table in docs/errors.md: the command line (and environment) that provokes it, the key
phrase of its message, and whether it must fail before the model is loaded (``early``: no pipeline is read; the
others can only be found by a model or a run and fail before the first optimiser step). Each row runs through the
real CLI, ``ddpo.cli.main``, in process on the tiny pipeline.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import record_pipeline_loads

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


DUPLICATE = "train:\n  learning_rate: 0.1\n  learning_rate: 0.2\n"
ALIAS_BOMB = "reward:\n  options:\n    l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9)
)


def _sample(model_dir: Path, flag: str, value: str) -> list[str]:
    return ["sample", "--model", str(model_dir), "--prompt", "a cat", flag, value]


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


def _stub_run(tmp: Path, fast: list[str], files: dict[str, bytes | str | int] | None = None) -> Path:
    """``tmp/runs/run`` holding the resolved config.yaml of the fast tiny run (no checkpoint yet) and ``files`` (an
    int: a sparse file of that many zero bytes, no newline)."""
    import yaml

    from ddpo.training.config import build_config, to_dict

    run = tmp / "runs" / "run"
    _write(run / "config.yaml", yaml.safe_dump(to_dict(build_config(preset="tiny", overrides=fast)), sort_keys=False))
    for name, data in (files or {}).items():
        if isinstance(data, int):
            with open(run / name, "wb") as f:
                f.truncate(data)
        else:
            _write(run / name, data)
    return run


def _resume_stub(
    tmp: Path, fast: list[str], files: dict[str, bytes | str | int] | None = None, *extra: str
) -> list[str]:
    return ["train", "--resume", str(_stub_run(tmp, fast, files)), *extra]


def _linked_out(tmp: Path, fast: list[str], name: str, target_is_dir: bool) -> list[str]:
    """A stub run whose ``name`` is a symbolic link to a folder or file outside the run directory."""
    run = _stub_run(tmp, fast)
    target = tmp / "elsewhere" / name
    if target_is_dir:
        target.mkdir(parents=True)
    else:
        _write(target, '{"epoch": 0}\n')
    (run / name).symlink_to(target, target_is_directory=target_is_dir)
    return ["train", "--resume", str(run)]


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
    *[
        (f"launch: {name}", lambda t, f, m, e=env: (["train", *T, *f], e), phrase, True)
        for name, env, phrase in (
            (
                "FSDP in one process without CUDA",
                {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "WORLD_SIZE": "1"},
                "started one process on a machine without CUDA, where accelerate would train unsharded",
            ),
            (
                "FSDP version 1",
                {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "WORLD_SIZE": "2"},
                "ddpo shards with FSDP2 only: add --fsdp_version 2",
            ),
            (
                "FSDP activation checkpointing",
                {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_ACTIVATION_CHECKPOINTING": "true"},
                "set train.gradient_checkpointing=true (diffusers' own) instead",
            ),
            (
                "DeepSpeed",
                {"ACCELERATE_USE_DEEPSPEED": "true"},
                "the launch asks for DeepSpeed (ACCELERATE_USE_DEEPSPEED=true), which ddpo does not support",
            ),
        )
    ],
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
    # run directories and checkpoints
    *[
        (f"run_name {how}", lambda t, f, m, v=value: (["train", *T, *f, f"run_name={v(t)}"], {}), phrase, True)
        for how, value, phrase in (
            ("going up (..)", lambda t: "../x", "run_name='../x' must be a single folder name"),
            ("absolute", lambda t: t / "abs", "must be a single folder name (no /, \\, .. or absolute path)"),
            ("with a slash", lambda t: "a/b", "run_name='a/b' must be a single folder name"),
            ("with a backslash", lambda t: "a\\b", "must be a single folder name"),
            ("..", lambda t: "..", "run_name='..' must be a single folder name"),
        )
    ],
    (
        "new run in a folder holding files",
        lambda t, f, m: (_write(t / "runs" / "run" / "metrics.jsonl", '{"epoch": 0}\n') and ["train", *T, *f], {}),
        "runs/run holds files but no config.yaml (metrics.jsonl); a new run there would overwrite them",
        True,
    ),
    (
        "checkpoints linked out of the run",
        lambda t, f, m: (_linked_out(t, f, "checkpoints", True), {}),
        "checkpoints is a symbolic link to",
        True,
    ),
    (
        "final linked out of the run",
        lambda t, f, m: (_linked_out(t, f, "final", True), {}),
        "outside the run directory",
        True,
    ),
    (
        "metrics.jsonl linked out of the run",
        lambda t, f, m: (_linked_out(t, f, "metrics.jsonl", False), {}),
        "metrics.jsonl is a symbolic link to",
        True,
    ),
    (
        "metrics.jsonl line without epoch",
        lambda t, f, m: (_resume_stub(t, f, {"metrics.jsonl": '{"epoch": 0}\n{"loss": 1.0}\n'}), {}),
        "metrics.jsonl line 2 has no integer 'epoch'",
        True,
    ),
    (
        "report: metrics.jsonl line without reward_mean",
        lambda t, f, m: (
            ["report", str(_stub_run(t, f, {"metrics.jsonl": '{"epoch": 0, "samples": 4}\n'})), "--no-samples"],
            {},
        ),
        "metrics.jsonl line 1 has no 'reward_mean'",
        True,
    ),
    (
        "metrics.jsonl not UTF-8",
        lambda t, f, m: (_resume_stub(t, f, {"metrics.jsonl": b'{"epoch": 0}\n{"a": "\xff"}\n'}), {}),
        "metrics.jsonl line 2 is not UTF-8 text",
        True,
    ),
    (
        "metrics.jsonl line not JSON",
        lambda t, f, m: (_resume_stub(t, f, {"metrics.jsonl": '{"epoch": 0\n'}), {}),
        "metrics.jsonl line 1 is not JSON",
        True,
    ),
    (
        "metrics.jsonl endless line",
        lambda t, f, m: (_resume_stub(t, f, {"metrics.jsonl": 100 << 20}), {}),
        "metrics.jsonl line 1 is longer than",
        True,
    ),
    (
        "eval.jsonl line not an object",
        lambda t, f, m: (_resume_stub(t, f, {"eval.jsonl": "[1, 2]\n"}), {}),
        "eval.jsonl line 1 is not a JSON object",
        True,
    ),
    (
        "resume: config.yaml not YAML",
        lambda t, f, m: (["train", "--resume", str(_write(t / "run" / "config.yaml", "model: [a\n").parent)], {}),
        "config.yaml' is not valid YAML",
        True,
    ),
    (
        "resume: config.yaml huge",
        lambda t, f, m: (["train", "--resume", str(_stub_run(t, f, {"config.yaml": 4 << 20}))], {}),
        "config.yaml' is larger than 1 MiB",
        True,
    ),
    (
        "resume: config.yaml empty",
        lambda t, f, m: (["train", "--resume", str(_write(t / "run" / "config.yaml", "").parent)], {}),
        "config.yaml is empty",
        True,
    ),
    (
        "resume: run_name override",
        lambda t, f, m: (_resume_stub(t, f, None, "run_name=other"), {}),
        "run_name='other' would name another folder; a resumed run stays in",
        True,
    ),
    (
        "resume: output_dir override",
        lambda t, f, m: (_resume_stub(t, f, None, f"output_dir={t / 'elsewhere'}"), {}),
        "would name another folder; a resumed run stays in",
        True,
    ),
    (
        "process_timeout_seconds too large",
        lambda t, f, m: (["train", *T, *f, "process_timeout_seconds=100000000000000"], {}),
        "process_timeout_seconds must be <= 31536000 (365 days); got 100000000000000",
        True,
    ),
    # published settings and edge cases (CPS window, Flow-GRPO's KL and ratio)
    (
        "CPS window of the deterministic last step only",
        lambda t, f, m: (
            ["train", *T, *f, "model.pretrained=tiny_sd3", "sample.scheduler=flow_cps", "sample.sde_window=[3,4]"],
            {},
        ),
        "sample.sde_window=[3, 4] holds no stochastic step: with sample.scheduler=flow_cps the last step (3) is "
        "deterministic",
        True,
    ),
    (
        "Flow-GRPO KL on a DDPM-style sampler",
        lambda t, f, m: (["train", *T, *f, "train.kl_coef=0.04", "train.kl_form=flow_grpo"], {}),
        "train.kl_form=flow_grpo is Flow-GRPO's KL of a flow SDE step: it needs sample.scheduler=flow_sde or flow_cps",
        True,
    ),
    (
        "Flow-GRPO ratio on a DDPM-style sampler",
        lambda t, f, m: (["train", *T, *f, "train.ratio_form=flow_grpo"], {}),
        "train.ratio_form=flow_grpo is Flow-GRPO's PPO ratio of a flow SDE step: it needs sample.scheduler=flow_sde",
        True,
    ),
    (
        "Flow-GRPO ratio without the PPO loss",
        lambda t, f, m: (
            ["train", *T, *f, "model.pretrained=tiny_sd3", "sample.scheduler=flow_sde", "train.algorithm=rwr"]
            + ["train.ratio_form=flow_grpo"],
            {},
        ),
        "train.ratio_form=flow_grpo changes the PPO ratio, which only train.algorithm=ddpo_is uses; got rwr",
        True,
    ),
    (
        "Flow-GRPO KL with a forward-process algorithm",
        lambda t, f, m: (
            ["train", *T, *f, "model.pretrained=tiny_sd3", "sample.scheduler=flow_sde", "train.algorithm=awm"]
            + ["train.kl_form=flow_grpo"],
            {},
        ),
        "train.kl_form=flow_grpo is the KL of a log-prob step; train.algorithm=awm has its own KL",
        True,
    ),
    (
        "unknown KL form",
        lambda t, f, m: (["train", *T, *f, "train.kl_form=flowgrpo"], {}),
        "train.kl_form must be gaussian or flow_grpo; got 'flowgrpo'",
        True,
    ),
    # trust boundaries (import-path opt-in, the reward server) and eval's reward options
    (
        "config opts in to import paths",
        lambda t, f, m: (["train", *T, *f, "reward.trust_import_path=true"], {}),
        "reward.trust_import_path=true: a config file, grid or override cannot opt in to import-path rewards",
        True,
    ),
    (
        "config file opts in to import paths",
        lambda t, f, m: (["train", "--config", str(_write(t / "trust.yaml", "reward: {trust_import_path: true}"))], {}),
        "cannot opt in to import-path rewards (importing one runs its code); delete the key and give --trust-import",
        True,
    ),
    (
        "eval: import path without opt-in",
        lambda t, f, m: (["eval", "--model", "world", "--pass-at", "1", "--reward", "bad_rewards_18:nan"], {}),
        "reward 'bad_rewards_18:nan' is an import path: loading it imports and runs that module's code",
        True,
    ),
    (
        "eval: --reward-options YAML error",
        lambda t, f, m: (
            ["eval", "--model", "world", "--pass-at", "1", "--reward", "world", "--reward-options", "{a: [1"],
            {},
        ),
        "--reward-options is not valid YAML: while parsing a flow sequence: expected ',' or ']', but got",
        True,
    ),
    (
        "serve-reward: import path without opt-in",
        lambda t, f, m: (["serve-reward", "bad_rewards_18:nan", "--port", "0"], {}),
        "If you trust it, opt in with --trust-import-path on the command line or DDPO_TRUST_IMPORT_PATH=1",
        True,
    ),
    (
        "serve-reward: port out of range",
        lambda t, f, m: (["serve-reward", "brightness", "--port", "70000"], {}),
        "serve-reward --port must be 0-65535 (0: a free one); got 70000",
        True,
    ),
    (
        "serve-reward: negative max batch",
        lambda t, f, m: (["serve-reward", "brightness", "--max-batch", "-1"], {}),
        "serve-reward --max-batch must be >= 1 (the largest batch a request may hold); got -1",
        True,
    ),
    (
        "serve-reward: zero max batch",
        lambda t, f, m: (["serve-reward", "brightness", "--max-batch", "0"], {}),
        "serve-reward --max-batch must be >= 1",
        True,
    ),
    (
        "serve-reward: zero max image size",
        lambda t, f, m: (["serve-reward", "brightness", "--max-image-size", "0"], {}),
        "serve-reward --max-image-size must be >= 1 (pixels per side); got 0",
        True,
    ),
    (
        "serve-reward: --options YAML error",
        lambda t, f, m: (["serve-reward", "brightness", "--options", "{quality: [80"], {}),
        "--options is not valid YAML: while parsing a flow sequence: expected ',' or ']', but got '<stream end>'",
        True,
    ),
    (
        "serve-reward: reachable address without token",
        lambda t, f, m: (["serve-reward", "brightness", "--host", "0.0.0.0", "--token-env", "DDPO_NO_TOKEN_26"], {}),
        "serve-reward --host 0.0.0.0 can be reached from other machines and no token is set: set one in DDPO_NO_TOK",
        True,
    ),
    (
        "serve-reward: unknown host",
        lambda t, f, m: (["serve-reward", "brightness", "--host", "no-such-host.invalid"], {}),
        "serve-reward --host no-such-host.invalid: no such address (",
        True,
    ),
    # config loading and validation, `ddpo sample` / `eval` / `config` arguments
    *[
        (f"non-finite {key}", lambda t, f, m, k=key, v=value: (["train", *T, *f, f"{k}={v}"], {}), phrase, True)
        for key, value, phrase in (
            ("train.learning_rate", ".inf", "train.learning_rate must be a finite number; got inf"),
            ("sample.guidance_scale", ".inf", "sample.guidance_scale must be a finite number; got inf"),
            ("model.lora_alpha", ".nan", "model.lora_alpha must be a finite number; got nan"),
        )
    ],
    (
        "non-finite reward option",
        lambda t, f, m: (["train", *T, *f, "reward.name=brightness", "reward.options.target=.nan"], {}),
        "reward 'brightness': option 'target' must be a finite number; got nan (set reward.options.target)",
        True,
    ),
    (
        "duplicate key in a config file",
        lambda t, f, m: (["train", "--config", str(_write(t / "d.yaml", DUPLICATE)), *f], {}),
        "d.yaml' sets train.learning_rate twice (lines 2 and 3); keep one of them",
        True,
    ),
    (
        "duplicate key in an override's value",
        lambda t, f, m: (["train", *T, *f, "reward.options={quality: 80, quality: 90}"], {}),
        "sets reward.options.quality twice (line 1, columns 2 and 15)",
        True,
    ),
    (
        "duplicate key in a grid file",
        lambda t, f, m: (["ablate", "--dry-run", str(_write(t / "grid.yaml", "seeds: [0]\nseeds: [1]\n"))], {}),
        "grid.yaml' sets seeds twice (lines 1 and 2); keep one of them",
        True,
    ),
    (
        "YAML alias bomb (ddpo config)",
        lambda t, f, m: (["config", "--config", str(_write(t / "bomb.yaml", ALIAS_BOMB))], {}),
        "bomb.yaml' expands to more than 100000 values (its aliases, *name, followed)",
        True,
    ),
    (
        "config file too large",
        lambda t, f, m: (["train", "--config", str(_write(t / "big.yaml", "seed: 1\n" + "#" * (1 << 20))), *f], {}),
        "big.yaml' is larger than 1 MiB",
        True,
    ),
    (
        "config file not UTF-8",
        lambda t, f, m: (["train", "--config", str(_write(t / "l1.yaml", b"run_name: caf\xe9\n")), *f], {}),
        "l1.yaml' is not UTF-8 text (byte 13: invalid continuation byte); save it as UTF-8",
        True,
    ),
    (
        "--config a folder",
        lambda t, f, m: (["train", "--config", str(t), *f], {}),
        "' is a folder, not a YAML file",
        True,
    ),
    (
        "broken --config (ddpo config)",
        lambda t, f, m: (["config", "--config", str(_write(t / "bad.yaml", "train: [1, 2\n"))], {}),
        "is not valid YAML: while parsing a flow sequence: expected ',' or ']', but got '<stream end>' (line 2, column 1)",
        True,
    ),
    (
        "model.pretrained a file",
        lambda t, f, m: (["train", *T, *f, "model.pretrained=/dev/null"], {}),
        "model.pretrained='/dev/null' is a file, not a folder",
        True,
    ),
    (
        "import path not of the form package.module:attribute",
        lambda t, f, m: (["train", TRUST, *T, *f, "reward.name=..:x"], {}),
        "reward.name='..:x' is not an import path of the form package.module:attribute",
        True,
    ),
    (
        "import path not of the form (serve-reward)",
        lambda t, f, m: (["serve-reward", "..:x", TRUST], {}),
        "reward '..:x' is not an import path of the form package.module:attribute",
        True,
    ),
    (
        "mapping override into a plain value",
        lambda t, f, m: (["train", *T, *f, "reward.options.quality=80", "reward.options.quality.x=1"], {}),
        "reward.options.quality is 80, not a mapping: cannot set reward.options.quality.x inside it",
        True,
    ),
    *[
        (f"optimizer: {key}", lambda t, f, m, k=key, v=value: (["train", *T, *f, f"train.{k}={v}"], {}), phrase, True)
        for key, value, phrase in (
            ("adam_beta1", "1.5", "train.adam_beta1 must be in [0, 1) (an Adam moment's decay); got 1.5"),
            ("adam_beta2", "1", "train.adam_beta2 must be in [0, 1) (an Adam moment's decay); got 1.0"),
            ("adam_epsilon", "-1e-8", "train.adam_epsilon must be >= 0; got -1e-08"),
            ("adam_weight_decay", "-0.1", "train.adam_weight_decay must be >= 0; got -0.1"),
        )
    ],
    *[
        (
            f"rule value: {key}",
            lambda t, f, m, k=key, v=value, a=algorithm: (["train", *T, *f, *a, f"train.{k}={v}"], {}),
            phrase,
            True,
        )
        for key, value, algorithm, phrase in (
            # an estimator's own key is validated when that estimator is chosen
            ("rwr_temperature", "0", ["train.algorithm=rwr"], "train.rwr_temperature must be > 0; got 0.0"),
            ("rwr_quantile", "5", ["train.algorithm=rwr_sparse"], "train.rwr_quantile must be in [0, 1); got 5.0"),
            ("per_prompt_buffer_size", "-1", [], "train.per_prompt_buffer_size must be >= 1; got -1"),
        )
    ],
    *[
        (
            f"another estimator's key: {key}",
            lambda t, f, m, k=key, v=value: (["train", *T, *f, f"train.{k}={v}"], {}),
            phrase,
            True,
        )
        for key, value, phrase in (
            (
                "rwr_temperature",
                "0",
                "train.rwr_temperature is RWR's softmax temperature and does nothing with train.algorithm=ddpo_is: set "
                "it back to 1 or use train.algorithm=rwr",
            ),
            (
                "nft_beta",
                "0.5",
                "train.nft_beta is DiffusionNFT's distance b of its implicit policies and does nothing with "
                "train.algorithm=ddpo_is: set it back to 1 or use train.algorithm=nft",
            ),
            (
                "old_policy_flat",
                "-1",
                "train.old_policy_flat is the old (EMA) policy's schedule and does nothing with train.algorithm=ddpo_is: "
                "set it back to 0 or use train.algorithm=awm or nft",
            ),
        )
    ],
    *[
        (
            f"reward backpropagation: {name}",
            lambda t, f, m, a=args: (["train", *T, *f, "train.algorithm=draft", *a], {}),
            phrase,
            True,
        )
        for name, args, phrase in (
            (
                "reward not differentiable",
                [],
                "reward 'jpeg_compressibility' is not differentiable; use a differentiable",
            ),
            (
                "composite reward not differentiable",
                ["reward.name=weighted", 'reward.options={"components": {"brightness": 1, "jpeg_compressibility": 1}}'],
                "reward 'weighted' is not differentiable",
            ),
            ("sampler", ["reward.name=brightness", "sample.scheduler=euler"], "(a differentiable step); got 'euler'"),
            (
                "draft_k",
                ["reward.name=brightness", "train.draft_k=5"],
                "train.draft_k must be in [1, sample.num_steps=4]",
            ),
        )
    ],
    (
        "CPS eta above 1",
        lambda t, f, m: (
            ["train", *T, *f, "model.pretrained=tiny_sd3", "sample.scheduler=flow_cps", "sample.eta=1.5"],
            {},
        ),
        "sample.eta must be <= 1 with the CPS sampler",
        True,
    ),
    (
        "non-finite gradient before the first checkpoint",
        lambda t, f, m: (["train", *T, *f, "log_images=false", "train.learning_rate=1e30"], {}),
        "non-finite gradient norm at epoch 0, global step 1; lower train.learning_rate or use mixed_precision=no. No "
        "checkpoint was written yet, so a resume starts the run over.",
        False,
    ),
    *[
        (f"sample {flag} {value}", lambda t, f, m, a=flag, v=value: (_sample(m, a, v), {}), phrase, True)
        for flag, value, phrase in (
            ("--eta", "5", "--eta must be <= 1 (above 1 the DDIM variance exceeds 1 - alpha_bar_prev"),
            ("--guidance", "nan", "--guidance must be a finite number; got nan"),
            ("--seeds", str(2**64), "--seeds must be integers in [-2**63, 2**64) (torch.Generator's)"),
        )
    ],
    (
        "sample --out under a file",
        lambda t, f, m: (_sample(m, "--out", str(_write(t / "file", "")) + "/out"), {}),
        "/file, which is a file, not a folder; choose another output folder",
        True,
    ),
    (
        "sample --out unwritable",
        lambda t, f, m: (_sample(m, "--out", "/sys/ddpo-samples"), {}),
        "cannot write --out /sys/ddpo-samples",
        True,
    ),
    (
        "eval --pass-at 0",
        lambda t, f, m: (["eval", "--model", "world", "--pass-at", "0"], {}),
        "--pass-at takes one or more k >= 1, e.g. --pass-at 1 4 16; got [0]",
        True,
    ),
    (
        "eval --out a file",
        lambda t, f, m: (["eval", "--model", "world", "--pass-at", "1", "--out", str(_write(t / "scores", ""))], {}),
        "/scores is a file, not a folder; choose another output folder",
        True,
    ),
    (
        "eval --guidance inf",
        lambda t, f, m: (["eval", "--model", "world", "--pass-at", "1", "--guidance", "inf"], {}),
        "--guidance must be a finite number; got inf",
        True,
    ),
    *[
        (
            f"guards: {name}",
            lambda t, f, m, a=args: (["train", *T, *f, *a], {}),
            phrase,
            True,
        )
        for name, args, phrase in (
            ("stop rule without evaluation", ["stop.patience=2"], "stop.patience acts on the held-out evaluations"),
            (
                "guard_drop without guards",
                ["eval_prompts=simple_animals", "stop.guard_drop=0.1"],
                "name them in eval_rewards",
            ),
            ("kl_limit without a KL", ["eval_prompts=simple_animals", "stop.kl_limit=0.1"], "set train.kl_coef > 0"),
            ("negative rule", ["stop.min_delta=-1"], "stop.min_delta must be >= 0"),
            ("final_checkpoint", ["final_checkpoint=first"], "final_checkpoint must be last or best"),
            ("best_metric", ["eval_prompts=simple_animals", "best_metric=loss"], "best_metric must be reward_mean"),
            (
                "eval_rewards import path without opt-in",
                ["eval_prompts=simple_animals", "eval_rewards.bad_rewards_18:nan={}"],
                "eval_rewards: reward 'bad_rewards_18:nan' is an import path",
            ),
            (
                "eval_rewards options not a mapping",
                ["eval_prompts=simple_animals", "eval_rewards.brightness=3"],
                "must be the reward's options",
            ),
        )
    ],
    (
        "per_component without a weighted reward",
        lambda t, f, m: (["train", *T, *f, "sample.samples_per_prompt=2", "train.advantage=per_component"], {}),
        "normalises each component of a weighted reward",
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
    loads = record_pipeline_loads(monkeypatch) if early else []  # no pipeline may be read before the error
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    assert err.count("ddpo: error:") == 1 or err.startswith("ddpo: give either"), err[-2000:]
    assert phrase in err, err[-2000:]
    assert loads == []
