"""Composition variants tried before the Gaussian kernel (session 9, issue 16): the session-8 composition (plain mean
over the 20 nearest), its 1- and 2-hop concatenation, a half/half mix of the two, Gaussian weights over the 40 nearest
(sigma 0.5 x the section's median 40th-neighbour distance) and a plain mean over 25; clustered by tl.domains and k-means.
(The first run of this script's parent also had the plain 2-hop average: 0.889 / 0.967 / 0.969 / 0.947 by Leiden.)

    python docs/dev_notes/session-9/composition_variants.py /tmp/s7/up_bands /tmp/s7/up_blobs /tmp/s7/up_demo /tmp/s7/up_bands4k
"""
import json
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp
from safetensors.numpy import load_file
from scipy.spatial import cKDTree
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score as ari
from sklearn.preprocessing import StandardScaler

from spatia_hf import tl

warnings.filterwarnings("ignore")
OUT = Path(__file__).with_suffix(".json")


def per_section(xy, sections, fn):
    out = None
    for s in np.unique(sections):
        m = np.where(sections == s)[0]
        v = fn(xy[m], m)
        out = np.zeros((len(xy),) + v.shape[1:], v.dtype) if out is None else out
        out[m] = v
    return out


def knn_mean(values, xy, sections, k):
    return per_section(xy, sections, lambda p, m: values[m][cKDTree(p).query(p, k=min(k, len(m)))[1]].mean(1))


def radius_mean(values, xy, sections, r):
    def fn(p, m):
        tree = cKDTree(p)
        return np.stack([values[m][nb].mean(0) for nb in tree.query_ball_point(p, r)])
    return per_section(xy, sections, fn)


rows = []
for work in map(Path, sys.argv[1:]):
    for h5 in sorted(work.glob("embed_s*.h5ad")):
        seed = int(h5.stem.split("_s")[-1])
        a = ad.read_h5ad(h5)
        w = load_file(str(work / f"pretrain_s{seed}" / "model.safetensors"))
        centres = w[[k for k in w if k.endswith("cell_states.centres")][0]].astype(np.float64)
        scale = float(w[[k for k in w if k.endswith("cell_states.scale")][0]][0])
        x = np.asarray(a.obsm["X_spatia"], np.float64)
        xy = np.asarray(a.obsm["spatial"], np.float64)
        sections = a.obs["sample_id"].astype(str).to_numpy() if "sample_id" in a.obs else np.zeros(len(a), str)
        truth = a.obs["domain"].astype(str).to_numpy()
        params = a.uns["spatia"]["params"]
        n_dom = int(params["n_domains_requested"])
        logits = -((x[:, None, :] - centres[None]) ** 2).sum(-1) / (0.3 * scale)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        comp = knn_mean(p, xy, sections, 20)
        counts = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X, np.float64)
        logx = np.log1p(counts / np.maximum(counts.sum(1, keepdims=True), 1) * 1e4)
        pca = PCA(30, random_state=0).fit_transform(logx)
        hop2 = knn_mean(comp, xy, sections, 20)
        def gauss(k, frac):
            def fn(pp, m):
                d, nn = cKDTree(pp).query(pp, k=min(k, len(m)))
                s = np.median(d[:, -1]) * frac
                w = np.exp(-0.5 * (d / s) ** 2); w /= w.sum(1, keepdims=True)
                return (p[m][nn] * w[..., None]).sum(1)
            return per_section(xy, sections, fn)
        reps = {
            "spatia": comp,
            "concat_1_2hop": np.concatenate([np.sqrt(comp), np.sqrt(hop2)], 1),
            "mix_0.5": 0.5 * comp + 0.5 * hop2,
            "gauss40_0.5": gauss(40, 0.5),
            "knn25": knn_mean(p, xy, sections, 25),
        }
        for name, rep in reps.items():
            b = ad.AnnData(np.zeros((len(a), 1), np.float32), obsm={"rep": rep.astype(np.float32)})
            tl.domains(b, use_rep="rep", n_domains=n_dom, seed=int(params["seed"]))
            leiden = ari(truth, b.obs["spatia_domain"].astype(str))
            km = ari(truth, KMeans(n_dom, n_init=10, random_state=0).fit_predict(StandardScaler().fit_transform(rep)))
            rows.append({"tissue": work.name, "seed": seed, "rep": name, "leiden_refined": leiden, "kmeans": km})
            print(work.name, seed, name, round(leiden, 3), round(km, 3), flush=True)
OUT.write_text(json.dumps(rows, indent=1))
tissues = list(dict.fromkeys(r["tissue"] for r in rows))
for clusterer in ("leiden_refined", "kmeans"):
    print(f"\n{clusterer}: mean +- sd (ddof 1) over pretraining seeds")
    print("rep".ljust(20) + "".join(t.rjust(18) for t in tissues))
    for name in dict.fromkeys(r["rep"] for r in rows):
        cells = []
        for t in tissues:
            v = [r[clusterer] for r in rows if r["tissue"] == t and r["rep"] == name]
            cells.append(f"{np.mean(v):.3f}+-{np.std(v, ddof=1) if len(v) > 1 else 0:.3f}")
        print(name.ljust(20) + "".join(c.rjust(18) for c in cells))
