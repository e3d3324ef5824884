# Domain ARI of k-means on PCA(X_spatia) smoothed (box, Gaussian) vs compositions over k-means states of X_spatia (10/20/40 states, 15/30 neighbours).
# usage: python composition_vs_smoothing.py /tmp/up_bands/embed_s*.h5ad (session-6 spatia embed outputs of bench_user_path)
import sys, numpy as np, anndata as ad, scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score as ari
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler
def refine(lab, nn):
    return np.array([np.bincount(v).argmax() for v in lab[nn]])
for f in sys.argv[1:]:
    a = ad.read_h5ad(f)
    xy = np.asarray(a.obsm["spatial"], float)
    d = a.obs["domain"].astype("category").cat.codes.values; k=len(set(d))
    dist, nn = NearestNeighbors(n_neighbors=60).fit(xy).kneighbors(xy)
    km = lambda E: KMeans(k, n_init=10, random_state=0).fit_predict(StandardScaler().fit_transform(E))
    S = StandardScaler().fit_transform(np.asarray(a.obsm["X_spatia"], float))
    P = PCA(30, random_state=0).fit_transform(S)
    r = {}
    for kk in (10, 20, 30):
        r[f"pcaS_k{kk}"] = ari(d, km(P[nn[:, :kk]].mean(1)))
    # gaussian weights by distance
    for sfac in (0.5, 1.0):
        s = np.median(dist[:, 10]) * sfac * 2
        w = np.exp(-0.5 * (dist / s) ** 2); w /= w.sum(1, keepdims=True)
        lab = km((P[nn] * w[..., None]).sum(1)); r[f"pcaS_gauss{sfac}"] = ari(d, lab); r[f"pcaS_gauss{sfac}+r"] = ari(d, refine(lab, nn[:, :15]))
    for nc in (10, 20, 40):
        lab0 = KMeans(nc, n_init=4, random_state=0).fit_predict(P)
        oh = np.eye(nc)[lab0]
        for kk in (15, 30):
            lab = km(oh[nn[:, :kk]].mean(1)); r[f"comp{nc}_k{kk}"] = ari(d, lab); r[f"comp{nc}_k{kk}+r"] = ari(d, refine(lab, nn[:, :15]))
    print(f.split('/')[-2:], {k_: round(v, 3) for k_, v in r.items()}, flush=True)
