"""The 12 evaluation tasks of SPATIA as functions over arrays, one function per task.

Every function takes the outputs of any number of methods at once (``features`` / ``predictions``
map a method name, e.g. "SPATIA", "PCA", "log1p", "image-CNN", to its array), scores them all on the
same cells with the same seeds (sklearn metrics, and the package's ``evaluate`` modules where they add
something), and returns a :class:`TaskResult` with the mean over seeds, a 95% interval and the
per-seed values of every score (:mod:`~spatia_hf.evaluation.intervals`). Method names starting with
"SPATIA" are SPATIA variants, any other name is a baseline unless ``kinds`` marks it a "reference"
(an oracle or a null that bounds the scale, such as held-out real images in task 11); the report
compares SPATIA with the best baseline and names a winner only when their intervals separate.

Protocols fixed here so that every method gets the same treatment:
- annotation probes: standardise, then multinomial logistic regression fitted on the training cells;
- clustering: PCA to 50 dimensions when wider, then scanpy's Leiden (igraph flavour) on a 15-NN
  graph with the resolution bisected to give the true number of groups, once per seed (k-means with
  that number of clusters when igraph is missing);
- section classification: the same probe fitted on the training sections (one global scale instead
  of per-feature standardisation: few sections, many features), scored on the held-out sections;
  "not estimable" when they hold fewer than 2 sections of each of 2 classes;
- correlations are per gene across the scored cells (see the ``per_gene_correlation`` metric).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .intervals import LEVEL, SeededScores, draws_per_seed, resamples
from ..utils.stats import per_column_pearson, per_column_spearman
from .metrics import compute_metric, compute_metric_arrays
from .splits import Split

KINDS = ("spatia", "baseline", "reference")
KID_SUBSETS_PER_DRAW = 10
GENERATION_DRAWS = 50  # bootstrap draws of task 11: each recomputes FID (a matrix square root); 200 took ~1 min
LOWER_IS_BETTER = frozenset({"fid", "kid"})


@dataclass(frozen=True)
class TaskSpec:
    """Identity of a task: number, key, title, the metrics it reports and the headline one."""

    number: int
    key: str
    title: str
    metrics: tuple[str, ...]
    primary: str


TASKS: dict[int, TaskSpec] = {s.number: s for s in (
    TaskSpec(1, "cell_annotation", "Cell-type annotation (linear probe on the embedding)", ("macro_f1", "accuracy"),
             "macro_f1"),
    TaskSpec(2, "image_annotation", "Cell-type annotation from the image alone", ("macro_f1", "accuracy"), "macro_f1"),
    TaskSpec(3, "finetuned_annotation", "Cell-type annotation, fine-tuned head", ("macro_f1", "accuracy"), "macro_f1"),
    TaskSpec(4, "cell_clustering", "Cell clustering", ("ari", "nmi"), "ari"),
    TaskSpec(5, "domain_clustering", "Spatial-domain clustering", ("ari", "nmi"), "ari"),
    TaskSpec(6, "section_classification", "Section-level tissue/condition classification", ("accuracy",), "accuracy"),
    TaskSpec(7, "gene_imputation", "Imputation of masked panel genes", ("pearson", "spearman"), "pearson"),
    TaskSpec(8, "niche_imputation", "Niche-aware imputation of neighbour-driven genes", ("pearson",), "pearson"),
    TaskSpec(9, "image_to_expression", "Image -> expression prediction", ("pearson",), "pearson"),
    TaskSpec(10, "retrieval", "Expression <-> image retrieval", ("recall@10", "expr_to_image_recall@10",
                                                                 "image_to_expr_recall@10", "recall@1"), "recall@10"),
    TaskSpec(11, "generation", "Expression-conditioned cell image generation", ("fid", "kid", "type_accuracy"), "fid"),
    TaskSpec(12, "perturbation", "Perturbation response of generated morphology",
             ("direction_agreement", "size_ratio", "slope", "pair_direction_agreement"), "direction_agreement"),
)}
TASK_KEYS = {s.key: s.number for s in TASKS.values()}


def method_kind(name: str) -> str:
    """"spatia" for SPATIA variants (the word "SPATIA" first: "SPATIA", "SPATIA (image-only)",
    "SPATIA-niche"), else "baseline" ("spatial kNN" is a baseline)."""
    return "spatia" if re.match(r"SPATIA(?![A-Za-z0-9])", name) else "baseline"


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


@dataclass
class TaskResult:
    """Scores of every method on one task.

    Attributes:
        task, key, title, metrics, primary_metric: from :data:`TASKS`.
        scores: method -> metric -> value (floats; NaN where undefined).
        method_kinds: method -> "spatia" | "baseline" | "reference".
        split: how cells were chosen (``Split.to_json()`` or a description).
        details: JSON-able extras (per-gene correlations, per-section scores, algorithm used).
        notes: sentences for the report (caveats, protocol choices).
        artifacts: arrays for pictures (predictions, cluster labels); never written to JSON.
    """

    task: int
    key: str
    title: str
    metrics: list[str]
    primary_metric: str
    scores: dict[str, dict[str, float]]
    method_kinds: dict[str, str]
    split: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    artifacts: dict = field(default_factory=dict, repr=False, compare=False)
    intervals: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    per_seed: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    not_estimable: str | None = None

    def interval(self, method: str | None, metric: str | None = None) -> list[float] | None:
        """``[lo, hi]`` of ``method``'s ``metric`` (default: the primary), or None when not recorded."""
        if method is None:
            return None
        return self.intervals.get(method, {}).get(metric or self.primary_metric)

    def best(self, kind: str = "baseline", metric: str | None = None) -> tuple[str | None, float]:
        """The method of ``kind`` with the best ``metric`` (default: the primary) and its value."""
        metric = metric or self.primary_metric
        sign = 1.0 if higher_is_better(metric) else -1.0
        candidates = [(m, s[metric]) for m, s in self.scores.items()
                      if self.method_kinds.get(m) == kind and metric in s and not math.isnan(s[metric])]
        if not candidates:
            return None, float("nan")
        return max(candidates, key=lambda mv: sign * mv[1])

    def to_dict(self) -> dict:
        """JSON-able dict (no artifacts); NaN becomes None so the file is strict JSON."""
        def clean(v):
            if isinstance(v, dict):
                return {str(k): clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            if isinstance(v, (np.floating, float)):
                return None if math.isnan(float(v)) else float(v)
            if isinstance(v, np.integer):
                return int(v)
            if isinstance(v, np.ndarray):
                return clean(v.tolist())
            return v

        return clean({"task": self.task, "key": self.key, "title": self.title, "metrics": self.metrics,
                      "primary_metric": self.primary_metric, "scores": self.scores,
                      "method_kinds": self.method_kinds, "split": self.split, "details": self.details,
                      "notes": self.notes, "intervals": self.intervals, "per_seed": self.per_seed,
                      "not_estimable": self.not_estimable})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TaskResult":
        scores = {m: {k: float("nan") if v is None else float(v) for k, v in s.items()} for m, s in d["scores"].items()}
        nan = float("nan")
        intervals = {m: {k: [nan if x is None else float(x) for x in v] for k, v in s.items()}
                     for m, s in d.get("intervals", {}).items()}
        return cls(int(d["task"]), d["key"], d["title"], list(d["metrics"]), d["primary_metric"], scores,
                   dict(d["method_kinds"]), dict(d.get("split", {})), dict(d.get("details", {})),
                   list(d.get("notes", [])), intervals=intervals, per_seed=dict(d.get("per_seed", {})),
                   not_estimable=d.get("not_estimable"))


# ----------------------------------------------------------------------------- shared helpers
def _result(number: int, scores: dict | SeededScores, kinds: Mapping[str, str] | None, split: dict,
            **kw) -> TaskResult:
    spec = TASKS[number]
    kinds = dict(kinds or {})
    bad = {m: k for m, k in kinds.items() if k not in KINDS}
    if bad:
        raise ValueError(f"kinds={bad}: each kind must be one of {KINDS}")
    if isinstance(scores, SeededScores):
        kw.setdefault("intervals", scores.intervals())
        kw.setdefault("per_seed", scores.per_seed())
        scores = scores.means()
    method_kinds = {m: kinds.get(m, method_kind(m)) for m in scores}
    return TaskResult(number, spec.key, spec.title, list(spec.metrics), spec.primary, scores, method_kinds, split,
                      **kw)


def not_estimable(number: int, reason: str, split: dict | None = None) -> TaskResult:
    """A task the data cannot decide: no scores, and the reason in the report instead of a number."""
    return _result(number, {}, None, dict(split or {}), not_estimable=reason)


def _seeds(seed: int | Sequence[int]) -> list[int]:
    seeds = [int(seed)] if np.ndim(seed) == 0 else [int(s) for s in seed]
    if not seeds:
        raise ValueError("seed=[]: pass at least one seed")
    return seeds


def _training_runs(name: str, x: Any, n_seeds: int) -> list:
    """A method's features as a list of training runs: one array, or a list/tuple of arrays (one per
    training run of a method whose training is not reproducible, e.g. a peer trained from scratch),
    at most one run per seed."""
    runs = list(x) if isinstance(x, (list, tuple)) else [x]
    if not runs or len(runs) > n_seeds:
        raise ValueError(f"features[{name!r}]: {len(runs)} training runs for {n_seeds} seeds. Fix: pass one array, "
                         f"or between 1 and {n_seeds} runs (seed j clusters run j mod runs)")
    return runs


def _check_methods(arrays: Mapping[str, Any], what: str, n_rows: int | None = None, ndim: int = 2) -> None:
    if not arrays:
        raise ValueError(f"{what} is empty: pass at least one method, e.g. {{'PCA': matrix}}")
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.ndim != ndim:
            raise ValueError(f"{what}[{name!r}] has shape {a.shape}: expected {ndim} dimensions")
        if n_rows is not None and a.shape[0] != n_rows:
            raise ValueError(f"{what}[{name!r}] has {a.shape[0]} rows: expected {n_rows} (one per scored item, in "
                             "the same order)")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ValueError(f"{what}[{name!r}] contains NaN or inf. Fix: check that method's outputs")


def _codes(*label_arrays: Sequence) -> tuple[np.ndarray, list[np.ndarray]]:
    """Integer codes over the union of classes of several label arrays."""
    arrays = [np.asarray(a).astype(str) for a in label_arrays]
    classes = np.unique(np.concatenate(arrays))
    return classes, [np.searchsorted(classes, a) for a in arrays]


def linear_probe(train_x: np.ndarray, train_y: Sequence, test_x: np.ndarray, seed: int = 0,
                 scaling: str = "feature") -> np.ndarray:
    """Multinomial logistic regression (C=1, lbfgs: deterministic, so no seed changes it) fitted on the
    training rows; predicted labels of the test rows. With a single training class it predicts that class.

    ``scaling``: "feature" standardises each column (cells: many rows per column); "global" centres
    the columns and divides by one overall standard deviation, keeping the relative spread of the
    columns (sections: with fewer rows than columns, per-column standardisation lets noise columns
    drown the informative ones, measured 0.5 vs 1.0 leave-one-out accuracy on 8 synthetic sections).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if scaling not in ("feature", "global"):
        raise ValueError(f"scaling={scaling!r}: expected 'feature' or 'global'")
    train_y = np.asarray(train_y).astype(str)
    if np.unique(train_y).size < 2:
        return np.full(len(test_x), train_y[0])
    train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
    if scaling == "global":
        mean = train_x.mean(axis=0)
        scale = float((train_x - mean).std()) or 1.0
        model = LogisticRegression(C=1.0, max_iter=2000, random_state=seed)
        return model.fit((train_x - mean) / scale, train_y).predict((test_x - mean) / scale)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, random_state=seed))
    return model.fit(train_x, train_y).predict(test_x)


def classification_scores(pred: Sequence, truth: Sequence) -> dict[str, float]:
    """Macro-F1 (a class never predicted scores 0) and accuracy, by sklearn."""
    from sklearn.metrics import accuracy_score, f1_score

    _, (p, t) = _codes(pred, truth)
    return {"macro_f1": float(f1_score(t, p, average="macro", zero_division=0.0)),
            "accuracy": float(accuracy_score(t, p))}


def clustering_scores(labels: Sequence, truth: Sequence) -> dict[str, float]:
    """ARI and NMI of cluster labels against the true groups, by sklearn."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return {"ari": float(adjusted_rand_score(truth, labels)), "nmi": float(normalized_mutual_info_score(truth, labels))}


def _batched_confusion(a: np.ndarray, b: np.ndarray, rows: np.ndarray, square: bool = False) -> np.ndarray:
    """Contingency tables ``(n_draws, n_a, n_b)`` of integer labels ``a`` vs ``b`` on each row set of
    ``rows`` ``(n_draws, n_items)``, in one bincount (``square``: both sides share the classes)."""
    ka, kb = int(a.max()) + 1, int(b.max()) + 1
    if square:
        ka = kb = max(ka, kb)
    draw = np.arange(rows.shape[0])[:, None] * (ka * kb)
    flat = np.bincount((draw + a[rows] * kb + b[rows]).ravel(), minlength=rows.shape[0] * ka * kb)
    return flat.reshape(rows.shape[0], ka, kb).astype(np.float64)


def classification_scores_batched(pred: Sequence, truth: Sequence, rows: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`classification_scores` on each row set of ``rows`` ``(n_draws, n_items)`` at once
    (sklearn's macro-F1 over the classes present in either array, absent-class F1 0; equality with
    sklearn is tested)."""
    _, (p, t) = _codes(pred, truth)
    cm = _batched_confusion(t, p, rows, square=True)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support = cm.sum(axis=2) + cm.sum(axis=1)  # true + predicted counts per class
    present = support > 0
    f1 = np.divide(2 * tp, support, out=np.zeros_like(tp), where=present)
    return {"macro_f1": (f1 * present).sum(axis=1) / present.sum(axis=1), "accuracy": tp.sum(axis=1) / rows.shape[1]}


def clustering_scores_batched(labels: Sequence, truth: Sequence, rows: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`clustering_scores` (ARI, arithmetic-mean NMI) on each row set of ``rows`` at once, from
    the contingency tables (the formulas sklearn uses; equality with sklearn is tested)."""
    _, (lab,) = _codes(labels)
    _, (t,) = _codes(truth)
    cm = _batched_confusion(t, lab, rows)
    n = float(rows.shape[1])
    comb = lambda x: x * (x - 1) / 2.0  # noqa: E731
    a, b = cm.sum(axis=2), cm.sum(axis=1)
    index, sa, sb = comb(cm).sum(axis=(1, 2)), comb(a).sum(axis=1), comb(b).sum(axis=1)
    expected = sa * sb / comb(n)
    top = 0.5 * (sa + sb)
    same = np.isclose(top, expected)
    ari = np.where(same, 1.0, (index - expected) / np.where(same, 1.0, top - expected))
    with np.errstate(divide="ignore", invalid="ignore"):
        pij = cm / n
        outer = (a / n)[:, :, None] * (b / n)[:, None, :]
        mi = np.where(pij > 0, pij * np.log(pij / outer), 0.0).sum(axis=(1, 2))
        ent = lambda q: -np.where(q > 0, q * np.log(q), 0.0).sum(axis=1)  # noqa: E731
        ha, hb = ent(a / n), ent(b / n)
    single = ((a > 0).sum(axis=1) == 1) & ((b > 0).sum(axis=1) == 1)
    nmi = np.where(single, 1.0, np.maximum(mi, 0.0) / np.maximum(0.5 * (ha + hb), np.finfo(np.float64).eps))
    return {"ari": ari, "nmi": nmi}


def leiden_available() -> bool:
    """Leiden via scanpy needs ``igraph`` (a default dependency; absent only in a stripped install)."""
    try:
        import igraph  # noqa: F401
        import scanpy  # noqa: F401
    except ImportError:
        return False
    return True


def _leiden(x: np.ndarray, n_clusters: int, seeds: Sequence[int], n_neighbors: int) -> list[np.ndarray]:
    """scanpy's Leiden (igraph flavour) on one kNN graph of ``x``, once per seed, each with the
    resolution searched as ``tl.domains`` does (:func:`spatia_hf.utils.clustering.search_resolution`)."""
    import anndata
    import scanpy as sc

    from spatia_hf.utils.clustering import search_resolution

    adata = anndata.AnnData(obsm={"X_eval": np.asarray(x, np.float32)})
    sc.pp.neighbors(adata, n_neighbors=min(n_neighbors, len(x) - 1), use_rep="X_eval", random_state=0)

    def run(resolution: float, seed: int) -> np.ndarray:
        sc.tl.leiden(adata, resolution=resolution, flavor="igraph", n_iterations=2, directed=False,
                     random_state=seed, key_added="_eval_leiden")
        return adata.obs["_eval_leiden"].cat.codes.to_numpy()

    return [search_resolution(lambda res, seed=seed: run(res, seed), n_clusters)[1] for seed in seeds]


def cluster_seeds(x: np.ndarray, n_clusters: int, method: str = "auto", seeds: Sequence[int] = (0,),
                  n_neighbors: int = 15, refine: bool = False, hellinger: bool | None = False
                  ) -> tuple[list[np.ndarray], str]:
    """Cluster rows of ``x`` into about ``n_clusters`` groups once per seed; returns the labels per
    seed and the algorithm ("leiden", "leiden+centroids" or "kmeans", "+hellinger" when the square
    root of a composition was clustered). ``method``: "auto" (Leiden when available), "leiden"
    (scanpy, igraph flavour) or "kmeans" (sklearn, 10 restarts). ``refine``: Leiden's groups refined
    to their centres, as ``spatia_hf.tl.domains`` does; ``hellinger``: as ``tl.domains`` (None: the
    square root of ``x`` when its rows are proportions; :func:`spatia_hf.utils.clustering.domain_features`)."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    from spatia_hf.utils.clustering import domain_features

    if method not in ("auto", "leiden", "kmeans"):
        raise ValueError(f"method={method!r}: expected 'auto', 'leiden' or 'kmeans'")
    if n_clusters < 2 or n_clusters > len(x):
        raise ValueError(f"n_clusters={n_clusters} for {len(x)} cells: expected 2 <= n_clusters <= n_cells")
    x, sqrt_applied = domain_features(np.asarray(x, np.float64), hellinger)
    metric = "+hellinger" if sqrt_applied else ""
    if x.shape[1] > 50:
        x = PCA(n_components=min(50, len(x) - 1), random_state=0).fit_transform(x)
    use_leiden = method == "leiden" or (method == "auto" and leiden_available())
    if use_leiden:
        if not leiden_available():
            raise ImportError("method='leiden' needs scanpy and igraph. Fix: pip install igraph, or use "
                              "method='kmeans'")
        labels = _leiden(x, n_clusters, seeds, n_neighbors)
        if not refine:
            return labels, "leiden" + metric
        from spatia_hf.utils.clustering import refine_to_centroids

        return [refine_to_centroids(x, lab) for lab in labels], "leiden+centroids" + metric
    return [KMeans(n_clusters=n_clusters, n_init=10, random_state=s).fit_predict(x) for s in seeds], "kmeans" + metric


def cluster(x: np.ndarray, n_clusters: int, method: str = "auto", seed: int = 0, n_neighbors: int = 15
            ) -> tuple[np.ndarray, str]:
    """:func:`cluster_seeds` for one seed: labels and the algorithm used."""
    labels, algo = cluster_seeds(x, n_clusters, method, [seed], n_neighbors)
    return labels[0], algo


def _clustering(number: int, features: Mapping[str, np.ndarray], truth: Sequence, eval_idx: np.ndarray | None,
                n_clusters: int | None, method: str, seed: int | Sequence[int], kinds,
                groups: Sequence | None = None, **clusterer) -> TaskResult:
    truth = np.asarray(truth).astype(str)
    seeds = _seeds(seed)
    runs = {name: _training_runs(name, x, len(seeds)) for name, x in features.items()}
    _check_methods({f"{name}" + (f" run {i}" if len(r) > 1 else ""): x for name, r in runs.items()
                    for i, x in enumerate(r)}, "features", len(truth))
    idx = np.arange(len(truth)) if eval_idx is None else np.asarray(eval_idx)
    _, (t,) = _codes(truth[idx])
    k = int(n_clusters or np.unique(t).size)
    acc, labels_by_method, per_group, used = SeededScores(), {}, {}, set()
    draws = {s: resamples(len(idx), s, draws_per_seed(len(seeds))) for s in seeds}
    for name, xs in runs.items():
        if len(xs) == 1:  # one graph, one Leiden per seed
            all_labels, algo = cluster_seeds(np.asarray(xs[0])[idx], k, method, seeds, **clusterer)
        else:  # seed j clusters training run j: the seeds' spread includes the method's training spread
            clustered = [cluster_seeds(np.asarray(xs[j % len(xs)])[idx], k, method, [s], **clusterer)
                         for j, s in enumerate(seeds)]
            all_labels, algo = [labels for (labels,), _ in clustered], clustered[0][1]
        used.add(algo)
        for s, labels in zip(seeds, all_labels):
            acc.add(name, s, lambda rows, lab=labels: clustering_scores_batched(lab, t, rows), draws[s], batched=True)
        labels_by_method[name] = all_labels[0]
        if groups is not None:
            g = np.asarray(groups).astype(str)[idx]
            per_group[name] = {sid: clustering_scores(all_labels[0][g == sid], t[g == sid])["ari"]
                               for sid in np.unique(g)}
    details = {"algorithm": sorted(used), "n_clusters": k, "seeds": seeds}
    if groups is not None:
        details["ari_per_section"] = per_group  # first seed
    notes = [f"{'/'.join(sorted(used))} with {k} clusters (the number of true groups) on {len(idx)} held-out cells, "
             f"seeds {seeds}; interval: {LEVEL:.0%} bootstrap over cells pooled over seeds"]
    if "kmeans" in used and method == "auto":
        notes.append("scanpy/igraph not installed: k-means used (pip install igraph for Leiden)")
    return _result(number, acc, kinds, {"kind": "cells", "n_test": int(len(idx))}, details=details, notes=notes,
                   artifacts={"labels": labels_by_method, "eval_idx": idx})


# ----------------------------------------------------------------------------- tasks 1-3: annotation
def _score_predictions(number: int, preds: Mapping[str, np.ndarray], truth: np.ndarray, split: Split, seed: int,
                       kinds, notes: list[str]) -> TaskResult:
    acc = SeededScores()
    draws = resamples(len(truth), seed)
    for name, p in preds.items():
        acc.add(name, seed, lambda rows, p=np.asarray(p).astype(str): classification_scores_batched(p, truth, rows),
                draws, batched=True)
    notes = notes + [f"interval: {LEVEL:.0%} bootstrap over the {len(truth)} held-out cells (the fitted maps are "
                     "deterministic given the training sections)"]
    return _result(number, acc, kinds, split.to_json(), notes=notes,
                   artifacts={"predictions": dict(preds), "truth": truth})


def _annotation(number: int, features: Mapping[str, np.ndarray], labels: Sequence, split: Split,
                seed: int | Sequence[int], kinds) -> TaskResult:
    labels = np.asarray(labels).astype(str)
    _check_methods(features, "features", len(labels))
    seed0 = _seeds(seed)[0]
    preds = {name: linear_probe(np.asarray(x)[split.train], labels[split.train], np.asarray(x)[split.test], seed0)
             for name, x in features.items()}
    unseen = sorted(set(labels[split.test]) - set(labels[split.train]))
    notes = [f"test types never seen in training: {unseen}"] if unseen else []
    return _score_predictions(number, preds, labels[split.test], split, seed0, kinds, notes)


def run_cell_annotation(features: Mapping[str, np.ndarray], labels: Sequence, split: Split,
                        seed: int | Sequence[int] = 0, kinds: Mapping[str, str] | None = None) -> TaskResult:
    """Task 1: a linear probe (fitted on ``split.train``) on each method's per-cell embedding
    ``(n_cells, d)`` predicts the cell type of ``split.test``; macro-F1 and accuracy."""
    return _annotation(1, features, labels, split, seed, kinds)


def run_image_annotation(features: Mapping[str, np.ndarray], labels: Sequence, split: Split,
                         seed: int | Sequence[int] = 0, kinds: Mapping[str, str] | None = None) -> TaskResult:
    """Task 2: as task 1, on image-only embeddings (SPATIA's image branch, an image CNN, pixels)."""
    return _annotation(2, features, labels, split, seed, kinds)


def run_finetuned_annotation(predictions: Mapping[str, Sequence], labels: Sequence, split: Split,
                             kinds: Mapping[str, str] | None = None, seed: int = 0) -> TaskResult:
    """Task 3: score cell-type predictions of fine-tuned heads for the cells ``split.test`` (in that
    order); the training happened elsewhere (the Trainer), on ``split.train`` only."""
    labels = np.asarray(labels).astype(str)
    _check_methods(predictions, "predictions", len(split.test), ndim=1)
    return _score_predictions(3, predictions, labels[split.test], split, seed, kinds, [])


# ----------------------------------------------------------------------------- tasks 4-5: clustering
def run_cell_clustering(features: Mapping[str, np.ndarray], labels: Sequence, eval_idx: np.ndarray | None = None,
                        n_clusters: int | None = None, method: str = "auto", seed: int | Sequence[int] = 0,
                        kinds: Mapping[str, str] | None = None) -> TaskResult:
    """Task 4: cluster each method's cell embeddings (rows ``eval_idx``, default all) and compare with
    the cell types: ARI and NMI (one clustering per seed)."""
    return _clustering(4, features, labels, eval_idx, n_clusters, method, seed, kinds)


def run_domain_clustering(features: Mapping[str, np.ndarray], domains: Sequence, sample_ids: Sequence,
                          eval_idx: np.ndarray | None = None, n_clusters: int | None = None, method: str = "auto",
                          seed: int | Sequence[int] = 0, kinds: Mapping[str, str] | None = None) -> TaskResult:
    """Task 5: cluster niche-aware cell embeddings into spatial domains (jointly over the scored
    sections); ARI and NMI against the true domains, plus ARI per section in ``details``. Every
    method gets the clustering of ``spatia_hf.tl.domains``: Leiden on a 50-neighbour graph, its
    domains refined to their centres, compositions (rows of proportions) compared by the Hellinger
    distance. A method given as a list of arrays (several training runs) has seed j cluster run
    j mod runs, so its interval covers its training spread."""
    return _clustering(5, features, domains, eval_idx, n_clusters, method, seed, kinds, groups=sample_ids,
                       n_neighbors=50, refine=True, hellinger=None)


# ----------------------------------------------------------------------------- task 6: sections
MIN_HELD_OUT_SECTIONS_PER_CLASS = 2


def section_means(cell_features: np.ndarray, cell_sample_ids: Sequence, sample_ids: Sequence) -> np.ndarray:
    """Mean of per-cell features per section, rows in the order of ``sample_ids``."""
    cs = np.asarray(cell_sample_ids).astype(str)
    rows = []
    for sid in np.asarray(sample_ids).astype(str):
        mask = cs == sid
        if not mask.any():
            raise ValueError(f"section {sid!r} has no cells in cell_sample_ids")
        rows.append(np.asarray(cell_features)[mask].mean(axis=0))
    return np.stack(rows)


def section_classification_blocker(labels: Sequence, sample_ids: Sequence, held_out: Sequence[str]) -> str | None:
    """Why a section label cannot be scored on ``held_out`` sections (None when it can): the probe
    needs training sections of at least 2 classes, and the score needs at least
    :data:`MIN_HELD_OUT_SECTIONS_PER_CLASS` held-out sections of each of at least 2 classes (with
    fewer, one section flips the accuracy by 1/n and no interval can be drawn)."""
    labels, sample_ids = np.asarray(labels).astype(str), np.asarray(sample_ids).astype(str)
    test = np.isin(sample_ids, list(held_out))
    held = dict(zip(*np.unique(labels[test], return_counts=True))) if test.any() else {}
    train_classes = sorted(set(labels[~test]))
    if len(train_classes) < 2:
        return (f"the {int((~test).sum())} training section(s) hold the class(es) {train_classes}: a probe needs at "
                "least 2 classes. Fix: build more sections or hold out others")
    if len(held) < 2 or min(held.values()) < MIN_HELD_OUT_SECTIONS_PER_CLASS:
        return (f"{int(test.sum())} held-out section(s) {sorted(sample_ids[test].tolist())} with classes "
                f"{ {str(k): int(v) for k, v in held.items()} }: a section-level accuracy needs at least "
                f"{MIN_HELD_OUT_SECTIONS_PER_CLASS} held-out sections of each of at least 2 classes that no training "
                f"stage saw; the other {int((~test).sum())} section(s) trained the model. Fix: build and hold out more "
                "sections (spatia synth --sections, --held-out)")
    return None


def run_section_classification(features: Mapping[str, np.ndarray], labels: Sequence, sample_ids: Sequence,
                               held_out: Sequence[str], seed: int = 0,
                               kinds: Mapping[str, str] | None = None) -> TaskResult:
    """Task 6: a probe fitted on the training sections' features ``(n_sections, d)`` (tissue
    embeddings, pseudo-bulk, mean cell embeddings) predicts the label of each ``held_out`` section;
    accuracy with a bootstrap over held-out sections. Not estimable (see
    :func:`section_classification_blocker`) when the held-out sections cannot decide it."""
    labels = np.asarray(labels).astype(str)
    sample_ids = np.asarray(sample_ids).astype(str)
    if len(labels) != len(sample_ids):
        raise ValueError(f"labels ({len(labels)}) and sample_ids ({len(sample_ids)}): expected one per section")
    if np.unique(labels).size < 2:
        raise ValueError(f"labels has a single class {np.unique(labels).tolist()}: section classification needs "
                         "at least 2 classes. Fix: choose another section label or add sections")
    _check_methods(features, "features", len(labels))
    split = {"kind": "section", "n_sections": int(len(labels)), "held_out_sections": sorted(map(str, held_out))}
    reason = section_classification_blocker(labels, sample_ids, held_out)
    if reason is not None:
        return not_estimable(6, reason, split)
    test = np.flatnonzero(np.isin(sample_ids, list(held_out)))
    train = np.setdiff1d(np.arange(len(labels)), test)
    acc, preds = SeededScores(), {}
    draws = resamples(len(test), seed)
    for name, x in features.items():
        x = np.asarray(x)
        preds[name] = linear_probe(x[train], labels[train], x[test], seed, scaling="global").astype(str)
        acc.add(name, seed, lambda rows, p=preds[name]: {
            "accuracy": classification_scores_batched(p, labels[test], rows)["accuracy"]}, draws, batched=True)
    notes = ["probe: logistic regression fitted on the training sections, features centred and divided by one "
             f"global scale; interval: {LEVEL:.0%} bootstrap over the {len(test)} held-out sections"]
    return _result(6, acc, kinds, split, notes=notes,
                   details={"predictions": {m: p.tolist() for m, p in preds.items()},
                            "labels": labels[test].tolist(), "sample_ids": sample_ids[test].tolist()})


# ----------------------------------------------------------------------------- tasks 7-9: expression
def _runs_by_seed(predictions, truth, seed) -> dict[int, tuple[Mapping[str, np.ndarray], np.ndarray]]:
    """``{seed: (predictions, truth)}`` from one split's arrays or from dicts keyed by seed."""
    if isinstance(truth, Mapping):
        if set(truth) != set(predictions):
            raise ValueError(f"truth has seeds {sorted(truth)}, predictions {sorted(predictions)}: expected the same")
        return {int(s): (predictions[s], truth[s]) for s in truth}
    return {_seeds(seed)[0]: (predictions, truth)}


def _correlation_task(number: int, predictions, truth, gene_names: Sequence[str], split: dict, kinds,
                      with_spearman: bool, seed: int | Sequence[int] = 0) -> TaskResult:
    runs = _runs_by_seed(predictions, truth, seed)
    acc = SeededScores()
    details = {"genes": list(gene_names), "pearson_per_gene": {}, "n_genes_undefined": {}, "seeds": sorted(runs)}
    artifacts = {}
    for s, (preds, tru) in runs.items():
        tru = np.asarray(tru, np.float64)
        if tru.ndim != 2 or tru.shape[1] != len(gene_names):
            raise ValueError(f"truth has shape {tru.shape} for {len(gene_names)} gene_names: expected "
                             "(n_cells, n_genes)")
        _check_methods(preds, "predictions", tru.shape[0])
        draws = resamples(tru.shape[0], s, draws_per_seed(len(runs)))
        for name, p in preds.items():
            p = np.asarray(p, np.float64)
            if p.shape != tru.shape:
                raise ValueError(f"predictions[{name!r}] has shape {p.shape}: expected {tru.shape} (cells x genes)")

            def score(rows, p=p, tru=tru):  # rows: (n_draws, n_cells) -> per-gene values of every draw at once
                pearson = per_column_pearson(p[rows], tru[rows])
                got = {"pearson": _nan_summary(pearson, np.mean), "pearson_median": _nan_summary(pearson, np.median)}
                if with_spearman:
                    got["spearman"] = _nan_summary(per_column_spearman(p[rows], tru[rows]), np.mean)
                return got

            acc.add(name, s, score, draws, batched=True)
            if not artifacts:  # per-gene values of the first seed, for the report's figure and results.json
                full = compute_metric_arrays("per_gene_correlation", predictions=p, references=tru)
                details["pearson_per_gene"][name] = full["pearson_per_gene"]
                details["n_genes_undefined"][name] = full["n_genes_undefined"]
        if not artifacts:
            artifacts = {"predictions": dict(preds), "truth": tru}
    n_cells = [np.asarray(t).shape[0] for _, t in runs.values()]
    notes = ["mean over genes of the per-gene correlation across scored cells (constant predictions score 0)",
             f"interval: {LEVEL:.0%} bootstrap over the scored cells ({'/'.join(map(str, n_cells))} per seed)"
             + (f", pooled over the seeds {sorted(runs)} of the cell split" if len(runs) > 1 else "")]
    return _result(number, acc, kinds, split, details=details, notes=notes, artifacts=artifacts)


def _nan_summary(values: np.ndarray, fn) -> np.ndarray:
    """``fn`` (mean or median) over genes (last axis) leaving out undefined (NaN) genes, per draw."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a draw with no defined gene gives NaN
        return np.asarray({np.mean: np.nanmean, np.median: np.nanmedian}[fn](values, axis=-1))


def run_gene_imputation(predictions, truth, gene_names: Sequence[str], split: Split | dict | None = None,
                        kinds: Mapping[str, str] | None = None, seed: int = 0) -> TaskResult:
    """Task 7: predicted values ``(n_test_cells, n_masked_genes)`` of genes masked in the test cells vs
    their measured (log1p-normalised) values; per-gene Pearson and Spearman. ``predictions`` /
    ``truth`` may also be dicts keyed by seed (one cell split per seed)."""
    return _correlation_task(7, predictions, truth, gene_names, _split_json(split), kinds, True, seed)


def run_niche_imputation(predictions, truth, gene_names: Sequence[str], split: Split | dict | None = None,
                         kinds: Mapping[str, str] | None = None, seed: int = 0) -> TaskResult:
    """Task 8: as task 7 for genes whose expression is driven by the cell's neighbours; Pearson."""
    return _correlation_task(8, predictions, truth, gene_names, _split_json(split), kinds, False, seed)


def run_image_to_expression(predictions: Mapping[str, np.ndarray], truth: np.ndarray, gene_names: Sequence[str],
                            split: Split | dict | None = None, kinds: Mapping[str, str] | None = None,
                            seed: int = 0) -> TaskResult:
    """Task 9: expression predicted from the cell image alone vs measured; per-gene Pearson."""
    return _correlation_task(9, predictions, truth, gene_names, _split_json(split), kinds, False, seed)


def _split_json(split: Split | dict | None) -> dict:
    return split.to_json() if isinstance(split, Split) else dict(split or {})

# ----------------------------------------------------------------------------- task 10: retrieval
def run_retrieval(pairs: Mapping[str, tuple[np.ndarray, np.ndarray]], ks: Sequence[int] = (1, 5, 10),
                  split: Split | dict | None = None, kinds: Mapping[str, str] | None = None,
                  seed: int = 0) -> TaskResult:
    """Task 10: each method gives ``(expression_embedding, image_embedding)`` of the same scored cells
    (row i = cell i in both, same width); recall@k for expression -> image and image -> expression,
    and their mean ("recall@k")."""
    if not pairs:
        raise ValueError("pairs is empty: pass {'method': (expression_embedding, image_embedding)}")
    ks = sorted({int(k) for k in ks} | {1, 10})
    acc, ranks, draws = SeededScores(), {}, None
    for name, pair in pairs.items():
        if len(pair) != 2:
            raise ValueError(f"pairs[{name!r}]: expected a tuple (expression_embedding, image_embedding)")
        e, m = (np.asarray(a, np.float64) for a in pair)
        out = compute_metric("recall_at_k", predictions=e, references=m, ks=ks)
        fwd, bwd, n = np.asarray(out["pred_to_ref_ranks"]), np.asarray(out["ref_to_pred_ranks"]), out["n_items"]
        draws = resamples(n, seed) if draws is None else draws

        def score(rows, fwd=fwd, bwd=bwd, n=n):
            s = {}
            for k in ks:
                s[f"expr_to_image_recall@{k}"] = float(np.mean(fwd[rows] <= min(k, n)))
                s[f"image_to_expr_recall@{k}"] = float(np.mean(bwd[rows] <= min(k, n)))
                s[f"recall@{k}"] = 0.5 * (s[f"expr_to_image_recall@{k}"] + s[f"image_to_expr_recall@{k}"])
            return s

        acc.add(name, seed, score, draws)
        ranks[name] = {"expr_to_image": out["pred_to_ref_median_rank"], "image_to_expr": out["ref_to_pred_median_rank"],
                       "chance": {str(k): out[f"chance@{k}"] for k in ks}, "n_items": out["n_items"]}
    n = next(iter(ranks.values()))["n_items"]
    notes = [f"{n} candidates per query: chance recall@10 = {min(10, n) / n:.3f}; interval: {LEVEL:.0%} bootstrap "
             "over the queries (the candidate set stays whole)"]
    return _result(10, acc, kinds, _split_json(split), details={"median_rank": ranks}, notes=notes)


# ----------------------------------------------------------------------------- task 11: generation
def run_generation(real_features: np.ndarray, real_labels: Sequence, generated: Mapping[str, np.ndarray],
                   condition_labels: Mapping[str, Sequence] | Sequence, seed: int = 0, kid_subsets: int = 100,
                   kid_subset_size: int = 1000, kinds: Mapping[str, str] | None = None) -> TaskResult:
    """Task 11: feature-space FID/KID of each method's generated images against real images, and the
    type accuracy of a classifier (linear probe fitted on the real features and labels) applied to the
    generated images, against the cell type of the expression each image was conditioned on.

    Args:
        real_features, real_labels: features ``(n_real, d)`` of real crops (the reference set) and types.
        generated: method -> features ``(n_gen, d)`` of its generated images (same feature extractor).
        condition_labels: cell type of each generated image's condition; one array for all methods or a
            dict per method.
    """
    real = np.asarray(real_features, np.float64)
    real_labels = np.asarray(real_labels).astype(str)
    if real.ndim != 2 or len(real) != len(real_labels):
        raise ValueError(f"real_features {real.shape} and real_labels ({len(real_labels)}): expected (n_real, d) "
                         "and one label per row")
    _check_methods(generated, "generated")
    acc = SeededScores()
    for name, g in generated.items():
        g = np.asarray(g, np.float64)
        if g.shape[1] != real.shape[1]:
            raise ValueError(f"generated[{name!r}] has width {g.shape[1]}, real features {real.shape[1]}: extract "
                             "both with the same feature extractor")
        cond = condition_labels[name] if isinstance(condition_labels, Mapping) else condition_labels
        cond = np.asarray(cond).astype(str)
        if len(cond) != len(g):
            raise ValueError(f"condition labels for {name!r}: {len(cond)} for {len(g)} generated images")
        flags = np.r_[np.zeros(len(real), bool), np.ones(len(g), bool)]
        pred = linear_probe(real, real_labels, g, seed)

        def score(rows, g=g, pred=pred, cond=cond, flags=flags):
            whole = len(rows) == len(g) and np.array_equal(rows, np.arange(len(g)))
            out = compute_metric_arrays("feature_fid_kid", features=np.vstack([real, g[rows]]), is_generated=flags,
                                        subsets=kid_subsets if whole else KID_SUBSETS_PER_DRAW,
                                        subset_size=kid_subset_size, seed=seed)
            return {"fid": out["fid"], "kid": out["kid"],
                    "type_accuracy": classification_scores(pred[rows], cond[rows])["accuracy"]}

        acc.add(name, seed, score, resamples(len(g), seed, GENERATION_DRAWS))
    notes = [f"FID/KID in the given feature space ({real.shape[1]} dims, {len(real)} real images); "
             "type accuracy: linear probe fitted on the real features"]
    if len(real) <= real.shape[1]:
        notes.append("fewer real images than feature dimensions: FID is biased upwards; compare methods only")
    notes.append(f"interval: {LEVEL:.0%} bootstrap ({GENERATION_DRAWS} draws) over the generated images (the real "
                 "reference set stays whole; "
                 f"{KID_SUBSETS_PER_DRAW} KID subsets per draw); one noise seed ({seed}), as generating again per seed "
                 "would multiply the generation time")
    return _result(11, acc, kinds, {"kind": "cells", "n_real": int(len(real))}, notes=notes)


# ----------------------------------------------------------------------------- task 12: perturbation
def pair_direction_agreement(pair_shifts: np.ndarray, true_shift: Sequence[float]) -> float:
    """Fraction of measurable (cell, perturbation) pairs ``pair_shifts [n_cells, n_perturbations]`` (log
    ratios after/before; NaN where a crop had no measurable nucleus) moving the way the true shift does;
    perturbations without a true effect are left out. NaN when no pair counts."""
    sign = np.sign(np.asarray(true_shift, np.float64))[None, :]
    pairs = np.asarray(pair_shifts, np.float64)
    counted = np.isfinite(pairs) & (sign != 0)
    return float((np.sign(pairs) == sign)[counted].mean()) if counted.any() else math.nan


def run_perturbation(measured: Mapping[str, Sequence[float]], true_shift: Sequence[float],
                     perturbations: Sequence[str] | None = None, kinds: Mapping[str, str] | None = None,
                     resample: Mapping[str, tuple[int, Any]] | None = None, seed: int = 0,
                     pair_shifts: Mapping[str, np.ndarray] | None = None) -> TaskResult:
    """Task 12: measured log-fold morphology shifts (one per perturbation, e.g. NUCSIZE x4 -> log
    nucleus-area ratio of generated after/before from the same noise) vs the true shifts; direction
    agreement (over the perturbations' median shifts), median size ratio and slope, and for methods
    that edit cells, ``pair_direction_agreement`` over every (cell, perturbation) pair.

    ``resample`` maps a method to ``(n_items, shifts_of(rows))``: its shifts recomputed from the item
    rows ``rows`` (the perturbed cells, or the real cells of a regression), for a bootstrap interval;
    methods without it get their point value as the interval's two ends. ``pair_shifts`` maps a
    method to its per-pair log ratios ``[n_items, n_perturbations]`` (rows = the same items); a
    method without pairs (a regression, a reference) gets NaN there."""
    true = np.asarray(true_shift, np.float64)
    _check_methods({k: np.asarray(v, np.float64) for k, v in measured.items()}, "measured", len(true), ndim=1)
    pair_shifts = {k: np.asarray(v, np.float64) for k, v in (pair_shifts or {}).items()}
    for name, pairs in pair_shifts.items():
        if name not in measured or pairs.ndim != 2 or pairs.shape[1] != len(true):
            raise ValueError(f"pair_shifts[{name!r}]: expected a method of `measured` with shape [n_cells, "
                             f"{len(true)}], got {pairs.shape}")
    names = list(perturbations) if perturbations is not None else [str(i) for i in range(len(true))]
    acc, shifts = SeededScores(), {}
    keys = ("direction_agreement", "size_ratio", "slope")

    def score(values, pairs=None) -> dict[str, float]:
        paired = {"pair_direction_agreement": math.nan if pairs is None else pair_direction_agreement(pairs, true)}
        if not np.isfinite(values).all():  # a draw with no measurable cell: left out of the interval
            return {**{k: math.nan for k in keys}, **paired}
        out = compute_metric_arrays("morphology_shift", predictions=np.asarray(values, np.float64), references=true)
        return {**{k: out[k] for k in keys}, **paired}

    for name, m in measured.items():
        shifts[name] = np.asarray(m, np.float64).tolist()
        pairs = pair_shifts.get(name)
        if resample and name in resample:
            n_items, shifts_of = resample[name]
            if pairs is not None and len(pairs) != n_items:
                raise ValueError(f"pair_shifts[{name!r}] has {len(pairs)} rows for {n_items} resampled items")
            draws = resamples(n_items, seed)
            acc.add(name, seed, lambda rows, shifts_of=shifts_of, m=m, pairs=pairs: score(
                m if len(rows) == n_items and np.array_equal(rows, np.arange(n_items)) else shifts_of(rows),
                None if pairs is None else pairs[rows]), draws)
        else:
            acc.add_point(name, seed, score(m, pairs))
    notes = ["shifts are natural-log folds; size_ratio 1 = right size, 0 = no effect"]
    if pair_shifts:
        notes.append("pair_direction_agreement: share of (edited cell, fold) pairs whose nucleus area moved the way "
                     "the truth does (before and after from the same noise); methods without pairs: none")
    if resample:
        notes.append(f"interval: {LEVEL:.0%} bootstrap over each method's cells (perturbed cells; the real cells of "
                     "the regression); references without cells have none")
    return _result(12, acc, kinds, {"kind": "perturbations", "n_perturbations": int(len(true))},
                   details={"perturbations": names, "true_shift": true.tolist(), "measured_shift": shifts},
                   notes=notes)
