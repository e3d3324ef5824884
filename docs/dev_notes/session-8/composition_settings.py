"""Which composition settings separate domains best, on every benchmark tissue (not the demo alone)?
Recomputes each cell's niche composition from the saved cell embeddings (obsm["X_spatia"]) and the
checkpoint's cell-state centres, for assignment temperatures and neighbourhood sizes, then runs
tl.domains (Hellinger, refined Leiden) as `spatia embed` does. Session 8, issue 16.

    python docs/dev_notes/session-8/composition_settings.py /tmp/s7/up_bands /tmp/s7/up_blobs /tmp/s7/up_demo /tmp/s7/up_bands4k
"""
import itertools
import json
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
from safetensors.numpy import load_file
from scipy.spatial import cKDTree
from sklearn.metrics import adjusted_rand_score as ari

from spatia_hf import tl

warnings.filterwarnings("ignore")
TEMPERATURES = (0.1, 0.3, 1.0)
NEIGHBOURS = (10, 20, 30)
rows = []
for work in map(Path, sys.argv[1:]):
    for h5 in sorted(work.glob("embed_s*.h5ad")):
        seed = int(h5.stem.split("_s")[-1])
        a = ad.read_h5ad(h5)
        w = load_file(str(work / f"pretrain_s{seed}" / "model.safetensors"))
        centres = w[[k for k in w if k.endswith("cell_states.centres")][0]].astype(np.float64)
        scale = float(w[[k for k in w if k.endswith("cell_states.scale")][0]][0])
        x = np.asarray(a.obsm["X_spatia"], np.float64)
        d2 = ((x[:, None, :] - centres[None]) ** 2).sum(-1)
        xy = np.asarray(a.obsm["spatial"], np.float64)
        sections = a.obs["sample_id"].astype(str).to_numpy() if "sample_id" in a.obs else np.zeros(len(a), str)
        truth = a.obs["domain"].astype(str).to_numpy()
        params = a.uns["spatia"]["params"]
        for t, k in itertools.product(TEMPERATURES, NEIGHBOURS):
            logits = -d2 / (t * scale)
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            comp = np.empty_like(p)
            for s in np.unique(sections):
                m = np.where(sections == s)[0]
                _, nn = cKDTree(xy[m]).query(xy[m], k=min(k, len(m)))
                comp[m] = p[m][nn].mean(1)
            b = ad.AnnData(np.zeros((len(a), 1), np.float32), obsm={"X_spatia_niche": comp.astype(np.float32)})
            tl.domains(b, n_domains=int(params["n_domains_requested"]), seed=int(params["seed"]))
            score = ari(truth, b.obs["spatia_domain"].astype(str))
            rows.append({"tissue": work.name, "seed": seed, "temperature": t, "neighbours": k, "ari": score})
            print(work.name, seed, t, k, round(score, 3), flush=True)
Path("docs/dev_notes/session-8/composition_settings.json").write_text(json.dumps(rows, indent=1))
tissues = list(dict.fromkeys(r["tissue"] for r in rows))
print("temperature neighbours " + " ".join(f"{t:>14s}" for t in tissues))
for t, k in itertools.product(TEMPERATURES, NEIGHBOURS):
    cells = []
    for tissue in tissues:
        v = [r["ari"] for r in rows if r["tissue"] == tissue and r["temperature"] == t and r["neighbours"] == k]
        cells.append(f"{np.mean(v):.3f}+-{np.std(v):.3f}")
    print(f"{t:11g} {k:10d} " + " ".join(f"{c:>14s}" for c in cells))
