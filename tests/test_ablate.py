"""Ablation grids (``ddpo ablate``) and reports (``ddpo report``) on a tiny real pipeline: every cell runs, the tidy
results / summary / plot are right, an interrupted grid resumes without redoing finished cells, and a bad cell stops
the grid before anything runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from ddpo.cli import main
from ddpo.tools.ablate import ID_COLUMNS, GridError, load_grid, parse_grid, run_grid, summarize, write_outputs
from ddpo.tools.report import load_run


def tiny_grid(settings: dict, output_dir: Path, **changes) -> dict:
    """2 algorithms x 1 reward x 2 seeds, 2 epochs of 4 samples each, on the 16-px test pipeline (``settings``: the
    ``fast_settings`` fixture)."""
    grid = {
        "name": "tiny",
        "output_dir": str(output_dir),
        "parallel": 2,
        "base": {
            "preset": "tiny",
            "overrides": {
                "num_epochs": 2,
                **settings,
                "log_images": True,
                "eval_prompts": "simple_animals",
                "eval_samples": 2,
            },
        },
        "algorithms": [
            {"name": "ddpo_is", "overrides": {"train.algorithm": "ddpo_is"}},
            {"name": "rwr_kl", "overrides": {"train.algorithm": "rwr", "train.kl_coef": 0.1}},
        ],
        "rewards": [{"name": "jpeg", "reward": {"name": "jpeg_compressibility", "options": {"quality": 90}}}],
        "seeds": [0, 1],
    }
    grid.update(changes)
    return grid


@pytest.fixture(scope="module")
def finished_grid(fast_settings, tmp_path_factory):
    """The tiny grid, run (cells in this process, for speed) and collected."""
    grid = parse_grid(tiny_grid(fast_settings, tmp_path_factory.mktemp("ablation") / "out"))
    outcomes = run_grid(grid, in_process=True)
    assert [o.returncode for o in outcomes] == [0, 0, 0, 0]
    write_outputs(grid)
    return grid


def test_grid_runs_every_cell_and_writes_results_summary_and_plot(finished_grid):
    out = finished_grid.output_dir
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["ddpo_is__jpeg__seed0", "ddpo_is__jpeg__seed1", "rwr_kl__jpeg__seed0", "rwr_kl__jpeg__seed1"]
    config = yaml.safe_load((out / "runs" / "rwr_kl__jpeg__seed1" / "config.yaml").read_text())
    assert config["seed"] == 1 and config["train"]["algorithm"] == "rwr" and config["train"]["kl_coef"] == 0.1
    assert config["reward"] == {"name": "jpeg_compressibility", "options": {"quality": 90}}  # no opt-in in a config
    # Cells are launched from their validated, fully resolved config (a preset edited mid-grid cannot leak in).
    assert yaml.safe_load((out / "configs" / "rwr_kl__jpeg__seed1.yaml").read_text()) == config

    results = pd.read_csv(out / "results.csv")
    assert list(results.columns[: len(ID_COLUMNS)]) == ID_COLUMNS
    assert {"approx_kl", "clipfrac", "ratio_mean", "ratio_max", "loss", "grad_norm", "kl"} <= set(results.columns)
    assert len(results) == 2 * 2 * 2  # cells x seeds x epochs
    assert sorted(results.reward_queries.unique()) == [4, 8]
    run = results[(results.cell == "ddpo_is__jpeg") & (results.seed == 1)].sort_values("epoch")
    logged = [json.loads(line) for line in (out / "runs" / "ddpo_is__jpeg__seed1" / "metrics.jsonl").open()]
    assert run.reward_mean.tolist() == pytest.approx([m["reward_mean"] for m in logged])

    summary = pd.read_csv(out / "summary.csv")
    assert summary.cell.tolist() == ["ddpo_is__jpeg", "rwr_kl__jpeg"] and summary.seeds.tolist() == [2, 2]
    finals = results[results.epoch == 1].groupby("cell").reward_mean
    assert summary.final_mean.tolist() == pytest.approx(finals.mean().tolist())
    assert summary.final_std.tolist() == pytest.approx(finals.std(ddof=1).tolist())
    # Held-out evaluations: every run scores the same base-model images first; change = after - before per seed.
    evals = pd.read_csv(out / "eval.csv")
    assert len(evals) == 2 * 2 * 2 and sorted(evals.epoch.unique()) == [0, 2]
    assert evals[evals.epoch == 0].reward_mean.nunique() == 1
    after = evals[evals.epoch == 2].sort_values(["cell", "seed"]).groupby("cell", sort=True).reward_mean
    before = evals[evals.epoch == 0].reward_mean.iloc[0]
    assert summary.heldout_before.tolist() == pytest.approx([before, before])
    assert summary.heldout_after_mean.tolist() == pytest.approx(after.mean().tolist())
    assert summary.heldout_change_mean.tolist() == pytest.approx((after.mean() - before).tolist())
    assert summary.heldout_change_std.tolist() == pytest.approx(after.std(ddof=1).tolist())
    markdown = (out / "summary.md").read_text()
    assert "| jpeg | rwr_kl |" in markdown and "midpoint" in markdown and "held-out change" in markdown
    with Image.open(out / "reward_vs_queries.png") as image:
        assert image.size[0] > 300 and image.size[1] > 200
    again = load_grid(out / "grid.yaml")  # the grid as run: the same cells
    assert [(c.run_dir, c.overrides) for c in again.cells] == [(c.run_dir, c.overrides) for c in finished_grid.cells]


def test_rerun_resumes_interrupted_cells_and_skips_finished_ones(finished_grid, fast_settings, tmp_path, capsys):
    """Through `ddpo ablate` (cells in parallel subprocesses): one cell killed after its first epoch's checkpoint is
    resumed, one killed before any checkpoint is restarted, the finished ones are not touched."""
    out = tmp_path / "out"
    shutil.copytree(finished_grid.output_dir, out)
    runs = out / "runs"
    interrupted, early = runs / "rwr_kl__jpeg__seed1", runs / "ddpo_is__jpeg__seed1"
    original = [json.loads(line) for line in (interrupted / "metrics.jsonl").open()]
    # Killed during epoch 2: no final/, only the epoch-1 checkpoint, one metrics line.
    shutil.rmtree(interrupted / "final")
    shutil.rmtree(interrupted / "checkpoints" / "checkpoint_000002")
    (interrupted / "metrics.jsonl").write_text(json.dumps(original[0]) + "\n")
    # Killed during epoch 1: a run directory without any checkpoint.
    shutil.rmtree(early / "final")
    shutil.rmtree(early / "checkpoints")
    (early / "metrics.jsonl").unlink()
    finished = [runs / "ddpo_is__jpeg__seed0" / "metrics.jsonl", runs / "rwr_kl__jpeg__seed0" / "metrics.jsonl"]
    before = [(p.stat().st_mtime_ns, p.read_bytes()) for p in finished]

    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(tiny_grid(fast_settings, out)))
    assert main(["ablate", str(grid_file), "--parallel", "2"]) == 0
    printed = capsys.readouterr().out
    assert "2 finished, 1 to resume, 1 to run" in printed

    assert [(p.stat().st_mtime_ns, p.read_bytes()) for p in finished] == before
    assert "--resume" in (out / "logs" / "rwr_kl__jpeg__seed1.log").read_text()
    resumed = [json.loads(line) for line in (interrupted / "metrics.jsonl").open()]
    assert [m["epoch"] for m in resumed] == [0, 1] and (interrupted / "final").is_dir()
    assert resumed[1]["reward_mean"] == original[1]["reward_mean"]  # an exact resume
    assert len((early / "metrics.jsonl").read_text().splitlines()) == 2 and (early / "final").is_dir()
    assert len(pd.read_csv(out / "results.csv")) == 8

    # Everything finished: a rerun runs nothing.
    assert main(["ablate", str(grid_file)]) == 0
    assert "4 finished, 0 to resume, 0 to run" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change, message",
    [
        ({"algorithms": [{"name": "ok"}, {"name": "bad", "overrides": {"train.learning_rat": 1}}]}, "Did you mean"),
        ({"rewards": [{"name": "a", "reward": {"name": "jpeg_compressibility"}}, {"name": "b", "reward": {"name": "jpg"}}]}, "unknown reward 'jpg'"),
        ({"rewards": [{"name": "m", "components": {"jpeg_compressibility": 1.0, "brightnes": 0.5}}]}, "unknown reward 'brightnes'"),
        ({"algorithms": [{"name": "sf", "overrides": {"train.algorithm": "ddpo_sf", "train.num_inner_epochs": 2}}]}, "on-policy"),
        ({"seeds": [0, 0]}, "distinct integers"),
        ({"algorithms": [{"name": "a"}, {"name": "a"}]}, "duplicate algorithms names"),
        ({"algorithms": [{"name": "a__b"}]}, "without '__'"),
        ({"base": {"preset": "tinyy"}}, "Did you mean 'tiny'"),
        ({"epochs": 3}, "unknown keys ['epochs']"),
    ],
)  # fmt: skip
def test_bad_grid_fails_naming_the_cell(fast_settings, tmp_path, change, message):
    with pytest.raises(GridError, match=None) as error:
        parse_grid(tiny_grid(fast_settings, tmp_path / "out", **change))
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()


def test_bad_last_cell_stops_the_grid_before_the_first_cell_runs(fast_settings, tmp_path, capsys):
    seeds = [0, 1, 2]
    grid = tiny_grid(fast_settings, tmp_path / "out", seeds=seeds)
    grid["algorithms"].append({"name": "broken", "overrides": {"train.clip_range": -1.0}})
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(grid))
    assert main(["ablate", str(grid_file)]) == 2
    err = capsys.readouterr().err
    assert "cell broken__jpeg__seed0" in err and "train.clip_range must be > 0" in err
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_the_commands_and_runs_nothing(fast_settings, tmp_path, capsys):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(tiny_grid(fast_settings, tmp_path / "out")))
    assert main(["ablate", str(grid_file), "--dry-run", "--output-dir", str(tmp_path / "elsewhere")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[new]")]
    assert len(lines) == 4
    assert "train.algorithm=rwr train.kl_coef=0.1 reward.name=jpeg_compressibility" in lines[2]
    assert f"output_dir={tmp_path / 'elsewhere' / 'runs'} run_name=rwr_kl__jpeg__seed0" in lines[2]
    assert not (tmp_path / "out").exists() and not (tmp_path / "elsewhere").exists()


def test_a_changed_grid_refuses_to_mix_with_old_runs(finished_grid, fast_settings):
    changed = tiny_grid(fast_settings, finished_grid.output_dir)
    changed["base"]["overrides"]["train.learning_rate"] = 0.02
    with pytest.raises(GridError, match="holds a run of a different config .*train.learning_rate"):
        parse_grid(changed)
    # More epochs is not a different experiment: finished cells become resumable.
    longer = tiny_grid(fast_settings, finished_grid.output_dir)
    longer["base"]["overrides"]["num_epochs"] = 3
    assert run_grid(parse_grid(longer), dry_run=True)[0].state == "resume"


def test_summary_thresholds_and_reward_queries():
    rows = []
    for algorithm, curve in [("fast", [0.0, 0.6, 1.0]), ("slow", [0.0, 0.2, 0.6])]:
        for seed, shift in [(0, 0.0), (1, 0.1)]:
            for epoch, value in enumerate(curve):
                rows.append(
                    {
                        "cell": f"{algorithm}__r",
                        "algorithm": algorithm,
                        "reward": "r",
                        "seed": seed,
                        "epoch": epoch,
                        "reward_queries": 10 * (epoch + 1),
                        "reward_mean": value + shift,
                    }
                )
    summary = summarize(pd.DataFrame(rows)).set_index("algorithm")
    # initial 0.05 (mean of epoch 0), best final 1.05 -> midpoint threshold 0.55
    assert summary.threshold.tolist() == pytest.approx([0.55, 0.55])
    assert summary.loc["fast"].final_mean == pytest.approx(1.05)
    assert summary.loc["fast"].final_std == pytest.approx(0.0707107, rel=1e-5)
    assert summary.loc["fast"].queries_mean == 20 and summary.loc["fast"].reached == 2
    assert summary.loc["slow"].queries_mean == 30 and summary.loc["slow"].reached == 2
    given = summarize(pd.DataFrame(rows), thresholds={"r": 0.65}, final_epochs=2).set_index("algorithm")
    assert given.loc["slow"].reached == 1 and given.loc["slow"].queries_mean == 30  # only seed 1 reaches 0.65
    assert given.loc["fast"].final_mean == pytest.approx((0.6 + 1.0 + 0.7 + 1.1) / 4)
    assert (given.threshold_source == "given").all()


def test_report_cli_writes_figures_and_html_for_a_run_and_an_ablation(finished_grid, tmp_path, capsys):
    run = finished_grid.cells[1].run_dir
    assert main(["report", str(run), "--out", str(tmp_path / "run"), "--seeds", "0", "--prompt", "a cat"]) == 0
    names = {"rewards.png", "diagnostics.png", "samples_across_epochs.png", "before_after.png", "index.html"}
    assert names <= {p.name for p in (tmp_path / "run").iterdir()}
    assert "<img src='before_after.png'>" in (tmp_path / "run" / "index.html").read_text()
    evals = load_run(run).evals  # plotted on rewards.png next to the batch means
    assert evals.epoch.tolist() == [0, 2] and evals.samples.tolist() == [2, 2]
    # The page's table of reward against samples seen: one row per epoch, the held-out reward where one was taken.
    metrics = load_run(run).metrics
    page = (tmp_path / "run" / "index.html").read_text()
    table = page.split("<h2>Reward against samples seen</h2>", 1)[1].split("</table>", 1)[0]
    rows = table.split("<tr>")[2:]  # after the header row
    assert len(rows) == 1 + len(metrics)
    assert rows[0].startswith(f"<td>0</td><td>0</td><td></td><td>{evals.reward_mean[0]:.4g}</td>")
    last = metrics.iloc[-1]
    assert rows[-1].startswith(
        f"<td>{int(last.samples):,}</td><td>{int(last.epoch) + 1}</td><td>{last.reward_mean:.4g}</td>"
        f"<td>{evals.reward_mean[1]:.4g}</td>"
    )

    assert main(["report", str(finished_grid.output_dir), "--out", str(tmp_path / "ablation")]) == 0
    page = (tmp_path / "ablation" / "index.html").read_text()
    assert "reward_vs_queries.png" in page and "rwr_kl" in page and "approx_kl_vs_queries.png" in page
    assert (tmp_path / "ablation" / "reward_vs_queries.png").is_file()
    assert main(["report", str(tmp_path)]) == 2
    assert "neither a run directory" in capsys.readouterr().err


def test_extend_shorter_resumes_copies_and_equals_training_from_scratch(fast_settings, tmp_path, capsys):
    """With ``extend_shorter``, a cell that differs from another only in num_epochs starts as a copy of the finished
    shorter run and resumes; its weights equal those of the same cell trained from epoch 0."""
    from safetensors.torch import load_file

    algorithms = [
        {"name": "is_1", "overrides": {"train.algorithm": "ddpo_is", "num_epochs": 1}},
        {"name": "is_3", "overrides": {"train.algorithm": "ddpo_is", "num_epochs": 3}},
        {"name": "rwr_3", "overrides": {"train.algorithm": "rwr", "num_epochs": 3}},  # nothing shorter: from scratch
    ]
    chained = parse_grid(
        tiny_grid(fast_settings, tmp_path / "chained", algorithms=algorithms, seeds=[0], extend_shorter=True)
    )
    plain = parse_grid(tiny_grid(fast_settings, tmp_path / "plain", algorithms=algorithms, seeds=[0]))
    run_grid(chained, dry_run=True)
    dry = capsys.readouterr().out
    assert "[extend is_1__jpeg__seed0] ddpo train --resume" in dry and dry.count("[extend") == 1
    assert [o.returncode for o in run_grid(chained, in_process=True)] == [0, 0, 0]
    assert [o.returncode for o in run_grid(plain, in_process=True)] == [0, 0, 0]
    for name in ("is_3__jpeg__seed0", "rwr_3__jpeg__seed0"):
        a, b = (load_file(g.runs_dir / name / "final" / "pytorch_lora_weights.safetensors") for g in (chained, plain))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    extended = chained.runs_dir / "is_3__jpeg__seed0"
    # the copy leaves the shorter run's results behind: only the extended run's own final/ is there
    assert sorted(p.name for p in extended.iterdir() if p.name in ("final", "eval", "eval_all")) == ["final"]
    assert [json.loads(line)["epoch"] for line in (extended / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert yaml.safe_load((extended / "config.yaml").read_text())["run_name"] == "is_3__jpeg__seed0"
    assert run_grid(chained, dry_run=True) == []  # all three finished


def test_copy_run_leaves_the_results_of_the_shorter_run(tmp_path):
    """``extend_shorter``'s copy of a finished run has its checkpoints and logs but not its final/ weights or its
    ``ddpo eval`` checks (eval/, eval_all/): until the longer run finishes, nothing in it looks finished or checked.
    Folders of those names deeper in the run are copied."""
    from ddpo.tools.ablate.runner import copy_run

    source = tmp_path / "short"
    for folder in ("final", "eval", "eval_all", "checkpoints/checkpoint_000001/final", "samples"):
        (source / folder).mkdir(parents=True)
        (source / folder / "x.txt").write_text(folder)
    (source / "metrics.jsonl").write_text("{}\n")
    copy_run(source, tmp_path / "long")
    copied = sorted(str(p.relative_to(tmp_path / "long")) for p in (tmp_path / "long").rglob("*.txt"))
    assert copied == ["checkpoints/checkpoint_000001/final/x.txt", "samples/x.txt"]
    assert (tmp_path / "long" / "metrics.jsonl").read_text() == "{}\n"
    assert (source / "final" / "x.txt").is_file()  # the source is untouched


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "ablations").glob("*.yaml")))
def test_shipped_grids_build_every_cell(path):
    """Every shipped grid builds and validates all its cells (a preset that changes under a grid breaks it)."""
    grid = load_grid(path)
    assert grid.cells
