"""Loader of the ``evaluate`` metric modules shipped inside the package (``evaluation/metrics/<name>/``).

``evaluate.load("accuracy")`` fetches from the Hub and fails offline; ``load_metric("accuracy")``
loads the package's own copy by local path, so evaluation runs without a network. ``evaluate`` is
imported here lazily (it costs seconds), never at ``import spatia_hf``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

METRICS_DIR = Path(__file__).parent  # evaluation/metrics/: one folder per metric module
# Only metrics that add something to sklearn/scipy live here (accuracy, macro-F1, ARI and NMI are
# plain sklearn.metrics calls in the task code).
METRIC_NAMES = (
    "per_gene_correlation",
    "recall_at_k",
    "feature_fid_kid",
    "morphology_shift",
)


def metric_path(name: str) -> Path:
    """Folder of the metric module ``name`` inside the installed package."""
    if name not in METRIC_NAMES:
        raise ValueError(f"metric {name!r} is not shipped with spatia-hf. Fix: use one of {list(METRIC_NAMES)}")
    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        raise FileNotFoundError(f"{path / (name + '.py')} is missing: the package was installed without its "
                                "metric modules. Fix: reinstall spatia-hf (package-data evaluation/metrics/*/*.py)")
    return path


@functools.lru_cache(maxsize=None)
def load_metric(name: str):
    """The ``evaluate.EvaluationModule`` of the shipped metric ``name`` (cached: loading copies and
    imports the module, which takes a moment). Kept in memory: no Arrow cache files are written."""
    import evaluate

    return evaluate.load(str(metric_path(name)), keep_in_memory=True)


def compute_metric(name: str, **inputs: Any) -> dict:
    """``load_metric(name).compute(**inputs)``: one call for the task code."""
    return load_metric(name).compute(**inputs)


def compute_metric_arrays(name: str, **inputs: Any) -> dict:
    """The metric's own computation on in-memory arrays, without ``evaluate``'s Arrow round trip of the
    inputs (milliseconds instead of tens of them): for the hundreds of bootstrap draws of an interval."""
    return load_metric(name)._compute(**inputs)

