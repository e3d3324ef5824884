"""SPATIA model, pipeline and dataset cards: offline rendering of ``huggingface_hub`` cards from templates.

``render_model_card`` / ``render_pipeline_card`` / ``render_dataset_card`` fill the templates in
``spatia_hf/templates/`` (also under ``model_cards/`` in the source tree) with ``huggingface_hub.ModelCard`` /
``DatasetCard``: YAML metadata (license, library, tags, datasets, ``model-index`` from evaluation results),
intended use, training data, limitations, how to load, citation. ``write_model_card`` writes the card
beside saved weights.

Evaluation results (``eval_results=`` or ``--eval-results results.json``) are plain data, never objects of
the evaluation package: a list of ``huggingface_hub.EvalResult`` or JSON of this form (``baselines``
optional, shown in the card body)::

    {"dataset": {"name": "synthetic tissue", "type": "org/data", "config": "cells", "split": "test"},
     "tasks": [{"task": "cell-type annotation (linear probe)", "task_type": "cell-type-annotation",
                "metrics": {"macro_f1": 0.91, "accuracy": 0.95},
                "baselines": {"pca+logreg": {"macro_f1": 0.80}}}]}

the short form ``{"task name": {"metric": value, ...}, ...}``, or the ``results.json`` (or report folder)
written by ``spatia_hf.evaluation.report`` (``"format": "spatia-hf-evaluation"``): SPATIA variants go to
``model-index``, baselines to the card's table.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, ModelCard, ModelCardData

from ..utils.io import atomic_write_text

SPATIA_ARXIV_ID = "2507.04704"


SPATIA_CITATION = """@article{kong2025spatia,
  title   = {SPATIA: Multimodal Model for Prediction and Generation of Spatial Cell Phenotypes},
  author  = {Kong, Zhenglun and Qiu, Mufan and Boesen, John and Lin, Xiang and Yun, Sukwon and
             Chen, Tianlong and Kellis, Manolis and Zitnik, Marinka},
  journal = {arXiv preprint arXiv:2507.04704},
  year    = {2025}
}"""


LIBRARY_NAME = "spatia-hf"


DEFAULT_LICENSE = "apache-2.0"


BASE_TAGS = ("spatia", "spatial-transcriptomics", "biology", "single-cell", "multimodal")


TEMPLATE_FILES = {"model": "model_card.md", "pipeline": "pipeline_card.md", "dataset": "dataset_card.md"}


EVALUATION_FORMAT = "spatia-hf-evaluation"  # the "format" of spatia_hf.evaluation.report's results.json


INTENDED_USE_MODEL = (
    "Research on image-based spatial transcriptomics: embeddings of cells, niches and whole sections for "
    "cell-type annotation, clustering, spatial-domain detection, gene imputation, image-to-expression "
    "prediction and cross-modal retrieval, or as the starting point for fine-tuning on a new panel or "
    "tissue. It is not a medical device and must not be used for diagnosis or treatment decisions.")


INTENDED_USE_PIPELINE = (
    "Research on the relation between gene expression and cell morphology: generating stain images of cells "
    "from expression profiles, and in-silico perturbation (editing the expression of chosen genes and "
    "comparing the generated morphology from the same noise). Generated images are model outputs, not "
    "measurements, and must not be used as data about real patients or for diagnosis.")


INTENDED_USE_DATASET = (
    "Pretraining, fine-tuning and evaluation of multi-scale models of image-based spatial transcriptomics "
    "(cells, niches, sections), e.g. with spatia-hf's `SpatiaModel` and its Trainer scripts.")


LIMITATIONS = (
    "- Inputs must match the training data: stain channels in the same order, crops at the same µm per pixel "
    "(positions are in µm), stains normalised per slide with robust percentiles.\n"
    "- Genes outside the checkpoint's vocabulary are mapped by symbol (or Ensembl id); unknown genes are "
    "counted and reported, not embedded. Panels that share few genes with the vocabulary transfer poorly.\n"
    "- Embeddings reflect the tissues, technologies and donors seen in training; batch effects between "
    "instruments and sites are not removed.")


LIMITATIONS_SYNTHETIC = (
    "\n- Trained or evaluated on the built-in synthetic tissue: its metrics show that the machinery works, "
    "not how the model does on real tissue.")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "task"


def load_eval_results(source: str | os.PathLike | Mapping | Sequence[EvalResult] | None, *,
                      dataset_name: str | None = None, dataset_type: str | None = None,
                      dataset_config: str | None = None, dataset_split: str | None = None
                      ) -> tuple[list[EvalResult], dict[tuple[str, str], dict[str, float]]]:
    """Evaluation results as ``EvalResult``s for ``model-index`` plus baselines per (task, metric).

    ``source`` is a path to a ``results.json``, its parsed content, or a list of ``EvalResult``. The
    ``dataset_*`` arguments fill what the JSON does not say (the ``dataset`` block wins).
    """
    if source is None:
        return [], {}
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():  # an evaluation report folder
            path = path / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"eval_results={os.fspath(path)!r} does not exist. Fix: pass the results.json "
                                    f"written by `spatia evaluate`")
        try:
            source = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"eval_results={os.fspath(path)!r} is not valid JSON ({err})") from None
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        results = list(source)
        bad = [r for r in results if not isinstance(r, EvalResult)]
        if bad:
            raise ValueError(f"eval_results list holds {type(bad[0]).__name__}, not EvalResult. Fix: pass "
                             f"huggingface_hub.EvalResult objects or a results.json mapping")
        return results, {}
    if not isinstance(source, Mapping):
        raise ValueError(f"eval_results of type {type(source).__name__} is not understood. Fix: pass a path, "
                         f"a mapping or a list of EvalResult")
    if source.get("format") == EVALUATION_FORMAT:
        return _from_evaluation_report(source, dataset_name=dataset_name, dataset_type=dataset_type,
                                       dataset_config=dataset_config, dataset_split=dataset_split)
    ds = dict(source.get("dataset") or {}) if isinstance(source.get("dataset"), Mapping) else {}
    d_name = ds.get("name") or dataset_name or "spatial transcriptomics dataset"
    d_type = ds.get("type") or dataset_type or _slug(d_name)
    d_config = ds.get("config") or dataset_config
    d_split = ds.get("split") or dataset_split
    if "tasks" in source:
        tasks = source["tasks"]
        if not isinstance(tasks, Sequence):
            raise ValueError("eval_results['tasks'] must be a list of {task, metrics, ...} objects")
    else:  # short form {task: {metric: value}}
        tasks = [{"task": k, "metrics": v} for k, v in source.items() if k != "dataset"]
    results: list[EvalResult] = []
    baselines: dict[tuple[str, str], dict[str, float]] = {}
    for i, task in enumerate(tasks):
        if not isinstance(task, Mapping) or not isinstance(task.get("metrics"), Mapping):
            raise ValueError(f"eval_results task #{i} ({task!r:.80}) has no 'metrics' mapping. Fix: give "
                             f"{{'task': name, 'metrics': {{'metric': value}}}}")
        name = str(task.get("task") or task.get("name") or f"task {i + 1}")
        for metric, value in task["metrics"].items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"eval_results: metric {metric!r} of task {name!r} is {value!r}, not a finite "
                                 f"number. Fix: write numbers (NaN/inf are not accepted by the Hub)")
            results.append(EvalResult(
                task_type=str(task.get("task_type") or _slug(name)), task_name=name,
                dataset_type=str(task.get("dataset_type") or d_type), dataset_name=str(task.get("dataset") or d_name),
                dataset_config=task.get("dataset_config") or d_config, dataset_split=task.get("split") or d_split,
                metric_type=_slug(str(metric)).replace("-", "_"), metric_name=str(metric),
                metric_value=round(float(value), 6)))
            for base, values in (task.get("baselines") or {}).items():
                if isinstance(values, Mapping) and isinstance(values.get(metric), (int, float)):
                    baselines.setdefault((name, str(metric)), {})[str(base)] = float(values[metric])
    return results, baselines


def report_eval_results(tasks: Sequence[Mapping], dataset_name: str, dataset_type: str | None = None,
                        methods: Sequence[str] | None = None, dataset_config: str | None = "cells",
                        dataset_split: str | None = "test", source_name: str | None = None,
                        source_url: str | None = None) -> list[EvalResult]:
    """``EvalResult`` entries (for ``ModelCardData(eval_results=...)``) from the task dicts of an evaluation
    ``results.json`` (``task``, ``key``, ``title``, ``metrics``, ``scores``, ``method_kinds``): one per task,
    chosen method (default: every SPATIA variant) and reported metric; undefined (None/NaN) scores are left
    out. ``source_name`` / ``source_url`` (both or neither, as the Hub requires) credit where it ran."""
    entries = []
    for t in sorted(tasks, key=lambda t: t["task"]):
        kinds = t.get("method_kinds") or {}
        chosen = [m for m in t["scores"] if (m in methods if methods is not None else kinds.get(m) == "spatia")]
        for m in chosen:
            for metric in t["metrics"]:
                value = t["scores"][m].get(metric)
                if value is None or math.isnan(value):
                    continue
                entries.append(EvalResult(
                    task_type=t["key"], task_name=t["title"], dataset_type=dataset_type or dataset_name,
                    dataset_name=dataset_name, dataset_config=dataset_config, dataset_split=dataset_split,
                    metric_type=metric, metric_value=round(float(value), 6),
                    metric_name=metric if m == "SPATIA" else f"{metric} ({m})", source_name=source_name,
                    source_url=source_url))
    return entries


def _from_evaluation_report(data: Mapping, **dataset) -> tuple[list[EvalResult], dict]:
    """``results.json`` of ``spatia_hf.evaluation.report``: every SPATIA variant's scores become
    ``EvalResult``s (undefined ones left out); baselines of the same task and metric go to the card table."""
    tasks = list(data.get("tasks", []))
    meta = data.get("meta") or {}
    name = dataset["dataset_name"] or meta.get("dataset") or "SPATIA evaluation data"
    kwargs = {k: v for k, v in (("dataset_config", dataset["dataset_config"]),
                                ("dataset_split", dataset["dataset_split"])) if v is not None}
    results = report_eval_results(tasks, dataset_name=str(name),
                                  dataset_type=dataset["dataset_type"] or meta.get("dataset_type"), **kwargs)
    baselines: dict[tuple, Any] = {}
    for t in tasks:
        kinds = t.get("method_kinds") or {}
        for metric in t["metrics"]:
            found = {m: _fmt(s[metric]) + _interval_text(t, m, metric) for m, s in t["scores"].items()
                     if kinds.get(m) == "baseline" and s.get(metric) is not None and math.isfinite(s[metric])}
            if found:
                baselines[(t["title"], metric)] = found
            for m in t["scores"]:  # SPATIA's own intervals, keyed like its EvalResult rows
                if kinds.get(m) == "spatia" and _interval_text(t, m, metric):
                    name = metric if m == "SPATIA" else f"{metric} ({m})"
                    baselines[(INTERVAL_KEY, t["title"], name)] = _interval_text(t, m, metric)
    return results, baselines


INTERVAL_KEY = "95% interval"  # baselines[(INTERVAL_KEY, task title, metric name)]: SPATIA's interval text


def _interval_text(task: Mapping, method: str, metric: str) -> str:
    """`` [lo, hi]`` of a method's metric in an evaluation results.json task (empty when not recorded)."""
    ci = ((task.get("intervals") or {}).get(method) or {}).get(metric)
    if not ci or any(v is None or not math.isfinite(v) for v in ci):
        return ""
    return f" [{_fmt(float(ci[0]))}, {_fmt(float(ci[1]))}]"


def _eval_rows(results: Sequence[EvalResult], baselines: Mapping) -> list[dict]:
    rows = []
    for r in results:
        base = baselines.get((r.task_name, r.metric_name), {})
        rows.append({"task": r.task_name or r.task_type, "dataset": r.dataset_name,
                     "split": r.dataset_split or "-", "metric": r.metric_name or r.metric_type,
                     "value": _fmt(r.metric_value) + baselines.get((INTERVAL_KEY, r.task_name, r.metric_name), ""),
                     "baselines": ", ".join(f"{k} {_fmt(v)}" for k, v in base.items()) or "-"})
    return rows


def template_path(kind: str) -> Path:
    """Path of the packaged card template for ``kind`` (model, pipeline or dataset)."""
    if kind not in TEMPLATE_FILES:
        raise ValueError(f"kind={kind!r} has no card template. Fix: use one of {sorted(TEMPLATE_FILES)}")
    return Path(str(resources.files("spatia_hf") / "templates" / TEMPLATE_FILES[kind]))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e7:
            return str(int(value))
        return f"{value:.4g}"
    return str(value)


def _human(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit} ({n:,})"
    return f"{n:,}"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("spatia-hf", "transformers", "diffusers", "torch", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


_BASE_CONFIG_KEYS: set[str] | None = None


def _base_config_keys() -> set[str]:
    """Keys every transformers config has (output flags, token ids, ...): not worth a card row."""
    global _BASE_CONFIG_KEYS
    if _BASE_CONFIG_KEYS is None:
        from transformers import PretrainedConfig

        _BASE_CONFIG_KEYS = set(PretrainedConfig().to_dict()) | {"architectures", "auto_map", "dtype", "torch_dtype",
                                                                 "transformers_version", "model_type"}
    return _BASE_CONFIG_KEYS


_TRAINING_FIELDS = re.compile(r"(dropout|_eps$|initializer_range|hidden_act|_prob$)")


def config_rows(config: Mapping[str, Any], prefix: str = "", limit: int = 48) -> list[tuple[str, str]]:
    """Flattened ``(field, value)`` rows of a config dict for the card: architecture fields only
    (nested sub-configs as ``cell_config.hidden_size``; gene lists, dropouts, epsilons and the fields
    every transformers config has are left to ``config.json``)."""
    rows: list[tuple[str, str]] = []
    base = _base_config_keys()
    for key, value in config.items():
        if key.startswith(("_", "gene")) or key in base or value is None or _TRAINING_FIELDS.search(key):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows.extend(config_rows(value, prefix=f"{name}.", limit=limit))
        elif isinstance(value, (list, tuple)):
            if len(value) <= 8 and all(isinstance(v, (int, float, str, bool)) for v in value):
                rows.append((name, ", ".join(_fmt(v) for v in value)))
            else:
                rows.append((name, f"list of {len(value)}"))
        else:
            rows.append((name, _fmt(value)))
    if not prefix and len(rows) > limit:
        rows = rows[:limit] + [("...", f"{len(rows) - limit} more fields in `config.json`")]
    return rows


def _labels(config: Mapping[str, Any]) -> str | None:
    """The class names of a classification head (``id2label``), unless they are transformers' defaults."""
    id2label = config.get("id2label") or {}
    names = [str(id2label[k]) for k in sorted(id2label, key=lambda k: int(k))] if id2label else []
    if not names or all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return None
    return f"{len(names)} ({', '.join(f'`{n}`' for n in names[:12])}{', ...' if len(names) > 12 else ''})"


def _find_genes(config: Mapping[str, Any]) -> list[str] | None:
    for key in ("gene_vocab", "genes", "gene_names"):
        if isinstance(config.get(key), list):
            return config[key]
    for value in config.values():
        if isinstance(value, Mapping):
            found = _find_genes(value)
            if found is not None:
                return found
    return None


def _gene_summary(config: Mapping[str, Any]) -> str:
    genes = _find_genes(config)
    if not genes:
        return "not recorded in the config"
    head = ", ".join(f"`{g}`" for g in genes[:8])
    return f"{len(genes)} genes ({head}{', ...' if len(genes) > 8 else ''})"


def safetensors_parameter_count(files: Iterable[str | os.PathLike]) -> int:
    """Number of parameters in safetensors files, read from their headers (weights are not loaded)."""
    from safetensors import safe_open

    total = 0
    for f in files:
        with safe_open(os.fspath(f), framework="pt") as st:
            for key in st.keys():
                total += math.prod(st.get_slice(key).get_shape())
    return total


def _public_names() -> set[str]:
    """Names ``from spatia_hf import ...`` offers; read from the loaded package (this module is part of it)."""
    return set(getattr(sys.modules.get("spatia_hf"), "__all__", ()))


def _class_import(class_name: str, module: str | None) -> str:
    if module and module.startswith("spatia_hf"):
        return f"from spatia_hf import {class_name}" if class_name in _public_names() else \
            f"from {module} import {class_name}"
    return f"from {(module or 'transformers').split('.')[0]} import {class_name}"


def _model_class(config: Mapping[str, Any], model: Any = None) -> tuple[str, str | None]:
    if model is not None:
        return type(model).__name__, type(model).__module__
    arch = (config.get("architectures") or [None])[0]
    if arch:
        import transformers

        module = "spatia_hf" if str(config.get("model_type", "")).startswith("spatia") else (
            "transformers" if hasattr(transformers, arch) else None)
        return arch, module
    return "AutoModel", "transformers"


def _is_synthetic(text: str | None) -> bool:
    return bool(text) and "synthetic" in text.lower()


def _training_and_limitations(training_data: str | None, dataset_id, what: str) -> tuple[str, str]:
    """A card's training-data sentence (``training_data``, else a link to the Hub dataset) and its
    limitations, with the synthetic-data caveat when either names synthetic data."""
    hub_id = dataset_id if isinstance(dataset_id, str) else None
    training = training_data or (f"Trained on [{hub_id}](https://huggingface.co/datasets/{hub_id})."
                                 if hub_id is not None else f"Not recorded with this {what}.")
    synthetic = _is_synthetic(training_data) or _is_synthetic(hub_id)
    return training, LIMITATIONS + (LIMITATIONS_SYNTHETIC if synthetic else "")


def _card_data_common(license: str, tags: Iterable[str], datasets: str | Sequence[str] | None,
                      extra_tags: Iterable[str] = ()) -> dict:
    all_tags = list(dict.fromkeys([*BASE_TAGS, *extra_tags, *tags]))
    ds = [datasets] if isinstance(datasets, str) else (list(datasets) if datasets else None)
    return {"license": license, "tags": all_tags, "datasets": ds}


def render_model_card(model_or_dir: Any, *, repo_id: str | None = None, eval_results: Any = None,
                      dataset_id: str | Sequence[str] | None = None, training_data: str | None = None,
                      license: str = DEFAULT_LICENSE, tags: Iterable[str] = (), base_model: str | None = None,
                      pipeline_tag: str | None = "feature-extraction", summary: str | None = None) -> ModelCard:
    """The model card of a SPATIA (or any transformers) model or saved checkpoint folder.

    Args:
        model_or_dir: a ``PreTrainedModel`` or a folder written by ``save_pretrained`` (its
            ``config.json`` and safetensors headers are read; weights are not loaded).
        repo_id: Hub id used in the card title and in the loading code.
        eval_results: ``results.json`` path, its content or a list of ``EvalResult`` (see module doc).
        dataset_id: Hub id(s) of the training data (``datasets:`` metadata).
        training_data: a sentence or paragraph on what the model was trained on.
    """
    model = None
    weight_files: list[Path] = []
    if isinstance(model_or_dir, (str, os.PathLike)):
        folder = Path(model_or_dir)
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{os.fspath(folder)!r} has no config.json. Fix: pass a folder written by "
                                    f"model.save_pretrained(...)")
        config = json.loads(config_file.read_text())
        weight_files = sorted(folder.glob("*.safetensors"))
        n_params = safetensors_parameter_count(weight_files) if weight_files else None
    else:
        model = model_or_dir
        config = model.config.to_dict()
        n_params = int(model.num_parameters()) if hasattr(model, "num_parameters") else None
    class_name, module = _model_class(config, model)
    model_type = str(config.get("model_type", "unknown"))
    is_spatia = model_type.startswith("spatia") or (module or "").startswith("spatia_hf")
    title = repo_id or f"SPATIA {model_type} model"
    results, baselines = load_eval_results(eval_results, dataset_type=dataset_id if isinstance(dataset_id, str)
                                           else None)
    versions = _versions()
    data = ModelCardData(
        **_card_data_common(license, tags, dataset_id, extra_tags=[model_type, "transformers"]),
        library_name=LIBRARY_NAME if is_spatia else "transformers", pipeline_tag=pipeline_tag,
        base_model=base_model, eval_results=results or None, model_name=title if results else None)
    load_id = repo_id or "path/to/checkpoint"
    lines = ["import spatia_hf  # registers the SPATIA classes with transformers' Auto classes"] if is_spatia else []
    snippet = "\n".join([*lines, _class_import(class_name, module), "",
                         f'model = {class_name}.from_pretrained("{load_id}")', "model.eval()"])
    training, limitations = _training_and_limitations(training_data, dataset_id, "checkpoint")
    return ModelCard.from_template(
        data, template_path=os.fspath(template_path("model")),
        title=title, arxiv_id=SPATIA_ARXIV_ID, citation=SPATIA_CITATION,
        summary=summary or f"A `{class_name}` checkpoint of SPATIA for image-based spatial transcriptomics.",
        model_class=class_name, model_type=model_type, n_parameters=_human(n_params),
        weight_files=", ".join(f"`{f.name}`" for f in weight_files) or None,
        gene_summary=_gene_summary(config), labels=_labels(config), spatia_version=versions["spatia-hf"],
        transformers_version=versions["transformers"], torch_version=versions["torch"],
        config_rows=config_rows(config), intended_use=INTENDED_USE_MODEL, training_data=training,
        eval_rows=_eval_rows(results, baselines), has_baselines=any(len(k) == 2 for k in baselines),
        eval_intro="Scores on held-out data (sections no training stage saw), with the baselines run in the same "
                   "evaluation where given; [lo, hi] is the 95% interval (bootstrap over scored cells, pooled over "
                   "seeds) where the evaluation recorded one.",
        limitations=limitations, load_snippet=snippet)


def write_model_card(save_dir: str | os.PathLike, model: Any = None, eval_results: Any = None, **card_kwargs) -> Path:
    """Render the card of ``model`` (or of the checkpoint in ``save_dir``) into ``save_dir/README.md``.

    Called after ``save_pretrained`` so a checkpoint folder documents itself; the file is written to a
    temporary name and renamed. ``card_kwargs`` go to ``render_model_card``.
    """
    save_dir = Path(save_dir)
    card = render_model_card(model if model is not None else save_dir, eval_results=eval_results, **card_kwargs)
    path = save_dir / "README.md"
    atomic_write_text(path, str(card))
    return path


@dataclass
class _Component:
    name: str
    library: str
    class_name: str
    parameters: str


def _pipeline_components(folder: Path) -> tuple[dict, list[_Component], int]:
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{os.fspath(folder)!r} has no model_index.json. Fix: pass a folder written by "
                                f"pipeline.save_pretrained(...)")
    index = json.loads(index_file.read_text())
    components, total = [], 0
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] is None:
            continue
        files = sorted((folder / name).glob("*.safetensors"))
        n = safetensors_parameter_count(files) if files else None
        total += n or 0
        components.append(_Component(name, str(value[0]), str(value[1]), _human(n) if n else "-"))
    return index, components, total


def render_pipeline_card(pipeline_or_dir: Any, *, repo_id: str | None = None, eval_results: Any = None,
                         dataset_id: str | Sequence[str] | None = None, training_data: str | None = None,
                         license: str = DEFAULT_LICENSE, tags: Iterable[str] = (), base_model: str | None = None,
                         summary: str | None = None, usage: str | None = None) -> ModelCard:
    """The model card of a generation pipeline (object or folder written by ``save_pretrained``).

    ``usage`` replaces the generation lines of the loading example (the default shows
    ``SpatiaGenerationPipeline``'s call with a perturbation).
    """
    if isinstance(pipeline_or_dir, (str, os.PathLike)):
        index, components, total = _pipeline_components(Path(pipeline_or_dir))
    else:
        with tempfile.TemporaryDirectory(prefix="spatia-card-") as tmp:
            pipeline_or_dir.save_pretrained(tmp, safe_serialization=True)
            index, components, total = _pipeline_components(Path(tmp))
    pipe_class = index.get("_class_name")
    pipe_class = pipe_class[1] if isinstance(pipe_class, list) else str(pipe_class)
    title = repo_id or "SPATIA generation pipeline"
    results, baselines = load_eval_results(eval_results)
    versions = _versions()
    data = ModelCardData(**_card_data_common(license, tags, dataset_id, extra_tags=["diffusers", "image-generation"]),
                         library_name=LIBRARY_NAME, pipeline_tag=None, base_model=base_model,
                         eval_results=results or None, model_name=title if results else None)
    load_id = repo_id or "path/to/pipeline"
    pipe_import = f"from spatia_hf import {pipe_class}"
    if pipe_class not in _public_names():
        module = next((c.library for c in components if c.library.startswith("spatia_hf")), None)
        pipe_import = f"import spatia_hf\nfrom {module or 'spatia_hf'} import {pipe_class}"
    default_usage = (
        "gen = torch.Generator().manual_seed(0)\n"
        "images = pipe(expression, gene_names=panel, num_inference_steps=30, generator=gen).images\n"
        "# perturbation: same noise, edited expression\n"
        "edited = pipe(expression, gene_names=panel, perturbation={\"GENE\": 4.0},\n"
        "              generator=torch.Generator().manual_seed(0)).images")
    snippet = (f"import torch\n{pipe_import}\n\npipe = {pipe_class}.from_pretrained(\"{load_id}\")\n"
               f"{usage if usage is not None else default_usage}").rstrip()
    training, limitations = _training_and_limitations(training_data, dataset_id, "pipeline")
    return ModelCard.from_template(
        data, template_path=os.fspath(template_path("pipeline")),
        title=title, arxiv_id=SPATIA_ARXIV_ID, citation=SPATIA_CITATION,
        summary=summary or f"A `{pipe_class}` that generates cell images from gene expression.",
        components=components, pipeline_class=pipe_class, n_parameters=_human(total or None),
        spatia_version=versions["spatia-hf"], diffusers_version=versions["diffusers"],
        torch_version=versions["torch"], intended_use=INTENDED_USE_PIPELINE, training_data=training,
        eval_rows=_eval_rows(results, baselines), has_baselines=any(len(k) == 2 for k in baselines),
        eval_intro="Scores of generated images on held-out cells.",
        limitations=limitations, load_snippet=snippet)


def render_dataset_card(dataset_dir: str | os.PathLike, *, repo_id: str | None = None,
                        license: str = DEFAULT_LICENSE, tags: Iterable[str] = (),
                        pretty_name: str | None = None) -> DatasetCard:
    """The Hub card of a built dataset folder: its own card (``configs`` YAML and the description the
    builder wrote) with license, tags, Hub loading code, intended use, limitations and citation added."""
    folder = Path(dataset_dir)
    readme = folder / "README.md"
    if not readme.is_file():
        raise FileNotFoundError(f"{os.fspath(folder)!r} has no README.md. Fix: pass a folder written by "
                                f"spatia_hf.data.builder.build_multiscale_dataset (or `spatia convert`)")
    own = DatasetCard.load(readme)
    meta = own.data.to_dict()
    if not meta.get("configs"):
        raise ValueError(f"{os.fspath(readme)!r} lists no `configs` in its YAML, so load_dataset cannot find the "
                         f"Parquet shards. Fix: rebuild the dataset with spatia_hf.data.builder")
    meta["license"] = license
    meta["tags"] = list(dict.fromkeys([*(meta.get("tags") or []), *BASE_TAGS, *tags]))
    if pretty_name:
        meta["pretty_name"] = pretty_name
    technologies = ""
    sections_file = folder / "sections.json"
    if sections_file.is_file():
        try:
            technologies = json.dumps([s.get("technology") for s in json.loads(sections_file.read_text())
                                       .get("sections", [])])
        except (json.JSONDecodeError, AttributeError):
            technologies = ""
    configs = [c["config_name"] for c in meta["configs"]]
    load_id = repo_id or "path/to/dataset"
    snippet = "\n".join([
        "from datasets import load_dataset",
        "",
        *[f'{c} = load_dataset("{load_id}", "{c}", split="train")' for c in configs],
        "",
        "# the genes that `gene_indices` refer to, and what was dropped per section",
        "from spatia_hf.data.gene_panel import read_gene_panel",
        f'panel = read_gene_panel("{load_id}")',
    ])
    limitations = ("- Images are normalised per section (robust percentiles) and stored as uint8; pixel sizes are in "
                   "`pixel_size_um`.\n- Expression is raw counts of the listed panel; genes outside it were not "
                   "measured.")
    if "synthetic" in technologies:
        limitations += ("\n- Built from the spatia-hf synthetic tissue generator: cell types, domains and "
                        "morphology are simulated, with ground truth in `sections.json`.")
    return DatasetCard.from_template(
        DatasetCardData(**meta), template_path=os.fspath(template_path("dataset")),
        dataset_description=own.text.strip("\n") + "\n", load_snippet=snippet, intended_use=INTENDED_USE_DATASET,
        limitations=limitations, license=license, arxiv_id=SPATIA_ARXIV_ID, citation=SPATIA_CITATION)

