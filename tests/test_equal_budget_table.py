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
    summary = {"change": change, "change_se": se, "mean_before": 0.4, "mean_after": 0.4 + change}
    (run / "eval_all" / "summary.json").write_text(json.dumps(summary))


def test_table_by_hand(tmp_path):
    runs = tmp_path / "ablation" / "runs"
    make_run(runs, "ddpo_is_1k__world__seed0", 1024, 0.10, 0.01, 60.0)
    make_run(runs, "ddpo_is_1k__world__seed1", 1024, 0.04, 0.02, 120.0)
    make_run(runs, "nft_2k__world__seed0", 2048, -0.02, 0.01, 30.0)
    (runs / "unfinished_1k__world__seed0").mkdir()  # no final/: skipped
    cmd = [sys.executable, str(ROOT / "scripts" / "equal_budget_table.py"), str(tmp_path / "ablation"), "--no-eval"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    markdown = (tmp_path / "ablation" / "equal_budget.md").read_text()
    assert markdown.splitlines()[0] == "| estimator | 1,024 samples | 2,048 samples |"
    mean, se = 0.07, math.sqrt(((0.03**2) * 2) / 1 / 2)  # std over 2 seeds / sqrt(2)
    assert f"**{mean:+.3f} ± {se:.3f}** (2 seeds: +0.100 ± 0.010, +0.040 ± 0.020; 1.5 min)" in markdown
    assert "| nft | not run | **-0.020 ± n/a** (1 seed: -0.020 ± 0.010; 0.5 min) |" in markdown
    assert (tmp_path / "ablation" / "equal_budget.png").stat().st_size > 0
    assert "unfinished" not in markdown
