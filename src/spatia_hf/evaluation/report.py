"""The evaluation report: ``report.md`` (score tables and pictures), ``results.json`` (every score,
round-trippable) and ``huggingface_hub.EvalResult`` entries for a model card's ``model-index``.

Layout of ``REPORT_DIR``::

    report.md        summary (per task: SPATIA vs the best baseline) and one section per task
    results.json     {"format", "version", "spatia_hf_version", "meta", "tasks": [...], "figures": {...}}
    figures/*.png    pictures referenced by report.md

Both files are written to temporary names and renamed, so a reader never sees half a report.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from .intervals import LEVEL, separated
from .tasks import TASKS, TaskResult, higher_is_better
from ..utils.io import atomic_write_text

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
FIGURES_DIR = "figures"
FORMAT = "spatia-hf-evaluation"
VERSION = 1
MAX_EXTRA_COLUMNS = 2  # per-task table: the task's metrics plus at most this many others


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.3f}" if abs(v) < 1000 else f"{v:.4g}"


def _fmt_ci(r: TaskResult, method: str | None, metric: str | None = None) -> str:
    """``mean [lo, hi]`` of a method's metric (the interval when recorded)."""
    if method is None:
        return "–"
    metric = metric or r.primary_metric
    text = _fmt(r.scores.get(method, {}).get(metric))
    ci = r.interval(method, metric)
    if ci is not None and not any(v is None or math.isnan(v) for v in ci):
        text += f" [{_fmt(ci[0])}, {_fmt(ci[1])}]"
    return text


def verdict(r: TaskResult) -> str:
    """Which side wins the headline metric: named only when the intervals separate."""
    if r.not_estimable:
        return "not estimable"
    s_name, s_val = r.best("spatia")
    b_name, b_val = r.best("baseline")
    if s_name is None or b_name is None:
        return "–"
    if r.interval(s_name) is None or r.interval(b_name) is None:
        return "no interval drawn"
    if not separated(r.interval(s_name), r.interval(b_name)):
        return "no winner (intervals overlap)"
    spatia_better = (s_val > b_val) == higher_is_better(r.primary_metric)
    return "**SPATIA**" if spatia_better else "**baseline**"


def summary_rows(results: Sequence[TaskResult]) -> list[dict[str, Any]]:
    """Per task (all 12): headline metric, best SPATIA variant and best baseline with their intervals,
    the winner (only when the intervals separate) and why a task is not estimable; ``ran`` is False
    for tasks that did not run."""
    by_number = {r.task: r for r in results}
    rows = []
    for number, spec in TASKS.items():
        r = by_number.get(number)
        s_name, s_val = r.best("spatia") if r else (None, math.nan)
        b_name, b_val = r.best("baseline") if r else (None, math.nan)
        rows.append({"task": number, "title": spec.title, "metric": spec.primary, "spatia": s_val,
                     "spatia_interval": r.interval(s_name) if r else None, "spatia_method": s_name,
                     "best_baseline": b_val, "baseline_interval": r.interval(b_name) if r else None,
                     "baseline_method": b_name, "winner": verdict(r).strip("*") if r else None,
                     "not_estimable": r.not_estimable if r else None, "ran": r is not None})
    return rows


def format_value(value: float | None, interval: Sequence[float] | None = None) -> str:
    """``0.912 [0.890, 0.931]`` (``-`` for a missing value) for console tables."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value:.3f}"
    if interval is not None and not any(v is None or math.isnan(v) for v in interval):
        text += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
    return text


def results_to_json(results: Sequence[TaskResult], meta: Mapping[str, Any] | None = None,
                    figures: Mapping[str, str] | None = None) -> dict:
    """The content of ``results.json``."""
    from ..utils.version import __version__

    numbers = [r.task for r in results]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"results hold task numbers {numbers}: each task may appear once")
    return {"format": FORMAT, "version": VERSION, "spatia_hf_version": __version__, "meta": dict(meta or {}),
            "tasks": [r.to_dict() for r in sorted(results, key=lambda r: r.task)], "figures": dict(figures or {})}


def load_results(path: str | Path) -> tuple[list[TaskResult], dict]:
    """``(task results, whole JSON)`` of a ``results.json`` file or a report directory."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist. Fix: run the evaluation (write_report) first")
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: format={data.get('format')!r}, expected {FORMAT!r} (not a spatia-hf results file)")
    if data.get("version", 0) > VERSION:
        raise ValueError(f"{path}: version {data['version']} is newer than this spatia-hf reads ({VERSION}). "
                         "Fix: upgrade spatia-hf")
    return [TaskResult.from_dict(t) for t in data["tasks"]], data


def _summary_table(results: Mapping[int, TaskResult]) -> list[str]:
    lines = ["| # | task | metric | SPATIA | best baseline | baseline method | winner |",
             "|---|---|---|---|---|---|---|"]
    for number, spec in TASKS.items():
        r = results.get(number)
        if r is None:
            lines.append(f"| {number} | {spec.title} | {spec.primary} | not run | not run | | |")
            continue
        arrow = "↑" if higher_is_better(r.primary_metric) else "↓"
        if r.not_estimable:
            lines.append(f"| {number} | {r.title} | {r.primary_metric} {arrow} | not estimable | not estimable | | "
                         "not estimable (see the task) |")
            continue
        spatia_name, _ = r.best("spatia")
        base_name, _ = r.best("baseline")
        spatia_cell = _fmt_ci(r, spatia_name) + (f" ({spatia_name})" if spatia_name and spatia_name != "SPATIA" else "")
        lines.append(f"| {number} | {r.title} | {r.primary_metric} {arrow} | {spatia_cell} | "
                     f"{_fmt_ci(r, base_name)} | {base_name or '–'} | {verdict(r)} |")
    return lines


def _task_section(r: TaskResult, figures: Mapping[str, str]) -> list[str]:
    metrics = list(r.metrics)
    extras = []
    for scores in r.scores.values():  # extra metrics some methods report (e.g. pearson_median); all in JSON
        extras += [m for m in scores if m not in metrics and m not in extras]
    metrics += extras[:MAX_EXTRA_COLUMNS]
    arrows = ["↑" if higher_is_better(m) else "↓" for m in metrics]
    if r.not_estimable:
        split = ", ".join(f"{k}={v}" for k, v in r.split.items() if v not in (None, [], ""))
        return [f"### {r.task}. {r.title}", "", f"**Not estimable**: {r.not_estimable}", "",
                f"Data: {split or 'see notes'}."] + [f"- {n}" for n in r.notes] + [""]
    lines = [f"### {r.task}. {r.title}", "",
             "| method | kind | " + " | ".join(f"{m} {a}" for m, a in zip(metrics, arrows)) + " |",
             "|---|---|" + "---|" * len(metrics)]
    sign = 1.0 if higher_is_better(r.primary_metric) else -1.0
    order = sorted(r.scores, key=lambda m: (r.method_kinds.get(m) != "spatia",
                                            -sign * _nan_last(r.scores[m].get(r.primary_metric))))
    for m in order:
        cells = " | ".join(_fmt_ci(r, m, k) for k in metrics)
        lines.append(f"| {m} | {r.method_kinds.get(m, '')} | {cells} |")
    split = ", ".join(f"{k}={v}" for k, v in r.split.items() if v not in (None, [], ""))
    lines += ["", f"Scored on: {split or 'see notes'}."]
    lines += [f"- {n}" for n in r.notes]
    for name, rel in figures.items():
        if name.startswith(f"task{r.task:02d}"):
            lines += ["", f"![{name}]({rel})"]
    return lines + [""]


def _nan_last(v: float | None) -> float:
    return -math.inf if v is None or math.isnan(v) else v


def render_markdown(results: Sequence[TaskResult], meta: Mapping[str, Any] | None = None,
                    figures: Mapping[str, str] | None = None) -> str:
    """The text of ``report.md``."""
    from ..utils.version import __version__

    by_number = {r.task: r for r in results}
    figures = dict(figures or {})
    lines = ["# SPATIA evaluation report", "", f"spatia-hf {__version__}."]
    for k, v in (meta or {}).items():
        if isinstance(v, Mapping) and v and all(isinstance(x, (list, type(None))) for x in v.values()):
            lines.append(f"- {k}:")  # e.g. the sections that trained each checkpoint
            lines += [f"  - {role}: {x if x is not None else 'not recorded'}" for role, x in v.items()]
        else:
            lines.append(f"- {k}: {v}")
    lines += ["", "## Summary", "",
              "Headline metric per task (↑ higher is better, ↓ lower is better): the best SPATIA variant and "
              "the best baseline, scored on the same cells of sections no training stage saw, with the same "
              f"seeds; each cell is the mean over seeds and a {LEVEL:.0%} interval (bootstrap over the scored "
              "items, pooled over seeds). A winner is named only when the two intervals do not overlap. "
              "References (oracles, nulls) bound the scale and are not baselines.", ""]
    lines += _summary_table(by_number)
    general = [(n, rel) for n, rel in figures.items() if not n.startswith("task")]
    if general:
        lines += ["", "## Pictures", ""] + [f"![{n}]({rel})" for n, rel in general]
    lines += ["", "## Tasks", ""]
    for number in sorted(by_number):
        lines += _task_section(by_number[number], figures)
    return "\n".join(lines).rstrip() + "\n"


def write_report(results: Sequence[TaskResult], report_dir: str | Path, meta: Mapping[str, Any] | None = None,
                 figures: Mapping[str, str | Path] | None = None) -> Path:
    """Write ``report.md`` and ``results.json`` into ``report_dir`` (pictures are expected under
    ``report_dir/figures``, e.g. drawn by :mod:`spatia_hf.evaluation.plots`); returns the report path.

    ``figures`` maps a name to a PNG path; names starting with ``taskNN`` are shown in that task's
    section, the others under "Pictures".
    """
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    rel = {}
    for name, p in (figures or {}).items():
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"figure {name!r}: {p} does not exist")
        try:
            rel[name] = p.resolve().relative_to(report_dir.resolve()).as_posix()
        except ValueError as err:
            raise ValueError(f"figure {name!r}: {p} is outside {report_dir}. Fix: draw it under "
                             f"{report_dir / FIGURES_DIR}") from err
    data = results_to_json(results, meta, rel)
    atomic_write_text(report_dir / RESULTS_FILE, json.dumps(data, indent=1, allow_nan=False) + "\n")
    atomic_write_text(report_dir / REPORT_FILE, render_markdown(results, meta, rel))
    return report_dir / REPORT_FILE


def results_to_eval_results(results: Sequence[TaskResult] | str | Path, dataset_name: str,
                            dataset_type: str | None = None, methods: Sequence[str] | None = None,
                            dataset_config: str | None = "cells", dataset_split: str | None = "test",
                            source_name: str | None = None, source_url: str | None = None) -> list:
    """``huggingface_hub.EvalResult`` entries (for ``ModelCardData(eval_results=...)``) of the given
    methods (default: every SPATIA variant), one per task and reported metric; undefined (NaN)
    scores are left out. ``results`` may be task results or a results.json / report directory.
    ``source_name`` / ``source_url`` (both or neither, as the Hub requires) credit where the
    evaluation ran, e.g. the report's URL."""
    from ..hub.cards import report_eval_results

    if isinstance(results, (str, Path)):
        results = load_results(results)[0]
    return report_eval_results([r.to_dict() for r in results], dataset_name, dataset_type=dataset_type,
                               methods=methods, dataset_config=dataset_config, dataset_split=dataset_split,
                               source_name=source_name, source_url=source_url)
