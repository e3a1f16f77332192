"""Only the user opts in to rewards given by import path (their module's code runs when imported),
with ``--trust-import-path`` anywhere on the command line or ``DDPO_TRUST_IMPORT_PATH=1``; a config file, a grid or an
override cannot. Every entry point that builds a reward from a name (train/config, ``eval RUN``, ``eval --reward``,
``report RUN``, ``serve-reward``) refuses before the module is imported: its top-level code (which writes a marker
file here) never runs without the opt-in."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

from ddpo.cli import main
from ddpo.tools.ablate import GridError, parse_grid
from ddpo.training.config import ConfigError, build_config, to_dict
from ddpo.training.trust import TRUST_ENV

MARKED = """
from pathlib import Path

import rewards

Path({marker!r}).write_text("imported")


@rewards.reward_function
def luma(images, prompts):
    return images.mean(dim=(1, 2, 3))


def undeclared(images, prompts):
    return images.mean(dim=(1, 2, 3))
"""


@pytest.fixture
def marked(tmp_path, monkeypatch) -> tuple[str, Path]:
    """A module ``marked_reward_26`` whose import writes ``marker``; the env has no opt-in. Yields (module, marker)."""
    marker = tmp_path / "imported"
    module = f"marked_reward_26_{abs(hash(str(tmp_path)))}"  # a fresh module name per test: nothing cached
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / f"{module}.py").write_text(MARKED.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    monkeypatch.delenv(TRUST_ENV, raising=False)
    monkeypatch.delenv("DDPO_DEBUG", raising=False)
    return module, marker


def _fake_run(tmp_path: Path, reward: str) -> Path:
    """A run directory with the tiny preset's resolved config naming ``reward``, an empty log and a final/ folder:
    enough for ``ddpo eval`` and ``ddpo report`` to reach the reward."""
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    config = to_dict(build_config(preset="tiny"))
    config["reward"] = {"name": reward, "options": {}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.jsonl").write_text("")
    return run


def _refused(capsys, argv: list[str], marker: Path, phrase: str = "is an import path") -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert phrase in err and "--trust-import-path" in err and TRUST_ENV in err, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert not marker.exists(), "the module was imported: its top-level code ran before the refusal"
    return err


def test_a_config_file_grid_or_override_cannot_opt_in(tmp_path, marked):
    module, marker = marked
    for source in (
        {"overrides": ["reward.trust_import_path=true"]},
        {"config_file": tmp_path / "c.yaml"},
    ):
        (tmp_path / "c.yaml").write_text("reward:\n  name: jpeg_compressibility\n  trust_import_path: true\n")
        with pytest.raises(ConfigError, match="cannot opt in.*--trust-import-path.*DDPO_TRUST_IMPORT_PATH=1"):
            build_config(preset="tiny", **source)
    with pytest.raises(ConfigError, match="cannot opt in"):  # a resolved config (an ablation's pinned cell)
        build_config(base={"reward": {"name": f"{module}:luma", "trust_import_path": True}})
    grid = {
        "output_dir": str(tmp_path / "out"),
        "base": {"preset": "tiny", "overrides": {"reward.trust_import_path": True}},
        "algorithms": [{"name": "is", "overrides": {"train.algorithm": "ddpo_is"}}],
        "rewards": [{"name": "mine", "reward": {"name": f"{module}:luma"}}],
        "seeds": [0],
    }
    with pytest.raises(GridError, match="cannot opt in"):
        parse_grid(grid)
    grid["base"]["overrides"].pop("reward.trust_import_path")
    with pytest.raises(GridError, match="is an import path.*--trust-import-path"):
        parse_grid(grid)
    # false, as the config.yaml of runs before this change holds it, is read (and changes nothing); it is no longer
    # written into new configs.
    old = to_dict(build_config(preset="tiny"))
    assert "trust_import_path" not in old["reward"]
    old["reward"]["trust_import_path"] = False
    assert to_dict(build_config(base=old)) == to_dict(build_config(preset="tiny"))
    with pytest.raises(ConfigError, match=f"reward '{module}:luma' is an import path"):
        build_config(preset="tiny", overrides=[f"reward.name={module}:luma", "reward.trust_import_path=false"])
    assert not marker.exists()


def test_the_flag_anywhere_or_the_environment_opts_in(marked, monkeypatch, capsys):
    module, marker = marked
    overrides = [f"reward.name={module}:luma", "num_epochs=2"]
    _refused(capsys, ["config", "--preset", "tiny", *overrides], marker)
    for argv in (
        ["config", "--trust-import-path", "--preset", "tiny", *overrides],
        ["config", "--preset", "tiny", *overrides, "--trust-import-path"],  # after the overrides
        ["config", "--preset", "tiny", overrides[0], "--trust-import-path", overrides[1]],  # between them
    ):
        assert main(argv) == 0, argv
        assert f"name: {module}:luma" in capsys.readouterr().out
        assert TRUST_ENV not in os.environ  # the opt-in lasts as long as its command
    monkeypatch.setenv(TRUST_ENV, "1")
    assert build_config(preset="tiny", overrides=overrides).reward.name == f"{module}:luma"
    monkeypatch.setenv(TRUST_ENV, "0")
    with pytest.raises(ConfigError, match="is an import path"):
        build_config(preset="tiny", overrides=overrides)
    assert not marker.exists()  # validating a config imports nothing


def test_eval_of_a_run_refuses_its_import_path_reward_before_importing(tmp_path, marked, capsys):
    module, marker = marked
    run = _fake_run(tmp_path, f"{module}:luma")
    err = _refused(capsys, ["eval", str(run)], marker)
    assert "config.yaml" in err  # where the name came from


def test_report_of_a_run_refuses_its_import_path_reward_before_importing(tmp_path, marked, capsys):
    module, marker = marked
    run = _fake_run(tmp_path, f"{module}:luma")
    _refused(capsys, ["report", str(run)], marker)


def test_eval_reward_and_serve_reward_refuse_an_import_path_before_importing(marked, capsys):
    module, marker = marked
    _refused(capsys, ["eval", "--model", "world", "--pass-at", "1", "--reward", f"{module}:luma"], marker)
    _refused(capsys, ["serve-reward", f"{module}:luma", "--port", "0"], marker)
    # With the flag (last on the line) the module is imported, and then refused as a reward it does not declare:
    # the gate let it through, and nothing is served or sampled.
    for argv in (
        ["eval", "--model", "world", "--pass-at", "1", "--reward", f"{module}:undeclared", "--trust-import-path"],
        ["serve-reward", f"{module}:undeclared", "--port", "0", "--trust-import-path"],
    ):
        assert main(argv) == 2
        assert "not a declared reward" in capsys.readouterr().err
        assert marker.exists()
        marker.unlink()
        sys.modules.pop(module)  # imported afresh by the next command


def test_ablate_takes_the_flag_and_its_grid_cannot_opt_in(tmp_path, marked, capsys):
    module, marker = marked
    grid = {
        "output_dir": str(tmp_path / "out"),
        "base": {"preset": "tiny"},
        "algorithms": [{"name": "is", "overrides": {"train.algorithm": "ddpo_is"}}],
        "rewards": [{"name": "mine", "reward": {"name": f"{module}:luma"}}],
        "seeds": [0],
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    _refused(capsys, ["ablate", str(path), "--dry-run"], marker)
    assert main(["ablate", str(path), "--dry-run", "--trust-import-path"]) == 0  # validated: the module is imported
    assert marker.exists() and TRUST_ENV not in os.environ
