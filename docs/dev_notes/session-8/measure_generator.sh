#!/usr/bin/env bash
# Response (200 pairs, folds x0.5/x2/x4, control x4) + type accuracy / feature FID of one trained generator.
# usage: bash docs/dev_notes/session-8/measure_generator.sh PIPELINE_DIR NAME [DATASET] [HELD_OUT]
set -euo pipefail
P=$1; NAME=$2; D=${3:-/tmp/demo7/dataset}; HELD=${4:-synth_s03}
python examples/measure_perturbation_response.py --pipeline "$P" --dataset_dir "$D" --eval_sections "$HELD" \
    --n_pairs 200 --num_inference_steps 12 --out docs/generation/response_$NAME.json \
    --strip docs/generation/response_strip_$NAME.png
python examples/generate.py --pipeline "$P" --dataset "$D" --out /tmp/s8/gen_$NAME --n-per-type 30 --n-perturb 0 --steps 12
cp /tmp/s8/gen_$NAME/generation_report.json docs/generation/generation_report_$NAME.json
