# Domains (tl.domains) from compositions over the m=20 nearest cells vs over the cells within 20/30/40 um, and PCA averaged within 20/30/40 um (the evaluation's smoothing baseline) with the same clusterer.
# usage: python smoothing_radius.py W... (bench_user_path work folders; reads W/../old_embeds/<name>/embed_s*.h5ad: the first run's outputs, X_spatia is the same)
import sys, warnings; warnings.filterwarnings("ignore")
from pathlib import Path
import numpy as np, anndata as ad, torch, scipy.sparse as sp
from safetensors.torch import load_file
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score as ari
from sklearn.neighbors import NearestNeighbors
from spatia_hf.models.cell_states import SpatiaCellStates
from spatia_hf import tl
for work in map(Path, sys.argv[1:]):
    for h5 in sorted((Path("/tmp/s7/old_embeds") / work.name).glob("embed_s*.h5ad")):
        seed = h5.stem.split("_s")[-1]
        w = load_file(work / f"pretrain_s{seed}" / "model.safetensors")
        c = w["spatia.niche.cell_states.centres"]
        st = SpatiaCellStates(c.shape[0], c.shape[1]); st.centres.copy_(c); st.scale.copy_(w["spatia.niche.cell_states.scale"]); st.fitted.fill_(1)
        a = ad.read_h5ad(h5)
        px = float(a.uns["spatial_pixel_size_um"])
        xy = np.asarray(a.obsm["spatial"], float)
        d = a.obs["domain"].astype("category").cat.codes.values; k = len(set(d))
        p = st.probabilities(torch.from_numpy(np.asarray(a.obsm["X_spatia"], np.float32))).numpy()
        X = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X, float)
        L = np.log1p(X / np.maximum(X.sum(1, keepdims=True), 1) * 1e4); pcs = PCA(30, random_state=0).fit_transform(L)
        def dom(E):
            b = ad.AnnData(np.zeros((len(E), 1), np.float32), obsm={"E": np.asarray(E, np.float32)})
            tl.domains(b, use_rep="E", n_domains=k, seed=int(seed)); return round(ari(d, b.obs["spatia_domain"].astype(str)), 3)
        nn = NearestNeighbors(n_neighbors=20).fit(xy).kneighbors(xy, return_distance=False)
        row = {"px_um": px, "m20": dom(p[nn].mean(1))}
        scale = px or 1.0
        for r in (20, 30, 40):
            ind = NearestNeighbors(radius=r / scale).fit(xy).radius_neighbors(xy, return_distance=False)
            row[f"r{r}"] = dom(np.stack([p[i].mean(0) for i in ind]))
            row[f"pca_r{r}"] = dom(np.stack([pcs[i].mean(0) for i in ind]))
            row[f"n_r{r}"] = float(np.mean([len(i) for i in ind]))
        print(work.name, seed, row, flush=True)
