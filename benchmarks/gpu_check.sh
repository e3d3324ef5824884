#!/usr/bin/env bash
# GPU figures of spatia-hf in one run (<= 5 minutes on one GPU), from the repository root of a fresh machine:
#
#     bash benchmarks/gpu_check.sh                 # installs the package, then runs benchmarks/gpu_check.py
#     bash benchmarks/gpu_check.sh --dry-run       # the same code paths on the CPU at a tiny size (no GPU needed)
#
# Prints bf16 pretraining cells/s and peak GPU memory at the base preset (SDPA), generator images/s at 128 px
# with and without token merging, a 2-process DDP step when 2+ GPUs are present, and an FSDP2 run through the
# Trainer with examples/accelerate_configs/fsdp.yaml (one process per GPU) whose saved checkpoint is loaded back
# (RESULT {json} lines; all of them also in $OUT/gpu_check.json, or ./gpu_check.json without $OUT).
#
# Installation keeps the machine's torch: `pip install -e .` runs with a constraint pinning the installed torch
# version, so pip can neither replace a CUDA build nor pull a CPU wheel. Without torch it stops and says so.
# On a machine without a package index, put the dependencies on PYTHONPATH and `src` too: when spatia_hf
# imports, nothing is installed.
# Extra arguments go to benchmarks/gpu_check.py (e.g. --steps 20 --batch 4 --no-ddp).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python || command -v python3)}"
DRY=0
ARGS=()
for a in "$@"; do
  if [[ "$a" == "--dry-run" ]]; then DRY=1; else ARGS+=("$a"); fi
done
TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
if [[ -z "$TORCH_VERSION" ]]; then
  echo "gpu_check: no torch in $PY. Fix: install the CUDA build of torch for this machine first" >&2
  exit 2
fi
if ! "$PY" -c 'import spatia_hf' 2>/dev/null || [[ "${SPATIA_REINSTALL:-0}" == "1" ]]; then
  CONSTRAINTS="$(mktemp)"
  echo "torch==${TORCH_VERSION}" > "$CONSTRAINTS"
  echo "gpu_check: pip install -e . (torch pinned at ${TORCH_VERSION})"
  "$PY" -m pip install --quiet -e . -c "$CONSTRAINTS"
  rm -f "$CONSTRAINTS"
fi
"$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, GPUs: {torch.cuda.device_count()}")'
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
JSON="${OUT:-.}/gpu_check.json"
if [[ "$DRY" == "1" ]]; then
  exec timeout 600 "$PY" benchmarks/gpu_check.py --device cpu --preset tiny --crop-px 32 --cells 300 --batch 2 \
    --cells-per-niche 8 --warmup 1 --steps 1 --gen-px 32 --gen-preset tiny --gen-batch 2 --gen-steps 2 \
    --gen-genes 20 --json "$JSON" ${ARGS[@]+"${ARGS[@]}"}
fi
exec timeout 420 "$PY" benchmarks/gpu_check.py --device cuda --json "$JSON" ${ARGS[@]+"${ARGS[@]}"}
