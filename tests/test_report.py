"""The report writer: report.md with a row per task, results.json that round-trips, pictures, and
model-index entries; plus one tiny end-to-end run of all 12 tasks on a built synthetic dataset."""

import json
import math

import numpy as np
import pytest

from spatia_hf.evaluation.report import (
    load_results,
    render_markdown,
    results_to_eval_results,
    results_to_json,
    write_report,
)
from spatia_hf.evaluation.tasks import TASKS, TaskResult

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _result(number, scores, kinds=None, **kw):
    spec = TASKS[number]
    kinds = kinds or {m: ("spatia" if m.startswith("SPATIA") else "baseline") for m in scores}
    return TaskResult(number, spec.key, spec.title, list(spec.metrics), spec.primary, scores, kinds, **kw)


@pytest.fixture
def handmade():
    return [
        _result(1, {"SPATIA": {"macro_f1": 0.91, "accuracy": 0.93}, "PCA": {"macro_f1": 0.80, "accuracy": 0.85},
                    "log1p": {"macro_f1": 0.84, "accuracy": 0.86}}, split={"kind": "section", "n_test": 10}),
        _result(11, {"SPATIA": {"fid": 2.0, "kid": 0.1, "type_accuracy": 0.7},
                     "random crop": {"fid": 3.0, "kid": 0.2, "type_accuracy": 0.2},
                     "real": {"fid": 0.5, "kid": 0.0, "type_accuracy": 0.9}},
                kinds={"SPATIA": "spatia", "random crop": "baseline", "real": "reference"}),
        _result(7, {"mean": {"pearson": 0.0, "spearman": float("nan")}}, notes=["a note"],
                details={"pearson_per_gene": {"mean": [0.0, None]}}),
    ]


def test_best_respects_metric_direction_and_kind(handmade):
    assert handmade[0].best("baseline") == ("log1p", 0.84)
    assert handmade[1].best("baseline") == ("random crop", 3.0)  # the reference's 0.5 is not a baseline
    assert handmade[1].best("spatia") == ("SPATIA", 2.0)
    assert handmade[2].best("spatia") == (None, pytest.approx(math.nan, nan_ok=True))


def test_report_has_a_summary_row_for_every_task_and_json_round_trips(tmp_path, handmade):
    from spatia_hf.evaluation import plots

    fig = plots.plot_image_grid(np.zeros((3, 2, 8, 8), np.uint8), tmp_path / "figures" / "task11_grid.png")
    path = write_report(handmade, tmp_path, meta={"dataset": "tiny"}, figures={"task11_grid": fig})
    text = path.read_text()
    summary = text.split("## Summary")[1].split("## Tasks")[0]
    rows = [line for line in summary.splitlines() if line.startswith("| ") and not line.startswith("| #")]
    assert [int(r.split("|")[1]) for r in rows] == list(range(1, 13))
    assert "| 1 | Cell-type annotation (linear probe on the embedding) | macro_f1 ↑ | 0.910 | 0.840 | log1p |" in text
    assert "| 11 | Expression-conditioned cell image generation | fid ↓ | 2.000 | 3.000 | random crop |" in text
    assert "| 2 | Cell-type annotation from the image alone | macro_f1 | not run | not run | |" in text
    assert "![task11_grid](figures/task11_grid.png)" in text
    assert "- a note" in text

    loaded, data = load_results(tmp_path)
    assert data["meta"] == {"dataset": "tiny"} and data["figures"] == {"task11_grid": "figures/task11_grid.png"}
    assert [r.to_dict() for r in loaded] == [r.to_dict() for r in sorted(handmade, key=lambda r: r.task)]
    assert math.isnan(loaded[1].scores["mean"]["spearman"])  # NaN -> null -> NaN
    json.loads((tmp_path / "results.json").read_text())  # strict JSON: no NaN tokens
    assert not list(tmp_path.glob(".*tmp*"))  # temporary files renamed away


def test_write_report_refuses_duplicate_tasks_and_foreign_figures(tmp_path, handmade):
    with pytest.raises(ValueError, match="once"):
        results_to_json([handmade[0], handmade[0]])
    outside = tmp_path.parent / "elsewhere.png"
    outside.write_bytes(PNG_MAGIC)
    with pytest.raises(ValueError, match="outside"):
        write_report(handmade, tmp_path / "rep", figures={"x": outside})


def test_load_results_rejects_other_json(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="format"):
        load_results(tmp_path)


def test_eval_results_for_the_model_card(tmp_path, handmade):
    from huggingface_hub import ModelCard, ModelCardData

    write_report(handmade, tmp_path)
    entries = results_to_eval_results(tmp_path, dataset_name="org/synthetic-tissue")
    assert [(e.task_type, e.metric_type, e.metric_value) for e in entries] == [
        ("cell_annotation", "macro_f1", 0.91), ("cell_annotation", "accuracy", 0.93),
        ("generation", "fid", 2.0), ("generation", "kid", 0.1), ("generation", "type_accuracy", 0.7)]
    assert all(e.dataset_name == "org/synthetic-tissue" and e.dataset_split == "test" for e in entries)
    card = ModelCard.from_template(ModelCardData(model_name="spatia-tiny", eval_results=entries))
    assert "model-index" in card.content and "type_accuracy" in card.content
    base = results_to_eval_results(handmade, "d", methods=["PCA"])
    assert [e.metric_name for e in base] == ["macro_f1 (PCA)", "accuracy (PCA)"]


def test_markdown_shows_spatia_first_then_by_score(handmade):
    text = render_markdown(handmade)
    section = text.split("### 1. ")[1].split("###")[0]
    order = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    assert order == ["method", "SPATIA", "log1p", "PCA"]


# ----------------------------------------------------------------------------- tiny end-to-end run
@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    from spatia_hf.data.synthetic import build_tiny_dataset

    return build_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny", n_sections=4, n_cells=80, seed=0,
                              crop_px=32)


def test_tiny_run_scores_all_12_tasks_with_an_extra_method(tmp_path, tiny_dataset):
    from spatia_hf.evaluation.suite import prepare_suite, run_suite

    inputs = prepare_suite(tiny_dataset, seed=0, n_masked_genes=8, n_target_genes=10, max_generation=32,
                           max_perturbation=8)
    c = inputs.cells
    onehot = (c.label("cell_type")[:, None] == np.unique(c.label("cell_type"))[None]).astype(np.float32)
    gen = c.images[inputs.generation_idx]
    before = c.images[inputs.perturbation_idx]
    extra = {"cell_annotation": {"SPATIA": onehot + 0.01 * np.random.default_rng(0).normal(size=onehot.shape)},
             "generation": {"SPATIA": gen},
             "perturbation": {"SPATIA": {"before": before, "after": {f: before for f in inputs.folds}}}}
    results, figures = run_suite(inputs, extra, cnn_epochs=2, figures_dir=tmp_path / "figures", num_threads=1)
    assert sorted(r.task for r in results) == list(range(1, 13))
    by = {r.task: r for r in results}
    assert by[1].scores["SPATIA"]["macro_f1"] == pytest.approx(1.0)
    assert by[12].scores["SPATIA"]["direction_agreement"] == 0.0  # unchanged images: no shift
    assert by[12].scores["SPATIA"]["pair_direction_agreement"] == 0.0  # no pair moved
    assert np.isnan(by[12].scores["observational regression (real cells)"]["pair_direction_agreement"])
    assert by[11].method_kinds["real held-out crops"] == "reference"
    for r in results:  # every method scored every headline metric
        assert all(r.primary_metric in s for s in r.scores.values())
    assert {"embedding_pca", "task05_domains", "task07_imputation", "task12_strip"} <= set(figures)
    for p in figures.values():
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size < 300_000

    path = write_report(results, tmp_path, {"dataset": str(tiny_dataset)}, figures)
    text = path.read_text()
    assert "| 1 | Cell-type annotation (linear probe on the embedding) | macro_f1 ↑ | 1.000 [1.000, 1.000] |" in text
    assert "not run" not in text
    loaded, _ = load_results(tmp_path)
    assert [r.to_dict() for r in loaded] == [r.to_dict() for r in results]

    again, _ = run_suite(inputs, extra, tasks=[1, 5], cnn_epochs=2, num_threads=1)
    assert again[0].scores == by[1].scores and again[1].scores == by[5].scores  # fixed seeds


def test_extra_methods_must_match_the_prepared_rows(tiny_dataset):
    from spatia_hf.evaluation.suite import prepare_suite, run_suite

    inputs = prepare_suite(tiny_dataset, seed=0, n_masked_genes=8, n_target_genes=10)
    with pytest.raises(ValueError, match="unknown task keys"):
        run_suite(inputs, {"annotation": {}}, tasks=[1], cnn_epochs=1, num_threads=1)
    with pytest.raises(ValueError, match=r"\['SPATIA'\] has 3 rows: expected one per held-out cell"):
        run_suite(inputs, {"gene_imputation": {"SPATIA": np.zeros((3, 8))}}, tasks=[7], cnn_epochs=1, num_threads=1)


def test_predicted_domains_are_renamed_to_the_truth_they_overlap():
    from spatia_hf.evaluation.plots import match_labels

    truth = ["d0", "d0", "d1", "d1", "d2"]
    assert match_labels(truth, [2, 2, 0, 0, 1]).tolist() == truth
    assert match_labels(["a", "a", "b", "b"], [7, 7, 5, 6]).tolist() == ["a", "a", "b", "cluster 6"]


def test_every_documented_extra_slot_is_scored_as_spatia(tiny_dataset):
    from spatia_hf.evaluation.suite import masked_log1p, prepare_suite, run_suite

    inputs = prepare_suite(tiny_dataset, seed=0, n_masked_genes=8, n_target_genes=10)
    c, sec = inputs.cells, inputs.section_split
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(c.n_cells, 4))
    _, masked_truth, _ = masked_log1p(inputs, inputs.masked_genes)
    _, nbr_truth, _ = masked_log1p(inputs, inputs.neighbor_genes)
    extra = {"image_annotation": {"SPATIA image branch": emb}, "cell_clustering": {"SPATIA": emb},
             "domain_clustering": {"SPATIA": emb},
             "finetuned_annotation": {"SPATIA": c.label("cell_type")[sec.test]},
             "section_classification": {"SPATIA": rng.normal(size=(len(inputs.sections.sample_ids), 3))},
             "gene_imputation": {"SPATIA": masked_truth[sec.test]},  # an oracle: perfect correlation
             "niche_imputation": {"SPATIA": nbr_truth[sec.test]},
             "image_to_expression": {"SPATIA": rng.normal(size=(len(sec.test), len(inputs.target_genes)))},
             "retrieval": {"SPATIA": (emb[inputs.retrieval_idx], emb[inputs.retrieval_idx])}}
    results, _ = run_suite(inputs, extra, tasks=list(range(2, 11)), cnn_epochs=1, num_threads=1)
    by = {r.key: r for r in results}
    assert set(by) == set(extra)
    for key, methods in extra.items():
        if by[key].not_estimable:  # 1 held-out section of 4: section labels cannot be scored
            assert key == "section_classification" and "held-out" in by[key].not_estimable
            continue
        assert all(by[key].method_kinds[m] == "spatia" for m in methods)
    assert by["finetuned_annotation"].scores["SPATIA"]["macro_f1"] == 1.0
    assert by["gene_imputation"].scores["SPATIA"]["pearson"] == pytest.approx(1.0)
    assert by["retrieval"].scores["SPATIA"]["recall@1"] == 1.0  # identical towers find every partner


def test_a_missing_peer_is_a_note_not_a_row(monkeypatch, tiny_dataset):
    from spatia_hf.evaluation import peers
    from spatia_hf.evaluation.suite import prepare_suite

    with pytest.raises(ValueError, match="one of"):
        peers.peer_installed("stagate")
    inputs = prepare_suite(tiny_dataset, seed=0, n_masked_genes=8, n_target_genes=10)
    monkeypatch.setattr(peers, "peer_installed", lambda name: False)
    out = peers.run_peers(inputs, ["novae", "scvi"])
    assert out.extra == {} and out.seconds == {}
    assert all("not installed" in n and "spatia-hf[peers]" in n for task in (1, 4, 5, 7, 8) for n in out.notes[task])
