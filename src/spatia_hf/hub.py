"""Publishing SPATIA models, generation pipelines and datasets on the Hugging Face Hub.

- Cards: ``render_model_card`` / ``render_pipeline_card`` / ``render_dataset_card`` fill the templates
  in ``spatia_hf/templates/`` (also under ``model_cards/`` in the source tree) with
  ``huggingface_hub.ModelCard`` / ``DatasetCard``: YAML metadata (license, library, tags, datasets,
  ``model-index`` from evaluation results), intended use, training data, limitations, how to load,
  citation. Rendering is offline. ``write_model_card`` writes the card beside saved weights.
- Pushing: ``push_model``, ``push_pipeline``, ``push_dataset`` (and ``spatia push``) check the repo id
  and the token before any network call, create the repo (and branch), then make ONE commit with
  ``HfApi.create_commit``: the files of the checkpoint or dataset folder as they are, plus the freshly
  rendered card. Local files are only read, so a push that fails half-way leaves them untouched
  (nothing is renamed, rewritten or staged in place). Pickled weights are refused (safetensors only).
  A dataset folder is uploaded as built (Parquet shards + card + ``gene_panel.json`` + ``sections.json``)
  rather than re-sharded by ``DatasetDict.push_to_hub``, so the gene panel travels with the data and
  ``load_dataset("org/name", "cells")`` reads it; an in-memory ``DatasetDict`` goes through its own
  ``push_to_hub``.
- Loading from a Hub id: models load with ``from_pretrained`` as usual. Pipelines whose components
  are classes of this package need ``SpatiaPipelineHubMixin`` (see its docstring for the diffusers
  0.42 failure it fixes). Datasets: ``resolve_dataset_dir`` / ``load_gene_panel`` /
  ``load_spatia_dataset`` accept a local folder or a Hub id (downloaded once, then read offline).

Evaluation results (``eval_results=`` or ``--eval-results results.json``) may be a list of
``huggingface_hub.EvalResult`` or JSON of this form (``baselines`` optional, shown in the card body)::

    {"dataset": {"name": "synthetic tissue", "type": "org/data", "config": "cells", "split": "test"},
     "tasks": [{"task": "cell-type annotation (linear probe)", "task_type": "cell-type-annotation",
                "metrics": {"macro_f1": 0.91, "accuracy": 0.95},
                "baselines": {"pca+logreg": {"macro_f1": 0.80}}}]}

the short form ``{"task name": {"metric": value, ...}, ...}``, or the ``results.json`` (or report folder)
written by ``spatia_hf.evaluation.report`` (``"format": "spatia-hf-evaluation"``): SPATIA variants go to
``model-index``, baselines to the card's table.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    CommitOperationDelete,
    DatasetCard,
    DatasetCardData,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
)

if TYPE_CHECKING:  # pragma: no cover
    import datasets

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
# Pickle-based weight files: never uploaded (the project's weights are safetensors only).
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt")
# Trainer bookkeeping that may sit in an output folder and never belongs in a published checkpoint.
SKIPPED_PATTERNS = (".*", "*/.*", "__pycache__/*", "*/__pycache__/*", "checkpoint-*/*", "runs/*", "*.tmp*",
                    "training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state*.pth", "scaler.pt",
                    "trainer_state.json", "README.md")
# Remote files a push replaces: stale ones of these kinds are deleted so the repo mirrors the folder.
EVALUATION_FORMAT = "spatia-hf-evaluation"  # the "format" of spatia_hf.evaluation.report's results.json
MANAGED_PATTERNS = {"model": ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json"),
                    "pipeline": ("*.safetensors", "*.safetensors.index.json", "*/config.json", "*_config.json",
                                 "model_index.json"),
                    "dataset": ("*.parquet", "gene_panel.json", "sections.json")}
_REPO_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?$")

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


# --------------------------------------------------------------------------------------------
# checks done before any network call
# --------------------------------------------------------------------------------------------
def validate_repo_id(repo_id: str) -> str:
    """Check that ``repo_id`` is ``ORG/NAME`` with characters the Hub accepts; return it unchanged."""
    example = "e.g. 'my-lab/spatia-tiny'"
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise ValueError(f"repo_id={repo_id!r} is not of the form ORG/NAME. Fix: pass the namespace (user or "
                         f"organisation) and the repo name, {example}")
    for part, what in zip(repo_id.split("/"), ("namespace", "name")):
        if not _REPO_PART.match(part) or ".." in part or "--" in part or len(part) > 96:
            raise ValueError(
                f"repo_id={repo_id!r}: the {what} {part!r} is invalid. Fix: use letters, digits, '-', '_' and '.' "
                f"(no leading/trailing '-' or '.', no '--' or '..', at most 96 characters), {example}")
    if repo_id.endswith(".git"):
        raise ValueError(f"repo_id={repo_id!r} ends with '.git'. Fix: drop the suffix")
    return repo_id


def resolve_token(token: str | None = None) -> str:
    """The token to push with: ``token``, else ``HF_TOKEN``, else the one saved by ``hf auth login``."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise ValueError("no Hugging Face token: pushing needs a token with write access. Fix: pass --token / "
                         "token=..., set the HF_TOKEN environment variable, or run `hf auth login`")
    return token


# --------------------------------------------------------------------------------------------
# evaluation results
# --------------------------------------------------------------------------------------------
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


def _from_evaluation_report(data: Mapping, **dataset) -> tuple[list[EvalResult], dict]:
    """``results.json`` of ``spatia_hf.evaluation.report``: every SPATIA variant's scores become
    ``EvalResult``s (NaN left out); baselines of the same task and metric go to the card table."""
    from .evaluation.report import results_to_eval_results
    from .evaluation.tasks import TaskResult

    tasks = [TaskResult.from_dict(t) for t in data.get("tasks", [])]
    meta = data.get("meta") or {}
    name = dataset["dataset_name"] or meta.get("dataset") or "SPATIA evaluation data"
    kwargs = {k: v for k, v in (("dataset_config", dataset["dataset_config"]),
                                ("dataset_split", dataset["dataset_split"])) if v is not None}
    results = results_to_eval_results(tasks, dataset_name=str(name),
                                      dataset_type=dataset["dataset_type"] or meta.get("dataset_type"), **kwargs)
    baselines: dict[tuple[str, str], dict[str, float]] = {}
    for r in tasks:
        for metric in r.metrics:
            found = {m: s[metric] for m, s in r.scores.items()
                     if r.method_kinds.get(m) == "baseline" and metric in s and math.isfinite(s[metric])}
            if found:
                baselines[(r.title, metric)] = found
    return results, baselines


def _eval_rows(results: Sequence[EvalResult], baselines: Mapping) -> list[dict]:
    rows = []
    for r in results:
        base = baselines.get((r.task_name, r.metric_name), {})
        rows.append({"task": r.task_name or r.task_type, "dataset": r.dataset_name,
                     "split": r.dataset_split or "-", "metric": r.metric_name or r.metric_type,
                     "value": _fmt(r.metric_value),
                     "baselines": ", ".join(f"{k} {_fmt(v)}" for k, v in base.items()) or "-"})
    return rows


# --------------------------------------------------------------------------------------------
# card rendering
# --------------------------------------------------------------------------------------------
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


# Fields that say how a model was trained or regularised rather than what it is: left to config.json.
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


def _class_import(class_name: str, module: str | None) -> str:
    if module and module.startswith("spatia_hf"):
        import spatia_hf

        return f"from spatia_hf import {class_name}" if hasattr(spatia_hf, class_name) else \
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
        eval_rows=_eval_rows(results, baselines), has_baselines=bool(baselines),
        eval_intro="Scores on held-out data, with the baselines run in the same evaluation where given.",
        limitations=limitations, load_snippet=snippet)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_model_card(save_dir: str | os.PathLike, model: Any = None, eval_results: Any = None, **card_kwargs) -> Path:
    """Render the card of ``model`` (or of the checkpoint in ``save_dir``) into ``save_dir/README.md``.

    Called after ``save_pretrained`` so a checkpoint folder documents itself; the file is written to a
    temporary name and renamed. ``card_kwargs`` go to ``render_model_card``.
    """
    save_dir = Path(save_dir)
    card = render_model_card(model if model is not None else save_dir, eval_results=eval_results, **card_kwargs)
    path = save_dir / "README.md"
    _atomic_write_text(path, str(card))
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
    try:
        import spatia_hf

        if not hasattr(spatia_hf, pipe_class):
            module = next((c.library for c in components if c.library.startswith("spatia_hf")), None)
            pipe_import = f"import spatia_hf\nfrom {module or 'spatia_hf'} import {pipe_class}"
    except ImportError:  # pragma: no cover - the package imports itself
        pass
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
        eval_rows=_eval_rows(results, baselines), has_baselines=bool(baselines),
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
        "from spatia_hf.hub import load_gene_panel",
        f'panel = load_gene_panel("{load_id}")',
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


# --------------------------------------------------------------------------------------------
# pushing
# --------------------------------------------------------------------------------------------
def _matches(path: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) for p in patterns)


def folder_files(folder: str | os.PathLike) -> dict[str, Path]:
    """Files of ``folder`` to publish (``path_in_repo -> local path``): hidden files, Trainer state and the
    README (re-rendered) are skipped; pickled weights raise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{os.fspath(folder)!r} is not a folder. Fix: pass the folder written by "
                                f"save_pretrained or by the dataset builder")
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    files = {k: v for k, v in files.items() if not _matches(k, SKIPPED_PATTERNS)}
    pickled = [k for k in files if _matches(k, PICKLE_PATTERNS)]
    if pickled:
        raise ValueError(f"{os.fspath(folder)!r} holds pickled weights {pickled[:5]}; spatia-hf publishes "
                         f"safetensors only. Fix: re-save with save_pretrained(safe_serialization=True) and "
                         f"remove the pickle files")
    return files


def _check_folder(kind: str, files: Mapping[str, Path], folder: Path) -> None:
    where = os.fspath(folder)
    if kind == "model":
        if "config.json" not in files:
            raise FileNotFoundError(f"{where!r} has no config.json. Fix: pass a folder written by "
                                    f"model.save_pretrained(...)")
        if not any(k.endswith(".safetensors") for k in files):
            raise FileNotFoundError(f"{where!r} has no *.safetensors weights. Fix: save with "
                                    f"model.save_pretrained(folder) (safetensors is the default)")
    elif kind == "pipeline":
        if "model_index.json" not in files:
            raise FileNotFoundError(f"{where!r} has no model_index.json. Fix: pass a folder written by "
                                    f"pipeline.save_pretrained(...)")
    elif kind == "dataset":
        from .data.schema import GENE_PANEL_FILE

        if GENE_PANEL_FILE not in files:
            raise FileNotFoundError(f"{where!r} has no {GENE_PANEL_FILE}. Fix: pass a folder written by the "
                                    f"dataset builder (`spatia convert ...`)")
        if not any(k.endswith(".parquet") for k in files):
            raise FileNotFoundError(f"{where!r} has no Parquet shards. Fix: pass a built dataset folder")


def _commit(kind: str, repo_id: str, files: Mapping[str, Path | bytes], *, token: str, private: bool | None,
            revision: str | None, commit_message: str | None, commit_description: str | None = None,
            create_pr: bool = False) -> CommitInfo:
    """Create the repo (and branch), then commit ``files`` in one go, deleting stale managed files."""
    repo_type = "dataset" if kind == "dataset" else "model"
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    branch = revision or "main"
    if branch != "main":
        api.create_branch(repo_id, branch=branch, repo_type=repo_type, exist_ok=True)
    remote = api.list_repo_files(repo_id, repo_type=repo_type, revision=branch)
    stale = [p for p in remote if p not in files and _matches(p, MANAGED_PATTERNS[kind])]
    operations: list = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=src if isinstance(src, bytes)
                                           else os.fspath(src)) for p, src in files.items()]
    operations += [CommitOperationDelete(path_in_repo=p) for p in stale]
    message = commit_message or f"Upload SPATIA {kind} with spatia-hf"
    return api.create_commit(repo_id, operations, commit_message=message, commit_description=commit_description,
                             repo_type=repo_type, revision=branch, create_pr=create_pr)


def push_model(model_or_dir: Any, repo_id: str, *, token: str | None = None, private: bool | None = None,
               revision: str | None = None, commit_message: str | None = None,
               commit_description: str | None = None, create_pr: bool = False, keep_card: bool = False,
               **card_kwargs) -> CommitInfo:
    """Push a model (object, saved in a temporary folder first) or a checkpoint folder with its card.

    The repo id and token are checked before any network call. ``revision`` is the branch to commit
    to (created from ``main`` if missing). The card is rendered for ``repo_id`` (``card_kwargs`` go to
    ``render_model_card``, e.g. ``eval_results``); ``keep_card=True`` uploads the folder's own
    README.md instead. Returns the ``CommitInfo``.
    """
    validate_repo_id(repo_id)
    token = resolve_token(token)
    if isinstance(model_or_dir, (str, os.PathLike)):
        return _push_folder("model", Path(model_or_dir), repo_id, token=token, private=private, revision=revision,
                            commit_message=commit_message, commit_description=commit_description,
                            create_pr=create_pr, keep_card=keep_card, card_kwargs=card_kwargs)
    with tempfile.TemporaryDirectory(prefix="spatia-push-") as tmp:
        model_or_dir.save_pretrained(tmp, **({"model_card": False} if _accepts(model_or_dir.save_pretrained,
                                                                                "model_card") else {}))
        card = render_model_card(model_or_dir, repo_id=repo_id, **card_kwargs)
        return _push_folder("model", Path(tmp), repo_id, token=token, private=private, revision=revision,
                            commit_message=commit_message, commit_description=commit_description,
                            create_pr=create_pr, card=card)


def push_pipeline(pipeline_or_dir: Any, repo_id: str, *, token: str | None = None, private: bool | None = None,
                  revision: str | None = None, commit_message: str | None = None,
                  commit_description: str | None = None, create_pr: bool = False, keep_card: bool = False,
                  **card_kwargs) -> CommitInfo:
    """Push a diffusers pipeline (object or ``save_pretrained`` folder) with its card; see ``push_model``."""
    validate_repo_id(repo_id)
    token = resolve_token(token)
    if isinstance(pipeline_or_dir, (str, os.PathLike)):
        return _push_folder("pipeline", Path(pipeline_or_dir), repo_id, token=token, private=private,
                            revision=revision, commit_message=commit_message,
                            commit_description=commit_description, create_pr=create_pr, keep_card=keep_card,
                            card_kwargs=card_kwargs)
    with tempfile.TemporaryDirectory(prefix="spatia-push-") as tmp:
        pipeline_or_dir.save_pretrained(tmp, safe_serialization=True)
        return _push_folder("pipeline", Path(tmp), repo_id, token=token, private=private, revision=revision,
                            commit_message=commit_message, commit_description=commit_description,
                            create_pr=create_pr, card_kwargs=card_kwargs)


def push_dataset(dataset: "str | os.PathLike | datasets.DatasetDict", repo_id: str, *, token: str | None = None,
                 private: bool | None = None, revision: str | None = None, commit_message: str | None = None,
                 commit_description: str | None = None, create_pr: bool = False, keep_card: bool = False,
                 gene_panel: str | os.PathLike | Mapping | None = None, **card_kwargs) -> CommitInfo:
    """Push a built dataset folder as it is (one commit), or a ``DatasetDict`` with its ``push_to_hub``.

    For a ``DatasetDict``, ``gene_panel`` (a ``gene_panel.json`` path or its content) is uploaded beside
    the data in a second commit, since ``push_to_hub`` knows nothing of it.
    """
    validate_repo_id(repo_id)
    token = resolve_token(token)
    if isinstance(dataset, (str, os.PathLike)):
        return _push_folder("dataset", Path(dataset), repo_id, token=token, private=private, revision=revision,
                            commit_message=commit_message, commit_description=commit_description,
                            create_pr=create_pr, keep_card=keep_card, card_kwargs=card_kwargs)
    from .data.schema import GENE_PANEL_FILE

    info = dataset.push_to_hub(repo_id, token=token, private=private, revision=revision, create_pr=create_pr,
                               commit_message=commit_message or "Upload SPATIA dataset with spatia-hf",
                               commit_description=commit_description)
    if gene_panel is None:
        return info
    content = Path(gene_panel).read_bytes() if isinstance(gene_panel, (str, os.PathLike)) else \
        json.dumps(gene_panel, indent=1).encode()
    return HfApi(token=token).create_commit(
        repo_id, [CommitOperationAdd(GENE_PANEL_FILE, content)], commit_message=f"Add {GENE_PANEL_FILE}",
        repo_type="dataset", revision=revision or "main", create_pr=create_pr)


def _push_folder(kind: str, folder: Path, repo_id: str, *, token: str, private: bool | None, revision: str | None,
                 commit_message: str | None, commit_description: str | None, create_pr: bool,
                 keep_card: bool = False, card: Any = None, card_kwargs: Mapping | None = None) -> CommitInfo:
    files: dict[str, Path | bytes] = dict(folder_files(folder))
    _check_folder(kind, files, folder)
    own_readme = folder / "README.md"
    if keep_card and own_readme.is_file():
        files["README.md"] = own_readme
    else:
        if card is None:
            render = {"model": render_model_card, "pipeline": render_pipeline_card,
                      "dataset": render_dataset_card}[kind]
            card = render(folder, repo_id=repo_id, **(card_kwargs or {}))
        files["README.md"] = str(card).encode("utf-8")
    return _commit(kind, repo_id, files, token=token, private=private, revision=revision,
                   commit_message=commit_message, commit_description=commit_description, create_pr=create_pr)


def _accepts(fn: Any, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------------------------
# mixins for the model and pipeline classes
# --------------------------------------------------------------------------------------------
class SpatiaModelHubMixin:
    """Mix into a ``PreTrainedModel`` (before it in the bases): ``save_pretrained`` also writes the model
    card, and ``push_to_hub`` publishes weights + SPATIA card in one commit (transformers' own
    ``push_to_hub`` would replace the card with a generic one)."""

    def save_pretrained(self, save_directory, *args, model_card: bool = True, eval_results: Any = None, **kwargs):
        push = kwargs.pop("push_to_hub", False)
        repo_id = kwargs.pop("repo_id", None)
        token = kwargs.pop("token", None)
        out = super().save_pretrained(save_directory, *args, **kwargs)
        if model_card and kwargs.get("is_main_process", True):
            write_model_card(save_directory, self, eval_results=eval_results, repo_id=repo_id)
        if push and kwargs.get("is_main_process", True):
            push_model(save_directory, repo_id or Path(save_directory).name, token=token, keep_card=True)
        return out

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, commit_description: str | None = None,
                    private: bool | None = None, token: str | None = None, revision: str | None = None,
                    create_pr: bool = False, tags: Iterable[str] = (), max_shard_size: Any = None,
                    **card_kwargs) -> CommitInfo:
        """Publish this model with its card; ``card_kwargs`` (``eval_results``, ``dataset_id``,
        ``training_data``, ``license``) go to ``render_model_card``."""
        return push_model(self, repo_id, token=token, private=private, revision=revision,
                          commit_message=commit_message, commit_description=commit_description,
                          create_pr=create_pr, tags=tags, **card_kwargs)


class SpatiaPipelineHubMixin:
    """Mix into a ``DiffusionPipeline`` subclass (before it in the bases) so it loads from a Hub id and
    pushes with the SPATIA card.

    Why: ``save_pretrained`` records a component defined in this package by its module path
    (``["spatia_hf.pipeline_spatia", "SpatiaDenoiser"]`` in ``model_index.json``). diffusers 0.42's
    ``DiffusionPipeline.download`` (run by ``from_pretrained`` for anything that is not a local folder)
    computes which files to fetch with ``_get_custom_components_and_folders``, which accepts a
    component library only if it is in ``LOADABLE_CLASSES`` (diffusers, transformers,
    onnxruntime.training), a ``diffusers.pipelines`` module, or a ``<component>/<module>.py`` file in the
    repo, and otherwise raises ``"... as defined in model_index.json does not exist in <repo>"``. Loading
    from a local folder never calls ``download`` and resolves the class from ``sys.modules`` (the
    package is imported), which works. So ``download`` is replaced by a plain ``snapshot_download`` of
    the repo (safetensors only; pickled weights are never fetched), after which ``from_pretrained``
    proceeds exactly as for a local folder. Offline (``HF_HUB_OFFLINE=1`` or ``local_files_only``) the
    cached snapshot is returned.
    """

    @classmethod
    def download(cls, pretrained_model_name: str, **kwargs) -> str:
        return snapshot_pipeline(
            pretrained_model_name, revision=kwargs.get("revision"), cache_dir=kwargs.get("cache_dir"),
            token=kwargs.get("token"), local_files_only=bool(kwargs.get("local_files_only")),
            force_download=bool(kwargs.get("force_download")))

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                    token: str | None = None, create_pr: bool = False, revision: str | None = None,
                    safe_serialization: bool = True, **card_kwargs) -> CommitInfo:
        """Publish this pipeline with its card; ``card_kwargs`` go to ``render_pipeline_card``."""
        if not safe_serialization:
            raise ValueError("safe_serialization=False: spatia-hf publishes safetensors only. Fix: drop the argument")
        return push_pipeline(self, repo_id, token=token, private=private, revision=revision,
                             commit_message=commit_message, create_pr=create_pr, **card_kwargs)


def snapshot_pipeline(repo_id: str, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                      token: str | bool | None = None, local_files_only: bool = False,
                      force_download: bool = False) -> str:
    """Local snapshot folder of a pipeline repo (downloaded once into the Hub cache; offline afterwards)."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, repo_type="model", revision=revision, cache_dir=cache_dir, token=token,
                             local_files_only=local_files_only, force_download=force_download,
                             ignore_patterns=list(PICKLE_PATTERNS))


# --------------------------------------------------------------------------------------------
# loading datasets by Hub id
# --------------------------------------------------------------------------------------------
def resolve_dataset_dir(path_or_repo_id: str | os.PathLike, *, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, token: str | bool | None = None,
                        local_files_only: bool = False) -> Path:
    """A local dataset folder for a path or a Hub dataset id (``snapshot_download``: downloaded once,
    then read from the cache, also with ``HF_HUB_OFFLINE=1``). The folder has the builder's layout."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path
    repo_id = os.fspath(path_or_repo_id)
    if repo_id.count("/") != 1 or os.path.isabs(repo_id) or repo_id.startswith("."):
        raise FileNotFoundError(f"{repo_id!r} is neither a local dataset folder nor a Hub id ORG/NAME. Fix: check "
                                f"the path, or pass the dataset repo id")
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(repo_id, repo_type="dataset", revision=revision, cache_dir=cache_dir,
                                    token=token, local_files_only=local_files_only))
    missing = _missing_dataset_files(folder)
    if missing:
        # offline, snapshot_download returns whatever is cached, e.g. only the one config that
        # load_dataset(repo_id, "cells") fetched
        raise FileNotFoundError(
            f"the cached snapshot of dataset {repo_id!r} at {os.fspath(folder)!r} is incomplete (missing {missing}). "
            f"Fix: call spatia_hf.hub.resolve_dataset_dir({repo_id!r}) once with network access (without "
            f"HF_HUB_OFFLINE=1) to download the whole dataset")
    return folder


def _missing_dataset_files(folder: Path) -> list[str]:
    """What a dataset folder lacks for every config of its card (and the gene panel) to load."""
    from .data.schema import GENE_PANEL_FILE

    missing = [] if (folder / GENE_PANEL_FILE).is_file() else [GENE_PANEL_FILE]
    readme = folder / "README.md"
    if not readme.is_file():
        return missing + ["README.md"]
    for config in DatasetCard.load(readme).data.to_dict().get("configs") or []:
        files = config.get("data_files") or []
        patterns = [files] if isinstance(files, str) else [f["path"] if isinstance(f, Mapping) else f for f in files]
        for pattern in patterns:
            for p in [pattern] if isinstance(pattern, str) else pattern:
                if not list(folder.glob(p)):
                    missing.append(p)
    return missing


def load_gene_panel(path_or_repo_id: str | os.PathLike, **kwargs) -> dict:
    """``gene_panel.json`` of a dataset folder or Hub dataset (the genes ``gene_indices`` refer to)."""
    from .data.schema import GENE_PANEL_FILE

    path = Path(path_or_repo_id)
    if not path.is_dir():
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(os.fspath(path_or_repo_id), GENE_PANEL_FILE, repo_type="dataset",
                                    **{k: v for k, v in kwargs.items() if k in ("revision", "cache_dir", "token",
                                                                               "local_files_only")})).parent
    file = path / GENE_PANEL_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{os.fspath(path)!r} has no {GENE_PANEL_FILE}. Fix: pass a dataset built by "
                                f"spatia-hf")
    return json.loads(file.read_text())


def load_spatia_dataset(path_or_repo_id: str | os.PathLike, config: str = "cells", split: str | None = "train",
                        **kwargs):
    """``datasets.load_dataset`` of one config (cells / niches / tissues) from a folder or Hub id."""
    import datasets

    from .data.schema import CONFIGS

    if config not in CONFIGS:
        raise ValueError(f"config={config!r} is not a SPATIA dataset config. Fix: use one of {CONFIGS}")
    folder = resolve_dataset_dir(path_or_repo_id, **kwargs)
    return datasets.load_dataset(os.fspath(folder), config, split=split)


__all__ = [
    "SPATIA_ARXIV_ID",
    "SPATIA_CITATION",
    "validate_repo_id",
    "resolve_token",
    "load_eval_results",
    "config_rows",
    "template_path",
    "render_model_card",
    "render_pipeline_card",
    "render_dataset_card",
    "write_model_card",
    "folder_files",
    "push_model",
    "push_pipeline",
    "push_dataset",
    "SpatiaModelHubMixin",
    "SpatiaPipelineHubMixin",
    "snapshot_pipeline",
    "resolve_dataset_dir",
    "load_gene_panel",
    "load_spatia_dataset",
]
