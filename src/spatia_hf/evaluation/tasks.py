"""The 12 evaluation tasks of SPATIA as functions over arrays, one function per task.

Every function takes the outputs of any number of methods at once (``features`` / ``predictions``
map a method name, e.g. "SPATIA", "PCA", "log1p", "image-CNN", to its array), scores them all on the
same cells with the same seeds through the package's ``evaluate`` metrics, and returns a
:class:`TaskResult`. Method names starting with "SPATIA" are SPATIA variants, any other name is a
baseline unless ``kinds`` marks it a "reference" (an oracle or a null that bounds the scale, such as
held-out real images in task 11); the report compares SPATIA with the best baseline.

Protocols fixed here so that every method gets the same treatment:
- annotation probes: standardise, then multinomial logistic regression fitted on the training cells;
- clustering: PCA to 50 dimensions when wider, then Leiden on a 15-NN graph with the resolution
  bisected to give the true number of groups (when ``leidenalg`` and ``igraph`` are installed,
  ``pip install spatia-hf[leiden]``), otherwise k-means with that number of clusters (10 restarts);
- section classification: leave-one-section-out with the same probe, but one global scale instead of
  per-feature standardisation (few sections, many features); a fold whose training sections hold
  one class predicts that class;
- correlations are per gene across the scored cells (see the ``per_gene_correlation`` metric).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .metrics import compute_metric
from .splits import Split, leave_one_section_out

KINDS = ("spatia", "baseline", "reference")
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
             ("direction_agreement", "size_ratio", "slope"), "direction_agreement"),
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
                      "notes": self.notes})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TaskResult":
        scores = {m: {k: float("nan") if v is None else float(v) for k, v in s.items()} for m, s in d["scores"].items()}
        return cls(int(d["task"]), d["key"], d["title"], list(d["metrics"]), d["primary_metric"], scores,
                   dict(d["method_kinds"]), dict(d.get("split", {})), dict(d.get("details", {})),
                   list(d.get("notes", [])))


# ----------------------------------------------------------------------------- shared helpers
def _result(number: int, scores: dict, kinds: Mapping[str, str] | None, split: dict, **kw) -> TaskResult:
    spec = TASKS[number]
    kinds = dict(kinds or {})
    bad = {m: k for m, k in kinds.items() if k not in KINDS}
    if bad:
        raise ValueError(f"kinds={bad}: each kind must be one of {KINDS}")
    method_kinds = {m: kinds.get(m, method_kind(m)) for m in scores}
    return TaskResult(number, spec.key, spec.title, list(spec.metrics), spec.primary, scores, method_kinds, split,
                      **kw)


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
    """Multinomial logistic regression (C=1) fitted on the training rows; predicted labels of the
    test rows. With a single training class it predicts that class.

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


def _classification_scores(pred: Sequence, truth: Sequence) -> dict[str, float]:
    _, (p, t) = _codes(pred, truth)
    return {"macro_f1": compute_metric("macro_f1", predictions=p, references=t)["macro_f1"],
            "accuracy": compute_metric("accuracy", predictions=p, references=t)["accuracy"]}


def leiden_available() -> bool:
    try:
        import igraph  # noqa: F401
        import leidenalg  # noqa: F401
    except ImportError:
        return False
    return True


def _leiden(x: np.ndarray, n_clusters: int, seed: int, n_neighbors: int) -> np.ndarray:
    import igraph
    import leidenalg
    from sklearn.neighbors import kneighbors_graph

    knn = kneighbors_graph(x, n_neighbors=min(n_neighbors, len(x) - 1), mode="connectivity", include_self=False)
    knn = ((knn + knn.T) > 0).astype(np.float64).tocoo()
    keep = knn.row < knn.col
    graph = igraph.Graph(n=len(x), edges=list(zip(knn.row[keep].tolist(), knn.col[keep].tolist())))

    def run(resolution: float) -> np.ndarray:
        part = leidenalg.find_partition(graph, leidenalg.RBConfigurationVertexPartition,
                                        resolution_parameter=resolution, seed=seed)
        return np.asarray(part.membership)

    lo, hi = math.log(1e-3), math.log(20.0)
    best = run(1.0)
    for _ in range(25):  # bisect the resolution (log scale) towards n_clusters groups
        mid = 0.5 * (lo + hi)
        labels = run(math.exp(mid))
        k = labels.max() + 1
        if abs(k - n_clusters) < abs(best.max() + 1 - n_clusters):
            best = labels
        if k == n_clusters:
            break
        lo, hi = (mid, hi) if k < n_clusters else (lo, mid)
    return best


def cluster(x: np.ndarray, n_clusters: int, method: str = "auto", seed: int = 0, n_neighbors: int = 15
            ) -> tuple[np.ndarray, str]:
    """Cluster rows of ``x`` into about ``n_clusters`` groups; returns labels and the algorithm used
    ("leiden" or "kmeans"). ``method``: "auto" (Leiden when installed), "leiden" or "kmeans"."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    if method not in ("auto", "leiden", "kmeans"):
        raise ValueError(f"method={method!r}: expected 'auto', 'leiden' or 'kmeans'")
    if n_clusters < 2 or n_clusters > len(x):
        raise ValueError(f"n_clusters={n_clusters} for {len(x)} cells: expected 2 <= n_clusters <= n_cells")
    x = np.asarray(x, np.float64)
    if x.shape[1] > 50:
        x = PCA(n_components=min(50, len(x) - 1), random_state=seed).fit_transform(x)
    use_leiden = method == "leiden" or (method == "auto" and leiden_available())
    if use_leiden:
        if not leiden_available():
            raise ImportError("method='leiden' needs leidenalg and igraph. Fix: pip install 'spatia-hf[leiden]' "
                              "or use method='kmeans'")
        return _leiden(x, n_clusters, seed, n_neighbors), "leiden"
    return KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(x), "kmeans"


def _clustering(number: int, features: Mapping[str, np.ndarray], truth: Sequence, eval_idx: np.ndarray | None,
                n_clusters: int | None, method: str, seed: int, kinds, groups: Sequence | None = None) -> TaskResult:
    truth = np.asarray(truth).astype(str)
    _check_methods(features, "features", len(truth))
    idx = np.arange(len(truth)) if eval_idx is None else np.asarray(eval_idx)
    _, (t,) = _codes(truth[idx])
    k = int(n_clusters or np.unique(t).size)
    scores, labels_by_method, per_group, used = {}, {}, {}, set()
    for name, x in features.items():
        labels, algo = cluster(np.asarray(x)[idx], k, method, seed)
        used.add(algo)
        labels_by_method[name] = labels
        scores[name] = {
            "ari": compute_metric("adjusted_rand_index", predictions=labels, references=t)["adjusted_rand_index"],
            "nmi": compute_metric("normalized_mutual_info", predictions=labels, references=t)["normalized_mutual_info"]}
        if groups is not None:
            g = np.asarray(groups).astype(str)[idx]
            per_group[name] = {sid: compute_metric("adjusted_rand_index", predictions=labels[g == sid],
                                                   references=t[g == sid])["adjusted_rand_index"]
                               for sid in np.unique(g)}
    details = {"algorithm": sorted(used), "n_clusters": k}
    if groups is not None:
        details["ari_per_section"] = per_group
    notes = [f"{'/'.join(sorted(used))} with {k} clusters (the number of true groups) on {len(idx)} cells"]
    if "kmeans" in used and method == "auto":
        notes.append("leidenalg/igraph not installed: k-means used (pip install 'spatia-hf[leiden]' for Leiden)")
    return _result(number, scores, kinds, {"kind": "cells", "n_test": int(len(idx))}, details=details, notes=notes,
                   artifacts={"labels": labels_by_method, "eval_idx": idx})


# ----------------------------------------------------------------------------- tasks 1-3: annotation
def _annotation(number: int, features: Mapping[str, np.ndarray], labels: Sequence, split: Split, seed: int,
                kinds) -> TaskResult:
    labels = np.asarray(labels).astype(str)
    _check_methods(features, "features", len(labels))
    scores, preds = {}, {}
    for name, x in features.items():
        x = np.asarray(x)
        preds[name] = linear_probe(x[split.train], labels[split.train], x[split.test], seed)
        scores[name] = _classification_scores(preds[name], labels[split.test])
    unseen = sorted(set(labels[split.test]) - set(labels[split.train]))
    notes = [f"test types never seen in training: {unseen}"] if unseen else []
    return _result(number, scores, kinds, split.to_json(), notes=notes,
                   artifacts={"predictions": preds, "truth": labels[split.test]})


def run_cell_annotation(features: Mapping[str, np.ndarray], labels: Sequence, split: Split, seed: int = 0,
                        kinds: Mapping[str, str] | None = None) -> TaskResult:
    """Task 1: a linear probe (fitted on ``split.train``) on each method's per-cell embedding
    ``(n_cells, d)`` predicts the cell type of ``split.test``; macro-F1 and accuracy."""
    return _annotation(1, features, labels, split, seed, kinds)


def run_image_annotation(features: Mapping[str, np.ndarray], labels: Sequence, split: Split, seed: int = 0,
                         kinds: Mapping[str, str] | None = None) -> TaskResult:
    """Task 2: as task 1, on image-only embeddings (SPATIA's image branch, an image CNN, pixels)."""
    return _annotation(2, features, labels, split, seed, kinds)


def run_finetuned_annotation(predictions: Mapping[str, Sequence], labels: Sequence, split: Split,
                             kinds: Mapping[str, str] | None = None) -> TaskResult:
    """Task 3: score cell-type predictions of fine-tuned heads for the cells ``split.test`` (in that
    order); the training happened elsewhere (the Trainer), on ``split.train`` only."""
    labels = np.asarray(labels).astype(str)
    _check_methods(predictions, "predictions", len(split.test), ndim=1)
    scores = {name: _classification_scores(np.asarray(p).astype(str), labels[split.test])
              for name, p in predictions.items()}
    return _result(3, scores, kinds, split.to_json(),
                   artifacts={"predictions": dict(predictions), "truth": labels[split.test]})


# ----------------------------------------------------------------------------- tasks 4-5: clustering
def run_cell_clustering(features: Mapping[str, np.ndarray], labels: Sequence, eval_idx: np.ndarray | None = None,
                        n_clusters: int | None = None, method: str = "auto", seed: int = 0,
                        kinds: Mapping[str, str] | None = None) -> TaskResult:
    """Task 4: cluster each method's cell embeddings (rows ``eval_idx``, default all) and compare with
    the cell types: ARI and NMI."""
    return _clustering(4, features, labels, eval_idx, n_clusters, method, seed, kinds)


def run_domain_clustering(features: Mapping[str, np.ndarray], domains: Sequence, sample_ids: Sequence,
                          eval_idx: np.ndarray | None = None, n_clusters: int | None = None, method: str = "auto",
                          seed: int = 0, kinds: Mapping[str, str] | None = None) -> TaskResult:
    """Task 5: cluster niche-aware cell embeddings into spatial domains (jointly over the scored
    sections); ARI and NMI against the true domains, plus ARI per section in ``details``."""
    return _clustering(5, features, domains, eval_idx, n_clusters, method, seed, kinds, groups=sample_ids)


# ----------------------------------------------------------------------------- task 6: sections
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


def run_section_classification(features: Mapping[str, np.ndarray], labels: Sequence, sample_ids: Sequence,
                               seed: int = 0, kinds: Mapping[str, str] | None = None) -> TaskResult:
    """Task 6: leave-one-section-out probe on section-level features ``(n_sections, d)`` (tissue
    embeddings, pseudo-bulk, mean cell embeddings) predicting a section label; accuracy."""
    labels = np.asarray(labels).astype(str)
    sample_ids = np.asarray(sample_ids).astype(str)
    if len(labels) != len(sample_ids):
        raise ValueError(f"labels ({len(labels)}) and sample_ids ({len(sample_ids)}): expected one per section")
    if np.unique(labels).size < 2:
        raise ValueError(f"labels has a single class {np.unique(labels).tolist()}: section classification needs "
                         "at least 2 classes. Fix: choose another section label or add sections")
    _check_methods(features, "features", len(labels))
    folds = leave_one_section_out(sample_ids)
    scores, preds = {}, {}
    for name, x in features.items():
        x = np.asarray(x)
        pred = np.empty(len(labels), dtype=object)
        for f in folds:
            pred[f.test] = linear_probe(x[f.train], labels[f.train], x[f.test], seed, scaling="global")
        preds[name] = pred.astype(str)
        _, (p, t) = _codes(preds[name], labels)
        scores[name] = {"accuracy": compute_metric("accuracy", predictions=p, references=t)["accuracy"]}
    notes = [f"leave-one-section-out over {len(labels)} sections: accuracy moves in steps of {1 / len(labels):.2f}",
             "probe: logistic regression on features centred and divided by one global scale"]
    return _result(6, scores, kinds, {"kind": "leave-one-section-out", "n_sections": int(len(labels))},
                   details={"predictions": {m: p.tolist() for m, p in preds.items()}, "labels": labels.tolist(),
                            "sample_ids": sample_ids.tolist()}, notes=notes)


# ----------------------------------------------------------------------------- tasks 7-9: expression
def _correlation_task(number: int, predictions: Mapping[str, np.ndarray], truth: np.ndarray,
                      gene_names: Sequence[str], split: dict, kinds, with_spearman: bool) -> TaskResult:
    truth = np.asarray(truth, np.float64)
    if truth.ndim != 2 or truth.shape[1] != len(gene_names):
        raise ValueError(f"truth has shape {truth.shape} for {len(gene_names)} gene_names: expected (n_cells, n_genes)")
    _check_methods(predictions, "predictions", truth.shape[0])
    scores, details = {}, {"genes": list(gene_names), "pearson_per_gene": {}, "n_genes_undefined": {}}
    for name, p in predictions.items():
        p = np.asarray(p, np.float64)
        if p.shape != truth.shape:
            raise ValueError(f"predictions[{name!r}] has shape {p.shape}: expected {truth.shape} (cells x genes)")
        out = compute_metric("per_gene_correlation", predictions=p, references=truth, gene_names=list(gene_names))
        scores[name] = {"pearson": out["pearson_mean"], "pearson_median": out["pearson_median"]}
        if with_spearman:
            scores[name]["spearman"] = out["spearman_mean"]
        details["pearson_per_gene"][name] = out["pearson_per_gene"]
        details["n_genes_undefined"][name] = out["n_genes_undefined"]
    notes = ["mean over genes of the per-gene correlation across scored cells (constant predictions score 0)"]
    return _result(number, scores, kinds, split, details=details, notes=notes,
                   artifacts={"predictions": dict(predictions), "truth": truth})


def run_gene_imputation(predictions: Mapping[str, np.ndarray], truth: np.ndarray, gene_names: Sequence[str],
                        split: Split | dict | None = None, kinds: Mapping[str, str] | None = None) -> TaskResult:
    """Task 7: predicted values ``(n_test_cells, n_masked_genes)`` of genes masked in the test cells vs
    their measured (log1p-normalised) values; per-gene Pearson and Spearman."""
    return _correlation_task(7, predictions, truth, gene_names, _split_json(split), kinds, True)


def run_niche_imputation(predictions: Mapping[str, np.ndarray], truth: np.ndarray, gene_names: Sequence[str],
                         split: Split | dict | None = None, kinds: Mapping[str, str] | None = None) -> TaskResult:
    """Task 8: as task 7 for genes whose expression is driven by the cell's neighbours; Pearson."""
    return _correlation_task(8, predictions, truth, gene_names, _split_json(split), kinds, False)


def run_image_to_expression(predictions: Mapping[str, np.ndarray], truth: np.ndarray, gene_names: Sequence[str],
                            split: Split | dict | None = None, kinds: Mapping[str, str] | None = None) -> TaskResult:
    """Task 9: expression predicted from the cell image alone vs measured; per-gene Pearson."""
    return _correlation_task(9, predictions, truth, gene_names, _split_json(split), kinds, False)


def _split_json(split: Split | dict | None) -> dict:
    return split.to_json() if isinstance(split, Split) else dict(split or {})


# ----------------------------------------------------------------------------- task 10: retrieval
def run_retrieval(pairs: Mapping[str, tuple[np.ndarray, np.ndarray]], ks: Sequence[int] = (1, 5, 10),
                  split: Split | dict | None = None, kinds: Mapping[str, str] | None = None) -> TaskResult:
    """Task 10: each method gives ``(expression_embedding, image_embedding)`` of the same scored cells
    (row i = cell i in both, same width); recall@k for expression -> image and image -> expression,
    and their mean ("recall@k")."""
    if not pairs:
        raise ValueError("pairs is empty: pass {'method': (expression_embedding, image_embedding)}")
    ks = sorted({int(k) for k in ks} | {1, 10})
    scores, ranks = {}, {}
    for name, pair in pairs.items():
        if len(pair) != 2:
            raise ValueError(f"pairs[{name!r}]: expected a tuple (expression_embedding, image_embedding)")
        e, m = (np.asarray(a, np.float64) for a in pair)
        out = compute_metric("recall_at_k", predictions=e, references=m, ks=ks)
        s = {}
        for k in ks:
            s[f"expr_to_image_recall@{k}"] = out[f"pred_to_ref_recall@{k}"]
            s[f"image_to_expr_recall@{k}"] = out[f"ref_to_pred_recall@{k}"]
            s[f"recall@{k}"] = 0.5 * (s[f"expr_to_image_recall@{k}"] + s[f"image_to_expr_recall@{k}"])
        scores[name] = s
        ranks[name] = {"expr_to_image": out["pred_to_ref_median_rank"], "image_to_expr": out["ref_to_pred_median_rank"],
                       "chance": {str(k): out[f"chance@{k}"] for k in ks}, "n_items": out["n_items"]}
    n = next(iter(ranks.values()))["n_items"]
    notes = [f"{n} candidates per query: chance recall@10 = {min(10, n) / n:.3f}"]
    return _result(10, scores, kinds, _split_json(split), details={"median_rank": ranks}, notes=notes)


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
    scores = {}
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
        out = compute_metric("feature_fid_kid", features=np.vstack([real, g]), is_generated=flags,
                             subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
        pred = linear_probe(real, real_labels, g, seed)
        _, (p, t) = _codes(pred, cond)
        scores[name] = {"fid": out["fid"], "kid": out["kid"],
                        "type_accuracy": compute_metric("accuracy", predictions=p, references=t)["accuracy"]}
    notes = [f"FID/KID in the given feature space ({real.shape[1]} dims, {len(real)} real images); "
             "type accuracy: linear probe fitted on the real features"]
    if len(real) <= real.shape[1]:
        notes.append("fewer real images than feature dimensions: FID is biased upwards; compare methods only")
    return _result(11, scores, kinds, {"kind": "cells", "n_real": int(len(real))}, notes=notes)


# ----------------------------------------------------------------------------- task 12: perturbation
def run_perturbation(measured: Mapping[str, Sequence[float]], true_shift: Sequence[float],
                     perturbations: Sequence[str] | None = None, kinds: Mapping[str, str] | None = None) -> TaskResult:
    """Task 12: measured log-fold morphology shifts (one per perturbation, e.g. NUCSIZE x4 -> log
    nucleus-area ratio of generated after/before from the same noise) vs the true shifts; direction
    agreement, median size ratio and slope."""
    true = np.asarray(true_shift, np.float64)
    _check_methods({k: np.asarray(v, np.float64) for k, v in measured.items()}, "measured", len(true), ndim=1)
    names = list(perturbations) if perturbations is not None else [str(i) for i in range(len(true))]
    scores, shifts = {}, {}
    for name, m in measured.items():
        out = compute_metric("morphology_shift", predictions=np.asarray(m, np.float64), references=true)
        scores[name] = {k: out[k] for k in ("direction_agreement", "size_ratio", "slope")}
        shifts[name] = np.asarray(m, np.float64).tolist()
    return _result(12, scores, kinds, {"kind": "perturbations", "n_perturbations": int(len(true))},
                   details={"perturbations": names, "true_shift": true.tolist(), "measured_shift": shifts},
                   notes=["shifts are natural-log folds; size_ratio 1 = right size, 0 = no effect"])
