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
import json
import os
import sys
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from saved_runs import domain_scores, per_section, print_summary, saved_runs

NEIGHBOURS = (30, 40, 60)
FRACTIONS = (0.35, 0.5, 0.7)
# "section": one bandwidth per section (frac x median distance to the k-th neighbour); "cell": each
# neighbourhood's own (frac x its centre's distance to its k-th neighbour), what a model can compute per niche
BANDWIDTH = os.environ.get("BANDWIDTH", "section")
if os.environ.get("GRID"):
    k_text, fracs_text = os.environ["GRID"].split(":")
    NEIGHBOURS, FRACTIONS = (int(k_text),), tuple(map(float, fracs_text.split(",")))


def composition(p, xy, sections, k, frac):
    def fn(pp, m):
        d, nn = cKDTree(pp).query(pp, k=min(k, len(m)))
        if frac is None:
            w = np.ones_like(d)
        else:
            w = np.exp(-0.5 * (d / (frac * (np.median(d[:, -1]) if BANDWIDTH == "section" else d[:, -1:]))) ** 2)
        w /= w.sum(1, keepdims=True)
        return (p[m][nn] * w[..., None]).sum(1)
    return per_section(xy, sections, fn)


rows = []
out_path = Path(sys.argv[1])
for run in saved_runs(sys.argv[2:]):
    for k, frac in [(20, None)] + list(itertools.product(NEIGHBOURS, FRACTIONS)):
        comp = composition(run.probabilities, run.xy, run.sections, k, frac)
        name = "uniform" if frac is None else f"gauss_{BANDWIDTH}"
        rows.append({"tissue": run.tissue, "seed": run.seed, "weights": name, "neighbours": k, "frac": frac,
                     **domain_scores(comp, run)})
        print(run.tissue, run.seed, name, k, frac, round(rows[-1]["leiden_refined"], 3), round(rows[-1]["kmeans"], 3),
              flush=True)
out_path.write_text(json.dumps(rows, indent=1))
print_summary(rows, lambda r: f"{r['weights']} {r['neighbours']} {r['frac']}", width=22)
