"""Cross-modal retrieval recall@k in both directions, as an ``evaluate`` metric shipped with spatia-hf.

Task 10: row i of ``predictions`` (e.g. the expression embedding of cell i) and row i of
``references`` (the image embedding of the same cell) are a pair. For each query the candidates are
all rows of the other modality, ranked by cosine similarity; recall@k is the fraction of queries whose
partner ranks in the top k. Ties are counted against the query (a partner tied with another
candidate ranks below it), so constant or collapsed embeddings score 0, not 1.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics.pairwise import cosine_similarity

_DESCRIPTION = """Recall@k of paired retrieval, predictions -> references and references -> predictions,
with cosine similarity (sklearn.metrics.pairwise.cosine_similarity)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of list of float): query-side embeddings, one row per item.
    references (list of list of float): other-modality embeddings; row i is the partner of predictions row i.
        The two sides may have different widths only if they were projected to a shared space; here they
        must have the same width.
    ks (list of int, optional): cut-offs, default (1, 5, 10); values above n are clipped to n.
Returns:
    pred_to_ref_recall@k, ref_to_pred_recall@k (float) for every k; chance@k (float) = k / n;
    pred_to_ref_median_rank, ref_to_pred_median_rank (float, 1 = best); n_items (int);
    pred_to_ref_ranks, ref_to_pred_ranks (list of int): each query's partner rank (1 = best).
Examples:
    >>> metric = spatia_hf.evaluation.metrics.load_metric("recall_at_k")
    >>> out = metric.compute(predictions=[[1, 0], [0, 1]], references=[[1, 0.1], [0.1, 1]], ks=[1])
    >>> out["pred_to_ref_recall@1"]
    1.0
"""

_CITATION = """@inproceedings{radford2021clip, title={Learning Transferable Visual Models From Natural Language
  Supervision}, author={Radford, A. and others}, booktitle={ICML}, year={2021}}"""


def _ranks(similarity: np.ndarray) -> np.ndarray:
    """1-based rank of each row's partner (the diagonal); ties count against it."""
    diag = np.diag(similarity)[:, None]
    ahead = (similarity >= diag).sum(axis=1) - 1  # other candidates at least as similar
    return ahead + 1


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RecallAtK(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.List(datasets.Value("float64")),
                                        "references": datasets.List(datasets.Value("float64"))}),
            reference_urls=["https://arxiv.org/abs/2103.00020"],
        )

    def _compute(self, predictions, references, ks=(1, 5, 10)) -> dict:
        a = np.asarray(list(predictions), dtype=np.float64)
        b = np.asarray(list(references), dtype=np.float64)
        if a.ndim != 2 or a.shape != b.shape:
            raise ValueError(f"predictions shape {a.shape} vs references shape {b.shape}: expected two equal "
                             "(n_items, dim) matrices with row i of each describing the same item")
        if a.shape[0] < 2:
            raise ValueError(f"n_items={a.shape[0]}: retrieval needs at least 2 items")
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise ValueError("embeddings contain NaN or inf. Fix: check the encoder outputs")
        bad = [k for k in ks if int(k) < 1]
        if bad:
            raise ValueError(f"ks={list(ks)}: every k must be >= 1")
        n = a.shape[0]
        sim = cosine_similarity(a, b)
        forward, backward = _ranks(sim), _ranks(sim.T)
        out = {}
        for k in ks:
            kk = min(int(k), n)
            out[f"pred_to_ref_recall@{k}"] = float(np.mean(forward <= kk))
            out[f"ref_to_pred_recall@{k}"] = float(np.mean(backward <= kk))
            out[f"chance@{k}"] = kk / n
        out["pred_to_ref_median_rank"] = float(np.median(forward))
        out["ref_to_pred_median_rank"] = float(np.median(backward))
        out["n_items"] = int(n)
        out["pred_to_ref_ranks"] = forward.astype(int).tolist()  # per query, for intervals over queries
        out["ref_to_pred_ranks"] = backward.astype(int).tolist()
        return out
