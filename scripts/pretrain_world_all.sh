#!/usr/bin/env bash
# Rebuild both shipped world models from scratch in one command, on the two cores of a 2-core machine:
# world/assets/world_model (the UNet model, scripts/pretrain_world.py), world/assets/world_clip and
# world/assets/world_flow (the flow-matching twin, scripts/pretrain_world_flow.py).
#
#   core A: VAE (3000 steps)          | UNet (5000 steps, on the VAE's latents)                          | save
#   core B: world CLIP | decoder (800)| twin transformer (3500 steps, the decoder's VAE, its own encoders)| save
#   then:   the two 256-sample evaluations side by side
#
# The decoder phase freezes the encoder, so the latents the UNet trains on do not change while it runs; the UNet
# phase is then run once more with the same step count (its loop is skipped) to save the pipeline with the decoder's
# VAE. The twin starts from WORK/world_model_vae (the trained VAE, a seeded untrained text encoder), so it does not wait
# for the UNet. Every phase is one torch thread and seeded per step, so a rebuild on the same CPU kind and torch build
# gives the same files.
#
#   bash scripts/pretrain_world_all.sh [OUT [WORK]]     # defaults: world/assets and /tmp/world_pretrain
#
# Rerunning resumes each phase from its latest checkpoint in WORK (WORK/flow for the twin). Logs: WORK/*.log;
# timings on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-world/assets}
work=${2:-/tmp/world_pretrain}
mkdir -p "$work" "$work/flow"
unet() { python scripts/pretrain_world.py --out "$out" --work "$work" "$@"; }
flow() { python scripts/pretrain_world_flow.py --out "$out" --work "$work/flow" --world-model "$work/world_model_vae" "$@"; }
t0=$(date +%s)
elapsed() { echo "$(($(date +%s) - t0)) s"; }

unet --phases clip >"$work/clip.log" 2>&1 &
side=$!
unet --phases vae >"$work/vae.log" 2>&1
echo "vae: $(elapsed)"
wait "$side"
echo "clip: $(elapsed)"
(
  unet --phases decoder >"$work/decoder.log" 2>&1
  echo "decoder: $(elapsed)"
  flow --phases transformer >"$work/flow_transformer.log" 2>&1
  echo "twin transformer, saved to $out/world_flow: $(elapsed)"
) &
side=$!
unet --phases unet >"$work/unet.log" 2>&1
echo "unet: $(elapsed)"
wait "$side"
unet --phases unet >"$work/unet_save.log" 2>&1 # the loop is skipped: the EMA weights saved with the decoder's VAE
echo "unet saved to $out/world_model: $(elapsed)"
unet --phases eval >"$work/eval.log" 2>&1 &
side=$!
flow --phases eval >"$work/flow_eval.log" 2>&1
wait "$side"
echo "evaluations ($work/eval.json, $work/flow/eval.json): $(elapsed)"
