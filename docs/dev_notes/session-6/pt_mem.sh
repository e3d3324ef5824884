#!/bin/bash
# pretraining peak RSS at the small preset, 240 steps, batch 8 (issue 20's command), on one section of N cells
N=$1; SP=/work/main/.venv/bin/spatia
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1
cd /tmp/mem
[ -d ds$N ] || { $SP synth --out syn$N --sections 1 --cells $N --seed 0 --no-progress > syn$N.log 2>&1; $SP convert synthetic syn$N --out ds$N --no-progress > conv$N.log 2>&1; }
/usr/bin/time -f "%e s %M KB" $SP pretrain --data ds$N --out pt$N --preset small --max-steps 240 --batch-size 8 --no-eval --no-progress > pt$N.log 2>&1
tail -1 pt$N.log
