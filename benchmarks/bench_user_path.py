#!/usr/bin/env python
"""The user's path over several pretraining seeds, scored on a section no training step saw.

`spatia synth` -> `spatia convert synthetic` -> `spatia pretrain` (one run per ``--seeds``) -> `spatia embed`
of the held-out (last) section -> probes of what `spatia embed` wrote, against PCA-30 of log-normalised
expression and the same PCA averaged over each cell's 30 nearest cells (the smoothing baseline), on spatially
disjoint halves of the section (split at the median x):

- ``type_macroF1``: logistic-regression probe of the cell type (trained on one half, scored on the other);
- ``domain_ARI_kmeans``: k-means (k = number of domains) on the embedding; ``spatia_domain_ARI``: the domains
  `spatia embed` wrote (Leiden on ``X_spatia_niche``, refined to the domain centres);
- ``gene_recovery``: mean Pearson over genes (detected in >= 10 % of cells) of a ridge probe to log expression;
- task-8 targets: ridge Pearson for the neighbour-induced programme (``NBR_log``: mean log expression of
  NBR1-3) and each ``neighbor_frac_*`` column of the synthetic truth.

Every figure is reported per seed and as mean +- sd over the seeds, with the pretraining time per step and the
first/last value of each objective (the contrastive loss against chance, ln of the distinct cells per batch,
is read from the run summary). Steps already done in ``--work`` are reused, so a run can be extended with
more seeds.

    python benchmarks/bench_user_path.py --work /tmp/up_bands --geometry bands --domains 4 --genes 160 \\
        --cells 1200 --sections 3 --tissue-seed 5 --seeds 0 1 2 --steps 120 --json bands.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SPATIA = [sys.executable, "-m", "spatia_hf.cli"]


def run(cmd: list[str], log: Path, env: dict) -> float:
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - start


def probe(h5ad: Path, type_key: str, domain_key: str) -> dict[str, float]:
    """The probes of the module docstring on one `spatia embed` output."""
    import anndata as ad
    import scipy.sparse as sp
    from scipy.stats import pearsonr
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.metrics import adjusted_rand_score, f1_score
    from sklearn.neighbors import NearestNeighbors
    from sklearn.preprocessing import StandardScaler

    a = ad.read_h5ad(h5ad)
    x = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X, dtype=np.float64)
    logx = np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4)
    xy = np.asarray(a.obsm["spatial"], dtype=np.float64)
    train = xy[:, 0] < np.median(xy[:, 0])
    test = ~train
    pca = PCA(30, random_state=0).fit(logx[train]).transform(logx)
    nn = NearestNeighbors(n_neighbors=30).fit(xy).kneighbors(xy, return_distance=False)
    reps = {"PCA30": pca, "PCA30_smoothed30nn": pca[nn].mean(1)}
    reps.update({k: np.asarray(a.obsm[k], dtype=np.float64)
                 for k in ("X_spatia", "X_spatia_niche", "X_spatia_niche_token") if k in a.obsm})
    values = {c: a.obs[c].to_numpy(float) for c in a.obs.columns if c.startswith("neighbor_frac_")}
    nbr = [list(a.var_names).index(g) for g in ("NBR1", "NBR2", "NBR3") if g in a.var_names]
    if nbr:
        values["NBR_log"] = logx[:, nbr].mean(1)
    genes = np.flatnonzero((x > 0).mean(0) >= 0.1)
    types = a.obs[type_key].astype("category").cat.codes.to_numpy()
    domains = a.obs[domain_key].astype("category").cat.codes.to_numpy()
    out: dict[str, float] = {}
    for name, emb in reps.items():
        emb = StandardScaler().fit_transform(emb)
        clf = LogisticRegression(max_iter=3000).fit(emb[train], types[train])
        out[f"{name}.type_macroF1"] = f1_score(types[test], clf.predict(emb[test]), average="macro")
        km = KMeans(len(set(domains)), n_init=10, random_state=0).fit_predict(emb)
        out[f"{name}.domain_ARI_kmeans"] = adjusted_rand_score(domains, km)
        for col, target in values.items():
            pred = Ridge(1.0).fit(emb[train], target[train]).predict(emb[test])
            out[f"{name}.{col}_pearson"] = pearsonr(pred, target[test])[0]
        if name != "PCA30_smoothed30nn":
            pred = Ridge(1.0).fit(emb[train], logx[train][:, genes]).predict(emb[test])
            out[f"{name}.gene_recovery"] = float(np.nanmean(
                [pearsonr(pred[:, j], logx[test][:, g])[0] for j, g in enumerate(genes)]))
    if "spatia_domain" in a.obs:
        out["obs.spatia_domain_ARI"] = adjusted_rand_score(a.obs[domain_key].astype(str),
                                                           a.obs["spatia_domain"].astype(str))
    return {k: float(v) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="folder for the tissue, dataset, runs and embeddings (reused)")
    p.add_argument("--geometry", default="bands", choices=("bands", "blobs"))
    p.add_argument("--sections", type=int, default=3)
    p.add_argument("--cells", type=int, default=1200)
    p.add_argument("--genes", type=int, default=160)
    p.add_argument("--domains", type=int, default=4)
    p.add_argument("--cell-types", type=int, default=6)
    p.add_argument("--tissue-seed", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="pretraining seeds")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--preset", default="small")
    p.add_argument("--threads", type=int, default=1, help="OMP threads of each step (1: run two benches at once)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    tissue, dataset = work / "tissue", work / "dataset"
    if not (tissue / "synthetic.json").exists():
        run(SPATIA + ["synth", "--out", str(tissue), "--sections", str(args.sections), "--cells", str(args.cells),
                      "--genes", str(args.genes), "--domains", str(args.domains), "--cell-types", str(args.cell_types),
                      "--domain-geometry", args.geometry, "--seed", str(args.tissue_seed), "--overwrite",
                      "--no-progress"], work / "synth.log", env)
    if not (dataset / "sections.json").exists():
        run(SPATIA + ["convert", "synthetic", str(tissue), "--out", str(dataset), "--no-progress"],
            work / "convert.log", env)
    held_out = sorted(tissue.glob("*.h5ad"))[-1]
    image = held_out.with_suffix("").with_suffix(".ome.tif")
    per_seed = {}
    for seed in args.seeds:
        run_dir, emb = work / f"pretrain_s{seed}", work / f"embed_s{seed}.h5ad"
        if not (run_dir / "spatia_training.json").exists():
            run(SPATIA + ["pretrain", "--data", str(dataset), "--out", str(run_dir), "--preset", args.preset,
                          "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--seed", str(seed),
                          "--no-eval", "--no-progress"], work / f"pretrain_s{seed}.log", env)
        summary = json.loads((run_dir / "spatia_training.json").read_text())
        if held_out.stem in summary.get("train_sections", []):
            raise SystemExit(f"{held_out.stem} was a training section of {run_dir}; the probe needs a held-out one")
        if not emb.exists():
            run(SPATIA + ["embed", "--model", str(run_dir), "--adata", str(held_out), "--image", str(image),
                          "--out", str(emb), "--n-domains", str(args.domains), "--seed", str(seed), "--no-progress"],
                work / f"embed_s{seed}.log", env)
        scores = probe(emb, "cell_type", "domain")
        scores["pretrain.seconds_per_step"] = summary["train_seconds"] / max(summary["global_step"], 1)
        for name, (first, last) in summary.get("objectives_first_last", {}).items():
            scores[f"pretrain.{name}.first"], scores[f"pretrain.{name}.last"] = first, last
        per_seed[seed] = scores
        print(f"seed {seed}: " + json.dumps({k: round(v, 3) for k, v in scores.items()
                                              if k.startswith(("X_spatia", "obs."))}), flush=True)
    keys = sorted(set().union(*per_seed.values()))
    summary = {k: {"mean": float(np.mean([s[k] for s in per_seed.values() if k in s])),
                   "sd": float(np.std([s[k] for s in per_seed.values() if k in s], ddof=1)) if len(per_seed) > 1 else 0.0}
               for k in keys}
    result = {"command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]), "held_out_section": held_out.stem,
              "seeds": args.seeds, "per_seed": per_seed, "mean_sd": summary}
    for k in keys:
        if k.startswith(("X_spatia", "obs.", "PCA30")):
            print(f"{k:55s} {summary[k]['mean']:.3f} +- {summary[k]['sd']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
