"""Images/s scored in process vs through `ddpo serve-reward` over HTTP (127.0.0.1), for the same reward.

Starts the server as a separate process on a free port, scores the same batches both ways (median of --repeats calls
after a warm-up) and prints a Markdown table; the HTTP rows send the images as float32 (exact) and as uint8.

    python scripts/bench_remote_reward.py --reward jpeg_compressibility --resolution 512 --batch-size 8 32
"""

from __future__ import annotations

import argparse
import os
import platform
import select
import subprocess
import sys
import time

import requests
import torch
import yaml

from ddpo.tools.bench import median_seconds
from rewards import get_reward


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def start_server(reward: str, options: str | None, threads: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "ddpo.cli", "serve-reward", reward, "--port", "0"]
    if options:
        cmd += ["--options", options]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 180
    line = ""
    while "http://" not in line:
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise SystemExit(f"the server did not start: {proc.stdout.read()}")
        if select.select([proc.stdout], [], [], 1.0)[0]:
            line = proc.stdout.readline()
    url = line.split(" on ", 1)[1].split(" ", 1)[0]
    while True:
        try:
            if requests.get(url + "/health", timeout=5).ok:
                return proc, url
        except requests.ConnectionError:
            time.sleep(0.1)
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server never answered /health")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward", default="jpeg_compressibility")
    parser.add_argument("--options", help="the reward's options as YAML")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, client and server (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = yaml.safe_load(args.options) if args.options else {}
    local = get_reward(args.reward, **options)
    proc, url = start_server(args.reward, args.options, args.threads)
    try:
        remote = {dtype: get_reward("remote", url=url, dtype=dtype) for dtype in ("float32", "uint8")}
        print(f"CPU: {cpu_name()}; {args.threads} torch thread(s); reward {args.reward}; {args.resolution} px")
        print()
        print(
            "| batch | in process (images/s) | HTTP float32 (images/s) | HTTP uint8 (images/s) | MB sent per batch (float32 / uint8) |"
        )
        print("|---:|---:|---:|---:|---:|")
        for batch in args.batch_size:
            images = torch.rand(batch, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(0))
            prompts = ["a red circle on a white background"] * batch
            rates = []
            for reward in (local, remote["float32"], remote["uint8"]):
                with torch.no_grad():
                    seconds = median_seconds(lambda r=reward, x=images, p=prompts: r(x, p), args.repeats)
                rates.append(batch / seconds)
            mb = images.numel() * 4 / 1e6, images.numel() / 1e6
            print(f"| {batch} | {rates[0]:,.1f} | {rates[1]:,.1f} | {rates[2]:,.1f} | {mb[0]:.1f} / {mb[1]:.1f} |")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
