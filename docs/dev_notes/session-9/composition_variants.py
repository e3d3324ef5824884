"""Composition variants tried before the Gaussian kernel (session 9, issue 16): the session-8 composition (plain mean
over the 20 nearest), its 1- and 2-hop concatenation, a half/half mix of the two, Gaussian weights over the 40 nearest
(sigma 0.5 x the section's median 40th-neighbour distance) and a plain mean over 25; clustered by tl.domains and k-means.
(The first run of this script's parent also had the plain 2-hop average: 0.889 / 0.967 / 0.969 / 0.947 by Leiden.)

    python docs/dev_notes/session-9/composition_variants.py /tmp/s7/up_bands /tmp/s7/up_blobs /tmp/s7/up_demo /tmp/s7/up_bands4k
"""
import json
import sys
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from saved_runs import domain_scores, knn_mean, per_section, print_summary, saved_runs

OUT = Path(__file__).with_suffix(".json")
rows = []
for run in saved_runs(sys.argv[1:]):
    p, xy, sections = run.probabilities, run.xy, run.sections
    comp = knn_mean(p, xy, sections, 20)
    hop2 = knn_mean(comp, xy, sections, 20)

    def gauss(k, frac):
        def fn(pp, m):
            d, nn = cKDTree(pp).query(pp, k=min(k, len(m)))
            w = np.exp(-0.5 * (d / (np.median(d[:, -1]) * frac)) ** 2)
            w /= w.sum(1, keepdims=True)
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
        rows.append({"tissue": run.tissue, "seed": run.seed, "rep": name, **domain_scores(rep, run)})
        print(run.tissue, run.seed, name, round(rows[-1]["leiden_refined"], 3), round(rows[-1]["kmeans"], 3), flush=True)
OUT.write_text(json.dumps(rows, indent=1))
print_summary(rows, lambda r: r["rep"])
