"""Copy of an embed output with obs["NBR_log"]: mean log1p-normalised value of the neighbour-induced genes."""
import sys, numpy as np, anndata as ad, scipy.sparse as sp
a = ad.read_h5ad(sys.argv[1])
X = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X, float)
L = np.log1p(X / np.maximum(X.sum(1, keepdims=True), 1) * 1e4)
cols = [list(a.var_names).index(g) for g in ("NBR1", "NBR2", "NBR3")]
a.obs["NBR_log"] = L[:, cols].mean(1)
a.write_h5ad(sys.argv[2])
