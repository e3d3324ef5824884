"""spatia_hf.tl.annotate / tl.impute: fine-tuned heads, AnnData in, obs / layers / obsm out (scanpy style)."""

import numpy as np
import pytest
import torch
from test_embed import _external_adata

import spatia_hf.tl as tl
from spatia_hf.models.configuration_spatia import SpatiaConfig
from spatia_hf.models.modeling_heads import SpatiaForCellClassification, SpatiaForGeneImputation
from spatia_hf.models.processing_spatia import SpatiaProcessor

GENES = [f"GENE{j}" for j in range(30)] + ["UNMEASURED1", "UNMEASURED2"]


def _save(cls, path, **config_kwargs):
    torch.manual_seed(0)
    config = SpatiaConfig.from_preset("tiny", gene_vocab=GENES, num_channels=2, **config_kwargs)
    cls(config).save_pretrained(path)
    SpatiaProcessor.from_config(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def annotation_dir(tmp_path_factory):
    labels = ["B cell", "T cell", "tumour"]
    return _save(SpatiaForCellClassification, tmp_path_factory.mktemp("annotation"), num_labels=3,
                 id2label=dict(enumerate(labels)), label2id={v: k for k, v in enumerate(labels)})


@pytest.fixture(scope="module")
def imputation_dir(tmp_path_factory):
    return _save(SpatiaForGeneImputation, tmp_path_factory.mktemp("imputation"))


def test_annotate_writes_labels_and_probabilities_in_place(annotation_dir):
    adata, image, px = _external_adata(n_cells=40)
    assert tl.annotate(adata, image, str(annotation_dir), pixel_size_um=px, progress=False) is None
    assert set(adata.obs["spatia_cell_type"].cat.categories) == {"B cell", "T cell", "tumour"}
    p = adata.obs["spatia_cell_type_probability"].to_numpy()
    assert ((p >= 1 / 3 - 1e-6) & (p <= 1)).all()
    again = tl.annotate(adata, image, str(annotation_dir), pixel_size_um=px, copy=True, progress=False,
                        batch_size=7)  # copy=True: a new AnnData; batch size changes nothing
    assert list(again.obs["spatia_cell_type"]) == list(adata.obs["spatia_cell_type"])


def test_annotate_refuses_a_checkpoint_without_the_head(imputation_dir):
    adata, image, px = _external_adata(n_cells=10)
    with pytest.raises(ValueError, match="is a SpatiaForGeneImputation, not a SpatiaForCellClassification. Fix: "
                                         "fine-tune one with `spatia finetune --task annotation"):
        tl.annotate(adata, image, str(imputation_dir), pixel_size_um=px, progress=False)


def test_impute_hides_the_genes_and_writes_a_layer_and_a_table(imputation_dir):
    adata, image, px = _external_adata(n_cells=40)
    genes = ["GENE3", "UNMEASURED1"]
    tl.impute(adata, image, str(imputation_dir), genes, pixel_size_um=px, progress=False)
    table = adata.obsm["X_spatia_imputed"]
    assert list(table.columns) == genes and np.isfinite(table.to_numpy()).all()
    layer = adata.layers["spatia_imputed"]
    j = list(adata.var_names).index("GENE3")
    np.testing.assert_allclose(layer[:, j], table["GENE3"].to_numpy())
    assert np.isnan(np.delete(layer, j, axis=1)).all()
    # hidden means hidden: the measured value of GENE3 does not change its prediction
    other = adata.copy()
    x = other.X.toarray()
    x[:, j] = 50.0
    other.X = x
    tl.impute(other, image, str(imputation_dir), genes, pixel_size_um=px, progress=False)
    np.testing.assert_allclose(other.obsm["X_spatia_imputed"].to_numpy(), table.to_numpy(), atol=1e-5)
    with pytest.raises(ValueError, match=r"\['NOT_A_GENE'\] are not in the model's vocabulary"):
        tl.impute(adata, image, str(imputation_dir), ["NOT_A_GENE"], pixel_size_um=px, progress=False)


def test_to_spatialdata_puts_the_table_on_circles_in_um(tmp_path):
    pytest.importorskip("spatialdata")
    adata, _, px = _external_adata(n_cells=20)
    adata.obs["spatia_domain"] = np.arange(20) % 3
    sdata = tl.to_spatialdata(adata, tmp_path / "sec.zarr", pixel_size_um=px)
    circles = sdata.shapes["cells"]
    np.testing.assert_allclose(np.c_[circles.geometry.x, circles.geometry.y], adata.obsm["spatial"] * px)
    table = sdata.tables["table"]
    assert list(table.obs["spatia_domain"]) == list(adata.obs["spatia_domain"])
    assert table.uns["spatialdata_attrs"]["region"] == "cells"
    import spatialdata

    back = spatialdata.read_zarr(tmp_path / "sec.zarr")
    assert back.tables["table"].n_obs == 20 and len(back.shapes["cells"]) == 20


def test_to_spatialdata_without_the_extra_names_it(monkeypatch):
    import sys

    from spatia_hf.data.readers.spatialdata_reader import MissingExtraError

    monkeypatch.setitem(sys.modules, "spatialdata", None)
    adata, _, px = _external_adata(n_cells=5)
    with pytest.raises(MissingExtraError, match=r"pip install 'spatia-hf\[spatialdata\]'"):
        tl.to_spatialdata(adata, pixel_size_um=px)
