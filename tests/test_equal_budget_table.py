"""scripts/equal_budget_table.py: the table of docs/results.md from the runs' ``ddpo eval`` summaries, against a hand
computation (run folders written by hand: metrics.jsonl, final/ and eval_all/summary.json as the trainer and
``ddpo eval`` write them)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_run(runs: Path, name: str, samples: int, change: float, se: float, seconds: float) -> None:
    run = runs / name
    (run / "final").mkdir(parents=True)
    (run / "eval_all").mkdir()
    rows = [{"epoch": 0, "samples": samples // 2, "epoch_seconds": seconds / 2}]
    rows.append({"epoch": 1, "samples": samples, "epoch_seconds": seconds / 2})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "config.yaml").write_text("num_epochs: 2\n")
    summary = {"change": change, "change_se": se, "mean_before": 0.4, "mean_after": 0.4 + change}
    (run / "eval_all" / "summary.json").write_text(json.dumps(summary))


def run_script(script: str, ablation: Path, *args: str) -> subprocess.CompletedProcess:
    """``python scripts/<script> ABLATION --no-eval ARGS...`` from the repository root, its output captured."""
    cmd = [sys.executable, str(ROOT / "scripts" / script), str(ablation), "--no-eval", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_table_by_hand(tmp_path):
    runs = tmp_path / "ablation" / "runs"
    make_run(runs, "ddpo_is_1k__world__seed0", 1024, 0.10, 0.01, 60.0)
    make_run(runs, "ddpo_is_1k__world__seed1", 1024, 0.04, 0.02, 120.0)
    make_run(runs, "nft_2k__world__seed0", 2048, -0.02, 0.01, 30.0)
    (runs / "unfinished_1k__world__seed0").mkdir()  # no final/: skipped
    result = run_script("equal_budget_table.py", tmp_path / "ablation")
    assert result.returncode == 0, result.stderr[-2000:]
    markdown = (tmp_path / "ablation" / "equal_budget.md").read_text()
    assert markdown.splitlines()[0] == "| estimator | 1,024 samples | 2,048 samples |"
    mean, se = 0.07, math.sqrt(((0.03**2) * 2) / 1 / 2)  # std over 2 seeds / sqrt(2)
    assert f"**{mean:+.3f} ± {se:.3f}** (2 seeds: +0.100 ± 0.010, +0.040 ± 0.020; 1.5 min)" in markdown
    assert "| nft | not run | **-0.020 ± n/a** (1 seed: -0.020 ± 0.010; 0.5 min) |" in markdown
    assert (tmp_path / "ablation" / "equal_budget.png").stat().st_size > 0
    assert "unfinished" not in markdown


def test_update_replaces_only_the_marked_table(tmp_path):
    runs = tmp_path / "ablation" / "runs"
    make_run(runs, "awm_1k__world__seed0", 1024, 0.05, 0.01, 60.0)
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- equal_budget:begin -->\n| old | table |\n<!-- equal_budget:end -->\nafter\n")
    result = run_script("equal_budget_table.py", tmp_path / "ablation", "--update", str(doc))
    assert result.returncode == 0, result.stderr[-2000:]
    table = (tmp_path / "ablation" / "equal_budget.md").read_text()
    assert doc.read_text() == f"intro\n<!-- equal_budget:begin -->\n{table}<!-- equal_budget:end -->\nafter\n"
    assert "| awm | **+0.050 ± n/a** (1 seed: +0.050 ± 0.010; 1.0 min) |" in table
    (tmp_path / "bare.md").write_text("no markers\n")
    result = run_script("equal_budget_table.py", tmp_path / "ablation", "--update", str(tmp_path / "bare.md"))
    assert result.returncode != 0 and "needs one line <!-- equal_budget:begin -->" in result.stderr


def test_default_run_seeds_and_their_marker(tmp_path):
    """The default run's seeds (ablations/default.yaml: ``default__world__seed<k>``, no budget in the name) make one
    row, and ``--marker default_run`` replaces that table only, leaving an equal_budget block in the same file."""
    runs = tmp_path / "ablation" / "runs"
    make_run(runs, "default__world__seed0", 4096, 0.12, 0.01, 480.0)
    make_run(runs, "default__world__seed2", 4096, 0.10, 0.02, 540.0)
    doc = tmp_path / "README.md"
    untouched = "<!-- equal_budget:begin -->\n| estimator |\n<!-- equal_budget:end -->\n"
    doc.write_text(f"a\n<!-- default_run:begin -->\nold\n<!-- default_run:end -->\n{untouched}")
    result = run_script("equal_budget_table.py", tmp_path / "ablation", "--marker", "default_run", "--update", str(doc))
    assert result.returncode == 0, result.stderr[-2000:]
    table = (tmp_path / "ablation" / "equal_budget.md").read_text()
    se = math.sqrt(0.01**2 * 2 / 1 / 2)  # std of (0.12, 0.10) over sqrt(2)
    assert f"| default | **+0.110 ± {se:.3f}** (2 seeds: +0.120 ± 0.010, +0.100 ± 0.020; 8.5 min) |" in table
    assert doc.read_text() == f"a\n<!-- default_run:begin -->\n{table}<!-- default_run:end -->\n{untouched}"


def test_a_run_still_training_is_not_checked(tmp_path):
    """An extended run of a grid that has not logged every epoch of its config is not finished, whatever lies in it
    (``ddpo ablate`` decides the same way), so the table never checks the weights of a run still training."""
    from ddpo.tools.ablate.equal_budget import checked_runs

    runs = tmp_path / "ablation" / "runs"
    make_run(runs, "nft_1k__world__seed0", 1024, 0.05, 0.01, 60.0)
    make_run(runs, "nft_2k__world__seed0", 2048, 0.05, 0.01, 60.0)
    (runs / "nft_2k__world__seed0" / "config.yaml").write_text("num_epochs: 4\n")  # 2 of 4 epochs logged
    assert [run.name for run in checked_runs(tmp_path / "ablation")] == ["nft_1k__world__seed0"]


def test_reward_backprop_table_puts_reward_and_guard_side_by_side(tmp_path):
    """scripts/reward_backprop_table.py: one row per estimator with its budget, minutes, the training reward's change
    (``eval_all``, CLIP-score units: one decimal) and the guard's (``eval_world``), each over seeds, by hand."""
    runs = tmp_path / "ablation" / "runs"
    make_run(runs, "draft__clip__seed0", 1728, 6.0, 2.0, 150.0)
    make_run(runs, "draft__clip__seed1", 1728, 8.0, 2.5, 210.0)
    make_run(runs, "nft__clip__seed0", 1280, 9.5, 2.0, 160.0)
    for name, change in (("draft__clip__seed0", 0.01), ("draft__clip__seed1", -0.03)):
        (runs / name / "eval_world").mkdir()
        summary = {"change": change, "change_se": 0.01, "mean_before": 0.8, "mean_after": 0.8 + change}
        (runs / name / "eval_world" / "summary.json").write_text(json.dumps(summary))
    doc = tmp_path / "results.md"
    doc.write_text("<!-- reward_backprop:begin -->\nold\n<!-- reward_backprop:end -->\n")
    result = run_script("reward_backprop_table.py", tmp_path / "ablation", "--update", str(doc))
    assert result.returncode == 0, result.stderr[-2000:]
    table = (tmp_path / "ablation" / "reward_backprop.md").read_text()
    assert (
        table.splitlines()[0]
        == "| estimator | epochs (samples) | training minutes | `clip_score` change | guard `world` change |"
    )
    clip_se, world_se = math.sqrt(2 * 1.0**2 / 1 / 2), math.sqrt(2 * 0.02**2 / 1 / 2)  # std over 2 seeds / sqrt(2)
    draft = (
        f"| draft | 2 (1,728) | 3.0 | **+7.0 ± {clip_se:.1f}** (2 seeds: +6.0 ± 2.0, +8.0 ± 2.5) | "
        f"**-0.010 ± {world_se:.3f}** (2 seeds: +0.010 ± 0.010, -0.030 ± 0.010) |"
    )
    assert draft in table.splitlines()
    assert "| nft | 2 (1,280) | 2.7 | **+9.5 ± n/a** (1 seed: +9.5 ± 2.0) | not checked |" in table.splitlines()
    assert doc.read_text() == f"<!-- reward_backprop:begin -->\n{table}<!-- reward_backprop:end -->\n"
    assert (tmp_path / "ablation" / "reward_backprop.png").stat().st_size > 0


def test_reward_and_guard_curves_average_the_seeds_at_each_evaluation(tmp_path):
    """The in-run curves: minutes are the epoch times summed up to the evaluated epoch, each point the mean over
    seeds; an epoch only one seed evaluated is left out."""
    from ddpo.tools.ablate.equal_budget import reward_and_guard_curves

    runs = tmp_path / "ablation" / "runs"
    for seed, seconds, evals in (
        (0, 60.0, [(0, 70.0, 0.8), (1, 80.0, 0.7)]),
        (1, 120.0, [(0, 72.0, 0.8), (1, 90.0, 0.9), (2, 1.0, 1.0)]),
    ):
        make_run(runs, f"alignprop__clip__seed{seed}", 128, 1.0, 0.5, seconds)
        rows = [{"epoch": e, "reward_mean": r, "guard/world_mean": g} for e, r, g in evals]
        (runs / f"alignprop__clip__seed{seed}" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    curves = reward_and_guard_curves(tmp_path / "ablation", "world")
    # epoch 1 ends after half of each run's seconds: (30 s + 60 s) / 2 = 45 s = 0.75 min
    assert curves == {"alignprop": [(0.0, 71.0, 0.8), (0.75, 85.0, 0.8)]}
