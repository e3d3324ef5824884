# Composition vs composition+centre vs composition+token vs token: k-means ARI, Leiden+centroids ARI, task-8 ridge targets.
# usage: python composition_token_concat.py /tmp/up_bands/embed_s*.h5ad (session-6 spatia embed outputs of bench_user_path)
import sys, numpy as np, anndata as ad, scipy.sparse as sp, warnings; warnings.filterwarnings("ignore")
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score as ari
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler
from sklearn.linear_model import Ridge
from scipy.stats import pearsonr
from spatia_hf import tl
def bal(E): E = E - E.mean(0); return E / np.sqrt(E.var(0).sum())
def lloyd(E, lab):
    cents = np.stack([E[lab == c].mean(0) for c in np.unique(lab)])
    return KMeans(len(cents), init=cents, n_init=1).fit_predict(E)
for f in sys.argv[1:]:
    a = ad.read_h5ad(f)
    X0 = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X, float)
    Lg = np.log1p(X0 / np.maximum(X0.sum(1, keepdims=True), 1) * 1e4)
    nbr = [list(a.var_names).index(g) for g in ("NBR1", "NBR2", "NBR3")]
    xy = np.asarray(a.obsm["spatial"], float); tr = xy[:, 0] < np.median(xy[:, 0]); te = ~tr
    d = a.obs["domain"].astype("category").cat.codes.values; k=len(set(d))
    nn = NearestNeighbors(n_neighbors=30).fit(xy).kneighbors(xy, return_distance=False)
    X = np.asarray(a.obsm["X_spatia"], float); N = np.asarray(a.obsm["X_spatia_niche"], float)
    km = KMeans(32, n_init=3, random_state=0).fit(X); protos = km.cluster_centers_
    d2 = ((X[:, None, :] - protos[None]) ** 2).sum(-1)
    z = -d2 / (0.3 * np.median(d2.min(1))); z -= z.max(1, keepdims=True); A = np.exp(z); A /= A.sum(1, keepdims=True)
    C = A[nn].mean(1)
    ys = [a.obs[c].values.astype(float) for c in ("neighbor_frac_T_cell", "neighbor_frac_macrophage", "neighbor_frac_tumor")] + [Lg[:, nbr].mean(1)]
    out = {}
    for name, E in (("comp", C), ("comp+centre", np.hstack([C, 0.2*A])), ("cat0.3", np.hstack([bal(C), 0.3 * bal(N)])), ("cat0.5", np.hstack([bal(C), 0.5 * bal(N)])), ("niche", N)):
        Es = StandardScaler().fit_transform(E)
        row = [round(ari(d, KMeans(k, n_init=10, random_state=0).fit_predict(Es)), 3)]
        b = ad.AnnData(np.zeros((len(E), 1)), obsm={"E": E.astype(np.float32)})
        tl.domains(b, use_rep="E", n_domains=k, seed=0)
        lab = b.obs["spatia_domain"].astype(int).values
        row.append(round(ari(d, lloyd(E, lab)), 3))
        row.append([round(pearsonr(Ridge(1.0).fit(Es[tr], y[tr]).predict(Es[te]), y[te])[0], 3) for y in ys])
        out[name] = row
    print(f.split('/')[-2:], out, flush=True)
