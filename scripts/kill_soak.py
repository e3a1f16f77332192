"""Soak test of exact resume: many runs SIGKILLed at random points, each resumed to the end (and killed again, up to
``--kills-per-run`` times), compared with an uninterrupted run: identical trained weights (``final/``, the newest
checkpoint) and ``metrics.jsonl`` without the ``*_seconds`` timings.

    PYTHONPATH=. python scripts/kill_soak.py --runs 50 --epochs 3 --seed 0 --work /tmp/soak

Every run is a fresh ``python -m ddpo.cli train`` process on a tiny pipeline (8x8 latents) with
``DDPO_KILL_AT=<point>:<n>`` (:mod:`ddpo.training.killpoints`); ``tests/test_kill_resume.py`` is the fast in-suite
part (one kill at each point). Prints one line per run and a summary; exit code 1 if any run differed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from ddpo.models import build_tiny_pipeline
from ddpo.training import checkpoint
from ddpo.training.killpoints import POINTS

# Upper bounds of n per point for a run of E epochs (2 sampling batches, 2 optimiser steps an epoch).
MAX_PASSAGES = {
    "sample": 2,
    "score": 2,
    "old_log_probs": 1,
    "backward": 2,
    "optimizer_step": 2,
    "metrics": 1,
    "checkpoint_payload": 1,
    "checkpoint_manifest": 1,
    "replace_dir": 1,
    "checkpoint_prune": 1,
    "final_payload": 0,
    "run_end": 0,
}


def fingerprint(run: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[dict]]:
    final = load_file(str(run / "final" / "pytorch_lora_weights.safetensors"))
    trained = load_file(str(checkpoint.list_checkpoints(run / "checkpoints")[-1] / "trainable.safetensors"))
    metrics = [
        {k: v for k, v in json.loads(line).items() if not k.endswith("_seconds")}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    return final, trained, metrics


def same(a, b) -> bool:
    tensors_equal = all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a[:2], b[:2], strict=True)
    )
    return tensors_equal and a[2] == b[2]


def ddpo(args: list[str], kill_at: str | None = None) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("DDPO_KILL_AT", None)
    if kill_at:
        env["DDPO_KILL_AT"] = kill_at
    done = subprocess.run([sys.executable, "-m", "ddpo.cli", *args], env=env, capture_output=True, text=True)
    if done.returncode not in (0, -signal.SIGKILL):
        sys.stderr.write(done.stderr[-3000:])
    return done.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--kills-per-run", type=int, default=2, help="kills before a resume may finish (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("kill_soak"))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    shutil.rmtree(args.work, ignore_errors=True)
    model = args.work / "tiny"
    build_tiny_pipeline(seed=0, sample_size=8).save_pretrained(model)
    common = ["--preset", "tiny", f"num_epochs={args.epochs}", "log_images=false", "run_name=run"]
    common += [f"model.pretrained={model}", "sample.num_steps=4", "sample.batch_size=2", "train.batch_size=4"]
    common += ["sample.num_batches_per_epoch=2", "train.learning_rate=0.01", "train.advantage=batch"]
    assert ddpo(["train", *common, f"output_dir={args.work / 'reference'}"]) == 0, "the reference run failed"
    reference = fingerprint(args.work / "reference" / "run")
    failures = 0
    for i in range(args.runs):
        start = time.perf_counter()
        out = args.work / f"run{i:04d}"
        kills = []
        command = ["train", *common, f"output_dir={out}"]
        for _ in range(args.kills_per_run):
            point = rng.choice(POINTS)
            n = rng.randint(1, max(1, MAX_PASSAGES[point] * args.epochs))
            kills.append(f"{point}:{n}")
            code = ddpo(command, kills[-1])
            if code == 0:
                break
            command = ["train", "--resume", str(out / "run")]
        else:
            code = ddpo(command)
        ok = code == 0 and same(fingerprint(out / "run"), reference)
        failures += not ok
        status = "identical" if ok else f"DIFFERENT (exit {code})"
        print(f"run {i}: killed at {', '.join(kills)}: {status} ({time.perf_counter() - start:.1f} s)", flush=True)
        if ok:
            shutil.rmtree(out)
    print(f"{args.runs - failures} of {args.runs} runs resumed bit-identically")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
