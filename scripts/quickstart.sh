#!/usr/bin/env bash
# The main job in about 20 minutes on 2 CPU cores: a toy target VLM, the visual-token-free
# drafter distilled online from it, and the benchmark of the drafter against transformers'
# `generate` and prompt lookup, printed as a table. Every stage shows a progress bar and is
# cached (toy target, drafter export) or resumes (drafter training); outputs land in
# checkpoints/quick/. The README's tables come from the full recipes: scripts/reproduce.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE="${WANDB_MODE:-offline}"

# stage NAME CMD...: run CMD and print its wall time
stage() {
  local name=$1 start=$SECONDS
  shift
  "$@"
  echo "[quickstart] $name: $((SECONDS - start)) s"
}

stage install pip install -q torch==2.13.0 -e .
# the toy target on a shorter, hotter schedule than the full one (same model)
stage toy-target covspec toy-target --out checkpoints/quick/toy-target \
  --vision-steps 600 --vision-lr 3e-3 --lm-steps 700 --lm-lr 1e-3
if [ ! -f checkpoints/quick/toy-drafter/model.safetensors ]; then
  stage drafter covspec train --config recipes/toy/drafter-quick.yaml
fi
stage bench covspec bench --target checkpoints/quick/toy-target \
  --drafter checkpoints/quick/toy-drafter --toy 40 --max-new-tokens 96 \
  --out checkpoints/quick/bench.json
echo "[quickstart] total: $SECONDS s"
