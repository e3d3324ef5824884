#!/bin/bash
# Session 9 (issue 16): `spatia embed` again on the 18 checkpoints of six benchmark tissues with the
# Gaussian-weighted composition (pretraining reused from --work; the embeddings made before were moved to
# WORK/before_s9/). Two queues of one thread each. The checkpoints were saved before the kernel existed, so
# their config.json says nothing about it and loads the old plain mean; before this script, each
# pretrain_s*/config.json got niche_config.cell_state_neighbours = 40 and cell_state_bandwidth = 0.35 (what
# `spatia pretrain` writes today; neither field enters training, so the weights are those today's code trains):
#   python -c "import json,glob; [json.dump({**c, 'niche_config': {**c['niche_config'], 'cell_state_neighbours': 40,
#     'cell_state_bandwidth': 0.35}}, open(p, 'w'), indent=2) for p in glob.glob('/tmp/s*/up_*/pretrain_s*/config.json')
#     for c in [json.load(open(p))]]"
B="python benchmarks/bench_user_path.py --threads 1 --seeds 0 1 2"
OUT=docs/dev_notes/session-9
( $B --work /tmp/s7/up_bands --geometry bands --domains 4 --genes 160 --cells 1200 --sections 3 --tissue-seed 5 --steps 120 --json $OUT/bench_bands.json
  $B --work /tmp/s7/up_demo --geometry blobs --domains 3 --genes 120 --cells 1200 --sections 4 --steps 150 --json $OUT/bench_demo_tissue.json
  $B --work /tmp/s9/up_blobs5 --geometry blobs --domains 5 --cell-types 7 --genes 140 --cells 1500 --sections 3 --tissue-seed 23 --steps 120 --json $OUT/bench_blobs5.json
) > /tmp/s9/rerun_a.log 2>&1 &
( $B --work /tmp/s7/up_blobs --geometry blobs --domains 3 --genes 120 --cells 1200 --sections 4 --tissue-seed 11 --steps 120 --json $OUT/bench_blobs.json
  $B --work /tmp/s7/up_bands4k --geometry bands --domains 4 --genes 178 --cells 4000 --sections 3 --tissue-seed 21 --steps 120 --json $OUT/bench_bands4k.json
  $B --work /tmp/s9/up_bands3 --geometry bands --domains 3 --cell-types 5 --genes 200 --cells 1600 --sections 3 --tissue-seed 31 --steps 120 --json $OUT/bench_bands3.json
) > /tmp/s9/rerun_b.log 2>&1 &
wait
