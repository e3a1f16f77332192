"""The notebooks in notebooks/ run top to bottom in a real Jupyter kernel on a tiny ablation made here, and are
committed without outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from ddpo.tools.ablate import parse_grid, run_grid, write_outputs

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.fixture(scope="module")
def tiny_ablation(fast_settings, tmp_path_factory) -> Path:
    """2 algorithms x 1 reward x 2 seeds, 2 epochs each, on the 16-px test pipeline (cells run in this process)."""
    overrides = {"num_epochs": 2, **fast_settings}
    grid = parse_grid(
        {
            "output_dir": str(tmp_path_factory.mktemp("notebook_ablation") / "out"),
            "base": {"preset": "tiny", "overrides": overrides},
            "algorithms": [
                {"name": "ddpo_sf", "overrides": {"train.algorithm": "ddpo_sf"}},
                {"name": "rwr_sparse", "overrides": {"train.algorithm": "rwr_sparse"}},
            ],
            "rewards": [{"name": "jpeg", "reward": {"name": "jpeg_compressibility"}}],
            "seeds": [0, 1],
        }
    )
    assert all(outcome.returncode == 0 for outcome in run_grid(grid, in_process=True))
    write_outputs(grid)
    return grid.output_dir


def execute(name: str, monkeypatch, **env: str) -> nbformat.NotebookNode:
    """Run notebooks/<name> top to bottom in a fresh python3 kernel (its cwd: notebooks/); raise on any error."""
    for key, value in {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **env}.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}})
    client.execute()  # raises CellExecutionError on the first failing cell
    return notebook


def images(notebook: nbformat.NotebookNode) -> int:
    return sum("image/png" in output.get("data", {}) for cell in notebook.cells for output in cell.get("outputs", []))


def test_notebooks_are_committed_without_outputs():
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert {p.name for p in paths} >= {"run_report.ipynb", "ablation_report.ipynb"}
    for path in paths:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name} is committed with outputs"


def test_run_notebook_executes(tiny_ablation, monkeypatch):
    run_dir = tiny_ablation / "runs" / "rwr_sparse__jpeg__seed1"
    notebook = execute("run_report.ipynb", monkeypatch, DDPO_RUN_DIR=str(run_dir))
    assert images(notebook) == 4  # rewards, diagnostics, sample grids, before/after


def test_ablation_notebook_executes(tiny_ablation, monkeypatch):
    notebook = execute("ablation_report.ipynb", monkeypatch, DDPO_ABLATION_DIR=str(tiny_ablation))
    assert images(notebook) >= 2  # reward vs queries, and at least one diagnostic


def test_ablation_notebook_draws_the_equal_budget_table(tiny_ablation, monkeypatch, tmp_path):
    """Runs checked by ``ddpo eval`` (folders as the trainer and the check write them) become the table and the plot."""
    from test_equal_budget_table import make_run

    runs = tmp_path / "equal_budget" / "runs"
    make_run(runs, "ddpo_is_1k__world__seed0", 1024, 0.10, 0.01, 60.0)
    make_run(runs, "ddpo_is_1k__world__seed1", 1024, 0.04, 0.02, 120.0)
    notebook = execute(
        "ablation_report.ipynb",
        monkeypatch,
        DDPO_ABLATION_DIR=str(tiny_ablation),
        DDPO_EQUAL_BUDGET_DIR=str(tmp_path / "equal_budget"),
    )
    last = notebook.cells[-1].outputs
    shown = "".join(output.get("data", {}).get("text/markdown", "") for output in last)
    assert "**+0.070 ± 0.030** (2 seeds: +0.100 ± 0.010, +0.040 ± 0.020; 1.5 min)" in shown
    assert sum("image/png" in output.get("data", {}) for output in last) == 1
