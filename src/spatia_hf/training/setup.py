"""What pretraining and fine-tuning share before the Trainer starts: the model (new from a preset
or loaded from a checkpoint, with checks that fail early and clearly), the processor mapped onto the
dataset panel, the TrainingArguments a SPATIA run needs, and the result summary written at the end.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig, TrainingArguments, set_seed

from ..models.configuration_spatia import SpatiaConfig
from spatia_hf.data import schema
from ..models.processing_spatia import PROCESSOR_FILE, SpatiaProcessor

from .arguments import ModelArguments
from ..data.datasets import SpatiaDataset

logger = logging.getLogger(__name__)

SUMMARY_FILE = "spatia_training.json"


# ----------------------------------------------------------------------------- config
def section_record(dataset: SpatiaDataset, eval_sections: list[str] | None,
                   base_model: str | os.PathLike | None = None, present: list[str] | None = None) -> dict[str, Any]:
    """Which sections trained (including the base checkpoint's) and which were held out, for the
    training summary (evaluation refuses to score a section a checkpoint trained on). ``present``:
    the dataset's sections when ``dataset`` holds a stream (default: ``dataset.sample_ids``)."""
    from ..data.datasets import default_eval_sections

    present = dataset.sample_ids if present is None else present
    held = default_eval_sections(present) if eval_sections is None else list(eval_sections)
    return {**section_lineage([s for s in present if s not in held], base_model), "eval_sections": sorted(held)}


def section_lineage(own_sections, base_model: str | os.PathLike | None) -> dict[str, Any]:
    """The sections that trained a checkpoint's weights: its own training sections plus those its
    base checkpoint (``base_model``, a local folder with a ``spatia_training.json``) recorded, so an
    evaluation can refuse to score any of them. A base without a record is named in
    ``base_model_unrecorded``."""
    own = sorted({str(x) for x in own_sections})
    out: dict[str, Any] = {"train_sections": own}
    if base_model is None:
        return out
    out["base_model"] = str(base_model)
    record = Path(base_model) / SUMMARY_FILE
    try:
        base = json.loads(record.read_text()).get("train_sections")
    except (OSError, json.JSONDecodeError):
        base = None
    if base is None:
        out["base_model_unrecorded"] = True
        return out
    out["base_train_sections"] = sorted(map(str, base))
    out["train_sections"] = sorted(set(own) | set(out["base_train_sections"]))
    return out


def parse_config_overrides(text: str | None) -> dict[str, dict[str, Any]]:
    """``"cell_config.hidden_size=64,mgm_weight=2"`` -> ``{"cell_config": {...}, "": {...}}``."""
    out: dict[str, dict[str, Any]] = {"": {}, "cell_config": {}, "niche_config": {}, "tissue_config": {}}
    if not text:
        return out
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"config_overrides: {item!r} is not KEY=VALUE. Fix: e.g. 'cell_config.hidden_size=64'")
        key, value = (x.strip() for x in item.split("=", 1))
        scope, _, name = key.rpartition(".")
        if scope not in out:
            raise ValueError(f"config_overrides: {key!r}: unknown scope {scope!r}. Fix: use cell_config., "
                             "niche_config., tissue_config. or no prefix")
        out[scope][name] = _literal(value)
    return out


def _literal(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def dataset_image_geometry(dataset: SpatiaDataset) -> tuple[int, int]:
    """(channels, size) of the crops of the ``cells`` config, from its features."""
    feat = dataset["cells"].features[schema.IMAGE]
    c, h, w = feat.shape
    if h != w:
        raise ValueError(f"cells.{schema.IMAGE}: crops are {h}x{w} px; SPATIA needs square crops. Fix: rebuild "
                         "the dataset with square crops")
    return int(c), int(h)


def new_config(model_args: ModelArguments, dataset: SpatiaDataset, **composite) -> SpatiaConfig:
    """A preset config with the dataset's gene panel as vocabulary and its crop geometry."""
    overrides = parse_config_overrides(model_args.config_overrides)
    channels, size = dataset_image_geometry(dataset)
    cell = dict(overrides["cell_config"])
    if model_args.max_genes is not None:
        cell["max_genes"] = model_args.max_genes
    return SpatiaConfig.from_preset(
        model_args.preset, gene_vocab=dataset.genes, gene_ensembl_ids=dataset.gene_ids,
        image_size=size, num_channels=channels, cell_config=cell, niche_config=overrides["niche_config"],
        tissue_config=overrides["tissue_config"], **{**overrides[""], **composite},
    )


def check_checkpoint(path: str) -> PretrainedConfig:
    """The config of a SPATIA checkpoint, or a clear error when it is missing or another model type."""
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(path)
    except OSError as err:
        raise FileNotFoundError(f"model_name_or_path={path!r}: no model config found ({err}). Fix: pass a directory "
                                "written by `spatia pretrain` / save_pretrained, or a Hub id") from None
    found = config_dict.get("model_type")
    if found != SpatiaConfig.model_type:
        raise ValueError(
            f"model_name_or_path={path!r} holds model_type={found!r}, not a composite SPATIA checkpoint "
            f"(model_type={SpatiaConfig.model_type!r}). Fix: pass a checkpoint written by `spatia pretrain` or "
            "SpatiaModel/SpatiaFor*.save_pretrained (a cell/niche/tissue-only model cannot be trained here)"
        )
    return SpatiaConfig.from_pretrained(path)


def check_geometry(config: SpatiaConfig, dataset: SpatiaDataset) -> None:
    channels, size = dataset_image_geometry(dataset)
    cell = config.cell_config
    if (channels, size) != (cell.num_channels, cell.image_size):
        raise ValueError(
            f"dataset {str(dataset.dataset_dir)!r}: crops are {channels} channels x {size} px but the model expects "
            f"{cell.num_channels} x {cell.image_size} px. Fix: rebuild the dataset with crop_px={cell.image_size} "
            "and the same stains, or start from a new model (--preset) sized to this dataset"
        )


# ----------------------------------------------------------------------------- processor
def build_processor(model_args: ModelArguments, config: SpatiaConfig, dataset: SpatiaDataset,
                    seed: int) -> SpatiaProcessor:
    """The checkpoint's processor (or one matching the config), mapped onto the dataset panel.

    A panel sharing no gene with the model vocabulary is refused whatever ``min_gene_coverage``.
    """
    kwargs: dict[str, Any] = {"seed": seed, "min_coverage": model_args.min_gene_coverage}
    if model_args.max_genes is not None:
        kwargs["max_genes"] = model_args.max_genes
    path = model_args.model_name_or_path
    if path is not None and (Path(path) / PROCESSOR_FILE).is_file():
        processor = SpatiaProcessor.from_pretrained(path, **kwargs)
    else:
        processor = SpatiaProcessor.from_config(config, **kwargs)
    shared = len(set(processor.gene_vocab) & set(dataset.genes))
    if shared == 0 and not processor.gene_ensembl_ids:
        raise ValueError(
            f"gene panel of {str(dataset.dataset_dir)!r} ({len(dataset.genes)} genes, e.g. {dataset.genes[:3]}) "
            f"shares no gene with the model vocabulary ({len(processor.gene_vocab)} genes, e.g. "
            f"{processor.gene_vocab[:3]}). Fix: use a checkpoint trained on this panel's genes, check the gene "
            "naming (symbols vs Ensembl ids), or start from a new model (--preset)"
        )
    mapping = processor.map_panel(dataset.genes, dataset.gene_ids)
    if mapping.n_kept == 0:
        raise ValueError(f"gene panel of {str(dataset.dataset_dir)!r} shares no gene with the model vocabulary. "
                         "Fix: use a checkpoint trained on this panel's genes or start from a new model (--preset)")
    if mapping.unknown:
        logger.warning("%d of %d dataset genes are unknown to the model and dropped (first: %s)",
                       len(mapping.unknown), len(mapping.genes), mapping.unknown[:5])
    return processor


# ----------------------------------------------------------------------------- training arguments
def prepare_training_args(training_args: TrainingArguments, *, self_supervised: bool) -> TrainingArguments:
    """Settings every SPATIA run needs, whatever the command line said:

    - ``remove_unused_columns=False``: the collators read raw dataset columns the model never takes;
    - ``ddp_find_unused_parameters=True`` (unless set): a head trains only some scales (pretraining
      never touches the tissue model), which plain DDP rejects;
    - self-supervised runs: no label columns and loss-only evaluation.

    FSDP on the CPU is refused: accelerate (1.15) makes FSDP only out of a multi-GPU-like state, so
    with ``use_cpu`` it would silently train plain DDP with the whole model on every process.
    """
    if training_args.fsdp and (training_args.use_cpu or str(training_args.device) == "cpu"):
        raise ValueError(f"fsdp={training_args.fsdp!r} with the CPU: accelerate runs FSDP only on GPUs (on the CPU it "
                         "falls back to DDP without a word). Fix: drop --fsdp on the CPU (DDP over gloo works), or "
                         "run on GPUs")
    training_args.remove_unused_columns = False
    if training_args.dataloader_persistent_workers and training_args.dataloader_num_workers > 0:
        logger.warning("dataloader_persistent_workers: worker processes keep the collator of the first epoch, so "
                       "random masks repeat every epoch. Fix: leave persistent workers off for pretraining")
    if training_args.ddp_find_unused_parameters is None:
        training_args.ddp_find_unused_parameters = True
    if self_supervised:
        training_args.label_names = []
        training_args.prediction_loss_only = True
    return training_args


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch before the model is built (its initial weights depend on it)."""
    set_seed(seed)


# ----------------------------------------------------------------------------- results
@dataclass
class TrainingResult:
    """What a run did: where it wrote, how far it went, what it logged and measured."""

    output_dir: Path
    global_step: int
    train_seconds: float
    world_size: int
    log_history: list[dict] = field(default_factory=list)
    eval_metrics: dict[str, Any] = field(default_factory=dict)
    stopped_by_time_budget: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def objective_history(self, name: str) -> list[tuple[int, float]]:
        """(step, value) of a logged training quantity (``loss``, ``loss_mgm``, ...)."""
        return [(int(h["step"]), float(h[name])) for h in self.log_history if name in h and "step" in h]

    def objective_names(self) -> list[str]:
        names = {k for h in self.log_history if "loss" in h for k in h if k == "loss" or k.startswith("loss_")}
        return sorted(names)

    def objective_first_last(self) -> dict[str, tuple[float, float]]:
        """First and last logged value of the total loss and every objective."""
        out = {}
        for name in self.objective_names():
            hist = self.objective_history(name)
            if hist:
                out[name] = (hist[0][1], hist[-1][1])
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "output_dir": str(self.output_dir),
            "global_step": self.global_step,
            "train_seconds": round(self.train_seconds, 3),
            "world_size": self.world_size,
            "stopped_by_time_budget": self.stopped_by_time_budget,
            "objectives_first_last": {k: list(v) for k, v in self.objective_first_last().items()},
            "eval_metrics": {k: v for k, v in self.eval_metrics.items() if _jsonable(v)},
            **self.extra,
        }


def _jsonable(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool)) or v is None or (
        isinstance(v, (list, tuple)) and all(isinstance(x, (int, float, str)) for x in v))


def resolve_resume(resume: str | bool | None, output_dir: str | Path) -> str | bool | None:
    """``resume_from_checkpoint`` as the Trainer should get it: True or "true" become the newest
    *complete* ``checkpoint-N`` in ``output_dir``. The Trainer writes ``trainer_state.json`` last, so a
    checkpoint without it was cut short (a killed run) and is skipped rather than loaded half-written."""
    if isinstance(resume, str) and resume.lower() == "true":
        resume = True
    if resume is not True:
        return resume
    folder = Path(output_dir)
    steps = sorted((int(p.name.split("-")[1]), p) for p in folder.glob("checkpoint-*")
                   if p.is_dir() and p.name.split("-")[1].isdigit()) if folder.is_dir() else []
    for step, path in reversed(steps):
        if (path / "trainer_state.json").is_file():
            skipped = [p.name for s, p in steps if s > step]
            if skipped:
                logger.warning("resume_from_checkpoint: skipping incomplete %s (no trainer_state.json); "
                               "resuming from %s", skipped, path.name)
            return str(path)
    raise FileNotFoundError(f"resume_from_checkpoint=True: no complete checkpoint-N folder in {folder} "
                            f"(found {[p.name for _, p in steps]}). Fix: pass a checkpoint folder, or train "
                            "with save_strategy='steps' so checkpoints are written")


