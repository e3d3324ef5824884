#!/usr/bin/env bash
# Session 8's measure (200 held-out pairs, folds x0.5/x2/x4, control x4; type accuracy and feature FID of 180
# generated held-out cells; 12 DPM-Solver++ steps, seed 0) at a chosen sampler: guidance scale G and edit guidance
# WP (both default to the pipeline's defaults).
# usage: bash docs/dev_notes/session-11/measure_generator.sh PIPELINE_DIR NAME [G] [WP] [DATASET] [HELD_OUT]
set -euo pipefail
P=$1; NAME=$2; G=${3:-}; WP=${4:-}; D=${5:-/tmp/demo7/dataset}; HELD=${6:-synth_s03}
RESP=(); GEN=()
if [ -n "$G" ]; then RESP+=(--guidance_scale "$G"); GEN+=(--guidance-scale "$G"); fi
if [ -n "$WP" ]; then RESP+=(--perturbation_guidance "$WP"); fi
python examples/measure_perturbation_response.py --pipeline "$P" --dataset_dir "$D" --eval_sections "$HELD" \
    --n_pairs 200 --num_inference_steps 12 --out docs/generation/response_$NAME.json \
    --strip docs/generation/response_strip_$NAME.png "${RESP[@]}"
python examples/generate.py --pipeline "$P" --dataset "$D" --out /tmp/gen_$NAME --n-per-type 30 --n-perturb 0 \
    --steps 12 "${GEN[@]}"
cp /tmp/gen_$NAME/generation_report.json docs/generation/generation_report_$NAME.json
