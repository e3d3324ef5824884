#!/bin/bash
# embed the held-out section (synth_s02) with the run's model, then probe (types, domains, task-8 targets)
S=$1; cd /tmp/bands; export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1
while [ ! -f pt_s$S/spatia_training.json ]; do sleep 15; done
/work/main/.venv/bin/spatia embed --model pt_s$S --adata band_syn/synth_s02.h5ad --image band_syn/synth_s02.ome.tif --out emb_s$S.h5ad --n-domains 4 --seed $S --no-progress > emb_s$S.log 2>&1
/work/main/.venv/bin/python /tmp/w16niche/add_nbr.py emb_s$S.h5ad tmp_s$S.h5ad && /work/main/.venv/bin/python /work/shared/tools/probe_embeddings.py tmp_s$S.h5ad --domain-key domain --type-key cell_type --value-key NBR_log neighbor_frac_T_cell neighbor_frac_macrophage neighbor_frac_tumor > probe_s$S.json 2> probe_s$S.err; rm -f tmp_s$S.h5ad
