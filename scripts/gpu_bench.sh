#!/usr/bin/env bash
# The GPU measurement of ddpo bench (issue 15): Stable Diffusion 1.5's architecture with random weights (speed does not
# depend on the weights; model.pretrained=sd15_random builds it from its published configs, no download), 512 px,
# bf16, 50 DDIM steps, CFG 5, LoRA: ours vs the straightforward reference in one process, images/s, training pairs/s,
# peak memory and the training phase's model-FLOPs utilisation against the card's measured bf16 matmul rate.
#
#   bash scripts/gpu_bench.sh                 # on a GPU machine: installs the project, then about 3-6 minutes
#   bash scripts/gpu_bench.sh --toy           # the same commands at toy size on the CPU (what the test suite runs)
#   OUT=results/ bash scripts/gpu_bench.sh    # where gpu_bench.json and gpu_bench.txt go (default: .)
#   DDPO_SKIP_INSTALL=1 bash scripts/gpu_bench.sh   # use the Python environment as it is
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-.}
mkdir -p "$out"
if [ "${DDPO_SKIP_INSTALL:-0}" != "1" ]; then
  python3 -m pip install --quiet -e .
fi
python3 - <<'PY'
import platform, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU run)"
print(f"gpu_bench: torch {torch.__version__}, python {platform.python_version()}, {gpu}", flush=True)
PY
if [ "${1:-}" = "--toy" ]; then
  # The tiny random pipeline, 4 steps, fp32: checks that every step of the script works, in seconds.
  args=(--preset sd15_compressibility model.pretrained=tiny mixed_precision=no sample.resolution=16
        sample.num_steps=4 sample.batch_size=2 sample.num_batches_per_epoch=1 train.batch_size=2
        train.gradient_accumulation_steps=4 --repeats 1 --warmup 0)
else
  # SD 1.5 at 512 px: 8 images an epoch (one sampling batch), 400 (trajectory, timestep) pairs in 50 training calls
  # of 8 pairs (16 rows with CFG), one optimiser step of all of them.
  args=(--preset sd15_compressibility model.pretrained=sd15_random mixed_precision=bf16 sample.resolution=512
        sample.num_steps=50 sample.guidance_scale=5 sample.batch_size=8 sample.num_batches_per_epoch=1
        train.batch_size=8 train.gradient_accumulation_steps=50 train.timestep_fraction=1.0 --repeats 2 --warmup 1)
fi
python3 -m ddpo.cli bench "${args[@]}" --json "$out/gpu_bench.json" | tee "$out/gpu_bench.txt"
