"""Regression dilution of an in-silico gene edit, and its correction from the counts alone.

A generator trained on (counts, image) pairs learns E[image | counts]; counts measure expression with
counting noise, so multiplying a gene's counts by f moves the conditional mean by less than f moves
the truth (regression dilution). For each tissue: the ridge 'conditional-mean generator' (real log
nucleus area on the standardised log1p profile, training sections), its x0.5/x2/x4 response on
held-out cells, and the same after the correction: the count fold f ** (1 / reliability), with the
reliability of the gene estimated from the training counts only (Poisson counting noise 1/(c+0.5)
against the gene's log1p variance left after regressing it on the other genes). No ground truth is
used for the correction. Session 8, issue 18.

    python docs/dev_notes/session-8/disattenuated_ceiling.py edited     # library recomputed after the edit
    python docs/dev_notes/session-8/disattenuated_ceiling.py unedited   # library kept (the pipeline's default)
"""
import sys

import numpy as np
from sklearn.linear_model import LinearRegression, Ridge

from spatia_hf.data.synthetic import make_synthetic_sections


def norm(c, library=None):
    lib = c.sum(1, keepdims=True) if library is None else library[:, None]
    return np.log1p(c / np.maximum(lib, 1) * 1e4)


def reliability(train_counts, g):
    y = norm(train_counts)
    others = np.delete(y, g, axis=1)
    resid = y[:, g] - LinearRegression().fit(others, y[:, g]).predict(others)
    c = train_counts[:, g]
    # delta method: var(log1p(c * s)) ~ 1/c for Poisson counts away from 0 (1/(c + 0.5) keeps zeros finite)
    noise = np.mean(1.0 / (c + 0.5))
    return float(np.clip(1.0 - noise / resid.var(), 0.25, 1.0))


def run(label, seed, library="edited", **kw):
    secs = make_synthetic_sections(4, kw.pop("n_cells", 1200), seed=seed, render=False, **kw)
    C = np.concatenate([s.counts_csr().toarray() for s in secs]).astype(np.float64)
    area = np.log(np.concatenate([s.obs["nucleus_area_um2"].to_numpy() for s in secs]).astype(np.float64))
    test = np.concatenate([[i == len(secs) - 1] * s.n_cells for i, s in enumerate(secs)])
    genes = secs[0].genes
    g = genes.index("NUCSIZE")
    exponent = secs[0].uns["synthetic_ground_truth"]["morphology_genes"]["NUCSIZE"]["exponent"]
    tr = norm(C[~test])
    mu, sd = tr.mean(0), np.maximum(tr.std(0), 0.1)
    model = Ridge(alpha=1.0).fit((tr - mu) / sd, area[~test])
    lam = reliability(C[~test], g)
    held = C[test][C[test][:, g] > 0]
    lib = held.sum(1) if library == "unedited" else None
    base = model.predict((norm(held, lib) - mu) / sd)
    row = []
    for f in (0.5, 2.0, 4.0):
        for fold in (f, f ** (1 / lam)):
            e = held.copy()
            e[:, g] *= fold
            r = np.exp((model.predict((norm(e, lib) - mu) / sd) - base).mean())
            row.append(np.log(r) / (exponent * np.log(f)))
    print(f"{label:44s} seed {seed}  reliability {lam:.2f}  fraction of true log-fold  "
          + "  ".join(f"x{f:g} {a:.2f} -> {b:.2f}" for f, a, b in zip((0.5, 2, 4), row[::2], row[1::2])))
    return row


if __name__ == "__main__":
    settings = [
        ("demo-like (rate 20, sd 0.5, blobs)", {}),
        ("bands, 4 domains", dict(domain_geometry="bands", n_domains=4)),
        ("shallow counts (rate 8)", dict(morph_reference_rate=8.0)),
        ("deep counts (rate 60)", dict(morph_reference_rate=60.0)),
        ("narrow spread (sd 0.3)", dict(morph_log_sd=0.3)),
        ("overdispersed gene (NB shape 10)", dict(morph_dispersion=10.0)),
        ("178 genes, 8 types, 800 cells/section", dict(n_genes=178, n_cell_types=8, n_cells=800)),
    ]
    library = sys.argv[1] if len(sys.argv) > 1 else "edited"
    print(f"edited cells normalised by their {library} library")
    rows = {}
    for label, kw in settings:
        rows[label] = [run(label, seed, library, **dict(kw)) for seed in (0, 1, 2)]
    print()
    for label, r in rows.items():
        r = np.array(r)
        print(f"{label:44s} " + "  ".join(
            f"x{f:g} {r[:, 2 * i].mean():.2f}+-{r[:, 2 * i].std():.2f} -> {r[:, 2 * i + 1].mean():.2f}+-{r[:, 2 * i + 1].std():.2f}"
            for i, f in enumerate((0.5, 2, 4))))
