"""The package layout's promises: one public import path per module (the old aliases are gone), the
world and rewards packages never import ddpo, and reading configs or reports does not load torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _imports_after(code: str) -> set[str]:
    """Top-level modules loaded by a fresh interpreter after running ``code``."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            f"{code}\nimport sys\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(out.stdout.split())


def test_one_public_path_per_module():
    """The world, report and ablation code is imported from where it lives; the old ``ddpo.world``, ``ddpo.report``
    and ``ddpo.ablate`` aliases are gone (a second path to the same module is one more thing to keep in step).
    Checked on disk: an editable install of another checkout could still resolve the old names."""
    import ddpo
    import world
    from ddpo.tools import ablate, report

    assert world.world_model_path and report.load_run and ablate.load_grid
    package = Path(ddpo.__file__).parent
    assert not [name for name in ("world", "report", "ablate") if (package / f"{name}.py").exists()]


def test_world_and_rewards_do_not_import_ddpo():
    assert "ddpo" not in _imports_after("import world, rewards; rewards.get_reward('world')")


def test_configs_runlogs_reports_and_the_cli_load_without_torch():
    loaded = _imports_after(
        "import ddpo.cli, ddpo.tools.report, ddpo.training.runlog\n"
        "from ddpo.training.config import build_config, preset_names\n"
        "preset_names()"
    )
    assert "torch" not in loaded and "ddpo" in loaded


def test_every_python_package_is_installed():
    """pyproject.toml lists its packages by hand: a sub-package missing there would be left out of a wheel (an
    editable install hides it), so every folder with an ``__init__.py`` must be listed."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(root).parts)
        for top in ("ddpo", "rewards", "world")
        for init in (root / top).rglob("__init__.py")
    }
    assert found - listed == set()
