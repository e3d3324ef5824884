"""All 12 tasks on one built dataset: data, splits, baselines, pictures and the report, in one run.

Two phases, so that SPATIA (or any model) is scored on exactly the cells the baselines see:

1. ``inputs = prepare_suite(dataset_dir, seed=0)`` loads the arrays and fixes every split and
   choice (held-out section, masked genes, test cells, generation conditions, perturbations);
2. ``results = run_suite(inputs, extra=...)`` runs the baselines, adds the ``extra`` methods' outputs
   and scores everything.

``extra`` maps a task key to ``{method_name: output}``; the expected output per task, in the row
order given by ``inputs``:

================================  ======================================================================
cell_annotation, cell_clustering  per-cell embedding ``(n_cells, d)`` for all cells of ``inputs.cells``
image_annotation                  per-cell image-only embedding ``(n_cells, d)``
domain_clustering                 per-cell niche-aware embedding ``(n_cells, d)``
finetuned_annotation              predicted type names for ``inputs.section_split.test``
section_classification            section embedding ``(n_sections, d)`` in ``inputs.sections`` order
gene_imputation                   ``(len(section_split.test), len(masked_genes))`` log1p values
niche_imputation                  ``(len(section_split.test), len(neighbor_genes))`` log1p values
gene_imputation_features          per held-out cell embedding ``(len(section_split.test), d)`` with the
niche_imputation_features         scored genes hidden; the suite fits the baselines' ridge on it per seed
image_to_expression               ``(len(section_split.test), len(target_genes))`` log1p values
retrieval                         ``(expression_emb, image_emb)`` for ``inputs.retrieval_idx``
generation                        generated crops ``(len(generation_idx), C, H, W)`` conditioned on those cells
perturbation                      ``{"before": crops, "after": {fold: crops}}`` for ``perturbation_idx``
================================  ======================================================================

Log1p values are ``log1p(counts / observed_library * 1e4)`` where the observed library excludes the
masked genes (see :func:`spatia_hf.evaluation.baselines.log1p_normalize`).

Every task scores only cells of the held-out sections (``section_split.test``), which no training
stage saw. Tasks 7-8 need cells with known values next to the scored ones: they split the held-out
sections' cells (seeded, one split per seed in ``imputation_splits``) into cells every method may fit
on and scored cells.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from . import baselines as B
from . import tasks as T
from .arrays import CellArrays, SectionArrays, load_arrays
from .morphology import nucleus_area
from .morphology import log_fold_shift, true_log_shift
from .intervals import DEFAULT_SEEDS
from .splits import Split, cell_split, section_split

DEFAULT_FOLDS = (0.25, 0.5, 2.0, 4.0)
FEATURE_SLOTS = ("gene_imputation_features", "niche_imputation_features")  # embeddings the suite fits a ridge on


@dataclass
class SuiteInputs:
    """Everything fixed before any method runs. Index arrays are rows of ``cells``."""

    cells: CellArrays
    sections: SectionArrays
    panel: dict
    ground_truth: dict | None
    seed: int
    section_split: Split
    imputation_splits: dict[int, Split]
    cell_type_key: str
    domain_key: str | None
    section_label_key: str | None
    masked_genes: list[str]
    neighbor_genes: list[str]
    target_genes: list[str]
    retrieval_idx: np.ndarray
    generation_idx: np.ndarray
    generation_reference_idx: np.ndarray
    perturbation_idx: np.ndarray
    morphology_gene: str | None
    folds: tuple[float, ...]
    log1p: np.ndarray = field(repr=False, default=None)

    @property
    def seeds(self) -> list[int]:
        """The seeds of every seeded step (cell splits, clustering); the first one is ``seed``."""
        return list(self.imputation_splits)

    def describe(self) -> dict:
        """Short JSON-able description for the report's metadata."""
        return {"cells": self.cells.n_cells, "genes": len(self.cells.genes), "sections": len(self.sections.sample_ids),
                "held-out sections": list(self.section_split.held_out_sections), "seeds": self.seeds,
                "masked genes (task 7)": len(self.masked_genes), "neighbour-driven genes (task 8)": self.neighbor_genes,
                "clustering": "leiden (scanpy, igraph)" if T.leiden_available() else "kmeans"}


def _load_ground_truth(dataset_dir: Path) -> dict | None:
    from spatia_hf.data.synthetic import load_ground_truth

    try:
        return load_ground_truth(dataset_dir)
    except (KeyError, IndexError, FileNotFoundError):
        return None


def _subsample(idx: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(idx, size=n, replace=False)) if len(idx) > n else np.sort(idx)


def prepare_suite(dataset_dir: str | Path, seed: int = 0, held_out: Sequence[str] | None = None,
                  cell_type_key: str = "cell_type", domain_key: str | None = "domain",
                  section_label_key: str | None = "condition", n_masked_genes: int = 20, n_target_genes: int = 50,
                  neighbor_genes: Sequence[str] | None = None, morphology_gene: str | None = None,
                  folds: Sequence[float] = DEFAULT_FOLDS, test_fraction: float = 0.25, max_retrieval: int = 500,
                  max_generation: int = 256, max_perturbation: int = 64,
                  seeds: Sequence[int] | None = None) -> SuiteInputs:
    """Load ``dataset_dir`` and fix the splits and every per-task choice (seeded).

    ``seeds`` (default ``seed, seed + 1, seed + 2``) seed the cell splits of tasks 7-8 and the
    clustering of tasks 4-5; ``test_fraction`` is the share of held-out cells scored in tasks 7-8.

    ``neighbor_genes`` / ``morphology_gene`` default to the synthetic tissue's ground truth (tasks 8
    and 12 are skipped on data without them unless given).
    """
    dataset_dir = Path(dataset_dir)
    cells, sections, panel = load_arrays(dataset_dir)
    cells.label(cell_type_key)  # clear error early when missing
    gt = _load_ground_truth(dataset_dir)
    rng = np.random.default_rng([seed, 11])
    sec = section_split(cells.sample_ids, held_out)
    seeds = [seed + k for k in range(len(DEFAULT_SEEDS))] if seeds is None else [int(s) for s in seeds]
    if not seeds or seeds[0] != seed:
        raise ValueError(f"seeds={seeds}: expected a non-empty list starting with seed={seed}")
    imputation = {s: held_out_cell_split(sec, cells.sample_ids, test_fraction, s) for s in seeds}

    if neighbor_genes is None:
        neighbor_genes = [g for g in (gt or {}).get("neighbor_genes", {}) if g in cells.genes]
    if morphology_gene is None:
        morphology_gene = next((g for g in (gt or {}).get("morphology_genes", {}) if g in cells.genes), None)
    log1p = B.log1p_normalize(cells.counts)
    exclude = list(cells.gene_index(neighbor_genes)) + (list(cells.gene_index([morphology_gene]))
                                                        if morphology_gene else [])
    masked = B.highly_variable_genes(log1p[sec.train], n_masked_genes, exclude)
    target = B.highly_variable_genes(log1p[sec.train], n_target_genes)

    test = sec.test
    perm = rng.permutation(test)
    half = len(perm) // 2
    return SuiteInputs(
        cells=cells, sections=sections, panel=panel, ground_truth=gt, seed=seed, section_split=sec,
        imputation_splits=imputation,
        cell_type_key=cell_type_key, domain_key=domain_key if domain_key in cells.labels else None,
        section_label_key=section_label_key if section_label_key in sections.labels else None,
        masked_genes=[cells.genes[j] for j in masked], neighbor_genes=list(neighbor_genes),
        target_genes=[cells.genes[j] for j in target], retrieval_idx=_subsample(test, max_retrieval, rng),
        generation_reference_idx=np.sort(perm[:half])[:max_generation],
        generation_idx=np.sort(perm[half:])[:max_generation],
        perturbation_idx=_subsample(test, max_perturbation, rng), morphology_gene=morphology_gene,
        folds=tuple(float(f) for f in folds), log1p=log1p)


def held_out_cell_split(sec: Split, sample_ids: np.ndarray, test_fraction: float, seed: int) -> Split:
    """Cells of the held-out sections split (seeded, stratified by section) into cells a method may fit
    on and scored cells; indices are rows of the whole dataset."""
    test = sec.test
    inner = cell_split(len(test), test_fraction, seed, stratify=np.asarray(sample_ids)[test])
    return Split(test[inner.train], test[inner.test], "cell", seed, sec.held_out_sections)


def masked_log1p(inputs: SuiteInputs, genes: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(observed, target, observed_columns)``: log1p of the other genes and of ``genes``, both
    normalised by the observed genes' library (so the masked genes' depth cannot leak)."""
    cols = inputs.cells.gene_index(genes)
    obs_cols = np.setdiff1d(np.arange(len(inputs.cells.genes)), cols)
    counts = inputs.cells.counts
    library = np.asarray(counts[:, obs_cols].sum(axis=1)).ravel()
    observed = B.log1p_normalize(counts[:, obs_cols], library=library)
    return observed, B.log1p_normalize(counts[:, cols], library=library), obs_cols


@dataclass
class _Shared:
    """Baseline features computed once and reused across tasks."""

    pca: np.ndarray
    cnn: B.TrainedCNN
    cnn_features: np.ndarray
    pixels: np.ndarray


def _shared(inputs: SuiteInputs, cnn_epochs: int) -> _Shared:
    c, s = inputs.cells, inputs.section_split
    labels = c.label(inputs.cell_type_key)
    cnn = B.train_image_cnn(c.images, labels, s.train, epochs=cnn_epochs, seed=inputs.seed)
    return _Shared(pca=B.pca_features(inputs.log1p, s.train, 30, inputs.seed), cnn=cnn,
                   cnn_features=cnn.features(c.images), pixels=B.pixel_features(c.images))


def _merge(base: dict, extra: Mapping[str, Mapping[str, Any]] | None, key: str) -> dict:
    added = dict((extra or {}).get(key, {}))
    clash = sorted(set(added) & set(base))
    if clash:
        raise ValueError(f"extra[{key!r}] reuses baseline method names {clash}. Fix: rename those methods")
    return {**base, **added}


def _kinds(kinds: Mapping[str, Mapping[str, str]] | None, key: str, base: Mapping[str, str] | None = None
           ) -> dict[str, str]:
    """The method kinds of task ``key``: the suite's references plus those the caller gave."""
    return {**dict(base or {}), **dict((kinds or {}).get(key, {}))}


def run_suite(inputs: SuiteInputs, extra: Mapping[str, Mapping[str, Any]] | None = None,
              tasks: Sequence[int] | None = None, cnn_epochs: int = 8, figures_dir: str | Path | None = None,
              progress: bool = False, num_threads: int | None = None,
              kinds: Mapping[str, Mapping[str, str]] | None = None) -> tuple[list[T.TaskResult], dict[str, Path]]:
    """Run the baselines (and ``extra`` methods) on the tasks ``tasks`` (default all 12).

    ``kinds`` maps a task key to ``{method_name: kind}`` ("spatia", "baseline" or "reference") for
    methods whose name alone would misclassify them, e.g. a SPATIA ablation ("SPATIA cell-only")
    that is a baseline of the full model.

    ``num_threads`` caps BLAS/OpenMP threads (threadpoolctl) while it runs: the matrices here are
    small, and on a shared CPU several BLAS threads were measured 20-40x slower than one (a 240 x 200
    SVD: 1.0 s vs 0.05 s). None leaves the library defaults.

    Returns the task results and the pictures drawn into ``figures_dir`` (none when it is None).
    Tasks that the data cannot support (no domains, a single section label, no neighbour-driven or
    morphology genes) are skipped: they have no result (the report lists them as not run).
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=num_threads):
        return _run_suite(inputs, extra, tasks, cnn_epochs, figures_dir, progress, kinds)


def _run_suite(inputs, extra, tasks, cnn_epochs, figures_dir, progress, kinds=None):
    from tqdm.auto import tqdm

    for what, given in (("extra", extra), ("kinds", kinds)):
        known = set(T.TASK_KEYS) | set(FEATURE_SLOTS)
        unknown = sorted(set(given or {}) - known)
        if unknown:
            raise ValueError(f"{what} has unknown task keys {unknown}; expected keys from {sorted(known)}")
    wanted = sorted(set(tasks or T.TASKS))
    shared = _shared(inputs, cnn_epochs)
    c, sec = inputs.cells, inputs.section_split
    types = c.label(inputs.cell_type_key)
    results: list[T.TaskResult] = []
    figures: dict[str, Path] = {}
    fig_dir = Path(figures_dir) if figures_dir is not None else None
    timings = {}
    runners = {1: _task1, 2: _task2, 3: _task3, 4: _task4, 5: _task5, 6: _task6, 7: _task7, 8: _task8, 9: _task9,
               10: _task10, 11: _task11, 12: _task12}
    for number in tqdm(wanted, desc="evaluation tasks", disable=not progress):
        t0 = time.perf_counter()
        out = runners[number](inputs, shared, extra, fig_dir, figures, kinds)
        timings[number] = time.perf_counter() - t0
        if out is not None:
            out.details["seconds"] = round(timings[number], 2)
            results.append(out)
    if fig_dir is not None:
        from . import plots

        colorings = {"cell type": types[sec.test]}
        if inputs.domain_key:
            colorings["domain"] = c.label(inputs.domain_key)[sec.test]
        figures["embedding_pca"] = plots.plot_embedding(shared.pca[sec.test], colorings,
                                                        fig_dir / "embedding_pca.png", "PCA (held-out section)")
        figures["embedding_image_cnn"] = plots.plot_embedding(shared.cnn_features[sec.test], colorings,
                                                              fig_dir / "embedding_image_cnn.png", "image-CNN")
        classes = np.unique(types[sec.test])
        per = max(1, 16 // len(classes))
        pick = np.concatenate([sec.test[types[sec.test] == t][:per] for t in classes])[:16]
        figures["real_crops"] = plots.plot_image_grid(c.images[pick], fig_dir / "real_crops.png", ncols=8,
                                                      titles=types[pick], title="real crops (held-out section)")
    return results, figures


# ----------------------------------------------------------------------------- per-task runners
def _task1(inputs, sh, extra, fig_dir, figures, kinds=None):
    c = inputs.cells
    feats = {"PCA": sh.pca, "log1p": inputs.log1p, "PCA + image-CNN (concat)": np.hstack([sh.pca, sh.cnn_features])}
    return T.run_cell_annotation(_merge(feats, extra, "cell_annotation"), c.label(inputs.cell_type_key),
                                 inputs.section_split, inputs.seed, kinds=_kinds(kinds, "cell_annotation"))


def _task2(inputs, sh, extra, fig_dir, figures, kinds=None):
    feats = {"image-CNN": sh.cnn_features, "pixels (8x8)": sh.pixels}
    return T.run_image_annotation(_merge(feats, extra, "image_annotation"), inputs.cells.label(inputs.cell_type_key),
                                  inputs.section_split, inputs.seed, kinds=_kinds(kinds, "image_annotation"))


def _task3(inputs, sh, extra, fig_dir, figures, kinds=None):
    c, s = inputs.cells, inputs.section_split
    types = c.label(inputs.cell_type_key)
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(max_iter=2000, random_state=inputs.seed).fit(inputs.log1p[s.train], types[s.train])
    preds = {"image-CNN (trained end to end)": sh.cnn.predict(c.images[s.test]),
             "log1p + logistic regression": lr.predict(inputs.log1p[s.test])}
    return T.run_finetuned_annotation(_merge(preds, extra, "finetuned_annotation"), types, s,
                                      kinds=_kinds(kinds, "finetuned_annotation"))


def _task4(inputs, sh, extra, fig_dir, figures, kinds=None):
    feats = {"PCA": sh.pca, "image-CNN": sh.cnn_features,
             "PCA + image-CNN (concat)": np.hstack([sh.pca, sh.cnn_features])}
    return T.run_cell_clustering(_merge(feats, extra, "cell_clustering"), inputs.cells.label(inputs.cell_type_key),
                                 inputs.section_split.test, seed=inputs.seeds, kinds=_kinds(kinds, "cell_clustering"))


def _task5(inputs, sh, extra, fig_dir, figures, kinds=None):
    if not inputs.domain_key:
        return None
    c = inputs.cells
    feats = {"PCA (cell only)": sh.pca,
             "PCA, kNN spatial smoothing (30 µm)": B.spatial_smoothing(sh.pca, c.xy_um, c.sample_ids, 30.0),
             "PCA, kNN spatial smoothing (60 µm)": B.spatial_smoothing(sh.pca, c.xy_um, c.sample_ids, 60.0)}
    r = T.run_domain_clustering(_merge(feats, extra, "domain_clustering"), c.label(inputs.domain_key), c.sample_ids,
                                inputs.section_split.test, seed=inputs.seeds,
                                kinds=_kinds(kinds, "domain_clustering"))
    if fig_dir is not None:
        from . import plots

        idx = r.artifacts["eval_idx"]
        best = [m for m in (r.best("spatia")[0], r.best("baseline")[0]) if m]
        figures["task05_domains"] = plots.plot_spatial_domains(
            c.xy_um[idx], c.label(inputs.domain_key)[idx], {m: r.artifacts["labels"][m] for m in best},
            fig_dir / "task05_domains.png", "spatial domains (held-out section)")
    return r


def _task6(inputs, sh, extra, fig_dir, figures, kinds=None):
    s, c = inputs.sections, inputs.cells
    if not inputs.section_label_key or np.unique(s.labels[inputs.section_label_key]).size < 2:
        return None
    feats = {"pseudo-bulk log1p": B.log1p_normalize(s.counts),
             "mean PCA of cells": T.section_means(sh.pca, c.sample_ids, s.sample_ids),
             "mean image-CNN of cells": T.section_means(sh.cnn_features, c.sample_ids, s.sample_ids)}
    return T.run_section_classification(_merge(feats, extra, "section_classification"),
                                        s.labels[inputs.section_label_key], s.sample_ids,
                                        inputs.section_split.held_out_sections, inputs.seed,
                                        kinds=_kinds(kinds, "section_classification"))


RIDGE_PCS = "ridge on observed-gene PCs (cell only)"
RIDGE_SMOOTHED_PCS = "ridge on spatially smoothed PCs (niche, 30 µm)"


def _imputation(inputs, genes, key, runner, fig_dir, figures, extra, fig_name, kinds=None):
    """Tasks 7-8 on the held-out sections, one cell split per seed: every method predicts the scored
    cells' ``genes`` from what it may fit on (the split's other held-out cells). Embeddings given in
    ``extra[key + '_features']`` get the baselines' ridge (same RidgeCV, same cells)."""
    c, held = inputs.cells, inputs.section_split.test
    observed, target, _ = masked_log1p(inputs, genes)
    row_of = {int(r): k for k, r in enumerate(held)}  # dataset row -> row of the held-out arrays
    given = dict((extra or {}).get(key, {}))
    features = dict((extra or {}).get(f"{key}_features", {}))
    for name, x in {**given, **features}.items():
        if np.asarray(x).shape[0] != len(held):
            raise ValueError(f"extra[{key!r}] / extra['{key}_features'][{name!r}] has {np.asarray(x).shape[0]} rows: "
                             f"expected one per held-out cell (inputs.section_split.test, {len(held)})")
    preds_by_seed, truth_by_seed = {}, {}
    for seed, s in inputs.imputation_splits.items():
        tr, te = np.array([row_of[int(r)] for r in s.train]), np.array([row_of[int(r)] for r in s.test])
        pcs = B.pca_features(observed, s.train, 30, seed)
        smoothed = B.spatial_smoothing(pcs[held], c.xy_um[held], c.sample_ids[held], 30.0)
        preds = {"mean imputation": B.mean_imputation(target[s.train], len(s.test)),
                 "kNN in expression (cell only)": B.knn_expression_imputation(pcs[s.train], target[s.train],
                                                                              pcs[s.test]),
                 RIDGE_PCS: B.ridge_regression(pcs[s.train], target[s.train], pcs[s.test]),
                 RIDGE_SMOOTHED_PCS: B.ridge_regression(smoothed[tr], target[s.train], smoothed[te]),
                 "spatial kNN smoothing (niche)": B.spatial_knn_imputation(c.xy_um[s.train], target[s.train],
                                                                           c.sample_ids[s.train], c.xy_um[s.test],
                                                                           c.sample_ids[s.test])}
        added = {name: np.asarray(p)[te] for name, p in given.items()}
        added.update({name: B.ridge_regression(np.asarray(x)[tr], target[s.train], np.asarray(x)[te])
                      for name, x in features.items()})
        preds_by_seed[seed] = _merge(preds, {key: added}, key)
        truth_by_seed[seed] = target[s.test]
    s0 = inputs.imputation_splits[inputs.seed]
    split = {**s0.to_json(), "seed": inputs.seeds, "n_fit": int(len(s0.train))}
    r = runner(preds_by_seed, truth_by_seed, list(genes), split,
               kinds={**_kinds(kinds, f"{key}_features"), **_kinds(kinds, key)})
    r.notes.append(f"cells of the held-out section(s) {list(inputs.section_split.held_out_sections)} only (no training "
                   f"stage saw them), split per seed into {len(s0.train)} cells to fit on and {len(s0.test)} scored "
                   f"cells; {RIDGE_PCS} / {RIDGE_SMOOTHED_PCS}: the standardised RidgeCV every embedding gets, on 30 "
                   "PCs of the observed genes / those PCs averaged over the cells within 30 µm")
    if fig_dir is not None:
        from . import plots

        m = r.best("spatia")[0] or r.best("baseline")[0]
        order = np.argsort(-np.nan_to_num(np.asarray(r.details["pearson_per_gene"][m], float), nan=-2))
        figures[fig_name] = plots.plot_imputation_scatter(
            np.asarray(r.artifacts["predictions"][m])[:, order], r.artifacts["truth"][:, order],
            [genes[j] for j in order], fig_dir / f"{fig_name}.png", title=f"{T.TASKS[r.task].title}: {m}")
    return r


def _task7(inputs, sh, extra, fig_dir, figures, kinds=None):
    return _imputation(inputs, inputs.masked_genes, "gene_imputation", T.run_gene_imputation, fig_dir, figures, extra,
                       "task07_imputation", kinds)


def _task8(inputs, sh, extra, fig_dir, figures, kinds=None):
    if not inputs.neighbor_genes:
        return None
    return _imputation(inputs, inputs.neighbor_genes, "niche_imputation", T.run_niche_imputation, fig_dir, figures,
                       extra, "task08_niche_imputation", kinds)


def _task9(inputs, sh, extra, fig_dir, figures, kinds=None):
    s = inputs.section_split
    cols = inputs.cells.gene_index(inputs.target_genes)
    y = inputs.log1p[:, cols]
    preds = {"ridge on image-CNN features": B.ridge_regression(sh.cnn_features[s.train], y[s.train],
                                                                sh.cnn_features[s.test]),
             "ridge on pixels (8x8)": B.ridge_regression(sh.pixels[s.train], y[s.train], sh.pixels[s.test]),
             "mean expression": B.mean_imputation(y[s.train], len(s.test))}
    return T.run_image_to_expression(_merge(preds, extra, "image_to_expression"), y[s.test], inputs.target_genes, s,
                                     kinds=_kinds(kinds, "image_to_expression"))


def _task10(inputs, sh, extra, fig_dir, figures, kinds=None):
    s, idx = inputs.section_split, inputs.retrieval_idx
    pairs = {"random": B.random_embeddings(len(idx), 16, inputs.seed),
             "PCA-CCA (log1p, pixels)": B.pca_cca_embeddings(inputs.log1p, sh.pixels, s.train, idx, seed=inputs.seed),
             "PCA-CCA (log1p, image-CNN)": B.pca_cca_embeddings(inputs.log1p, sh.cnn_features, s.train, idx,
                                                                 seed=inputs.seed)}
    return T.run_retrieval(_merge(pairs, extra, "retrieval"), split={"kind": "section", "n_test": int(len(idx)),
                                                                     "held_out_sections": list(s.held_out_sections)},
                           kinds=_kinds(kinds, "retrieval", {"random": "reference"}), seed=inputs.seed)


def _task11(inputs, sh, extra, fig_dir, figures, kinds=None):
    c, s = inputs.cells, inputs.section_split
    types = c.label(inputs.cell_type_key)
    ref, gen_idx = inputs.generation_reference_idx, inputs.generation_idx
    rng = np.random.default_rng([inputs.seed, 12])
    random_train = rng.choice(s.train, size=len(gen_idx), replace=len(s.train) < len(gen_idx))
    generated = {"real held-out crops": sh.cnn_features[gen_idx],
                 "random real crop (ignores expression)": sh.cnn_features[random_train]}
    kinds = _kinds(kinds, "generation", {"real held-out crops": "reference"})
    images = dict((extra or {}).get("generation", {}))
    clash = sorted(set(images) & set(generated))
    if clash:
        raise ValueError(f"extra['generation'] reuses baseline method names {clash}. Fix: rename those methods")
    for name, imgs in images.items():
        imgs = _as_uint8(imgs, name)
        if len(imgs) != len(gen_idx):
            raise ValueError(f"extra['generation'][{name!r}] has {len(imgs)} images: expected one per cell of "
                             f"inputs.generation_idx ({len(gen_idx)})")
        generated[name] = sh.cnn.features(imgs)
    r = T.run_generation(sh.cnn_features[ref], types[ref], generated, types[gen_idx], inputs.seed, kinds=kinds)
    r.notes.append("features: the image-CNN baseline (trained on the training sections' real crops); conditions: "
                   "expression of held-out cells, compared with the other half of the held-out section")
    if fig_dir is not None and images:
        from . import plots

        name = next(iter(images))
        k = min(16, len(gen_idx))
        figures["task11_generated"] = plots.plot_image_grid(_as_uint8(images[name], name)[:k],
                                                            fig_dir / "task11_generated.png", ncols=8,
                                                            titles=types[gen_idx][:k], title=f"generated: {name}")
    return r


def _as_uint8(images, name: str) -> np.ndarray:
    """Generated images as uint8 (N, C, H, W): floats are read as [0, 1]."""
    x = np.asarray(images)
    if x.ndim != 4:
        raise ValueError(f"generated images of {name!r} have shape {x.shape}: expected (N, C, H, W)")
    if x.dtype != np.uint8:
        x = np.clip(np.round(np.asarray(x, np.float64) * 255.0), 0, 255).astype(np.uint8)
    return x


def _task12(inputs, sh, extra, fig_dir, figures, kinds=None):
    gene, gt = inputs.morphology_gene, inputs.ground_truth
    if gene is None or gt is None or gene not in gt.get("morphology_genes", {}):
        return None
    c, s = inputs.cells, inputs.section_split
    truth = np.array([true_log_shift(gt, gene, f) for f in inputs.folds])
    names = [f"{gene} x{f:g}" for f in inputs.folds]
    col = c.gene_index([gene])[0]
    counts = np.asarray(c.counts[:, col].todense()).ravel()
    library = np.asarray(c.counts.sum(axis=1)).ravel()
    log_expr = np.log((counts[s.train] + 0.5) / np.maximum(library[s.train], 1.0))
    area = nucleus_area(c.images[s.train], c.pixel_size_um[s.train])
    ok = area > 0
    x, y = log_expr[ok], np.log(area[ok])
    types = B.one_hot(c.label(inputs.cell_type_key)[s.train][ok])
    regression = "observational regression (real cells)"
    measured = {regression: B.observational_shift(x, y, np.log(inputs.folds), types), "no change": np.zeros(len(truth))}
    resample = {regression: (len(y), lambda rows: B.observational_shift(x[rows], y[rows], np.log(inputs.folds),
                                                                         types[rows]))}
    kinds = _kinds(kinds, "perturbation", {"no change": "reference"})
    pair_shifts = {}
    for name, out in dict((extra or {}).get("perturbation", {})).items():
        before = nucleus_area(_as_uint8(out["before"], name), c.pixel_size_um[inputs.perturbation_idx])
        afters = []
        for f in inputs.folds:
            if f not in out["after"]:
                raise ValueError(f"extra['perturbation'][{name!r}]['after'] has no images for fold {f}; folds: "
                                 f"{list(inputs.folds)}")
            afters.append(nucleus_area(_as_uint8(out["after"][f], name), c.pixel_size_um[inputs.perturbation_idx]))
        if name in measured:
            raise ValueError(f"extra['perturbation'] reuses baseline method name {name!r}")
        measured[name] = np.array([log_fold_shift(before, a) for a in afters])
        pair_shifts[name] = _pair_log_ratios(before, afters)
        resample[name] = (len(before), lambda rows, before=before, afters=afters: np.array(
            [_shift_or_nan(before[rows], a[rows]) for a in afters]))
        if fig_dir is not None and "task12_strip" not in figures:
            from . import plots

            edited = {n: _as_uint8(out["after"][f], name) for n, f in zip(names, inputs.folds)}
            figures["task12_strip"] = plots.plot_perturbation_strip(
                _as_uint8(out["before"], name), edited, fig_dir / "task12_strip.png",
                title=f"{name}: {gene} edits, same noise")
    r = T.run_perturbation(measured, truth, names, kinds=kinds, resample=resample, seed=inputs.seed,
                           pair_shifts=pair_shifts)
    r.notes.append(f"truth: {gene} drives nucleus area with exponent {gt['morphology_genes'][gene]['exponent']}; "
                   "nucleus area measured from crops by evaluation.generation.nucleus_area")
    return r


def _pair_log_ratios(before: np.ndarray, afters: Sequence[np.ndarray]) -> np.ndarray:
    """``[n_cells, n_folds]`` log nucleus-area ratios after/before of each edited cell; NaN where either
    crop has no measurable nucleus (area 0)."""
    b = np.asarray(before, np.float64)[:, None]
    a = np.stack([np.asarray(x, np.float64) for x in afters], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((a > 0) & (b > 0), np.log(a / b), np.nan)


def _shift_or_nan(before: np.ndarray, after: np.ndarray) -> float:
    """:func:`log_fold_shift` of a bootstrap draw, NaN when the draw holds no measurable pair."""
    try:
        return log_fold_shift(before, after)
    except ValueError:
        return float("nan")


def evaluate_dataset(dataset_dir: str | Path, report_dir: str | Path, seed: int = 0,
                     extra: Mapping[str, Mapping[str, Any]] | None = None, tasks: Sequence[int] | None = None,
                     cnn_epochs: int = 8, progress: bool = False, num_threads: int | None = None,
                     kinds: Mapping[str, Mapping[str, str]] | None = None, **prepare_kwargs) -> Path:
    """Prepare, run the baselines (plus ``extra``), draw the pictures and write the report; returns
    the path of ``report.md``."""
    from .report import FIGURES_DIR, write_report

    report_dir = Path(report_dir)
    inputs = prepare_suite(dataset_dir, seed=seed, **prepare_kwargs)
    results, figures = run_suite(inputs, extra, tasks, cnn_epochs, report_dir / FIGURES_DIR, progress, num_threads,
                                 kinds)
    meta = {"dataset": str(dataset_dir), **inputs.describe()}
    skipped = sorted(set(tasks or T.TASKS) - {r.task for r in results})
    if skipped:
        meta["skipped tasks (data lacks what they need)"] = skipped
    return write_report(results, report_dir, meta, figures)
