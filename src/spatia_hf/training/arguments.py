"""Argument dataclasses for ``HfArgumentParser``: model, data and fine-tuning arguments.

They sit next to ``transformers.TrainingArguments`` (or :class:`SpatiaTrainingArguments`, which adds a
wall-clock budget), so one command line drives the examples, the ``spatia`` CLI and
``accelerate launch`` / ``torchrun`` alike::

    parser = HfArgumentParser((ModelArguments, DataArguments, SpatiaTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

PRESETS = ("tiny", "small", "base", "large")
TASKS = ("annotation", "imputation", "image_to_expression", "tissue_classification")
SCHEDULES = ("niche", "grid", "cell")


@dataclass
class ModelArguments:
    """Which model to train: a checkpoint to start from, or a size preset to build from scratch."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Checkpoint directory or Hub id to start from. None: a new model from --preset."},
    )
    preset: str = field(default="tiny", metadata={"help": f"Size preset for a new model: one of {PRESETS}."})
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Comma-separated config overrides for a new model, e.g. 'cell.hidden_size=64,"
                          "pretraining.mgm_weight=2'. A dotted key reaches a sub-config."},
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "'sdpa' (default) or 'eager'."}
    )
    max_genes: int | None = field(
        default=None,
        metadata={"help": "Gene tokens per cell (expressed genes first, then sampled zeros). None: the config's."},
    )
    min_gene_coverage: float = field(
        default=0.5,
        metadata={"help": "Refuse a dataset whose panel covers less than this fraction of its genes in the "
                          "model vocabulary (a checkpoint's vocabulary must fit the data)."},
    )

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"--preset {self.preset!r}: expected one of {PRESETS}")
        if not 0.0 <= self.min_gene_coverage <= 1.0:
            raise ValueError(f"--min_gene_coverage {self.min_gene_coverage}: expected a fraction in [0, 1]")


@dataclass
class DataArguments:
    """Where the built dataset lies, how it is split, and how batches are masked."""

    dataset_dir: str = field(
        metadata={"help": "A dataset directory written by the builder (cells/niches/tissues Parquet, "
                          "README.md card, gene_panel.json)."},
    )
    eval_sections: str | None = field(
        default=None,
        metadata={"help": "Comma-separated sample_ids held out for evaluation. Default: the last section "
                          "(sorted by name) when there are several, else none."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debug)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set."})
    schedule: str = field(
        default="niche",
        metadata={"help": "Pretraining schedule. 'niche': every example is a cell-centred neighbourhood (the "
                          "model's niche_config.num_neighbours nearest cells) whose member cells carry all cell "
                          "objectives (MGM, MIM, contrastive), plus the niche objectives (masked cells, "
                          "neighbourhood expression) and, batches being nearby neighbourhoods of one section, "
                          "masked niche modelling by the tissue model; one batch one optimiser step. 'grid': the "
                          "same on the dataset's grid-tile niches (no tissue objective). 'cell': every example "
                          "is a cell (no niche or tissue objective)."},
    )
    gene_mask_ratio: float | None = field(
        default=None, metadata={"help": "Fraction of gene tokens masked for MGM (None: the model config's)."}
    )
    image_mask_ratio: float | None = field(
        default=None, metadata={"help": "Fraction of image patches masked for MIM (None: the model config's)."}
    )
    niche_mask_ratio: float | None = field(
        default=None,
        metadata={"help": "Fraction of a niche's cells masked for masked-cell prediction (None: the config's)."},
    )
    max_cells_per_niche: int = field(
        default=32, metadata={"help": "Cells kept per grid niche ('grid' schedule; a seeded sample when a niche has "
                                      "more). Cell-centred niches hold niche_config.num_neighbours cells."}
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Read the cells shards as a datasets streaming IterableDataset (bounded memory, one "
                          "stream per rank, shuffle buffer, stream state saved in checkpoints) instead of loading "
                          "them map-style. Needs --max_steps; no end-of-training evaluation (held-out sections stay "
                          "out of training: score them with `spatia evaluate`)."},
    )
    shuffle_buffer_size: int = field(
        default=256, metadata={"help": "--streaming: examples in the shuffle buffer (1: no shuffling); memory grows "
                                       "with it (each niche example holds its cells' images)."}
    )

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule {self.schedule!r}: expected one of {SCHEDULES}")
        for name in ("gene_mask_ratio", "image_mask_ratio", "niche_mask_ratio"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"--{name} {value}: expected a fraction in [0, 1)")
        if self.max_cells_per_niche < 1:
            raise ValueError(f"--max_cells_per_niche {self.max_cells_per_niche}: expected >= 1")
        if self.shuffle_buffer_size < 1:
            raise ValueError(f"--shuffle_buffer_size {self.shuffle_buffer_size}: expected >= 1")

    def eval_section_list(self) -> list[str] | None:
        """``eval_sections`` as a list (None = default split)."""
        if self.eval_sections is None:
            return None
        return [s.strip() for s in self.eval_sections.split(",") if s.strip()]


@dataclass
class FinetuneArguments:
    """Which downstream task to fine-tune and where its labels come from."""

    task: str = field(default="annotation", metadata={"help": f"One of {TASKS}."})
    label_column: str | None = field(
        default=None,
        metadata={"help": "Label column: default 'cell_type' (annotation) or 'condition' (tissue_classification)."},
    )
    freeze_backbone: bool = field(
        default=False, metadata={"help": "Train only the task head (a linear probe when the head is linear)."}
    )
    imputation_mask_ratio: float = field(
        default=0.3, metadata={"help": "imputation: fraction of each cell's measured genes hidden and predicted."}
    )

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"--task {self.task!r}: expected one of {TASKS}")
        if not 0.0 < self.imputation_mask_ratio < 1.0:
            raise ValueError(f"--imputation_mask_ratio {self.imputation_mask_ratio}: expected a fraction in (0, 1)")

    def resolved_label_column(self) -> str | None:
        """The label column the task reads (None for tasks whose targets are the expression itself)."""
        if self.label_column is not None:
            return self.label_column
        return {"annotation": "cell_type", "tissue_classification": "condition"}.get(self.task)


@dataclass
class SpatiaTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus a wall-clock budget, so a demo or a CI run stops on time."""

    max_minutes: float | None = field(
        default=None,
        metadata={"help": "Stop training (and save) after this many minutes of wall-clock time."},
    )
