import sys, numpy as np, anndata as ad, warnings
warnings.filterwarnings("ignore")
from sklearn.metrics import adjusted_rand_score
from spatia_hf import tl
for path, nd in [(f"/tmp/up_bands/embed_s{s}.h5ad", 4) for s in range(3)] + [(f"/tmp/up_blobs/embed_s{s}.h5ad", 3) for s in range(3)]:
    a = ad.read_h5ad(path)
    row = []
    for nn in (15, 30, 50, 100):
        b = a.copy()
        tl.domains(b, n_domains=nd, n_neighbors=nn, key_added="d", seed=0)
        row.append(adjusted_rand_score(a.obs["domain"].astype(str), b.obs["d"].astype(str)))
    b = a.copy(); tl.domains(b, n_domains=nd, method="kmeans", key_added="d", seed=0)
    row.append(adjusted_rand_score(a.obs["domain"].astype(str), b.obs["d"].astype(str)))
    print(path.split("/")[2], path[-7:-5], " ".join(f"{x:.3f}" for x in row), flush=True)
