"""SPATIA in the 12-task evaluation: its outputs on the suite's rows, the split checks, `spatia evaluate`.

Fast tests use randomly initialised tiny checkpoints (real models, saved and loaded like trained
ones); the end-to-end test pretrains, fine-tunes and trains a generator for a few steps (slow).
"""

import json
import math

import numpy as np
import pytest
import torch

from spatia_hf.data import schema


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-section dataset, a random tiny pretraining checkpoint and a random annotation head."""
    from spatia_hf import SpatiaConfig, SpatiaForCellClassification, SpatiaForPretraining
    from spatia_hf.data.synthetic import build_tiny_dataset
    from spatia_hf.models.processing_spatia import SpatiaProcessor
    from spatia_hf.data.datasets import load_spatia_dataset

    root = tmp_path_factory.mktemp("evaluate_spatia")
    data = build_tiny_dataset(root / "data", n_sections=3, n_cells=70, seed=0)
    ds = load_spatia_dataset(data, ("cells",))
    c, size, _ = ds["cells"].features[schema.IMAGE].shape
    torch.manual_seed(0)
    config = SpatiaConfig.from_preset("tiny", gene_vocab=ds.genes, image_size=size, num_channels=c)
    SpatiaForPretraining(config).save_pretrained(root / "pre")
    SpatiaProcessor.from_config(config).save_pretrained(root / "pre")
    types = sorted(set(ds["cells"]["cell_type"]))
    head = SpatiaConfig.from_preset("tiny", gene_vocab=ds.genes, image_size=size, num_channels=c,
                                    num_labels=len(types), id2label=dict(enumerate(types)),
                                    label2id={t: i for i, t in enumerate(types)})
    SpatiaForCellClassification(head).save_pretrained(root / "ft")
    sections = sorted(ds.sample_ids)
    record = json.dumps({"train_sections": sections[:-1], "eval_sections": sections[-1:]})
    for name in ("pre", "ft"):  # what pretraining / fine-tuning record: the last section held out
        (root / name / "spatia_training.json").write_text(record)
    return {"data": data, "pre": root / "pre", "ft": root / "ft", "root": root, "types": types,
            "sections": sections}


@pytest.fixture(scope="module")
def inputs(tiny):
    from spatia_hf.evaluation.suite import prepare_suite

    return prepare_suite(tiny["data"], seed=0, n_masked_genes=6, n_target_genes=8, max_generation=8,
                         max_perturbation=4)


@pytest.fixture(scope="module")
def ckpt(tiny):
    from spatia_hf.evaluation.spatia_methods import load_checkpoint

    return load_checkpoint(tiny["pre"], tiny["data"])


def test_hidden_genes_are_neither_input_nor_sampled_as_zeros(inputs, ckpt):
    from spatia_hf.evaluation.spatia_methods import cell_rows, hiding_processor
    from spatia_hf.inference import encode_cells

    hidden = inputs.cells.gene_index(inputs.masked_genes)
    hidden_vocab = set(ckpt.processor.panel.vocab_ids[hidden].tolist())
    idx = np.arange(40)
    plain = encode_cells(ckpt.processor, cell_rows(inputs, idx), "expression")
    masked = encode_cells(hiding_processor(ckpt.processor, hidden), cell_rows(inputs, idx, hidden), "expression")
    assert hidden_vocab & set(plain["gene_ids"].unique().tolist())  # they are there without hiding
    assert not hidden_vocab & set(masked["gene_ids"].unique().tolist())
    # the library (hence every observed value) excludes the hidden genes, as the suite's truth does
    from spatia_hf.evaluation.suite import masked_log1p

    observed, _, obs_cols = masked_log1p(inputs, inputs.masked_genes)
    vocab_to_col = {int(v): j for j, v in enumerate(ckpt.processor.panel.vocab_ids)}
    gid, val = masked["gene_ids"][0].numpy(), masked["gene_values"][0].numpy()
    expressed = val > 0
    cols = np.array([vocab_to_col[int(g)] for g in gid[expressed]])
    np.testing.assert_allclose(val[expressed], observed[0, np.searchsorted(obs_cols, cols)], rtol=1e-4)


def test_zero_shot_imputation_cannot_read_the_masked_values(inputs, ckpt):
    import copy

    from spatia_hf.evaluation.spatia_methods import masked_gene_predictions

    idx = inputs.section_split.test[:12]
    genes = inputs.masked_genes
    base = masked_gene_predictions(ckpt, inputs, idx, genes)
    assert base.shape == (len(idx), len(genes)) and np.isfinite(base).all()
    import scipy.sparse as sp

    changed = copy.copy(inputs)
    changed.cells = copy.copy(inputs.cells)
    counts = inputs.cells.counts.toarray()
    counts[:, inputs.cells.gene_index(genes)] = counts[:, inputs.cells.gene_index(genes)] * 7 + 3
    changed.cells.counts = sp.csr_matrix(counts)
    np.testing.assert_allclose(masked_gene_predictions(ckpt, changed, idx, genes), base, atol=1e-5)
    # a visible gene does move them (the check above could fail)
    other = [g for g in inputs.cells.genes if g not in genes][:20]
    counts[:, inputs.cells.gene_index(other)] = counts[:, inputs.cells.gene_index(other)] * 7 + 3
    changed.cells.counts = sp.csr_matrix(counts)
    assert not np.allclose(masked_gene_predictions(ckpt, changed, idx, genes), base, atol=1e-5)


def test_hidden_cell_context_does_not_read_the_cell_itself(tiny, inputs, ckpt):
    from spatia_hf.evaluation.spatia_methods import hidden_cell_context
    from spatia_hf.data.datasets import load_spatia_dataset

    niches = load_spatia_dataset(tiny["data"], ("niches",))["niches"]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(inputs.cells.n_cells, ckpt.backbone.config.cell_config.hidden_size)).astype(np.float32)
    base = hidden_cell_context(ckpt, inputs, niches, x, seed=0)
    assert base.shape == x.shape and np.isfinite(base).all()
    in_niche = np.flatnonzero(~np.isclose(base, x).all(axis=1))
    assert len(in_niche) > 0  # cells in a niche get the niche model's output, not their own embedding
    i = in_niche[0]
    changed = x.copy()
    changed[i] += 5.0
    again = hidden_cell_context(ckpt, inputs, niches, changed, seed=0)
    np.testing.assert_allclose(again[i], base[i], atol=1e-5)  # its own embedding never entered
    assert not np.allclose(np.delete(again, i, 0), np.delete(base, i, 0), atol=1e-5)  # but its neighbours see it


def test_spatia_outputs_match_the_suite_contract_for_every_slot(tiny, inputs, ckpt):
    from spatia_hf.evaluation import spatia_methods as M

    ft = M.load_checkpoint(tiny["ft"], tiny["data"], fallback_processor=ckpt.processor)
    out = M.spatia_methods(ckpt, inputs, tiny["data"], finetuned=[ft])
    n, sec = inputs.cells.n_cells, inputs.section_split
    d = ckpt.backbone.config.cell_config.hidden_size
    states = ckpt.backbone.config.niche_config.num_cell_states
    assert out.extra["cell_annotation"][M.FUSED].shape == (n, d)
    assert out.extra["image_annotation"][M.IMAGE_BRANCH].shape == (n, d)
    assert out.extra["domain_clustering"][M.NICHE_AWARE].shape == (n, d)
    assert out.extra["section_classification"][M.TISSUE].shape[0] == len(inputs.sections.sample_ids)
    pred = out.extra["finetuned_annotation"][M.FINETUNED_HEAD]
    assert pred.shape == (len(sec.test),) and set(pred) <= set(tiny["types"])
    for key, genes in (("gene_imputation", inputs.masked_genes), ("niche_imputation", inputs.neighbor_genes)):
        for name, p in out.extra[key].items():  # zero-shot heads: one row per held-out cell
            assert p.shape == (len(sec.test), len(genes)) and np.isfinite(p).all(), name
        for name, x in out.extra[f"{key}_features"].items():  # embeddings the suite's ridge is fitted on
            width = d + states if name == M.RIDGE_CELL_COMPOSITION else d  # the cell next to its composition
            assert x.shape == (len(sec.test), width) and np.isfinite(x).all(), name
    assert set(out.extra["gene_imputation"]) == {M.MASKED_HEAD}
    assert set(out.extra["gene_imputation_features"]) == {M.RIDGE_FUSED}
    assert set(out.extra["niche_imputation"]) == {M.NICHE_HEAD}
    assert set(out.extra["niche_imputation_features"]) == {M.RIDGE_NICHE, M.RIDGE_CELL_ONLY, M.RIDGE_CELL_COMPOSITION}
    composition = out.extra["niche_imputation_features"][M.RIDGE_CELL_COMPOSITION][:, d:]
    np.testing.assert_allclose(composition.sum(1), 1.0, rtol=1e-5)
    niche = out.extra["domain_clustering"]
    assert niche[M.NICHE_EMBEDDING].shape == (n, states)  # the composition, as spatia embed writes it
    assert niche[M.NICHE_TOKEN].shape == (n, ckpt.backbone.config.niche_config.hidden_size)
    assert out.extra["image_to_expression"][M.RIDGE_IMAGE].shape == (len(sec.test), len(inputs.target_genes))
    e, m = out.extra["retrieval"][M.CONTRASTIVE]
    assert e.shape == m.shape == (len(inputs.retrieval_idx), ckpt.model.config.contrastive_dim)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    # ablations are baselines of the full model; the rest count as SPATIA
    assert out.kinds["domain_clustering"] == {M.CELL_ONLY: "baseline"}
    assert out.kinds["cell_annotation"][M.ABLATION_CONCAT] == "baseline"
    assert M.FUSED not in out.kinds["cell_annotation"]
    assert any("no concatenation-fusion checkpoint" in t for t in out.notes[1])
    assert any("not run" in t for t in out.notes[11])


def test_embeddings_are_aligned_by_section_and_cell_not_by_row(inputs):
    from spatia_hf.evaluation.spatia_methods import align_rows

    c = inputs.cells
    perm = np.random.default_rng(0).permutation(c.n_cells)
    order = align_rows(inputs, c.sample_ids[perm], c.cell_ids[perm])
    assert np.array_equal(perm[order], np.arange(c.n_cells))
    with pytest.raises(ValueError, match="missing from the embeddings"):
        align_rows(inputs, c.sample_ids[perm[1:]], c.cell_ids[perm[1:]])


def test_null_condition_ignores_the_expression():
    from spatia_hf.evaluation.spatia_methods import null_condition
    from spatia_hf.pipelines.pipeline_spatia import SpatiaGenerationPipeline

    torch.manual_seed(0)
    pipe = SpatiaGenerationPipeline.from_genes([f"G{i}" for i in range(12)], image_size=16, size="tiny")
    pipe.set_progress_bar_config(disable=True)
    a, b = np.zeros((1, 12)), np.full((1, 12), 40.0)

    def run(x):
        return pipe(x, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images

    assert not np.allclose(run(a), run(b))
    with null_condition(pipe):
        np.testing.assert_array_equal(run(a), run(b))
    assert not np.allclose(run(a), run(b))  # restored


def test_checkpoints_trained_on_a_scored_section_are_refused(tmp_path):
    from spatia_hf.evaluation.evaluate import SectionOverlapError, check_training_sections

    sections = ["s0", "s1", "s2"]
    pre, ft, gen, bare = tmp_path / "pre", tmp_path / "ft", tmp_path / "gen" / "pipeline", tmp_path / "bare"
    for p in (pre, ft, gen, bare):
        p.mkdir(parents=True)
    (pre / "spatia_training.json").write_text(json.dumps({"train_sections": ["s0", "s1"], "eval_sections": ["s2"]}))
    (ft / "spatia_training.json").write_text(json.dumps({"eval_sections": ["s1"]}))  # an older record
    (gen.parent / "generator_training.json").write_text(json.dumps({"train_sections": ["s0", "s1"]}))
    table = check_training_sections({"pretrained": pre, "generator": gen}, ["s2"], sections)
    assert table["pretrained"]["train_sections"] == ["s0", "s1"] and table["generator"]["train_sections"] == ["s0", "s1"]
    with pytest.raises(SectionOverlapError) as err:
        check_training_sections({"pretrained": pre, "fine-tuned": ft, "other": bare}, ["s2"], sections)
    text = str(err.value)
    assert "fine-tuned" in text and "['s2']" in text and "--eval_sections s2" in text
    assert "other checkpoint" in text and "does not record" in text


def test_records_name_the_base_checkpoints_sections(tmp_path):
    from spatia_hf.evaluation.evaluate import trained_sections
    from spatia_hf.evaluation.splits import section_split
    from spatia_hf.data.datasets import default_eval_sections
    from spatia_hf.training.setup import section_record

    class Data:
        sample_ids = ["b", "a", "c"]

    assert section_record(Data, None) == {"train_sections": ["a", "b"], "eval_sections": ["c"]}
    base = tmp_path / "base"
    base.mkdir()
    (base / "spatia_training.json").write_text(json.dumps({"train_sections": ["c"]}))
    rec = section_record(Data, ["c"], base)  # fine-tuned on a, b from a base that saw c
    assert rec["train_sections"] == ["a", "b", "c"] and rec["base_train_sections"] == ["c"]
    ft = tmp_path / "ft"
    ft.mkdir()
    (ft / "spatia_training.json").write_text(json.dumps(rec))
    assert trained_sections(ft, ["a", "b", "c"]) == ["a", "b", "c"]
    rec = section_record(Data, ["c"], tmp_path / "no-record")
    assert rec["base_model_unrecorded"] is True
    (ft / "spatia_training.json").write_text(json.dumps(rec))
    assert trained_sections(ft, ["a", "b", "c"]) is None  # cannot be shown unseen
    assert list(section_split(["a", "b", "c", "c"]).held_out_sections) == default_eval_sections(["a", "b", "c"])


def test_run_suite_takes_method_kinds_per_task(inputs):
    from spatia_hf.evaluation.suite import run_suite

    x = np.random.default_rng(0).normal(size=(inputs.cells.n_cells, 4))
    extra = {"cell_annotation": {"SPATIA": x, "SPATIA ablation": x[:, :2]}}
    results, _ = run_suite(inputs, extra, tasks=[1], cnn_epochs=1, num_threads=1,
                           kinds={"cell_annotation": {"SPATIA ablation": "baseline"}})
    kinds = results[0].method_kinds
    assert kinds["SPATIA"] == "spatia" and kinds["SPATIA ablation"] == "baseline" and kinds["PCA"] == "baseline"
    with pytest.raises(ValueError, match="kinds has unknown task keys"):
        run_suite(inputs, extra, tasks=[1], cnn_epochs=1, kinds={"annotation": {}})


def test_evaluate_writes_a_report_with_spatia_next_to_baselines(tiny, tmp_path):
    from spatia_hf.evaluation.evaluate import evaluate
    from spatia_hf.evaluation.report import load_results

    result = evaluate(tiny["pre"], tiny["data"], tmp_path / "report", tasks=[1, 5, 6], cnn_epochs=1,
                      progress=False, n_masked_genes=6, n_target_genes=8)
    tasks, data = load_results(result.report.parent)
    assert sorted(t.task for t in tasks) == [1, 5, 6]
    by = {t.task: t for t in tasks}
    assert "held-out section(s)" in by[6].not_estimable  # 1 held-out section of 3 cannot score a section label
    for t in (by[1], by[5]):
        assert {"spatia", "baseline"} <= set(t.method_kinds.values()), t.task
        assert set(t.intervals) == set(t.scores)  # every score has its interval
    assert data["meta"]["sections that trained each checkpoint"] == {"pretrained": tiny["sections"][:-1]}
    assert "passed" in data["meta"]["training/evaluation section check"]
    assert (result.report.parent / "figures" / "embedding_spatia_fused.png").is_file()
    table = result.format_table()
    assert "not run" in table and "SPATIA (niche" in table  # niche-aware or niche context (cell hidden)


def test_evaluate_refuses_a_checkpoint_trained_on_the_scored_section(tiny, tmp_path):
    import shutil

    from spatia_hf.evaluation.evaluate import SectionOverlapError, evaluate

    pre = tmp_path / "pre"
    shutil.copytree(tiny["pre"], pre)
    (pre / "spatia_training.json").write_text(json.dumps({"train_sections": tiny["sections"]}))
    with pytest.raises(SectionOverlapError, match=rf"trained on \['{tiny['sections'][-1]}'\]"):
        evaluate(pre, tiny["data"], tmp_path / "report", tasks=[1], progress=False)
    (pre / "spatia_training.json").unlink()
    with pytest.raises(SectionOverlapError, match="does not record"):
        evaluate(pre, tiny["data"], tmp_path / "report", tasks=[1], progress=False)


def test_cli_help_shows_an_example(capsys):
    from spatia_hf.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "--help"])
    text = capsys.readouterr().out
    assert "spatia evaluate --model" in text and "--finetuned" in text and "--pipeline" in text


def test_cli_rejects_bad_task_numbers_and_checkpoints(tiny, tmp_path, capsys):
    from spatia_hf.cli import main

    with pytest.raises(SystemExit):
        main(["evaluate", "--model", str(tiny["pre"]), "--dataset", str(tiny["data"]), "--out", str(tmp_path),
              "--tasks", "0,13"])
    assert "task numbers run from 1 to 12" in capsys.readouterr().err
    code = main(["evaluate", "--model", str(tmp_path), "--dataset", str(tiny["data"]), "--out", str(tmp_path / "r"),
                 "--tasks", "1", "--no-progress"])
    assert code == 1 and "no config.json" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_pipeline(tiny):
    """A random tiny generation pipeline at 16 px on the dataset's genes (crops are resized to 32 px)."""
    from spatia_hf.pipelines.pipeline_spatia import SpatiaGenerationPipeline
    from spatia_hf.data.datasets import load_spatia_dataset

    torch.manual_seed(0)
    genes = list(load_spatia_dataset(tiny["data"], ("cells",)).genes)
    pipe = SpatiaGenerationPipeline.from_genes(genes, image_size=16, size="tiny")
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tiny["root"] / "gen" / "pipeline")
    (tiny["root"] / "gen" / "generator_training.json").write_text(
        json.dumps({"train_sections": tiny["sections"][:-1], "eval_sections": tiny["sections"][-1:]}))
    return pipe


def test_perturbation_series_shares_noise_and_ignores_batching(inputs, tiny_pipeline):
    from spatia_hf.evaluation.generation import generate_perturbation_series

    c, gene = inputs.cells, inputs.morphology_gene
    assert gene is not None
    counts = c.counts[inputs.perturbation_idx].toarray()
    counts[:, c.genes.index(gene)] += 5  # every cell expresses the gene, so each fold is an edit
    kw = dict(num_inference_steps=2, seed=3, out_px=int(c.images.shape[-1]))
    before, after = generate_perturbation_series(tiny_pipeline, counts, c.genes, gene, (1.0, 16.0), batch_size=64, **kw)
    assert before.shape == after[1.0].shape == after[16.0].shape == (len(counts), *c.images.shape[1:])
    assert before.dtype == np.uint8
    # fold 1 is no edit: same noise and same condition give the control back
    assert np.abs(before.astype(int) - after[1.0].astype(int)).max() <= 1
    # the same crops as the pipeline's own perturbation= path with the same per-cell generators
    from spatia_hf.evaluation.generation import _to_uint8

    ref = tiny_pipeline(counts, gene_names=c.genes, perturbation={gene: 16.0}, num_inference_steps=2,
                        generator=[torch.Generator().manual_seed(3 + i) for i in range(len(counts))], output_type="pt")
    assert np.abs(_to_uint8([ref.images], kw["out_px"]).astype(int) - before.astype(int)).max() <= 1
    assert np.abs(_to_uint8([ref.perturbed_images], kw["out_px"]).astype(int) - after[16.0].astype(int)).max() <= 1
    # each cell has its own generator: 2 cells per pass give the same crops as all cells in one pass
    b2, a2 = generate_perturbation_series(tiny_pipeline, counts, c.genes, gene, (1.0, 16.0), batch_size=6, **kw)
    assert np.abs(b2.astype(int) - before.astype(int)).max() <= 1
    assert np.abs(a2[16.0].astype(int) - after[16.0].astype(int)).max() <= 1
    with pytest.raises(ValueError, match="gene='NOPE'"):
        generate_perturbation_series(tiny_pipeline, counts, c.genes, "NOPE", (2.0,), **kw)


def test_perturbation_response_has_folds_a_control_gene_and_cis(tiny, tiny_pipeline, tmp_path):
    """The response measure on a random pipeline: the wiring, the control gene and the JSON file."""
    from spatia_hf.evaluation.perturbation_response import (measure_perturbation_response, programme_genes,
                                                            response_goals, write_response)
    from spatia_hf.data.synthetic import load_ground_truth

    report = measure_perturbation_response(tiny_pipeline, tiny["data"], n_pairs=8, num_inference_steps=2,
                                           n_boot=200, seed=1)
    truth = load_ground_truth(tiny["data"])
    assert report["gene"] == "NUCSIZE"
    assert report["control_gene"] not in programme_genes(truth)  # a gene without any role in the tissue
    by_key = {(e["gene"], e["fold"]): e for e in report["edits"]}
    assert set(by_key) == {("NUCSIZE", 0.5), ("NUCSIZE", 2.0), ("NUCSIZE", 4.0), (report["control_gene"], 4.0)}
    x4 = by_key[("NUCSIZE", 4.0)]
    assert x4["true_ratio"] == pytest.approx(4.0 ** truth["morphology_genes"]["NUCSIZE"]["exponent"])
    lo, hi = x4["area_ratio_ci95"]
    assert lo <= x4["area_ratio"] <= hi and 0 <= x4["fraction_right_direction"] <= 1
    control = by_key[(report["control_gene"], 4.0)]
    assert control["true_ratio"] == 1.0 and isinstance(control["within_control_tolerance"], bool)
    assert report["cost"]["images"] == 8 * 5
    assert set(report["conditional_mean_reference"]["area_ratio"]) == {"NUCSIZE x0.5", "NUCSIZE x2", "NUCSIZE x4",
                                                                        f"{report['control_gene']} x4"}
    ref = report["conditional_mean_reference"]["area_ratio"]["NUCSIZE x4"]
    assert x4["reference_ratio"] == ref and "reference_ratio" not in control
    assert x4["fraction_of_reference_log_fold"] == pytest.approx(math.log(x4["area_ratio"]) / math.log(ref))
    lo_f, hi_f = x4["fraction_of_reference_log_fold_ci95"]
    assert lo_f <= x4["fraction_of_reference_log_fold"] <= hi_f
    path = write_response(report, tmp_path / "response.json", command="cmd")
    saved = json.loads(path.read_text())
    assert saved["command"] == "cmd" and saved["goals_met"] == response_goals(report)
    with pytest.raises(ValueError, match="control_gene='NUCSIZE'"):
        measure_perturbation_response(tiny_pipeline, tiny["data"], n_pairs=4, control_gene="NUCSIZE",
                                      num_inference_steps=1)
    with pytest.raises(ValueError, match="n_pairs=10000"):
        measure_perturbation_response(tiny_pipeline, tiny["data"], n_pairs=10000, num_inference_steps=1)


def test_summarize_edit_scores_magnitude_direction_and_control():
    from spatia_hf.evaluation.perturbation_response import bootstrap_mean_ci, summarize_edit

    rng = np.random.default_rng(0)
    before = rng.uniform(20, 40, 300)
    after = before * 2.0 * np.exp(rng.normal(0, 0.05, 300))  # x4 with exponent 0.5: the true 2x
    s = summarize_edit(before, after, 4.0, 0.5, n_boot=500)
    assert s["area_ratio"] == pytest.approx(2.0, rel=0.02) and s["within_magnitude_tolerance"]
    assert s["fraction_right_direction"] == 1.0 and s["direction_goal_met"]
    assert s["fraction_of_true_log_fold_ci95"][0] < 1.0 < s["fraction_of_true_log_fold_ci95"][1] + 0.05
    weak = summarize_edit(before, before * 1.1, 4.0, 0.5, n_boot=200)
    assert not weak["within_magnitude_tolerance"] and weak["fraction_of_true_log_fold"] == pytest.approx(0.1375, 0.01)
    control = summarize_edit(before, before * 1.08, 4.0, 0.0, n_boot=200)
    assert control["true_ratio"] == 1.0 and not control["within_control_tolerance"]
    assert "fraction_right_direction" not in control
    assert summarize_edit(before, before * 0.99, 4.0, 0.0, n_boot=200)["within_control_tolerance"]
    shrink = summarize_edit(before, before * 0.7, 0.5, 0.5, n_boot=200)
    assert shrink["fraction_right_direction"] == 1.0  # a fold < 1 must shrink the nucleus
    with pytest.raises(ValueError, match="pairs have a nucleus"):
        summarize_edit(np.zeros(5), np.ones(5), 2.0, 0.5)
    lo, hi = bootstrap_mean_ci(np.arange(100.0), n_boot=500)
    assert lo < 49.5 < hi


def test_spatia_evaluate_all_tasks_from_random_checkpoints(tiny, tiny_pipeline, tmp_path, capsys):
    """`spatia evaluate` of all 12 tasks with every SPATIA input (random tiny weights: the wiring, not
    the scores; the slow test below trains them)."""
    from spatia_hf.cli import main
    from spatia_hf.evaluation.report import load_results

    code = main(["evaluate", "--model", str(tiny["pre"]), "--finetuned", str(tiny["ft"]), "--pipeline",
                 str(tiny["root"] / "gen"), "--dataset", str(tiny["data"]), "--out", str(tmp_path / "report"),
                 "--steps", "2", "--cnn-epochs", "1", "--max-generation", "8", "--max-perturbation", "8",
                 "--no-progress"])
    assert code == 0
    assert "report:" in capsys.readouterr().out
    tasks, _ = load_results(tmp_path / "report")
    assert sorted(t.task for t in tasks) == list(range(1, 13))
    by = {t.task: t for t in tasks}
    assert by[6].not_estimable  # 1 held-out section of 3: a section label cannot be scored
    for t in tasks:
        if t.task != 6:
            assert "spatia" in t.method_kinds.values() and "baseline" in t.method_kinds.values(), t.task
    assert "SPATIA (fine-tuned head)" in by[3].scores
    assert {"SPATIA generator", "SPATIA generator (token merging 0.5)"} <= set(by[11].scores)
    # the 16 px generator's ceiling: the same real crops through its resolution (crops are 32 px)
    assert by[11].method_kinds["real held-out crops at 16 px"] == "reference"
    assert "SPATIA generator" in by[12].scores
    assert (tmp_path / "report" / "figures" / "task12_strip.png").is_file()


@pytest.mark.slow
def test_spatia_evaluate_end_to_end_after_a_few_training_steps(tmp_path, capsys):
    """Pretrain, fine-tune and train a generator for a few steps, then `spatia evaluate` all 12 tasks
    (minutes on a loaded 2-core CPU; the fast test above covers the wiring with random weights)."""
    from spatia_hf.cli import main
    from spatia_hf.data.synthetic import build_tiny_dataset
    from spatia_hf.evaluation.report import load_results, results_to_eval_results
    from spatia_hf.training.finetune import finetune
    from spatia_hf.training.generator import train_generator
    from spatia_hf.training.pretrain import pretrain

    data = build_tiny_dataset(tmp_path / "data", n_sections=4, n_cells=150, seed=0)
    pretrain(data, tmp_path / "pre", preset="tiny", max_steps=10, batch_size=8, progress=False, use_cpu=True,
             do_eval=False)
    finetune(data, tmp_path / "ft", "annotation", model_name_or_path=str(tmp_path / "pre"), max_steps=5,
             batch_size=16, progress=False, use_cpu=True, do_eval=False)
    train_generator(data, tmp_path / "gen", size="tiny", max_steps=2, batch_size=8,
                    spatia_model=str(tmp_path / "pre"), seed=0, cpu=True, progress=False, checkpoint_every=0)
    code = main(["evaluate", "--model", str(tmp_path / "pre"), "--finetuned", str(tmp_path / "ft"), "--pipeline",
                 str(tmp_path / "gen"), "--dataset", str(data), "--out", str(tmp_path / "report"), "--steps", "2",
                 "--cnn-epochs", "2", "--max-generation", "16", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "report:" in printed  # every checkpoint held the last section out, or evaluate would refuse
    tasks, _ = load_results(tmp_path / "report")
    assert sorted(t.task for t in tasks) == list(range(1, 13))
    for t in tasks:
        if not t.not_estimable:
            assert "spatia" in t.method_kinds.values() and "baseline" in t.method_kinds.values(), t.task
    by = {t.task: t for t in tasks}
    assert "SPATIA (fine-tuned head)" in by[3].scores
    assert {"SPATIA generator", "SPATIA generator (token merging 0.5)"} <= set(by[11].scores)
    assert not any(" px" in name for name in by[11].scores)  # a generator at the crops' size has no resized row
    assert by[11].method_kinds["unconditional generator (same denoiser, null condition)"] == "baseline"
    assert by[7].split["held_out_sections"] == ["synth_s03"]  # tasks 7-8 score the held-out section's cells only
    assert (tmp_path / "report" / "report.md").is_file()
    assert results_to_eval_results(tmp_path / "report", "tiny")  # what the model card reads
