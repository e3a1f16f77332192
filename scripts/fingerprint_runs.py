"""Fingerprint short training runs of every estimator, to prove a refactor left training bit for bit unchanged.

Each variant is a 2-epoch ``ddpo train`` of the world model (a shipped preset plus overrides, small batches, no
evaluation) run through the command line. The fingerprint of a run is the SHA-256 of its final trained tensors
(``final/``) and its ``metrics.jsonl`` without the timing keys. Run it on the code before a change and after, then
compare the two JSON files::

    python scripts/fingerprint_runs.py --out /tmp/before.json            # on the old commit
    python scripts/fingerprint_runs.py --out /tmp/after.json --compare /tmp/before.json

``--only NAME`` (repeatable) runs some variants. The figures are reproducible bit for bit on one machine kind only
(float results differ between CPU kinds), so compare files made on the same machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SMALL = [
    "num_epochs=2",
    "eval_prompts=",
    "sample.batch_size=4",
    "sample.num_batches_per_epoch=2",
    "sample.samples_per_prompt=2",
    "sample.num_steps=4",
    "train.batch_size=4",
    "train.gradient_accumulation_steps=1",
    "save_every=1",
]

VARIANTS: dict[str, list[str]] = {
    "nft_default": ["--preset", "world"],
    "nft_current_policy": ["--preset", "world", "train.nft_sample_policy=current"],
    "awm": ["--preset", "world", "train.algorithm=awm", "train.learning_rate=1e-2"],
    "ddpo_is": ["--preset", "world_ddpo"],
    "ddpo_is_inner2": ["--preset", "world_ddpo", "train.num_inner_epochs=2"],
    "ddpo_is_accum2": ["--preset", "world_ddpo", "train.gradient_accumulation_steps=2"],
    "ddpo_is_kl": ["--preset", "world_ddpo", "train.kl_coef=0.1"],
    "ddpo_is_full": ["--preset", "world_ddpo", "model.use_lora=false", "train.learning_rate=1e-4", "train.kl_coef=0.1"],
    "ddpo_sf": ["--preset", "world_ddpo", "train.algorithm=ddpo_sf"],
    "rwr": ["--preset", "world_ddpo", "train.algorithm=rwr"],
    "rwr_sparse": ["--preset", "world_ddpo", "train.algorithm=rwr_sparse"],
    "flow_ddpo_is": ["--preset", "world_flow"],
    "flow_nft": ["--preset", "world_flow", "train.algorithm=nft", "sample.scheduler=flow_euler", "sample.eta=0"],
}
"""Each variant's command-line arguments before :data:`SMALL` (which makes it short)."""

TIMING = ("seconds", "time", "eta")

CARD_FILES = ("README.md", "heldout_before.png", "heldout_after.png")
"""The model card of ``final/`` (it names the run and its folder): a description of the result, not part of it."""


def file_digest(path: Path) -> str:
    """SHA-256 of a file's content; of a safetensors file, of its tensors (name, dtype, shape, bytes, in name order)
    and its metadata (sorted), since the order of the header's keys differs between processes; of a JSON file, of its
    content without ``_name_or_path`` (the folder a diffusers config was loaded from)."""
    if path.suffix == ".json":  # a diffusers config records the folder it was loaded from: not part of the result
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            data.pop("_name_or_path", None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    if path.suffix != ".safetensors":
        return hashlib.sha256(path.read_bytes()).hexdigest()
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        digest.update(json.dumps(f.metadata() or {}, sort_keys=True).encode())
        for name in sorted(f.keys()):
            tensor = f.get_tensor(name)
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fingerprint(run_dir: Path) -> dict:
    """The digest (:func:`file_digest`) of every file under ``final/`` but the model card, and ``metrics.jsonl``
    without its timing keys."""
    files = {}
    for path in sorted((run_dir / "final").rglob("*")):
        if path.is_file() and path.name not in CARD_FILES:
            files[str(path.relative_to(run_dir))] = file_digest(path)
    lines = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        lines.append({k: v for k, v in record.items() if not any(w in k for w in TIMING)})
    return {"files": files, "metrics": lines}


def run_variant(name: str, args: list[str], workdir: Path, resume: bool) -> dict:
    """Train the variant; with ``resume``, also train it 1 epoch, resume it to 2 and check that it equals the
    uninterrupted run."""
    cmd = [sys.executable, "-m", "ddpo.cli", "train", *args, *SMALL, f"output_dir={workdir}", f"run_name={name}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    result = fingerprint(workdir / name)
    if resume:
        split = f"{name}_resumed"
        subprocess.run([*cmd[:-1], f"run_name={split}", "num_epochs=1"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(
            [sys.executable, "-m", "ddpo.cli", "train", "--resume", str(workdir / split), "num_epochs=2"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        resumed = fingerprint(workdir / split)
        result["resume_equal"] = (
            resumed["files"] == {k.replace(name, split, 1): v for k, v in result["files"].items()}
            and resumed["metrics"] == result["metrics"]
        )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--compare", help="a JSON file of an earlier run of this script: report any difference")
    parser.add_argument("--only", action="append", choices=sorted(VARIANTS), help="run only these variants")
    parser.add_argument("--resume", action="store_true", help="also check that a 1+1-epoch resumed run is equal")
    args = parser.parse_args()
    names = args.only or list(VARIANTS)
    results = {}
    with tempfile.TemporaryDirectory(prefix="ddpo-fingerprint-") as tmp:
        for name in names:
            start = time.perf_counter()
            results[name] = run_variant(name, VARIANTS[name], Path(tmp), args.resume)
            print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1, sort_keys=True))
    if not args.compare:
        return 0
    before = json.loads(Path(args.compare).read_text())
    bad = 0
    for name in names:
        if name not in before:
            print(f"{name}: not in {args.compare}")
            continue
        same = before[name]["files"] == results[name]["files"] and before[name]["metrics"] == results[name]["metrics"]
        resumed = results[name].get("resume_equal", True)
        print(f"{name}: {'identical' if same else 'DIFFERENT'}{'' if resumed else ' (resumed run differs)'}")
        bad += not (same and resumed)
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
