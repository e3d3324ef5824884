# Domain ARI of k-means on one-hot true types / PCA / X_spatia averaged over k = 8..45 nearest cells, with and without a majority-vote label refinement: how much of the gap is the smoothing scale.
# usage: python scale_of_smoothing.py /tmp/up_bands/embed_s*.h5ad (session-6 spatia embed outputs of bench_user_path)
import sys, numpy as np, anndata as ad, scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score as ari
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler
def refine(lab, nn):
    return np.array([np.bincount(v).argmax() for v in lab[nn]])
f = sys.argv[1]
a = ad.read_h5ad(f)
print(a.obs.columns.tolist())
X = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X, float)
L = np.log1p(X / np.maximum(X.sum(1, keepdims=True), 1) * 1e4)
xy = np.asarray(a.obsm["spatial"], float)
d = a.obs["domain"].astype("category").cat.codes.values; k=len(set(d))
t = a.obs["cell_type"].astype("category").cat.codes.values
oh = np.eye(t.max()+1)[t]
pca = PCA(30, random_state=0).fit(L).transform(L)
nnall = NearestNeighbors(n_neighbors=60).fit(xy).kneighbors(xy, return_distance=False)
km = lambda E: KMeans(k, n_init=10, random_state=0).fit_predict(StandardScaler().fit_transform(E))
S = np.asarray(a.obsm["X_spatia"], float)
for kk in (8, 15, 30, 45):
    r = {}
    for name, E in (("onehot", oh), ("pca", pca), ("Xsp", S), ("ohpca", np.hstack([oh*3, pca]))):
        lab = km(E[nnall[:, :kk]].mean(1)); r[name] = round(ari(d, lab), 3); r[name+"+r15"] = round(ari(d, refine(lab, nnall[:, :15])), 3)
    print(kk, r, flush=True)
# domain composition
import pandas as pd
print(pd.crosstab(a.obs["domain"], a.obs["cell_type"], normalize="index").round(2))
