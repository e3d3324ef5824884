"""``SpatiaTrainer``: a ``transformers.Trainer`` that logs each pretraining objective on its own.

SPATIA's pretraining loss is a weighted sum of objectives (masked gene modelling, masked image
modelling, contrastive alignment, niche masked-cell prediction). The model returns each term as a
field of its output (``mgm_loss`` or ``loss_mgm``); the trainer averages them between logging steps (across processes
under DDP/FSDP/DeepSpeed) and adds them to the Trainer's logs (``loss_mgm``, ``loss_mim``, ...) and
to evaluation metrics (``eval_loss_mgm``, ...), so every reporter (console, TensorBoard, trackio,
``trainer_state.json``) sees them with no custom loop.

Two callbacks ride along: :class:`TimeBudgetCallback` stops (and saves) after a wall-clock budget,
and :class:`EpochSeedCallback` tells seeded collators which epoch they serve, so masks are a pure
function of (seed, epoch, example) and a resumed run sees the masks an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME
from ..utils.io import atomic_write_text

TRAINING_ARGS_JSON = "training_args.json"
# task names of the card's model-index for the models a Trainer script trains
CARD_TASKS = {"SpatiaForPretraining": "SPATIA pretraining objectives (held-out sections)",
              "SpatiaForCellClassification": "cell-type annotation (fine-tuned head, held-out sections)",
              "SpatiaForGeneImputation": "gene imputation (fine-tuned head, held-out sections)",
              "SpatiaForExpressionPrediction": "image -> expression (fine-tuned head, held-out sections)",
              "SpatiaForTissueClassification": "section classification (fine-tuned head, held-out sections)"}
LOSS_PREFIX = "loss_"
LOSS_SUFFIX = "_loss"


def log_name(field_name: str) -> str | None:
    """Log key of a per-objective output field: ``mgm_loss`` or ``loss_mgm`` -> ``loss_mgm``;
    None for anything else (including the total ``loss``)."""
    if field_name.startswith(LOSS_PREFIX) and len(field_name) > len(LOSS_PREFIX):
        return field_name
    if field_name.endswith(LOSS_SUFFIX) and len(field_name) > len(LOSS_SUFFIX):
        return LOSS_PREFIX + field_name[: -len(LOSS_SUFFIX)]
    return None


def _output_items(outputs: Any) -> list[tuple[str, Any]]:
    if isinstance(outputs, dict):  # ModelOutput is a dict too, holding only the non-None fields
        declared = [f.name for f in dataclasses.fields(outputs)] if dataclasses.is_dataclass(outputs) else []
        return [(k, outputs.get(k)) for k in dict.fromkeys([*declared, *outputs.keys()])]
    if dataclasses.is_dataclass(outputs):
        return [(f.name, getattr(outputs, f.name)) for f in dataclasses.fields(outputs)]
    return []


def objective_losses(outputs: Any) -> dict[str, torch.Tensor]:
    """The per-objective losses of a model output (ModelOutput or dict), detached, by log name
    (``loss_mgm``, ``loss_mim``, ...). ``None`` fields (an objective that did not run) are left out."""
    out = {}
    for k, v in _output_items(outputs):
        name = log_name(k)
        if name is not None and isinstance(v, torch.Tensor):
            out[name] = v.detach().float().mean()
    return out


def objective_names(outputs: Any) -> list[str]:
    """Log names of every per-objective field the output class declares (also those that are None
    on this batch), so all processes reduce the same list in the same order."""
    return sorted({n for n in (log_name(k) for k, _ in _output_items(outputs)) if n is not None})


class _ObjectiveMeter:
    """Running sums and counts of per-objective losses between two reads (train or eval)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def update(self, outputs: Any) -> None:
        for name in objective_names(outputs):
            if name not in self.names:
                self.names.append(name)
                self.names.sort()
        for name, value in objective_losses(outputs).items():
            value = float(value)
            if math.isfinite(value):
                self.sums[name] = self.sums.get(name, 0.0) + value
                self.counts[name] = self.counts.get(name, 0) + 1

    def read_and_reset(self, reduce_fn) -> dict[str, float]:
        """Mean of each objective since the last read, reduced over processes by ``reduce_fn``.

        ``reduce_fn`` sums a float64 tensor over processes (identity on one process). Every process
        must call this at the same point with the same ``names`` (they come from the output class).
        """
        if not self.names:
            return {}
        stats = torch.tensor(
            [[self.sums.get(n, 0.0), float(self.counts.get(n, 0))] for n in self.names], dtype=torch.float64
        )
        stats = reduce_fn(stats)
        out = {n: float(s / c) for n, (s, c) in zip(self.names, stats.tolist()) if c > 0}
        self.sums.clear()
        self.counts.clear()
        return out


class SpatiaTrainer(Trainer):
    """``Trainer`` that logs the model's per-objective losses next to the total ``loss``.

    Everything else is the stock Trainer: ``processing_class``, ``data_collator``, accelerate
    devices and processes, checkpoints and ``resume_from_checkpoint``. Publishing goes through the
    package's card writer and push (``spatia_hf.hub``), not transformers' generic card:
    ``create_model_card`` writes SPATIA's card (``model-index`` from the last held-out evaluation), and
    ``push_to_hub`` (``--push_to_hub``) uploads the output folder in one commit with that card,
    safetensors only, without Trainer bookkeeping (pickled ``training_args.bin``, optimizer, checkpoints).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not self.label_names:
            # Self-supervised models (pretraining) take no `labels` yet return a loss; without this the
            # Trainer would skip the loss in evaluation.
            self.can_return_loss = True
        self._train_meter = _ObjectiveMeter()
        self._eval_meter = _ObjectiveMeter()

    def _get_train_sampler(self, train_dataset=None):
        """The dataset's own sampler when it has one (``train_sampler(batch_size, seed)``: e.g. cell
        neighbourhoods in blocks of nearby centres, so a batch is a small tissue), else the Trainer's."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        own = getattr(dataset, "train_sampler", None)
        if callable(own):
            return own(self.args.per_device_train_batch_size, self.args.seed)
        return super()._get_train_sampler(train_dataset)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        (self._train_meter if model.training else self._eval_meter).update(outputs)
        return (loss, outputs) if return_outputs else loss

    def get_train_dataloader(self):
        """The Trainer's loader; a stream already split by rank (``split_by_rank`` set, as
        :class:`~spatia_hf.training.streaming.StreamingExamples` is) is not sharded a second time by
        accelerate's ``IterableDatasetShard``, whose wrapper is made a pass-through."""
        loader = super().get_train_dataloader()
        if getattr(self.train_dataset, "split_by_rank", False):
            shard = getattr(loader, "dataset", None)
            if shard is not None and shard is not self.train_dataset and hasattr(shard, "num_processes"):
                shard.num_processes, shard.process_index = 1, 0
        return loader

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Save as the Trainer does, but the training arguments as JSON: the Trainer pickles them to
        ``training_args.bin``, and a pickle is code the reader runs on load."""
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        pickled = os.path.join(output_dir, TRAINING_ARGS_NAME)
        if self.args.should_save and os.path.isfile(pickled):
            atomic_write_text(os.path.join(output_dir, TRAINING_ARGS_JSON), self.args.to_json_string())
            os.remove(pickled)

    # ------------------------------------------------------------------ publishing
    def card_results(self) -> dict[str, dict[str, float]] | None:
        """The last evaluation's metrics in the card writer's short form ``{task: {metric: value}}``."""
        evals = [e for e in self.state.log_history if any(k.startswith("eval_") for k in e)]
        if not evals:
            return None
        skip = ("runtime", "samples_per_second", "steps_per_second", "epoch")
        metrics = {k[len("eval_"):]: float(v) for k, v in evals[-1].items()
                   if k.startswith("eval_") and isinstance(v, (int, float)) and math.isfinite(v)
                   and not k.endswith(skip)}
        task = CARD_TASKS.get(type(self.model).__name__, f"{type(self.model).__name__} (held-out sections)")
        return {task: metrics} if metrics else None

    def create_model_card(self, model_name: str | None = None, dataset: str | list[str] | None = None,
                          license: str | None = None, tags: str | list[str] | None = None, **_: Any) -> None:
        """SPATIA's card in ``output_dir/README.md`` (transformers' arguments that the SPATIA card has a
        place for are used; the rest describe a text model and are ignored)."""
        if not self.is_world_process_zero():
            return
        from ..hub.cards import DEFAULT_LICENSE, write_model_card

        dataset_id = dataset if isinstance(dataset, str) and dataset.count("/") == 1 else None
        write_model_card(self.args.output_dir, self.model, eval_results=self.card_results(),
                         repo_id=self.hub_model_id, dataset_id=dataset_id, license=license or DEFAULT_LICENSE,
                         tags=[tags] if isinstance(tags, str) else list(tags or ()))

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None,
                    **card_kwargs):
        """Save the final model, then publish ``output_dir`` with SPATIA's card in one commit."""
        from ..hub.push import push_model

        self.save_model(_internal_call=True)  # every process (sharded saves), written by process zero
        if not self.is_world_process_zero():
            return None
        self.create_model_card(**card_kwargs)
        repo_id = self.args.hub_model_id or Path(self.args.output_dir).name
        return push_model(self.args.output_dir, repo_id, token=token or self.args.hub_token,
                          private=self.args.hub_private_repo if private is None else private,
                          revision=revision or self.args.hub_revision, commit_message=commit_message,
                          keep_card=True)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Intermediate pushes (``hub_strategy``) would upload a pickled ``training_args.bin`` and the
        generic card; SPATIA publishes the final model only (``push_to_hub`` at the end of training)."""
        return None

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """No repo is created at the start of training: ``push_model`` creates it with the first commit."""
        self.hub_model_id = self.args.hub_model_id or Path(self.args.output_dir).name

    def _reduce_sum(self, stats: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes <= 1:
            return stats
        # gloo and nccl both reduce float64; move to the process device for nccl.
        return self.accelerator.reduce(stats.to(self.args.device), reduction="sum").cpu()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Training logs carry "loss"; the end-of-training summary carries "train_loss" (no per-step
        # means pending by then). Evaluation logs are handled in `evaluate`.
        if "loss" in logs and not any(k.startswith("eval_") for k in logs):
            logs.update(self._train_meter.read_and_reset(self._reduce_sum))
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        self._eval_meter.read_and_reset(lambda t: t)  # drop anything left from an interrupted evaluation
        # Per-objective means are computed after the loop and must reach the metrics before they are
        # logged, so wrap `log` for the duration of this call.
        original_log = self.log

        def log_with_objectives(logs: dict[str, float], start_time: float | None = None) -> None:
            extra = self._eval_meter.read_and_reset(self._reduce_sum)
            logs.update({f"{metric_key_prefix}_{k}": v for k, v in extra.items()})
            original_log(logs, start_time)

        self.log = log_with_objectives
        try:
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self.log = original_log
        return metrics


class TimeBudgetCallback(TrainerCallback):
    """Stops training after ``max_minutes`` of wall-clock time and saves a checkpoint there.

    Under several processes, the decision of process 0 is broadcast so all stop at the same step.
    """

    def __init__(self, max_minutes: float) -> None:
        if max_minutes <= 0:
            raise ValueError(f"max_minutes={max_minutes}: expected a positive number of minutes")
        self.max_seconds = 60.0 * max_minutes
        self.start: float | None = None
        self.stopped_at_step: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        over = self.start is not None and time.monotonic() - self.start >= self.max_seconds
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([1.0 if over else 0.0], device=args.device)
            torch.distributed.broadcast(flag, src=0)
            over = bool(flag.item())
        if over:
            self.stopped_at_step = state.global_step
            control.should_training_stop = True
            control.should_save = True
        return control


class EpochSeedCallback(TrainerCallback):
    """Sets ``collator.epoch`` at the start of every epoch (also on resume), for collators whose
    random masks are seeded per example and epoch (see ``spatia_hf.data.collators``)."""

    def __init__(self, *collators: Any) -> None:
        self.collators = [c for c in collators if c is not None and hasattr(c, "epoch")]

    def on_epoch_begin(self, args, state: TrainerState, control, **kwargs):
        # `state.epoch` is exact at epoch boundaries (epoch + steps/steps) and fractional mid-epoch
        # after a resume; its floor is the epoch the next batches belong to.
        epoch = int(math.floor((state.epoch or 0.0) + 1e-9))
        for collator in self.collators:
            collator.epoch = epoch
