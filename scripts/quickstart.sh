#!/usr/bin/env bash
# The whole loop on the embedded toy world, on a CPU: install, toy target, drafter + its two
# baselines, benchmark table. Every step is cached or resumable, so a rerun picks up where it
# stopped. Outputs land in checkpoints/.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE="${WANDB_MODE:-offline}"
pip install -q torch==2.13.0 -e .
covspec toy-target --out checkpoints/toy-target
for variant in visual_free full_visual text_only; do
  suffix=$([ "$variant" = visual_free ] && echo "" || echo "-${variant//_/-}")
  if [ ! -f "checkpoints/toy-drafter${suffix}/model.safetensors" ]; then
    covspec train --config recipes/toy/drafter.yaml --model.variant "$variant"
  fi
done
covspec bench --target checkpoints/toy-target --toy 40 --max-new-tokens 96 \
  --drafter checkpoints/toy-drafter --drafter checkpoints/toy-drafter-full-visual \
  --drafter checkpoints/toy-drafter-text-only --out checkpoints/bench/toy.json
