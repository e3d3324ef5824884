"""spatia_domain before (as `spatia embed` wrote it in session 7: raw composition) and after (tl.domains
now: Hellinger for a composition) on bench_user_path's saved outputs, 3 pretraining seeds per tissue.

    python docs/dev_notes/session-8/hellinger_domains.py /tmp/s7/up_bands /tmp/s7/up_blobs /tmp/s7/up_demo /tmp/s7/up_bands4k
"""
import json
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
from sklearn.metrics import adjusted_rand_score as ari

from spatia_hf import tl

warnings.filterwarnings("ignore")
out = {}
for work in map(Path, sys.argv[1:]):
    for h5 in sorted(work.glob("embed_s*.h5ad")):
        a = ad.read_h5ad(h5)
        truth = a.obs["domain"].astype(str).to_numpy()
        before = ari(truth, a.obs["spatia_domain"].astype(str))
        params = a.uns["spatia"]["params"]
        info = tl.domains(a, n_domains=int(params["n_domains_requested"]), seed=int(params["seed"]))
        after = ari(truth, a.obs["spatia_domain"].astype(str))
        out.setdefault(work.name, []).append({"file": str(h5), "before": before, "after": after, **info})
        print(work.name, h5.name, f"before {before:.3f} after {after:.3f}", info["metric"], flush=True)
summary = {t: {k: [float(np.mean([r[k] for r in rows])), float(np.std([r[k] for r in rows], ddof=1))]
               for k in ("before", "after")} for t, rows in out.items()}
for t, s in summary.items():
    print(f"{t:12s} before {s['before'][0]:.3f} +- {s['before'][1]:.3f}   after {s['after'][0]:.3f} +- {s['after'][1]:.3f}")
Path("docs/dev_notes/session-8/hellinger_domains.json").write_text(json.dumps({"summary": summary, "runs": out}, indent=1))
