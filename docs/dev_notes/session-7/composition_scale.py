# Spatial-domain ARI of `spatia_domain` (tl.domains: Leiden + centroid refinement) and of k-means when the composition
# is taken over the m nearest cells (m = 10, 15, 20, 30; 30 = the niche's size, what spatia embed used), with the
# checkpoint's own cell states, on bench_user_path outputs.
# usage: python composition_scale.py /tmp/s7/up_bands /tmp/s7/up_blobs ...   (folders with embed_s*.h5ad, pretrain_s*/)
import sys, json, warnings; warnings.filterwarnings("ignore")
from pathlib import Path
import numpy as np, anndata as ad, torch
from safetensors.torch import load_file
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score as ari
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler
from spatia_hf.models.cell_states import SpatiaCellStates
from spatia_hf import tl

out = {}
for work in map(Path, sys.argv[1:]):
    for h5 in sorted(work.glob("embed_s*.h5ad")):
        seed = h5.stem.split("_s")[-1]
        w = load_file(work / f"pretrain_s{seed}" / "model.safetensors")
        c = w["spatia.niche.cell_states.centres"]
        st = SpatiaCellStates(c.shape[0], c.shape[1]); st.centres.copy_(c); st.scale.copy_(w["spatia.niche.cell_states.scale"]); st.fitted.fill_(1)
        a = ad.read_h5ad(h5)
        d = a.obs["domain"].astype("category").cat.codes.values; k = len(set(d))
        p = st.probabilities(torch.from_numpy(np.asarray(a.obsm["X_spatia"], np.float32))).numpy()
        nn = NearestNeighbors(n_neighbors=30).fit(a.obsm["spatial"]).kneighbors(a.obsm["spatial"], return_distance=False)
        row = {}
        for m in (10, 15, 20, 30):
            C = p[nn[:, :m]].mean(1)
            b = ad.AnnData(np.zeros((len(C), 1), np.float32), obsm={"X_spatia_niche": C})
            tl.domains(b, n_domains=k, seed=int(seed))
            row[m] = (round(ari(d, b.obs["spatia_domain"].astype(str)), 3),
                      round(ari(d, KMeans(k, n_init=10, random_state=0).fit_predict(StandardScaler().fit_transform(C))), 3))
        out[f"{work.name}/s{seed}"] = row
        print(work.name, seed, row, flush=True)
for m in (10, 15, 20, 30):
    for t in sorted({k.split("/")[0] for k in out}):
        v = [r[m][0] for k, r in out.items() if k.startswith(t + "/")]
        print(m, t, "spatia_domain %.3f +- %.3f" % (np.mean(v), np.std(v, ddof=1)))
