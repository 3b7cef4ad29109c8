#!/usr/bin/env bash
# Every table of the README and its pages under docs/results, in order, on the toy world.
# Each training step is skipped when its export exists and resumes from its last checkpoint
# otherwise, so a rerun picks up where it stopped. About 11 h on a 2-core CPU VM (the stages
# noted below add up to 9.4 h, the benches and simulations without a note to the rest; the
# measured stage times are in the README); run it alone: the speed tables are ratios measured
# on this machine and the other stages would disturb them.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE="${WANDB_MODE:-offline}"
OUT=docs/results

# train RECIPE EXPORT_DIR [overrides...]: train unless the export is already there
train() {
  local recipe=$1 export=$2
  shift 2
  [ -f "$export/model.safetensors" ] || covspec train --config "$recipe" "$@"
}

covspec toy-target --out checkpoints/toy-target                                    # ~26 min
train recipes/toy/drafter.yaml checkpoints/toy-drafter                              # ~28 min
train recipes/toy/drafter.yaml checkpoints/toy-drafter-full-visual \
  --model.variant full_visual --trainer.max_steps 1000                             # ~16 min
for s in 1 2 3; do  # training-seed replicates of it: the yardstick for gaps between drafters
  train recipes/toy/drafter.yaml "checkpoints/toy-drafter-full-visual-seed$s" \
    --model.variant full_visual --trainer.max_steps 1000 --seed_everything "$s"       # ~21 min each
done
train recipes/toy/drafter.yaml checkpoints/toy-drafter-text-only \
  --model.variant text_only --trainer.max_steps 1000                               # ~12 min
for r in 64 16 4; do                                                                # ~37 min
  train recipes/toy/drafter-codec.yaml "checkpoints/toy-drafter-r$r" --model.feature_codec_rank "$r"
done
covspec toy-target --out checkpoints/toy-small --text-layers 2 --text-hidden 128 \
  --vision-steps 300 --lm-steps 400                                                 # ~3 min
train recipes/toy/device-vlm.yaml checkpoints/toy-device-vlm                        # ~3 min
# one fixed primitive per run, each from scratch for 1000 steps, then the elastic compressor
# for 2000 (two options per sample: each option sees as many samples as a fixed primitive)
for opt in none pool:4 pool:2 resampler:2 resampler:8 resampler:32 conv:2 prune:0.25; do
  train recipes/toy/elastic.yaml "checkpoints/toy-drafter-${opt//:/}" \
    --model.compressor "{options: [$opt]}" --trainer.max_steps 1000                 # 7.5-9 min each
done
train recipes/toy/elastic.yaml checkpoints/toy-drafter-elastic                      # ~45 min
# video mode: the toy video target and its drafters
covspec toy-target --video --out checkpoints/toy-video-target                      # ~30 min
train recipes/toy/video-drafter.yaml checkpoints/toy-video-drafter                  # ~57 min
short=(--data.train_data toyvideo:20000:11:2-64:log --data.batch_size 16)  # the keep drafters' clips
train recipes/toy/video-drafter.yaml checkpoints/toy-video-drafter-full-visual \
  --model.variant full_visual "${short[@]}"                                        # ~47 min
train recipes/toy/video-drafter.yaml checkpoints/toy-video-drafter-pool3 "${short[@]}" \
  --model.visual_prefix compressed --model.compressor '{options: [pool:3]}'        # ~20 min
train recipes/toy/video-drafter.yaml checkpoints/toy-video-drafter-elastic "${short[@]}" \
  --model.visual_prefix compressed --model.compressor '{options: [none, pool:3, tpool:4], gate: critic}' \
  --model.cost_weight 0.02                                                         # ~33 min

# README: results on the toy world
covspec bench --target checkpoints/toy-target --drafter checkpoints/toy-drafter \
  --drafter checkpoints/toy-drafter-full-visual --drafter checkpoints/toy-drafter-text-only \
  --toy 40 --max-new-tokens 96 --out "$OUT/bench-toy.json"
# README: the elastic compressor's Pareto table (mixed prompts), the elastic drafter at four
# prices of a prefix row (0.02 is its recipe's)
elastic=()
for d in toy-drafter toy-drafter-none toy-drafter-resampler2 toy-drafter-resampler8 \
  toy-drafter-pool4 toy-drafter-prune0.25 toy-drafter-pool2 toy-drafter-conv2 \
  toy-drafter-resampler32 toy-drafter-elastic toy-drafter-full-visual; do
  elastic+=(--drafter "checkpoints/$d")
done
covspec bench --target checkpoints/toy-target "${elastic[@]}" --toy 480 --toy-mixed \
  --gate-cost-weight 0 --gate-cost-weight 0.005 --gate-cost-weight 0.02 --gate-cost-weight 0.05 \
  --max-new-tokens 96 --out "$OUT/bench-elastic.json"                              # ~9 min
# README: the full-visual drafter's training-seed spread on the same 480 scenes
seeds=(--drafter checkpoints/toy-drafter-full-visual)
for s in 1 2 3; do seeds+=(--drafter "checkpoints/toy-drafter-full-visual-seed$s"); done
covspec bench --target checkpoints/toy-target "${seeds[@]}" --toy 480 --toy-mixed \
  --max-new-tokens 96 --out "$OUT/bench-seeds.json"                                # ~6 min
# README: the elastic drafter's price over a bad link (prefix bytes, first token)
covspec simulate --target checkpoints/toy-target --drafter checkpoints/toy-drafter-elastic \
  --drafter checkpoints/toy-drafter --drafter checkpoints/toy-drafter-pool2 \
  --drafter checkpoints/toy-drafter-full-visual --gate-cost-weight 0 --gate-cost-weight 0.02 \
  --gate-cost-weight 0.05 --protocol sync --channel good --channel bad --compute measured \
  --compute a40-orin-7b --rtt-sweep '' --toy 120 --toy-mixed \
  --out "$OUT/simulate-elastic.json"                                               # ~3 min
# README: device-edge simulation, feature codec, both drafter kinds
covspec simulate --target checkpoints/toy-target --drafter checkpoints/toy-drafter \
  --toy 20 --max-new-tokens 96 --out "$OUT/simulate-toy.json"
covspec simulate --target checkpoints/toy-target --drafter checkpoints/toy-drafter \
  --drafter checkpoints/toy-drafter-r64 --drafter checkpoints/toy-drafter-r16 \
  --drafter checkpoints/toy-drafter-r4 --protocol sync --channel medium --compute a40-orin-7b \
  --rtt-sweep '' --toy 40 --max-new-tokens 96 --out "$OUT/simulate-codec.json"
covspec bench --target checkpoints/toy-target --drafter checkpoints/toy-small \
  --drafter checkpoints/toy-device-vlm --toy 40 --max-new-tokens 96 \
  --out "$OUT/bench-device-vlm.json"
covspec simulate --target checkpoints/toy-target --drafter checkpoints/toy-drafter \
  --drafter checkpoints/toy-device-vlm --protocol sync --protocol decoupled --toy 20 \
  --max-new-tokens 96 --rtt-sweep '' --out "$OUT/simulate-drafters.json"

# README: the acceptance head, in the paraphrase world (short-trained drafter), then beside it
# the fully trained drafter and the canonical world's text-only drafter
covspec toy-target --paraphrase --out checkpoints/toy-para-target                   # ~17 min
train recipes/toy/para-drafter-short.yaml checkpoints/toy-para-drafter-short         # ~4 min
train recipes/toy/para-drafter.yaml checkpoints/toy-para-drafter                     # ~28 min
[ -f checkpoints/trajectories/toy-para-short/summary.json ] || \
  covspec collect-acceptance --target checkpoints/toy-para-target \
    --drafter checkpoints/toy-para-drafter-short --toy 2000 \
    --out checkpoints/trajectories/toy-para-short                # 5.5 min per 1000 alone
[ -f checkpoints/acceptance-head-para-short/model.safetensors ] || \
  covspec train --config recipes/toy/acceptance-para-short.yaml                     # ~2 min
# calibrated unless its metrics say so (an interrupted calibration reruns)
grep -qs closed_loop_calibration checkpoints/acceptance-head-para-short/metrics.json || \
  covspec calibrate-acceptance --head checkpoints/acceptance-head-para-short \
    --target checkpoints/toy-para-target --drafter checkpoints/toy-para-drafter-short \
    --toy 1000 --step 1 --mode chain                                                 # ~24 min
covspec simulate --target checkpoints/toy-para-target \
  --drafter checkpoints/toy-para-drafter-short --accept-head checkpoints/acceptance-head-para-short \
  --typical 0.09 --typical 0.3 --protocol sync --channel good --channel bad \
  --compute a40-orin-7b --rtt-sweep '' --toy 400 --toy-mixed --mode chain \
  --out "$OUT/simulate-acceptance-para-short.json"                                 # ~4 min
covspec simulate --target checkpoints/toy-para-target --drafter checkpoints/toy-para-drafter \
  --typical 0.09 --protocol sync --channel good --channel bad --compute a40-orin-7b \
  --rtt-sweep '' --toy 400 --toy-mixed --mode chain --out "$OUT/simulate-acceptance-para-full.json"
# README: video mode, the length sweep: keep and offload drafters at three depths on one clip
# stream (auto's threshold and depth table), then every drafter at depth 6 beside auto on
# another; each method's fastest of two rounds per clip
lengths=(--target checkpoints/toy-video-target --frames 8 16 32 64 128 256 576 --max-new-tokens 64)
covspec video-sweep "${lengths[@]}" --drafter checkpoints/toy-video-drafter \
  --drafter checkpoints/toy-video-drafter-pool3 --clips 16 --repeats 2 --seed 271828 \
  --depths 4 6 8 --out "$OUT/video-sweep.json"                                       # ~17 min
covspec video-sweep "${lengths[@]}" --drafter checkpoints/toy-video-drafter \
  --drafter checkpoints/toy-video-drafter-full-visual --drafter checkpoints/toy-video-drafter-pool3 \
  --drafter checkpoints/toy-video-drafter-elastic --clips 24 --repeats 2 \
  --visual-policy auto --keep toy-video-drafter-pool3 --offload toy-video-drafter \
  --threshold-from "$OUT/video-sweep.json" --depth-from "$OUT/video-sweep.json" \
  --out "$OUT/video-sweep-auto.json"                                                 # ~21 min
echo "tables and figures in $OUT"
