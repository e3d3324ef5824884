# Leiden (spatia_hf.tl.domains, 3 seeds) on compositions and on the pooled token, each before/after Lloyd iterations from Leiden's domains.
# usage: python leiden_then_centroids.py /tmp/up_bands/embed_s*.h5ad (session-6 spatia embed outputs of bench_user_path)
import sys, numpy as np, anndata as ad, scanpy as sc, warnings; warnings.filterwarnings("ignore")
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score as ari
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler
from spatia_hf import tl
def lloyd(E, lab):
    cents = np.stack([E[lab == c].mean(0) for c in np.unique(lab)])
    return KMeans(len(cents), init=cents, n_init=1).fit_predict(E)
for f in sys.argv[1:]:
    a = ad.read_h5ad(f)
    xy = np.asarray(a.obsm["spatial"], float)
    d = a.obs["domain"].astype("category").cat.codes.values; k=len(set(d))
    nn = NearestNeighbors(n_neighbors=30).fit(xy).kneighbors(xy, return_distance=False)
    X = np.asarray(a.obsm["X_spatia"], float); N = np.asarray(a.obsm["X_spatia_niche"], float)
    km = KMeans(32, n_init=3, random_state=0).fit(X); protos = km.cluster_centers_
    d2 = ((X[:, None, :] - protos[None]) ** 2).sum(-1)
    z = -d2 / (0.3 * np.median(d2.min(1))); z -= z.max(1, keepdims=True); A = np.exp(z); A /= A.sum(1, keepdims=True)
    C = A[nn].mean(1)
    out = {}
    for name, E in (("comp", C), ("niche", N)):
        row = [round(ari(d, KMeans(k, n_init=10, random_state=0).fit_predict(E)), 3)]
        for seed in (0, 1, 2):
            b = ad.AnnData(np.zeros((len(E), 1)), obsm={"E": E.astype(np.float32)})
            tl.domains(b, use_rep="E", n_domains=k, seed=seed)
            lab = b.obs["spatia_domain"].astype(int).values
            row.append((round(ari(d, lab), 3), round(ari(d, lloyd(E, lab)), 3)))
        out[name] = row
    print(f.split('/')[-2:], out, flush=True)
