"""``ddpo bench --calibrate``: time the hardware-dependent execution choices of the training phase on this machine
and model (pairs per training call, channels-last weights) and recommend overrides, cached per machine and model."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..training.config import recomputes_old_log_probs
from ..training.trainer import Trainer
from .bench_measure import sync


def calibration_key(config) -> str:
    """What a calibration depends on: the machine (CPU model or GPU name, torch, threads), the model and the shapes."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = torch.cuda.get_device_name(0) if device == "cuda" else _cpu_model()
    s, m = config.sample, config.model
    parts = [
        machine,
        torch.__version__,
        str(torch.get_num_threads()),
        m.pretrained,
        str(m.lora_rank),
        str(s.resolution),
    ]
    parts += [config.mixed_precision, str(s.guidance_scale > 1), str(config.train.batch_size)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def calibrate(config, repeats: int = 3, pairs: int = 32) -> dict[str, Any]:
    """Time the hardware-dependent execution choices of the training phase on this machine and model: pairs per
    training UNet call (``train.batch_size``, with the old log-probs' recomputation it costs when it differs from
    ``sample.batch_size``) and channels-last weights. Each candidate trains the same ``pairs`` (trajectory, timestep)
    pairs of one real sampled batch (forward + backward, gradients discarded); the median of ``repeats`` after a
    warm-up. Returns the table rows and the recommended overrides."""
    with tempfile.TemporaryDirectory(prefix="ddpo-calibrate-") as tmp:
        tr = Trainer(config, Path(tmp) / "run")
        s = config.sample
        denoiser = tr.accelerator.unwrap_model(tr.denoiser)
        samples = tr.sample(denoiser, tr.prompts[: s.batch_size], seed=0)
        weights = torch.ones(s.batch_size, device=tr.accelerator.device)
        i, j = (x.repeat((pairs + len(x) - 1) // len(x))[:pairs] for x in tr.training_pairs(0, 0, s.batch_size))

        def seconds_per_pair(call: int, forward_only: bool = False) -> float:
            times = []
            for r in range(repeats + 1):
                sync(tr.accelerator.device)
                start = time.perf_counter()
                for first in range(0, pairs, call):
                    ii, jj = i[first : first + call], j[first : first + call]
                    if forward_only:
                        with torch.no_grad():
                            tr.estimator.recompute(denoiser, samples, ii, jj)
                    else:
                        loss, _ = tr.minibatch_loss(samples, weights, ii, jj)
                        loss.backward()
                sync(tr.accelerator.device)
                if r:
                    times.append((time.perf_counter() - start) / pairs)
                tr.optimizer.zero_grad(set_to_none=True)
            return statistics.median(times)

        rows = []
        recompute = seconds_per_pair(s.batch_size, forward_only=True)
        for call in sorted({4, 8, 16, 32, s.batch_size, config.train.batch_size}):
            if call > pairs:
                continue
            cost = seconds_per_pair(call)
            extra = recompute if call != s.batch_size and recomputes_old_log_probs(config) else 0.0
            rows.append({"choice": f"train.batch_size={call}", "seconds_per_pair": cost + extra, "recompute": extra})
        best = min(rows, key=lambda row: row["seconds_per_pair"])
        call = int(best["choice"].split("=")[1])
        denoiser.to(memory_format=torch.channels_last)
        channels_last = seconds_per_pair(call)
        denoiser.to(memory_format=torch.contiguous_format)
        rows.append({"choice": f"train.batch_size={call} model.channels_last=true", "seconds_per_pair": channels_last})
    overrides = [best["choice"]]
    if channels_last < 0.97 * best["seconds_per_pair"]:
        overrides.append("model.channels_last=true")
    return {"key": calibration_key(config), "machine": _cpu_model(), "rows": rows, "recommended": overrides}


def format_calibration(result: dict[str, Any]) -> str:
    lines = [f"ddpo bench --calibrate ({result['machine']}; cache key {result['key']})"]
    lines.append(f"{'choice':48s}{'ms per training pair':>22s}")
    for row in result["rows"]:
        note = f"  (incl. {1e3 * row['recompute']:.1f} ms re-scoring old log-probs)" if row.get("recompute") else ""
        lines.append(f"{row['choice']:48s}{1e3 * row['seconds_per_pair']:22.2f}{note}")
    lines.append("recommended overrides: " + " ".join(result["recommended"]))
    lines.append(
        "(keep train.batch_size * train.gradient_accumulation_steps, the pairs per optimiser step, as it was: "
        "the maths is then unchanged)"
    )
    return "\n".join(lines)


def calibrate_main(config, repeats: int = 3, refresh: bool = False) -> dict[str, Any]:
    """``ddpo bench --calibrate``: measure (or read the cached measurement of this machine and model) and print."""
    cache = Path(os.environ.get("DDPO_CACHE", Path.home() / ".cache" / "ddpo")) / "calibration"
    path = cache / f"{calibration_key(config)}.json"
    if path.is_file() and not refresh:
        result = json.loads(path.read_text())
        print(f"ddpo bench: cached calibration {path} (--refresh to measure again)", flush=True)
    else:
        result = calibrate(config, repeats=repeats)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, path)
    print(format_calibration(result), flush=True)
    return result
