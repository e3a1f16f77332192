"""The package layout's promises: public import paths of the README and notebooks still work after the move, the
world and rewards packages never import ddpo, and reading configs or reports does not load torch."""

from __future__ import annotations

import subprocess
import sys


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


def test_public_aliases_are_the_moved_modules():
    import world
    from ddpo import ablate, report
    from ddpo import world as ddpo_world
    from ddpo.ablate import load_grid, run_grid, write_outputs
    from ddpo.tools import ablate as tools_ablate
    from ddpo.tools import report as tools_report
    from ddpo.world import world_model_path

    assert ddpo_world.render is world.render and world_model_path is world.world_model_path
    assert report.load_run is tools_report.load_run and report.plot_reward_vs_queries is not None
    assert (load_grid, run_grid, write_outputs) == (tools_ablate.load_grid, tools_ablate.run_grid, ablate.write_outputs)


def test_world_and_rewards_do_not_import_ddpo():
    assert "ddpo" not in _imports_after("import world, rewards; rewards.get_reward('world')")


def test_configs_runlogs_reports_and_the_cli_load_without_torch():
    loaded = _imports_after(
        "import ddpo.cli, ddpo.tools.report, ddpo.training.runlog\n"
        "from ddpo.training.config import build_config, preset_names\n"
        "preset_names()"
    )
    assert "torch" not in loaded and "ddpo" in loaded
