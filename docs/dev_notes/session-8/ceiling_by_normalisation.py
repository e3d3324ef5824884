"""How far can a generator conditioned on counts move nucleus area with a NUCSIZE edit? A ridge
regression of real log nucleus area on the condition (the conditional mean a perfectly trained
generator would learn), fitted on training sections, applied to edited held-out cells, for
several ways of normalising the counts. Session 8, issue 18.

    python docs/dev_notes/session-8/ceiling_by_normalisation.py /tmp/demo7/dataset synth_s03
"""
import sys

import numpy as np
from sklearn.linear_model import Ridge

from spatia_hf.evaluation.arrays import load_arrays

cells, _, _ = load_arrays(sys.argv[1], with_images=False)
held = sys.argv[2]
C = np.asarray(cells.counts.todense(), np.float64)
area = np.log(np.asarray(cells.values("nucleus_area_um2") if hasattr(cells, "values") and callable(cells.values)
                         else cells.values["nucleus_area_um2"], np.float64))
test = np.asarray(cells.sample_ids) == held
g = cells.genes.index("NUCSIZE")
ctrl = cells.genes.index("GENE0007")
share = C / C.sum(1, keepdims=True)
excluded = (share >= 0.05).any(0) & ~np.isin(np.arange(C.shape[1]), [])  # scanpy's rule, training cells
excluded_train = (share[~test] >= 0.05).any(0)


def profile(c, mode, library=None):
    if mode == "total":
        lib = c.sum(1, keepdims=True) if library is None else library[:, None]
    elif mode == "exclude_highly_expressed":  # scanpy normalize_total(exclude_highly_expressed=True)
        lib = c[:, ~excluded_train].sum(1, keepdims=True)
    elif mode == "leave_gene_out":
        lib = c.sum(1, keepdims=True) - c  # each gene's size factor from the other genes (an edit leaves it as is)
    return np.log1p(c / np.maximum(lib, 1) * 1e4)


print("excluded genes (>=5% of a training cell's counts):", [cells.genes[i] for i in np.where(excluded_train)[0]][:20],
      int(excluded_train.sum()))
for mode in ("total", "exclude_highly_expressed", "leave_gene_out"):
    tr = profile(C[~test], mode)
    mu, sd = tr.mean(0), np.maximum(tr.std(0), 0.1)
    model = Ridge(alpha=1.0).fit((tr - mu) / sd, area[~test])
    base_c = C[test]
    keep = base_c[:, g] > 0
    base_c = base_c[keep]
    lib = base_c.sum(1)
    base = model.predict((profile(base_c, mode, lib) - mu) / sd)
    out = []
    for gene, fold in ((g, 0.5), (g, 2), (g, 4), (ctrl, 4)):
        e = base_c.copy()
        e[:, gene] *= fold
        out.append(float(np.exp((model.predict((profile(e, mode, lib) - mu) / sd) - base).mean())))
    print(f"{mode:26s} x0.5 {out[0]:.3f}  x2 {out[1]:.3f}  x4 {out[2]:.3f}  control x4 {out[3]:.3f}  "
          f"(truth 0.707 / 1.414 / 2.0 / 1.0)")
