"""Trainer pretraining / fine-tuning: per-objective logging, collators, resume, errors, DDP.

Tiny sizes throughout; the 2-process DDP run is ``slow``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, TrainingArguments
from transformers.utils import ModelOutput

from spatia_hf.training.trainer import (
    EpochSeedCallback,
    SpatiaTrainer,
    TimeBudgetCallback,
    log_name,
    objective_losses,
)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- a toy two-objective model
@dataclass
class _ToyOutput(ModelOutput):
    loss: torch.Tensor | None = None
    a_loss: torch.Tensor | None = None
    b_loss: torch.Tensor | None = None


class _ToyConfig(PretrainedConfig):
    model_type = "spatia_test_toy"


class _ToyModel(PreTrainedModel):
    """Two regressions from one input; ``b_loss`` only when ``with_b`` is set on the batch."""

    config_class = _ToyConfig
    accepts_loss_kwargs = False

    def __init__(self, config):
        super().__init__(config)
        self.a = nn.Linear(4, 1)
        self.b = nn.Linear(4, 1)
        self.post_init()

    def forward(self, x, y, with_b=None):
        a_loss = ((self.a(x).squeeze(-1) - y) ** 2).mean()
        b_loss = ((self.b(x).squeeze(-1) + y) ** 2).mean() if with_b is not None and bool(with_b.all()) else None
        loss = a_loss + (b_loss if b_loss is not None else 0.0)
        return _ToyOutput(loss=loss, a_loss=a_loss, b_loss=b_loss)


class _ToyData(torch.utils.data.Dataset):
    def __init__(self, n=64, with_b=True):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
        self.with_b = with_b

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i], "with_b": torch.tensor(self.with_b)}


def _toy_args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, learning_rate=0.05,
                max_steps=8, logging_steps=4, save_strategy="no", report_to="none", use_cpu=True, seed=0,
                disable_tqdm=True, optim="adamw_torch")
    base.update(kw)
    return TrainingArguments(**base)


def test_log_name_maps_both_conventions():
    assert log_name("mgm_loss") == "loss_mgm"
    assert log_name("loss_mim") == "loss_mim"
    assert log_name("loss") is None and log_name("logits") is None


def test_objective_losses_skips_objectives_that_did_not_run():
    out = _ToyOutput(loss=torch.tensor(3.0), a_loss=torch.tensor(1.0), b_loss=None)
    assert set(objective_losses(out)) == {"loss_a"}


def test_trainer_logs_each_objective_as_mean_between_logging_steps(tmp_path):
    torch.manual_seed(0)
    model = _ToyModel(_ToyConfig())
    trainer = SpatiaTrainer(model=model, args=_toy_args(tmp_path), train_dataset=_ToyData())
    seen: list[dict] = []
    orig = trainer._train_meter.update
    trainer._train_meter.update = lambda o: (seen.append(objective_losses(o)), orig(o))[1]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for k, h in enumerate(logs):  # each log is the mean of its 4 steps, per objective
        chunk = seen[4 * k : 4 * k + 4]
        assert h["loss_a"] == pytest.approx(float(np.mean([float(s["loss_a"]) for s in chunk])), rel=1e-5)
        assert h["loss_b"] == pytest.approx(float(np.mean([float(s["loss_b"]) for s in chunk])), rel=1e-5)
        assert h["loss"] == pytest.approx(h["loss_a"] + h["loss_b"], rel=1e-4)


def test_trainer_adds_eval_objectives_to_metrics(tmp_path):
    model = _ToyModel(_ToyConfig())
    args = _toy_args(tmp_path, max_steps=2, per_device_eval_batch_size=16)
    trainer = SpatiaTrainer(model=model, args=args, train_dataset=_ToyData(), eval_dataset=_ToyData(32))
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_loss_a", "eval_loss_b"} <= set(metrics)
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_loss_a"] + metrics["eval_loss_b"], rel=1e-4)


def test_objective_absent_from_every_batch_is_not_logged(tmp_path):
    model = _ToyModel(_ToyConfig())
    trainer = SpatiaTrainer(model=model, args=_toy_args(tmp_path), train_dataset=_ToyData(with_b=False))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all("loss_a" in h and "loss_b" not in h for h in logs)


def test_time_budget_stops_training_and_saves(tmp_path):
    model = _ToyModel(_ToyConfig())
    budget = TimeBudgetCallback(max_minutes=1e-9)
    trainer = SpatiaTrainer(model=model, args=_toy_args(tmp_path, max_steps=50), train_dataset=_ToyData(),
                            callbacks=[budget])
    trainer.train()
    assert trainer.state.global_step == 1 and budget.stopped_at_step == 1
    assert (tmp_path / "out" / "checkpoint-1" / "model.safetensors").is_file()


def test_time_budget_rejects_non_positive_minutes():
    with pytest.raises(ValueError, match="max_minutes=0"):
        TimeBudgetCallback(0)


def test_saved_training_arguments_are_json_not_pickle(tmp_path):
    model = _ToyModel(_ToyConfig())
    trainer = SpatiaTrainer(model=model, args=_toy_args(tmp_path, max_steps=1), train_dataset=_ToyData())
    trainer.train()
    trainer.save_model()
    out = tmp_path / "out"
    assert not (out / "training_args.bin").exists()
    assert json.loads((out / "training_args.json").read_text())["seed"] == 0


# --------------------------------------------------------------------------- real data: tiny synthetic tissue
from spatia_hf.data import schema  # noqa: E402
from spatia_hf.training.arguments import (  # noqa: E402
    DataArguments,
    FinetuneArguments,
    ModelArguments,
    SpatiaTrainingArguments,
)
from spatia_hf.training.collators import (  # noqa: E402
    CellCollator,
    ExpressionTargetCollator,
    ImputationCollator,
    NicheCollator,
    TissueCollator,
    token_mask_from_noise,
)
from spatia_hf.training.datasets import (  # noqa: E402
    ArrowRows,
    NicheCellsDataset,
    load_spatia_dataset,
    split_by_section,
)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from spatia_hf.data.synthetic import build_tiny_dataset

    return build_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny", n_sections=2, n_cells=80, seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    return load_spatia_dataset(tiny_dir)


@pytest.fixture()
def processor(tiny):
    from spatia_hf import SpatiaConfig, SpatiaProcessor

    config = SpatiaConfig.from_preset("tiny", gene_vocab=tiny.genes, image_size=32, num_channels=2)
    proc = SpatiaProcessor.from_config(config)
    proc.map_panel(tiny.genes, tiny.gene_ids)
    return proc


def _training_args(tmp_path, **kw) -> SpatiaTrainingArguments:
    base = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, per_device_eval_batch_size=8,
                learning_rate=1e-3, max_steps=4, logging_steps=1, save_strategy="no", report_to="none",
                use_cpu=True, seed=0, disable_tqdm=True, optim="adamw_torch")
    base.update(kw)
    return SpatiaTrainingArguments(**base)


def test_split_by_section_holds_out_whole_sections(tiny):
    train, held = split_by_section(tiny["cells"], None)
    assert set(held[schema.SAMPLE_ID]) == {tiny.sample_ids[-1]}
    assert tiny.sample_ids[-1] not in set(train[schema.SAMPLE_ID])
    assert len(train) + len(held) == len(tiny["cells"])
    with pytest.raises(ValueError, match="not in the dataset"):
        split_by_section(tiny["cells"], ["no_such_section"])
    with pytest.raises(ValueError, match="every section is held out"):
        split_by_section(tiny["cells"], tiny.sample_ids)


def test_arrow_rows_keep_uint8_images_and_match_rows(tiny):
    rows = ArrowRows(tiny["cells"])
    batch = rows.__getitems__([5, 2])
    assert batch[schema.IMAGE].dtype == np.uint8 and batch[schema.IMAGE].shape[0] == 2
    ref = tiny["cells"].with_format("numpy")[2]
    np.testing.assert_array_equal(batch[schema.IMAGE][1], ref[schema.IMAGE])
    np.testing.assert_array_equal(batch[schema.GENE_INDICES][1], ref[schema.GENE_INDICES])
    assert batch[schema.CELL_ID][1] == ref[schema.CELL_ID]


def test_token_mask_hides_the_ratio_of_real_tokens_only():
    real = np.zeros((3, 10), dtype=bool)
    real[0, :10], real[1, :4], real[2, :1] = True, True, True
    mask = token_mask_from_noise(np.random.default_rng(0).random((3, 10)), real, 0.5)
    assert mask.sum(1).tolist() == [5, 2, 0]  # a single token is never hidden
    assert not (mask & ~real).any()


def test_cell_collator_masks_are_seeded_per_cell_not_per_batch(tiny, processor):
    rows = ArrowRows(tiny["cells"])
    coll = CellCollator(processor, seed=3, gene_mask_ratio=0.25, image_mask_ratio=0.5, num_patches=16)
    both = coll(rows.__getitems__([0, 1]))
    alone = coll(rows.__getitems__([1]))
    n = int(alone["gene_attention_mask"][0].sum())
    assert torch.equal(both["gene_ids"][1, :n], alone["gene_ids"][0, :n])  # same sampled zero genes
    assert torch.equal(both["gene_value_mask"][1, :n], alone["gene_value_mask"][0, :n])
    assert torch.equal(both["image_patch_mask"][1], alone["image_patch_mask"][0])
    assert both["image_patch_mask"].sum(1).tolist() == [8, 8]
    assert not (both["gene_value_mask"] & ~both["gene_attention_mask"].bool()).any()
    assert both["pixel_values"].shape == (2, 2, 32, 32) and both["pixel_values"].dtype == torch.float32
    coll.epoch = 1
    assert not torch.equal(coll(rows.__getitems__([0, 1]))["image_patch_mask"], both["image_patch_mask"])


def test_cell_collator_labels_and_unknown_label_error(tiny, processor):
    rows = ArrowRows(tiny["cells"]).__getitems__([0, 1, 2])
    classes = sorted(set(tiny["cells"]["cell_type"]))
    coll = CellCollator(processor, label_column="cell_type", label2id={c: i for i, c in enumerate(classes)})
    labels = coll(rows)["labels"].tolist()
    assert [classes[i] for i in labels] == list(rows["cell_type"])
    bad = CellCollator(processor, label_column="cell_type", label2id={"only": 0})
    with pytest.raises(ValueError, match="cell_type: label .* is not among"):
        bad(rows)


def test_niche_collator_pads_variable_size_niches(tiny, processor):
    data = NicheCellsDataset(tiny["niches"], tiny["cells"], max_cells=6)
    n_cells = np.asarray(tiny["niches"][schema.N_CELLS])
    picks = [int(np.argmax(n_cells)), int(np.argmin(n_cells)), int(np.flatnonzero(n_cells == 6)[0])]
    examples = data.__getitems__(picks)
    sizes = [len(e["cells"][schema.CELL_ID]) for e in examples]
    assert sizes == [6, int(n_cells.min()), 6]  # the largest niche is cut to max_cells
    batch = NicheCollator(CellCollator(processor), niche_mask_ratio=0.3)(examples)
    b, n = len(examples), max(sizes)
    assert batch["cell_attention_mask"].sum(1).tolist() == sizes
    assert batch["pixel_values"].shape[:2] == (b, n) and batch["gene_ids"].shape[:2] == (b, n)
    for i, e in enumerate(examples):
        k = sizes[i]
        np.testing.assert_allclose(batch["cell_positions"][i, :k, 0].numpy(), e["niche"][schema.CELL_REL_X_UM])
        assert (batch["gene_ids"][i, k:] == 0).all() and (batch["pixel_values"][i, k:] == 0).all()
    assert not (batch["niche_cell_mask"] & ~batch["cell_attention_mask"].bool()).any()


def test_niche_dataset_rejects_cells_of_another_split(tiny):
    train_cells, _ = split_by_section(tiny["cells"], None)
    with pytest.raises(ValueError, match="is not in the cells config"):
        NicheCellsDataset(tiny["niches"], train_cells)


def test_imputation_collator_holds_out_the_same_genes_everywhere(tiny, processor):
    rows = ArrowRows(tiny["cells"]).__getitems__(list(range(6)))
    held = processor.panel.vocab_ids[[3, 10, 40]]
    batch = ImputationCollator(processor, holdout_gene_ids=held)(rows)
    assert (batch["target_gene_ids"] == torch.as_tensor(held)).all()
    assert not np.isin(batch["gene_ids"].numpy(), held).any()
    assert torch.isfinite(batch["labels"]).all()
    rand = ImputationCollator(processor, mask_ratio=0.3)(rows)
    for i in range(6):  # random targets are disjoint from the inputs of the same cell
        tgt = set(rand["target_gene_ids"][i][rand["target_attention_mask"][i].bool()].tolist())
        assert tgt and not tgt & set(rand["gene_ids"][i].tolist())


def test_expression_targets_use_the_processor_normalisation(tiny, processor):
    rows = ArrowRows(tiny["cells"]).__getitems__([4])
    batch = ExpressionTargetCollator(processor)(rows)
    idx, cnt = rows[schema.GENE_INDICES][0], rows[schema.GENE_COUNTS][0].astype(np.float64)
    expected = np.log1p(cnt / (cnt.sum() / processor.target_sum))
    col = {int(v): j for j, v in enumerate(batch["target_gene_ids"][0].tolist())}
    got = np.asarray([batch["labels"][0, col[int(processor.panel.vocab_ids[i])]].item() for i in idx])
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_tissue_collator_windows_and_padding():
    rng = np.random.default_rng(0)
    pos = rng.uniform(0, 1000, size=(200, 2)).astype(np.float32)
    ex = [{"embeddings": rng.normal(size=(200, 8)), "positions": pos, "label": 1, "key": k} for k in range(3)]
    batch = TissueCollator(window_um=300.0, min_niches=4)(ex)
    m = batch["niche_attention_mask"].sum(1)
    assert (m >= 4).all() and (m < 200).all() and batch["labels"].tolist() == [1, 1, 1]
    for i in range(3):
        p = batch["niche_positions"][i][batch["niche_attention_mask"][i].bool()]
        assert float((p.max(0).values - p.min(0).values).max()) <= 300.0 + 1e-3
    full = TissueCollator(window_um=None)(ex)
    assert full["niche_attention_mask"].sum().item() == 600
