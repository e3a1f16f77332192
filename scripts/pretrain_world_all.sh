#!/usr/bin/env bash
# Rebuild the shipped embedded model (world/assets/world_model + world_clip) from scratch with
# scripts/pretrain_world.py, using both cores of a 2-core machine: the VAE first, then the decoder fine-tuning + the
# world CLIP in one process beside UNet steps 0-1000 in another (independent: the decoder phase freezes the encoder,
# so the latents the UNet trains on do not change), then UNet steps 1000-1600 (a fresh cosine tail, as shipped) with
# the decoder's VAE, then the 256-sample evaluation. Every phase is one torch thread and seeded per step, so the
# result is the same on every run of the same torch build.
#
#   bash scripts/pretrain_world_all.sh [OUT [WORK]]     # defaults: world/assets and /tmp/world_pretrain
#
# Rerunning resumes each phase from its latest checkpoint in WORK. Logs: WORK/*.log; timings on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-world/assets}
work=${2:-/tmp/world_pretrain}
mkdir -p "$work"
run() { python scripts/pretrain_world.py --out "$out" --work "$work" "$@"; }
t0=$(date +%s)
elapsed() { echo "$(($(date +%s) - t0)) s"; }

run --phases vae >"$work/vae.log" 2>&1
echo "vae: $(elapsed)"
run --phases decoder,clip >"$work/decoder_clip.log" 2>&1 &
side=$!
run --phases unet --unet-steps 1000 >"$work/unet1000.log" 2>&1
echo "unet steps 0-1000: $(elapsed)"
wait "$side"
echo "decoder + clip: $(elapsed)"
run --phases unet --unet-steps 1600 >"$work/unet1600.log" 2>&1
echo "unet steps 1000-1600, final weights in $out: $(elapsed)"
run --phases eval >"$work/eval.log" 2>&1
echo "eval ($work/eval.json): $(elapsed)"
