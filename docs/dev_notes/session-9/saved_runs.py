"""What the session-9 measurement scripts share (issue 16): the saved `spatia embed` runs of
`benchmarks/bench_user_path.py` (WORK/embed_sN.h5ad + WORK/pretrain_sN/model.safetensors), each cell's soft
assignment to the checkpoint's cell states recomputed from its saved embedding, neighbourhood means, the two
clusterers every representation gets (`tl.domains` as `spatia embed` runs it, and k-means), and the summary table.
"""
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import anndata as ad
import numpy as np
from safetensors.numpy import load_file
from scipy.spatial import cKDTree
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score as ari
from sklearn.preprocessing import StandardScaler

from spatia_hf import tl

warnings.filterwarnings("ignore")


@dataclass
class SavedRun:
    tissue: str
    seed: int
    adata: ad.AnnData
    x: np.ndarray  # obsm["X_spatia"]
    xy: np.ndarray  # obsm["spatial"]
    sections: np.ndarray
    truth: np.ndarray  # true domains
    n_domains: int  # what `spatia embed` was asked for
    cluster_seed: int  # the seed `spatia embed` clustered with
    probabilities: np.ndarray  # soft assignment to the checkpoint's cell states at `temperature`


def saved_runs(work_dirs: Sequence[str], temperature: float = 0.3) -> Iterator[SavedRun]:
    for work in map(Path, work_dirs):
        for h5 in sorted(work.glob("embed_s*.h5ad")):
            seed = int(h5.stem.split("_s")[-1])
            a = ad.read_h5ad(h5)
            w = load_file(str(work / f"pretrain_s{seed}" / "model.safetensors"))
            centres = w[[k for k in w if k.endswith("cell_states.centres")][0]].astype(np.float64)
            scale = float(w[[k for k in w if k.endswith("cell_states.scale")][0]][0])
            x = np.asarray(a.obsm["X_spatia"], np.float64)
            logits = -((x[:, None, :] - centres[None]) ** 2).sum(-1) / (temperature * scale)
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            sections = a.obs["sample_id"].astype(str).to_numpy() if "sample_id" in a.obs else np.zeros(len(a), str)
            params = a.uns["spatia"]["params"]
            yield SavedRun(work.name, seed, a, x, np.asarray(a.obsm["spatial"], np.float64), sections,
                           a.obs["domain"].astype(str).to_numpy(), int(params["n_domains_requested"]),
                           int(params["seed"]), p)


def per_section(xy: np.ndarray, sections: np.ndarray, fn: Callable) -> np.ndarray:
    """``fn(positions of one section, its rows) -> values`` assembled over the sections."""
    out = None
    for s in np.unique(sections):
        m = np.where(sections == s)[0]
        v = fn(xy[m], m)
        out = np.zeros((len(xy),) + v.shape[1:], v.dtype) if out is None else out
        out[m] = v
    return out


def knn_mean(values: np.ndarray, xy: np.ndarray, sections: np.ndarray, k: int) -> np.ndarray:
    return per_section(xy, sections, lambda p, m: values[m][cKDTree(p).query(p, k=min(k, len(m)))[1]].mean(1))


def radius_mean(values: np.ndarray, xy: np.ndarray, sections: np.ndarray, r: float) -> np.ndarray:
    def fn(p, m):
        return np.stack([values[m][nb].mean(0) for nb in cKDTree(p).query_ball_point(p, r)])
    return per_section(xy, sections, fn)


def domain_scores(rep: np.ndarray, run: SavedRun) -> dict[str, float]:
    """ARI of ``rep``'s domains by `tl.domains` with the arguments `spatia embed` used (refined Leiden,
    Hellinger for a composition) and by k-means on the standardised ``rep`` (the judges' probe)."""
    b = ad.AnnData(np.zeros((len(rep), 1), np.float32), obsm={"rep": np.asarray(rep, np.float32)})
    tl.domains(b, use_rep="rep", n_domains=run.n_domains, seed=run.cluster_seed)
    km = KMeans(run.n_domains, n_init=10, random_state=0).fit_predict(StandardScaler().fit_transform(rep))
    return {"leiden_refined": ari(run.truth, b.obs["spatia_domain"].astype(str)), "kmeans": ari(run.truth, km)}


def print_summary(rows: list[dict], label: Callable[[dict], str], width: int = 20) -> None:
    """Mean +- sd (ddof 1) over pretraining seeds, one line per ``label(row)``, one column per tissue."""
    tissues = list(dict.fromkeys(r["tissue"] for r in rows))
    for clusterer in ("leiden_refined", "kmeans"):
        print(f"\n{clusterer}: mean +- sd (ddof 1) over pretraining seeds")
        print("".ljust(width) + "".join(t.rjust(18) for t in tissues))
        for name in dict.fromkeys(map(label, rows)):
            cells = []
            for t in tissues:
                v = [r[clusterer] for r in rows if r["tissue"] == t and label(r) == name]
                cells.append(f"{np.mean(v):.3f}+-{np.std(v, ddof=1) if len(v) > 1 else 0:.3f}")
            print(name.ljust(width) + "".join(c.rjust(18) for c in cells))
