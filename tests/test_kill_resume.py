"""A run killed by SIGKILL at any point and resumed with ``ddpo train --resume`` ends bit-identical
to an uninterrupted run: the same trained weights (``final/`` and the newest checkpoint, safetensors) and the same
``metrics.jsonl`` apart from the ``*_seconds`` timings.

The kill is deterministic: ``DDPO_KILL_AT=<point>:<n>`` (:mod:`ddpo.training.killpoints`) SIGKILLs the process at
the n-th passage of a named point: during sampling, scoring, the old log-probs' recomputation, backward and the
optimiser step, the metrics log, each stage of writing a checkpoint and ``final/``, and after the run. The killed
run is a forked copy of the test process (no interpreter start-up); its resume runs in process. 3 epochs of the
tiny pipeline (8x8 latents, 2 optimiser steps an epoch). ``scripts/kill_soak.py`` runs random kill points.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddpo.cli import main
from ddpo.training import checkpoint, killpoints

EPOCHS = 3

# (point, n): the n-th passage; each run has 3 epochs x 2 sampling batches, 2 optimiser steps an epoch, a checkpoint
# after every epoch and final/ at the end.
KILLS = [
    ("sample", 3),  # epoch 1, first batch sampled
    ("score", 6),  # epoch 2, last batch scored
    ("old_log_probs", 2),  # epoch 1, before its first optimiser step
    ("backward", 3),  # epoch 1, between backward and step
    ("optimizer_step", 5),  # epoch 2, after its first step
    ("metrics", 2),  # epoch 1 logged, its checkpoint not written
    ("checkpoint_payload", 2),  # checkpoint 2's tensors in a temporary folder
    ("checkpoint_manifest", 3),  # the last checkpoint complete but not renamed
    ("replace_dir", 1),  # before the first checkpoint is renamed into place
    ("checkpoint_prune", 2),  # checkpoint 2 in place, before pruning
    ("final_payload", 1),  # final/ written to a temporary folder, not renamed
    ("run_end", 1),  # everything written, before the summary
]


def run_files(run: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[dict]]:
    """(final/ weights, newest checkpoint's trained weights, metrics without timings) of a run directory."""
    final = load_file(str(run / "final" / "pytorch_lora_weights.safetensors"))
    newest = checkpoint.list_checkpoints(run / "checkpoints")[-1]
    trained = load_file(str(newest / "trainable.safetensors"))
    metrics = [
        {k: v for k, v in json.loads(line).items() if not k.endswith("_seconds")}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    return final, trained, metrics


def assert_same_run(a: Path, b: Path) -> None:
    (final_a, trained_a, metrics_a), (final_b, trained_b, metrics_b) = run_files(a), run_files(b)
    assert final_a.keys() == final_b.keys() and trained_a.keys() == trained_b.keys()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    assert all(torch.equal(trained_a[k], trained_b[k]) for k in trained_a)
    assert metrics_a == metrics_b and [m["epoch"] for m in metrics_a] == list(range(EPOCHS))


def killed_run(argv: list[str], kill_at: str) -> int:
    """Run ``ddpo`` in a forked child with ``DDPO_KILL_AT=kill_at``; the signal that ended it (0: none)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.environ["DDPO_KILL_AT"] = kill_at
            killpoints.reset()
            code = main(argv)
        finally:
            os._exit(code)
    deadline = time.monotonic() + 120
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:  # never hang the suite (a fork that deadlocked)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the killed run ({kill_at}) did not end within 120 s")
        time.sleep(0.05)
    status = done[1]
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0


@pytest.fixture(scope="module")
def reference(fast_settings, tmp_path_factory) -> tuple[Path, list[str]]:
    """An uninterrupted run, and the command line that made it (output_dir appended per test)."""
    overrides = [f"{k}={v}" for k, v in fast_settings.items()]
    args = ["train", "--preset", "tiny", f"num_epochs={EPOCHS}", "log_images=false", "run_name=run", *overrides]
    out = tmp_path_factory.mktemp("reference")
    assert main([*args, f"output_dir={out}"]) == 0
    return out / "run", args


@pytest.mark.parametrize(("point", "n"), KILLS, ids=[f"{p}:{n}" for p, n in KILLS])
def test_killed_run_resumes_bit_identically(point, n, reference, tmp_path):
    run_dir, args = reference
    assert point in killpoints.POINTS
    assert killed_run([*args, f"output_dir={tmp_path}"], f"{point}:{n}") == signal.SIGKILL
    run = tmp_path / "run"
    assert not (run / "final").exists() or point == "run_end"  # it died before the end
    assert main(["train", "--resume", str(run)]) == 0
    assert_same_run(run, run_dir)
    assert not list((run / "checkpoints").glob(".*")), "crash debris left in checkpoints/"


def test_a_kill_point_that_is_never_reached_changes_nothing(reference, tmp_path):
    """The harness can fail: a point named but not reached leaves the run to finish normally (no signal)."""
    run_dir, args = reference
    assert killed_run([*args, f"output_dir={tmp_path}"], "sample:1000") == 0
    assert_same_run(tmp_path / "run", run_dir)


@pytest.mark.parametrize(("kill_at", "newest"), [("sample:3", "checkpoint_000001"), ("sample:1", None)])
def test_ctrl_c_says_where_to_resume_from(kill_at, newest, reference, tmp_path):
    """SIGINT (Ctrl-C) during ``ddpo train``, delivered at a named point by the same hook with
    ``DDPO_KILL_SIGNAL=INT``, in a real interpreter: one line naming the last intact checkpoint (or that there is
    none yet) and the resume command, exit code 130, no traceback; the resume then ends as the uninterrupted run."""
    run_dir, args = reference
    env = {**os.environ, "DDPO_KILL_AT": kill_at, "DDPO_KILL_SIGNAL": "INT", "OMP_NUM_THREADS": "1"}  # as conftest
    command = [sys.executable, "-m", "ddpo.cli", *args, f"output_dir={tmp_path}"]
    # A shell's background job (`pytest ... &`) inherits SIGINT ignored, and Python then keeps ignoring it: restore
    # the default in the child, as an interactive terminal has it.
    restore = functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, preexec_fn=restore)
    run = tmp_path / "run"
    assert done.returncode == 130, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    if newest is None:
        assert (
            last == f"ddpo: interrupted; no checkpoint was written yet; start it over with: ddpo train --resume {run}"
        )
        return
    assert last == (
        f"ddpo: interrupted; the last intact checkpoint is {run / 'checkpoints' / newest} (1 epoch done); "
        f"continue with: ddpo train --resume {run}"
    )
    assert main(["train", "--resume", str(run)]) == 0
    assert_same_run(run, run_dir)
