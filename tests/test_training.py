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
from transformers import PretrainedConfig, PreTrainedModel, TrainerCallback, TrainingArguments
from transformers.utils import ModelOutput

from spatia_hf.training.trainer import (
    EpochSeedCallback,
    SpatiaTrainer,
    TimeBudgetCallback,
    log_name,
    objective_losses,
)

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_epoch_seed_callback_sets_the_epoch_of_collators_also_after_a_resume():
    from transformers import TrainerControl, TrainerState

    class _C:
        epoch = 0

    a, b = _C(), _C()
    cb = EpochSeedCallback(a, b, None)
    for state_epoch, expected in ((None, 0), (2.0, 2), (1.5, 1)):  # 1.5: resumed mid-epoch 1
        cb.on_epoch_begin(None, TrainerState(epoch=state_epoch), TrainerControl())
        assert a.epoch == b.epoch == expected


def test_time_budget_rejects_non_positive_minutes():
    with pytest.raises(ValueError, match="max_minutes=0"):
        TimeBudgetCallback(0)


def test_resume_true_picks_the_newest_complete_checkpoint(tmp_path):
    from spatia_hf.training.setup import resolve_resume

    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("some/folder", tmp_path) == "some/folder"
    with pytest.raises(FileNotFoundError, match="no complete checkpoint-N"):
        resolve_resume("true", tmp_path)
    for step, complete in ((2, True), (10, True), (11, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert resolve_resume(True, tmp_path) == str(tmp_path / "checkpoint-10")  # 10 > 2 numerically; 11 is torn


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
from spatia_hf.data.collators import (  # noqa: E402
    CellCollator,
    ExpressionTargetCollator,
    ImputationCollator,
    NicheCollator,
    TissueCollator,
    token_mask_from_noise,
)
from spatia_hf.data.datasets import (  # noqa: E402
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


def test_arrow_rows_follow_the_rows_of_a_split(tiny):
    train, held = split_by_section(tiny["cells"], None)
    rows = ArrowRows(held, [schema.CELL_ID, schema.GENE_COUNTS])
    batch = rows.__getitems__([3, 0, -1])
    ref = held.with_format("numpy")
    assert list(batch[schema.CELL_ID]) == [ref[3][schema.CELL_ID], ref[0][schema.CELL_ID], ref[-1][schema.CELL_ID]]
    np.testing.assert_array_equal(batch[schema.GENE_COUNTS][1], ref[0][schema.GENE_COUNTS])
    with pytest.raises(IndexError):
        rows.__getitems__([len(held)])


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


# --------------------------------------------------------------------------- errors before training starts
def test_missing_label_column_fails_before_training(tiny_dir, tmp_path):
    from spatia_hf.training.finetune import run_finetuning

    with pytest.raises(ValueError, match="needs the label column 'no_such_label' in the 'cells' config"):
        run_finetuning(ModelArguments(), DataArguments(dataset_dir=str(tiny_dir)),
                       FinetuneArguments(task="annotation", label_column="no_such_label"), _training_args(tmp_path))
    assert not (tmp_path / "run").exists()


def test_section_classification_needs_two_training_classes(tiny_dir, tmp_path):
    from spatia_hf.training.finetune import run_finetuning

    with pytest.raises(ValueError, match="training sections hold 1 class"):
        run_finetuning(ModelArguments(), DataArguments(dataset_dir=str(tiny_dir)),
                       FinetuneArguments(task="tissue_classification"), _training_args(tmp_path))


def test_checkpoint_of_another_model_type_is_refused(tiny, tiny_dir, tmp_path):
    from spatia_hf import SpatiaCellConfig, SpatiaCellModel
    from spatia_hf.training.pretrain import run_pretraining

    cell_dir = tmp_path / "cell_ckpt"
    SpatiaCellModel(SpatiaCellConfig.from_preset("tiny", gene_vocab=tiny.genes)).save_pretrained(cell_dir)
    with pytest.raises(ValueError, match="holds model_type='spatia_cell', not a composite SPATIA checkpoint"):
        run_pretraining(ModelArguments(model_name_or_path=str(cell_dir)), DataArguments(dataset_dir=str(tiny_dir)),
                        _training_args(tmp_path))
    assert not (tmp_path / "run").exists()


def test_gene_panel_without_overlap_is_refused(tiny_dir, tmp_path):
    from spatia_hf import SpatiaConfig, SpatiaForPretraining
    from spatia_hf.training.pretrain import run_pretraining

    ckpt = tmp_path / "other_panel"
    config = SpatiaConfig.from_preset("tiny", gene_vocab=[f"OTHER{i}" for i in range(20)], image_size=32,
                                      num_channels=2)
    SpatiaForPretraining(config).save_pretrained(ckpt)
    with pytest.raises(ValueError, match="shares no gene with the model vocabulary"):
        run_pretraining(ModelArguments(model_name_or_path=str(ckpt), min_gene_coverage=0.0),
                        DataArguments(dataset_dir=str(tiny_dir)), _training_args(tmp_path))
    assert not (tmp_path / "run").exists()


def test_argument_dataclasses_reject_bad_values():
    with pytest.raises(ValueError, match="--schedule 'tissue'"):
        DataArguments(dataset_dir="x", schedule="tissue")
    with pytest.raises(ValueError, match="--task 'segmentation'"):
        FinetuneArguments(task="segmentation")
    with pytest.raises(ValueError, match="--preset 'huge'"):
        ModelArguments(preset="huge")


# --------------------------------------------------------------------------- pretraining and fine-tuning runs
def test_pretraining_logs_every_objective_and_saves_a_loadable_model(tiny_dir, tmp_path):
    from transformers import AutoModelForPreTraining

    from spatia_hf import SpatiaProcessor
    from spatia_hf.training.pretrain import run_pretraining

    result = run_pretraining(ModelArguments(preset="tiny"),
                             DataArguments(dataset_dir=str(tiny_dir), max_cells_per_niche=4, max_eval_samples=4),
                             _training_args(tmp_path, max_steps=3, do_eval=True))
    logged = [h for h in result.log_history if "loss" in h]
    assert len(logged) == 3
    for name in ("loss_mgm", "loss_mim", "loss_contrastive", "loss_niche"):
        assert all(np.isfinite(h[name]) for h in logged), name
        assert f"eval_{name}" in result.eval_metrics
    out = tmp_path / "run"
    summary = json.loads((out / "spatia_training.json").read_text())
    assert summary["world_size"] == 1 and summary["global_step"] == 3
    model = AutoModelForPreTraining.from_pretrained(out)
    assert type(model).__name__ == "SpatiaForPretraining"
    assert model.spatia.niche.has_fitted_cell_states  # fitted on training cells after training, saved with it
    assert SpatiaProcessor.from_pretrained(out).gene_vocab == load_spatia_dataset(tiny_dir, ("cells",)).genes


class _Interrupt(TrainerCallback):
    """Simulates a crash at the start of step ``at + 1`` (after checkpoint ``at`` was written)."""

    def __init__(self, at: int):
        self.at = at

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step >= self.at:
            raise RuntimeError("simulated interruption")


def test_interrupted_run_resumes_to_the_same_final_loss(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    from spatia_hf.training.pretrain import run_pretraining

    model_args = ModelArguments(preset="tiny")
    data_args = DataArguments(dataset_dir=str(tiny_dir), max_cells_per_niche=4)

    def args(name):  # 9 training niches, batch 4: 3 steps per epoch; checkpoint 4 is mid-epoch 2
        return _training_args(tmp_path, output_dir=str(tmp_path / name), max_steps=5, save_strategy="steps",
                              save_steps=4)

    full = run_pretraining(model_args, data_args, args("full"))
    with pytest.raises(RuntimeError, match="simulated interruption"):
        run_pretraining(model_args, data_args, args("cut"), callbacks=[_Interrupt(at=4)])
    assert (tmp_path / "cut" / "checkpoint-4").is_dir() and not (tmp_path / "cut" / "model.safetensors").exists()
    # a later checkpoint cut short while saving (no trainer_state.json, torn weights) must be skipped
    torn = tmp_path / "cut" / "checkpoint-5"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"\x00" * 16)
    resumed = run_pretraining(model_args, data_args, args("cut"), resume_from_checkpoint=True)

    def losses(r):
        return {h["step"]: h["loss"] for h in r.log_history if "loss" in h}

    assert resumed.global_step == full.global_step == 5
    assert losses(resumed)[5] == pytest.approx(losses(full)[5], rel=1e-5, abs=1e-6)  # the step after the resume
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_annotation_finetuning_stores_labels_and_reports_macro_f1(tiny_dir, tmp_path):
    from transformers import AutoConfig

    from spatia_hf.training.finetune import run_finetuning

    result = run_finetuning(ModelArguments(preset="tiny"), DataArguments(dataset_dir=str(tiny_dir)),
                            FinetuneArguments(task="annotation"), _training_args(tmp_path, max_steps=3, do_eval=True))
    assert 0.0 <= result.eval_metrics["eval_macro_f1"] <= 1.0 and "eval_accuracy" in result.eval_metrics
    config = AutoConfig.from_pretrained(tmp_path / "run")
    classes = sorted(set(load_spatia_dataset(tiny_dir, ("cells",))["cells"]["cell_type"]))
    assert [config.id2label[i] for i in range(len(classes))] == classes
    assert config.label2id == {c: i for i, c in enumerate(classes)}
    from spatia_hf import SpatiaForCellClassification

    # fine-tuning moved the cell embeddings: the states were refitted before saving
    assert SpatiaForCellClassification.from_pretrained(tmp_path / "run").spatia.niche.has_fitted_cell_states


@pytest.mark.parametrize("task", ["imputation", "image_to_expression"])
def test_expression_tasks_report_per_gene_correlation(tiny_dir, tmp_path, task):
    from spatia_hf.training.finetune import run_finetuning

    result = run_finetuning(ModelArguments(preset="tiny"), DataArguments(dataset_dir=str(tiny_dir)),
                            FinetuneArguments(task=task), _training_args(tmp_path, max_steps=2, do_eval=True))
    assert -1.0 <= result.eval_metrics["eval_pearson_mean"] <= 1.0
    assert result.eval_metrics["eval_n_genes"] >= 2


# --------------------------------------------------------------------------- front ends
def test_cli_pretrain_and_finetune(tiny_dir, tmp_path, capsys):
    from spatia_hf.cli import main

    out = tmp_path / "cli_pt"
    rc = main(["pretrain", "--data", str(tiny_dir), "--out", str(out), "--max-steps", "2", "--batch-size", "4",
               "--device", "cpu", "--seed", "1", "--no-progress", "--set", "max_cells_per_niche=4", "--logging-steps", "1",
               "--no-eval"])
    assert rc == 0 and (out / "model.safetensors").is_file()
    assert "loss_mgm" in capsys.readouterr().out
    rc = main(["finetune", "--task", "annotation", "--model", str(out), "--data", str(tiny_dir), "--out",
               str(tmp_path / "cli_ft"), "--label-column", "no_such_label", "--device", "cpu", "--no-progress"])
    assert rc == 1
    assert "needs the label column 'no_such_label'" in capsys.readouterr().err


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = sorted((REPO / "examples" / "accelerate_configs").glob("*.yaml"))
    kinds = {load_config_from_file(str(p)).distributed_type.value for p in configs}
    assert {"MULTI_GPU", "FSDP", "DEEPSPEED"} <= kinds
    assert any(load_config_from_file(str(p)).num_machines > 1 for p in configs)


# --------------------------------------------------------------------------- 2-process DDP (gloo, CPU)
@pytest.mark.slow
def test_pretraining_script_runs_two_process_ddp(tiny_dir, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           str(REPO / "examples" / "pretrain.py"), "--dataset_dir", str(tiny_dir), "--output_dir", str(out),
           "--preset", "tiny", "--max_steps", "3", "--per_device_train_batch_size", "2", "--logging_steps", "1",
           "--max_cells_per_niche", "4", "--use_cpu", "--ddp_backend", "gloo",
           "--save_strategy", "no", "--report_to", "none", "--optim", "adamw_torch", "--disable_tqdm", "true"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "spatia_training.json").read_text())
    assert summary["world_size"] == 2
    assert summary["global_step"] == 3 and set(summary["objectives_first_last"]) >= {"loss_mgm", "loss_niche"}
    from safetensors.torch import load_file

    assert load_file(out / "model.safetensors")["spatia.niche.cell_states.fitted"].item() == 1.0  # every rank fitted


def test_pretraining_batches_carry_seeded_masks_the_model_uses(tiny, tiny_dir):
    from spatia_hf.training.pretrain import build_pretraining_data, load_pretraining_model
    from spatia_hf.training.setup import build_processor

    model_args, data_args = ModelArguments(preset="tiny"), DataArguments(dataset_dir=str(tiny_dir), max_cells_per_niche=4)
    model = load_pretraining_model(model_args, data_args, tiny, seed=0)
    train, _, collator = build_pretraining_data(data_args, tiny, build_processor(model_args, model.config, tiny, 0),
                                                model, seed=0)
    batch = collator(train.__getitems__([0, 1]))
    assert {"gene_value_mask", "image_patch_mask", "niche_cell_mask"} <= set(batch)
    n_real = int(batch["cell_attention_mask"].sum())
    assert batch["image_patch_mask"].shape == (n_real, model.spatia.cell.num_patches)
    out = model(**batch)
    # each distinct cell is encoded once, with the mask of its first row (a cell's masks are seeded by its key,
    # so every row of the same cell carries the same mask)
    from spatia_hf.models.modeling_heads import first_occurrences

    uids = batch["cell_uids"][batch["cell_attention_mask"].bool()]
    first, inverse = first_occurrences(uids)
    assert torch.equal(out.image_patch_mask, batch["image_patch_mask"][first])
    assert torch.equal(batch["image_patch_mask"][first][inverse], batch["image_patch_mask"])
    assert out.niche_loss is not None and out.mgm_loss is not None


def test_push_to_hub_passes_through_to_the_trainer(tiny_dir, tmp_path):
    from hub_server import LoopbackHub
    from spatia_hf.training.pretrain import run_pretraining

    with LoopbackHub() as hub, hub.client():
        args = _training_args(tmp_path, max_steps=1, push_to_hub=True, hub_model_id="lab/spatia-tiny",
                              hub_token=hub.token, do_eval=True)
        run_pretraining(ModelArguments(preset="tiny"), DataArguments(dataset_dir=str(tiny_dir), max_cells_per_niche=4),
                        args)
        files = hub.files("lab/spatia-tiny")
    assert {"config.json", "model.safetensors", "spatia_processor.json", "spatia_training.json"} <= set(files)
    assert files["model.safetensors"] == (tmp_path / "run" / "model.safetensors").read_bytes()
    assert not any(name.endswith((".bin", ".pt", ".pth")) or name.startswith("checkpoint-") for name in files)
    # SPATIA's card, not transformers' generic one: library, citation, model-index from the held-out evaluation
    from huggingface_hub import ModelCard

    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "spatia-hf" and "arXiv:2507.04704" in card.text
    results = card.data.eval_results
    assert results and results[0].task_name.startswith("SPATIA pretraining objectives")
    assert {r.metric_name for r in results} >= {"loss"}
