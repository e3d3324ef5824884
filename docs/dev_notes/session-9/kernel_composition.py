"""Gaussian-weighted neighbourhood compositions against the uniform 20-nearest-cell one (session 9, issue 16).

Recomputes each cell's state probabilities from the saved cell embeddings (obsm["X_spatia"]) and the
checkpoint's state centres (T = 0.3), then the neighbourhood composition either as the plain mean over the
20 nearest cells (the current default) or as a Gaussian-weighted mean over the ``k`` nearest cells with
bandwidth ``frac`` x the section's median distance to the k-th neighbour (scale-free: no µm constant), and
clusters it as `spatia embed` does (tl.domains: Hellinger, refined Leiden) and by k-means.

    python docs/dev_notes/session-9/kernel_composition.py OUT.json
    BANDWIDTH=cell GRID=40:0.35,0.5 python docs/dev_notes/session-9/kernel_composition.py OUT.json /tmp/s7/up_bands /tmp/s7/up_blobs /tmp/s7/up_demo /tmp/s7/up_bands4k
"""
import itertools
import os
import json
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
from safetensors.numpy import load_file
from scipy.spatial import cKDTree
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score as ari
from sklearn.preprocessing import StandardScaler

from spatia_hf import tl

warnings.filterwarnings("ignore")
NEIGHBOURS = (30, 40, 60)
FRACTIONS = (0.35, 0.5, 0.7)
# "section": one bandwidth per section (frac x median distance to the k-th neighbour); "cell": each
# neighbourhood's own (frac x its centre's distance to its k-th neighbour), what a model can compute per niche
BANDWIDTH = os.environ.get("BANDWIDTH", "section")
if os.environ.get("GRID"):
    NEIGHBOURS, FRACTIONS = (int(os.environ["GRID"].split(":")[0]),), tuple(map(float, os.environ["GRID"].split(":")[1].split(",")))


def composition(p, xy, sections, k, frac):
    out = np.zeros_like(p)
    for s in np.unique(sections):
        m = np.where(sections == s)[0]
        d, nn = cKDTree(xy[m]).query(xy[m], k=min(k, len(m)))
        if frac is None:
            w = np.ones_like(d)
        else:
            bw = frac * (np.median(d[:, -1]) if BANDWIDTH == "section" else d[:, -1:])
            w = np.exp(-0.5 * (d / bw) ** 2)
        w /= w.sum(1, keepdims=True)
        out[m] = (p[m][nn] * w[..., None]).sum(1)
    return out


rows = []
out_path = Path(sys.argv[1])
for work in map(Path, sys.argv[2:]):
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
        settings = [(20, None)] + list(itertools.product(NEIGHBOURS, FRACTIONS))
        for k, frac in settings:
            comp = composition(p, xy, sections, k, frac)
            b = ad.AnnData(np.zeros((len(a), 1), np.float32), obsm={"X_spatia_niche": comp.astype(np.float32)})
            tl.domains(b, n_domains=n_dom, seed=int(params["seed"]))
            leiden = ari(truth, b.obs["spatia_domain"].astype(str))
            km = ari(truth, KMeans(n_dom, n_init=10, random_state=0).fit_predict(StandardScaler().fit_transform(comp)))
            name = "uniform" if frac is None else f"gauss_{BANDWIDTH}"
            rows.append({"tissue": work.name, "seed": seed, "weights": name, "neighbours": k, "frac": frac,
                         "leiden_refined": leiden, "kmeans": km})
            print(work.name, seed, name, k, frac, round(leiden, 3), round(km, 3), flush=True)
out_path.write_text(json.dumps(rows, indent=1))
tissues = list(dict.fromkeys(r["tissue"] for r in rows))
for clusterer in ("leiden_refined", "kmeans"):
    print(f"\n{clusterer}: mean +- sd (ddof 1) over pretraining seeds")
    print("weights k frac".ljust(22) + "".join(t.rjust(16) for t in tissues))
    for key in dict.fromkeys((r["weights"], r["neighbours"], r["frac"]) for r in rows):
        cells = []
        for t in tissues:
            v = [r[clusterer] for r in rows if r["tissue"] == t and (r["weights"], r["neighbours"], r["frac"]) == key]
            cells.append(f"{np.mean(v):.3f}+-{np.std(v, ddof=1) if len(v) > 1 else 0:.3f}")
        print(f"{key[0]} {key[1]} {key[2]}".ljust(22) + "".join(c.rjust(16) for c in cells))
