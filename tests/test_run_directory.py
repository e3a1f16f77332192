"""Issue 26, item 3: the rules of a run directory that the one-line rows of test_bad_inputs.py cannot show.

Its logs are read as bounded streams (an endless or huge file is refused without being read whole); a new run never
takes a folder holding files it did not write; a full disk during a checkpoint save removes the unfinished
checkpoint, says so in one line and leaves the previous checkpoint to resume from; a resume removes the temporary
files an earlier crash left, saying so.
"""

from __future__ import annotations

import errno
import os
import resource
from pathlib import Path

import pytest

from ddpo.cli import main
from ddpo.training import checkpoint, runlog
from ddpo.training.config import ConfigError
from ddpo.training.rundir import check_new_run_dir


def test_an_endless_log_is_refused_without_reading_it_whole(tmp_path):
    """A sparse 8 GiB metrics.jsonl of zero bytes (no newline) and a link to /dev/zero: one clear error each, and the
    process does not grow by more than a few MiB (before: it read the file whole)."""
    endless = tmp_path / "metrics.jsonl"
    with open(endless, "wb") as f:
        f.truncate(8 << 30)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(runlog.RunLogError, match=r"metrics.jsonl is larger than 128 MiB"):
        runlog.read_jsonl(endless)
    zero = tmp_path / "eval.jsonl"
    zero.symlink_to("/dev/zero")
    with pytest.raises(runlog.RunLogError, match=r"eval.jsonl is not a regular file"):
        runlog.read_jsonl(zero)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 << 10


def test_a_log_is_read_line_by_line_with_a_bound_per_line(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 0}\n' + "x" * 200 + "\n")
    monkeypatch.setattr(runlog, "MAX_LINE_BYTES", 100)
    with pytest.raises(runlog.RunLogError, match=r"metrics.jsonl line 2 is longer than 100 bytes"):
        runlog.read_jsonl(path)
    monkeypatch.setattr(runlog, "MAX_LINE_BYTES", 1000)
    with pytest.raises(runlog.RunLogError, match=r"metrics.jsonl line 2 is not JSON"):
        runlog.read_jsonl(path)
    path.write_text('{"epoch": 0}\n\n{"epoch": 1}\n')
    assert runlog.read_jsonl(path) == [{"epoch": 0}, {"epoch": 1}]
    assert runlog.read_jsonl(tmp_path / "absent.jsonl") == []


def test_a_new_run_takes_only_an_empty_folder(tmp_path):
    run = tmp_path / "run"
    check_new_run_dir(run)  # absent: fine
    run.mkdir()
    check_new_run_dir(run)  # empty: fine
    (run / ".ddpo-write-test-123").write_text("")  # another process of the same run probing it: fine
    check_new_run_dir(run)
    (run / "final").mkdir()
    with pytest.raises(ConfigError, match=r"holds files but no config.yaml \(final\); a new run there would"):
        check_new_run_dir(run)
    (run / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(ConfigError, match="already holds a run; continue it with `ddpo train --resume"):
        check_new_run_dir(run)


def _disk_fills_at_the_second_save(monkeypatch) -> None:
    """Simulate a disk that fills up while the second checkpoint's weights are written: half the file lands, then
    the write fails with ENOSPC (as a real full disk does)."""
    real, calls = checkpoint.save_file, []

    def save_file(tensors, filename, *args, **kwargs):
        calls.append(filename)
        real(tensors, filename, *args, **kwargs)
        if len(calls) == 2:
            size = os.path.getsize(filename)
            os.truncate(filename, size // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(checkpoint, "save_file", save_file)


def test_a_full_disk_during_a_checkpoint_save_cleans_up_and_says_so(fast_overrides, tmp_path, monkeypatch, capsys):
    run = tmp_path / "runs" / "run"
    args = ["train", "--preset", "tiny", "num_epochs=2", "log_images=false", *fast_overrides]
    with monkeypatch.context() as patch:
        _disk_fills_at_the_second_save(patch)
        assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ddpo: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert "the disk is full (No space left on device) while writing checkpoint_000002" in lines[0]
    assert "checkpoint_000001 is intact" in lines[0] and f"ddpo train --resume {run}" in lines[0]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["checkpoint_000001"]  # no .tmp-* left behind

    # An earlier crash (SIGKILL, power cut) leaves temporary folders that no cleanup ran for: the resume removes
    # them and names them.
    (run / "checkpoints" / ".tmp-0123abcd").mkdir()
    (run / "checkpoints" / ".tmp-0123abcd" / "optimizer.pt").write_bytes(b"half")
    (run / ".final-tmp-4242").mkdir()
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "ddpo: removed the unfinished temporary files of an earlier crash: checkpoints/.tmp-0123abcd" in out
    assert ".final-tmp-4242" in out
    assert not (run / ".final-tmp-4242").exists()
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["checkpoint_000001", "checkpoint_000002"]
    assert [m["epoch"] for m in runlog.read_jsonl(run / "metrics.jsonl")] == [0, 1]
    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_a_full_disk_while_writing_final_cleans_up(fast_overrides, tmp_path, monkeypatch, capsys):
    """final/ is written the same way: its temporary folder is removed and the message names the disk."""
    run = tmp_path / "runs" / "run"
    args = ["train", "--preset", "tiny", "num_epochs=1", "log_images=false", *fast_overrides]
    from ddpo.models import family as family_module

    real = family_module.ModelFamily.save_lora

    def save_lora(self, folder, *a, **k):
        real(self, folder, *a, **k)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))

    with monkeypatch.context() as patch:
        patch.setattr(family_module.ModelFamily, "save_lora", save_lora)
        assert main(args) == 2
    err = capsys.readouterr().err
    assert "the disk is full (No space left on device) while writing final/" in err, err[-2000:]
    assert not list(Path(run).glob(".final-tmp-*"))
