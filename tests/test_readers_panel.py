"""Gene panel coverage against a model vocabulary: kept, unknown, dropped; every vocabulary source."""

import json

import numpy as np
import pytest
import scipy.sparse as sp

from spatia_hf.data.gene_panel import load_vocabulary, panel_coverage

GENES = ["CD3E", "MS4A1", "EPCAM", "Ptprc", "NOVEL1"]


def test_coverage_counts_kept_unknown_and_count_share():
    counts = sp.csr_matrix(np.array([[1, 0, 2, 0, 5], [0, 3, 0, 1, 0]]))
    cov = panel_coverage(GENES, ["CD3E", "MS4A1", "EPCAM", "PTPRC", "KRT8"], counts=counts,
                         dropped={"features:NegPrb": 20})
    assert cov.kept == ["CD3E", "MS4A1", "EPCAM"] and cov.unknown == ["Ptprc", "NOVEL1"]
    assert cov.matched_case_insensitive == ["Ptprc"]  # reported, not silently matched
    assert cov.kept_count_fraction == pytest.approx(6 / 12)
    assert cov.fraction_kept == pytest.approx(0.6)
    assert "3/5 genes" in cov.summary() and "features:NegPrb=20" in cov.summary()
    assert json.loads(json.dumps(cov.to_json()))["unknown"] == ["Ptprc", "NOVEL1"]


def test_ensembl_ids_match_renamed_symbols(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "spatia", "cell_config": {
        "gene_vocab": ["CD3E", "CD20"], "gene_ensembl_ids": ["ENSG00000198851", "ENSG00000156738"]}}))
    cov = panel_coverage(["CD3E", "MS4A1"], tmp_path, gene_ids=["ENSG00000198851", "ENSG00000156738"])
    assert cov.kept == ["CD3E", "MS4A1"] and cov.matched_by_id == 2 and cov.n_vocabulary == 2


def test_vocabulary_sources(tmp_path):
    (tmp_path / "genes.txt").write_text("# panel\nA\nB\n\nC\n")
    (tmp_path / "list.json").write_text(json.dumps(["A", "B"]))
    ds = tmp_path / "dataset"
    ds.mkdir()
    (ds / "gene_panel.json").write_text(json.dumps({"genes": ["A", "B", "C", "D"], "gene_ids": None}))
    assert load_vocabulary(tmp_path / "genes.txt") == (["A", "B", "C"], None)
    assert load_vocabulary(tmp_path / "list.json") == (["A", "B"], None)
    assert load_vocabulary(ds)[0] == ["A", "B", "C", "D"]
    assert load_vocabulary(["X"]) == (["X"], None)
    with pytest.raises(FileNotFoundError, match="no config.json .* or gene_panel.json"):
        load_vocabulary(tmp_path)
    (tmp_path / "bad.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="no 'gene_vocab' or 'genes' list"):
        load_vocabulary(tmp_path / "bad.json")
