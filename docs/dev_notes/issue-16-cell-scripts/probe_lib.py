"""Same probes as /work/shared/tools/probe_embeddings.py, in-process (for quick diagnosis)."""
import numpy as np, anndata as ad, scipy.sparse as sp
from scipy.stats import pearsonr
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import f1_score
from sklearn.preprocessing import StandardScaler

class Probe:
    def __init__(self, h5ad, spatial_key="spatial"):
        a = ad.read_h5ad(h5ad)
        X = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X, dtype=np.float64)
        self.X = X
        self.L = np.log1p(X / np.maximum(X.sum(1, keepdims=True), 1) * 1e4)
        xy = np.asarray(a.obsm[spatial_key], dtype=np.float64)
        self.tr = xy[:, 0] < np.median(xy[:, 0]); self.te = ~self.tr
        self.genes = np.flatnonzero((X > 0).mean(0) >= 0.1)
        self.y = a.obs["cell_type"].astype("category").cat.codes.values
        self.obs = a.obs; self.cell_ids = np.asarray(a.obs_names).astype(str)
        self.pca = PCA(30, random_state=0).fit(self.L[self.tr]).transform(self.L)

    def score(self, E, types=True):
        E = StandardScaler().fit_transform(np.asarray(E, np.float64)); tr, te = self.tr, self.te
        r = {}
        P = Ridge(1.0).fit(E[tr], self.L[tr][:, self.genes]).predict(E[te])
        r["gene_rec"] = float(np.nanmean([pearsonr(P[:, j], self.L[te][:, g])[0] for j, g in enumerate(self.genes)]))
        if types:
            r["typeF1"] = f1_score(self.y[te], LogisticRegression(max_iter=3000).fit(E[tr], self.y[tr]).predict(E[te]), average="macro")
        v = self.obs["nucleus_area_um2"].values.astype(float)
        r["area_r"] = pearsonr(Ridge(1.0).fit(E[tr], v[tr]).predict(E[te]), v[te])[0]
        return {k: round(float(x), 3) for k, x in r.items()}
