"""Evaluation of SPATIA: the 12 tasks, honest baselines, ``evaluate`` metric modules, the report.

Modules (import what you need; nothing here is imported by ``import spatia_hf``, and ``evaluate`` is
loaded only when a metric is first used):

- ``metrics``: ``load_metric(name)`` loads the metric modules shipped in ``evaluation/metrics/`` offline;
- ``tasks``: one function per task over arrays from any number of methods, returning ``TaskResult``;
- ``splits``: section / cell / leave-one-section-out splits; ``arrays``: dataset rows -> arrays;
- ``baselines``: PCA, log1p, image CNN, pixels, spatial smoothing, imputers, ridge, PCA-CCA, ...;
- ``suite``: ``prepare_suite`` + ``run_suite`` (+ ``evaluate_dataset``) run all tasks on a dataset;
- ``report`` / ``plots``: ``report.md``, ``results.json``, pictures, model-index ``EvalResult`` entries;
- ``generation`` / ``morphology``: measuring generated cells (tasks 11-12).
"""
