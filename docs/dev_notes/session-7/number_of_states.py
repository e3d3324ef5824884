# Domains from compositions over the 20 nearest cells with 16/32/64/128 states fitted on the held-out cells themselves, temperature 0.3 / 1.0.
# usage: python number_of_states.py embed_s0.h5ad ...
import sys, warnings; warnings.filterwarnings("ignore")
from pathlib import Path
import numpy as np, anndata as ad, torch
from sklearn.metrics import adjusted_rand_score as ari
from sklearn.neighbors import NearestNeighbors
from spatia_hf.models.cell_states import SpatiaCellStates
from spatia_hf import tl
for h5 in sys.argv[1:]:
    a = ad.read_h5ad(h5); seed = int(Path(h5).stem.split("_s")[-1])
    xy = np.asarray(a.obsm["spatial"], float); d = a.obs["domain"].astype("category").cat.codes.values; k = len(set(d))
    X = np.asarray(a.obsm["X_spatia"], np.float32)
    nn = NearestNeighbors(n_neighbors=20).fit(xy).kneighbors(xy, return_distance=False)
    row = {}
    for P in (16, 32, 64, 128):
        for T in (0.3, 1.0):
            st = SpatiaCellStates(P, X.shape[1], T).fit(X, seed=0)
            p = st.probabilities(torch.from_numpy(X)).numpy()
            b = ad.AnnData(np.zeros((len(X), 1), np.float32), obsm={"E": p[nn].mean(1)})
            tl.domains(b, use_rep="E", n_domains=k, seed=seed); row[f"P{P}T{T}"] = round(ari(d, b.obs["spatia_domain"].astype(str)), 3)
    print(h5.split("/")[-2:], row, flush=True)
