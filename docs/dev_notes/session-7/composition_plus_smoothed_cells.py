# Composition (X_spatia_niche) alone vs composition + w * PCA-30 of X_spatia averaged over the same 20 nearest cells (blocks balanced to equal total variance), domains by tl.domains.
# usage: python composition_plus_smoothed_cells.py /tmp/s7/up_bands /tmp/s7/up_blobs /tmp/s7/up_demo /tmp/s7/up_bands4k
import sys, warnings; warnings.filterwarnings("ignore")
from pathlib import Path
import numpy as np, anndata as ad
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score as ari
from sklearn.neighbors import NearestNeighbors
from spatia_hf import tl
def bal(E): E = E - E.mean(0); return E / np.sqrt(E.var(0).sum())
res = {}
for work in map(Path, sys.argv[1:]):
    for h5 in sorted(work.glob("embed_s*.h5ad")):
        seed = int(h5.stem.split("_s")[-1]); a = ad.read_h5ad(h5)
        d = a.obs["domain"].astype("category").cat.codes.values; k = len(set(d))
        xy = np.asarray(a.obsm["spatial"], float); nn = NearestNeighbors(n_neighbors=20).fit(xy).kneighbors(xy, return_distance=False)
        C = np.asarray(a.obsm["X_spatia_niche"], float)
        S = PCA(30, random_state=0).fit_transform(np.asarray(a.obsm["X_spatia"], float))[nn].mean(1)
        row = {}
        for w in (0.0, 0.3, 0.5, 1.0):
            E = np.hstack([bal(C), w * bal(S)]) if w else C
            b = ad.AnnData(np.zeros((len(E), 1), np.float32), obsm={"E": E.astype(np.float32)})
            tl.domains(b, use_rep="E", n_domains=k, seed=seed); row[w] = round(ari(d, b.obs["spatia_domain"].astype(str)), 3)
        res.setdefault(work.name, []).append(row); print(work.name, seed, row, flush=True)
for t, rows in res.items():
    print(t, {w: round(float(np.mean([r[w] for r in rows])), 3) for w in rows[0]})
