#!/bin/bash
# issue 16 user path on a banded tissue: synth -> convert -> pretrain (small, 120 steps, batch 8) -> embed -> probe
set -e
S=$1; SP=/work/main/.venv/bin/spatia
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1
[ -d band_ds ] || { $SP synth --out band_syn --sections 3 --cells 1200 --genes 160 --domains 4 --domain-geometry bands --seed 5 >/dev/null 2>&1; $SP convert synthetic band_syn --out band_ds --no-progress > /dev/null 2>&1; }
/usr/bin/time -f "%e s %M KB" $SP pretrain --data band_ds --out pt_s$S --preset small --max-steps 120 --batch-size 8 --seed $S --no-eval --no-progress > pt_s$S.log 2>&1
