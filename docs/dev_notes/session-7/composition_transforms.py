# Domains (tl.domains) on the composition as written (raw), its square root (Hellinger), standardised columns, and log; on bench_user_path outputs.
# usage: python composition_transforms.py /tmp/s7/up_bands /tmp/s7/up_blobs /tmp/s7/up_demo /tmp/s7/up_bands4k
import sys, warnings; warnings.filterwarnings("ignore")
from pathlib import Path
import numpy as np, anndata as ad
from sklearn.metrics import adjusted_rand_score as ari
from spatia_hf import tl
res = {}
for work in map(Path, sys.argv[1:]):
    for h5 in sorted(work.glob("embed_s*.h5ad")):
        seed = int(h5.stem.split("_s")[-1]); a = ad.read_h5ad(h5)
        d = a.obs["domain"].astype("category").cat.codes.values; k = len(set(d))
        C = np.asarray(a.obsm["X_spatia_niche"], float)
        reps = {"raw": C, "sqrt": np.sqrt(C), "std": (C - C.mean(0)) / (C.std(0) + 1e-6), "log": np.log(C + 1e-3)}
        row = {}
        for name, E in reps.items():
            b = ad.AnnData(np.zeros((len(E), 1), np.float32), obsm={"E": E.astype(np.float32)})
            tl.domains(b, use_rep="E", n_domains=k, seed=seed); row[name] = round(ari(d, b.obs["spatia_domain"].astype(str)), 3)
        res.setdefault(work.name, []).append(row); print(work.name, seed, row, flush=True)
for t, rows in res.items():
    print(t, {w: round(float(np.mean([r[w] for r in rows])), 3) for w in rows[0]})
