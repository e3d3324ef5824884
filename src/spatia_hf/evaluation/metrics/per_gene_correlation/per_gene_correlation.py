"""Per-gene Pearson and Spearman correlation of predicted vs measured expression, an ``evaluate`` metric.

Tasks 7 (imputation of masked panel genes), 8 (neighbour-driven genes) and 9 (image -> expression):
each row is a cell, each column a gene; a gene is scored by the correlation, across cells, of its
predicted and measured values, and the summary is the mean and median over genes.

Conventions (stated because they change numbers): a gene whose measured values are constant over the
scored cells has no defined correlation; it is left out of the summaries and counted in
``n_genes_undefined``. A prediction that is constant while the measurement varies carries no
information about which cells express the gene and scores 0 (so a mean-imputation baseline is
scored, not dropped).
"""


import datasets
import evaluate
import numpy as np
from spatia_hf.utils.stats import mean_and_median, per_column_pearson, per_column_spearman

_DESCRIPTION = """Correlation across cells, gene by gene: Pearson on the values and Spearman (Pearson on
scipy.stats.rankdata ranks, average ties) on their ranks."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of list of float): one row per cell, one column per scored gene.
    references (list of list of float): measured values, same shape (e.g. log1p-normalised counts).
    gene_names (list of str, optional): names of the columns, echoed in the per-gene output.
Returns:
    pearson_mean, pearson_median, spearman_mean, spearman_median (float): over genes with a defined value.
    pearson_per_gene, spearman_per_gene (list of float): NaN where undefined.
    gene_names (list of str), n_genes (int), n_genes_undefined (int), n_cells (int).
Examples:
    >>> metric = spatia_hf.evaluation.metrics.load_metric("per_gene_correlation")
    >>> out = metric.compute(predictions=[[1.0], [2.0], [3.0]], references=[[2.0], [4.0], [7.0]])
    >>> round(out["pearson_mean"], 4), out["spearman_mean"]
    (0.9934, 1.0)
"""

_CITATION = """@article{2020SciPy-NMeth, title={{SciPy} 1.0: Fundamental Algorithms for Scientific Computing in Python},
  author={Virtanen, P. and others}, journal={Nature Methods}, volume={17}, pages={261--272}, year={2020}}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PerGeneCorrelation(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.List(datasets.Value("float64")),
                                        "references": datasets.List(datasets.Value("float64"))}),
            reference_urls=["https://docs.scipy.org/doc/scipy/reference/generated/scipy.stats.pearsonr.html"],
        )

    def _compute(self, predictions, references, gene_names=None) -> dict:
        pred = np.asarray(list(predictions), dtype=np.float64)
        ref = np.asarray(list(references), dtype=np.float64)
        if pred.ndim != 2 or pred.shape != ref.shape:
            raise ValueError(f"predictions shape {pred.shape} vs references shape {ref.shape}: expected two equal "
                             "(n_cells, n_genes) matrices. Fix: pass one row per cell with the same genes in both")
        if pred.shape[0] < 3:
            raise ValueError(f"n_cells={pred.shape[0]}: a correlation across cells needs at least 3 cells")
        if not (np.isfinite(pred).all() and np.isfinite(ref).all()):
            raise ValueError("predictions/references contain NaN or inf. Fix: impute or drop those cells first")
        names = list(gene_names) if gene_names is not None else [str(j) for j in range(pred.shape[1])]
        if len(names) != pred.shape[1]:
            raise ValueError(f"gene_names has {len(names)} names for {pred.shape[1]} columns")
        pearson = per_column_pearson(pred, ref)
        spearman = per_column_spearman(pred, ref)
        return {**mean_and_median(pearson, "pearson"), **mean_and_median(spearman, "spearman"),
                "pearson_per_gene": pearson.tolist(), "spearman_per_gene": spearman.tolist(),
                "gene_names": names, "n_genes": int(pred.shape[1]),
                "n_genes_undefined": int(np.isnan(pearson).sum()), "n_cells": int(pred.shape[0])}
