"""spatia_hf.tl.embed / `spatia embed` on an AnnData made outside the package."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import spatia_hf.tl as tl
from spatia_hf.models.configuration_spatia import SpatiaConfig
from spatia_hf.models.modeling_spatia import SpatiaModel
from spatia_hf.models.processing_spatia import SpatiaProcessor


def _external_adata(n_cells=60, n_genes=30, px=0.5, seed=0):
    """Counts, centroids in pixels, a 2-channel uint16 image with a nucleus at each centroid."""
    rng = np.random.default_rng(seed)
    side = 400
    xy = rng.uniform(40, side - 40, size=(n_cells, 2))
    image = np.zeros((2, side, side), np.uint16)
    rr, cc = np.mgrid[0:side, 0:side]
    for x, y in xy:
        image[0][(rr - y) ** 2 + (cc - x) ** 2 < 36] = 3000
        image[1][np.abs(np.hypot(rr - y, cc - x) - 9) < 1.5] = 1500
    counts = sp.csr_matrix(rng.negative_binomial(2, 0.5, size=(n_cells, n_genes)).astype(np.float32))
    adata = ad.AnnData(X=counts, obs=pd.DataFrame({"batch": ["a"] * n_cells},
                                                  index=[f"cell{i}" for i in range(n_cells)]),
                       var=pd.DataFrame(index=[f"GENE{j}" for j in range(n_genes)]))
    adata.obsm["spatial"] = xy
    adata.obsm["X_pca"] = rng.normal(size=(n_cells, 5))
    adata.layers["counts"] = counts.copy()
    adata.uns["mine"] = {"keep": 1}
    return adata, image, px


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    torch.manual_seed(0)
    genes = [f"GENE{j}" for j in range(30)]
    config = SpatiaConfig.from_preset("tiny", gene_vocab=genes, num_channels=2)
    path = tmp_path_factory.mktemp("model")
    SpatiaModel(config).save_pretrained(path)
    SpatiaProcessor.from_config(config).save_pretrained(path)
    return path


def test_embed_writes_slots_and_keeps_the_rest(tiny_model_dir):
    adata, image, px = _external_adata()
    before = adata.copy()
    tl.embed(adata, image, str(tiny_model_dir), pixel_size_um=px, n_domains=3, progress=False)
    width = SpatiaConfig.from_pretrained(tiny_model_dir).cell_config.hidden_size
    assert adata.obsm["X_spatia"].shape == (adata.n_obs, width)
    assert adata.obsm["X_spatia_niche"].shape[0] == adata.n_obs
    assert np.isfinite(adata.obsm["X_spatia"]).all()
    assert adata.obs["spatia_domain"].nunique() == 3
    assert adata.uns["spatia"]["gene_coverage"]["coverage"] == 1.0
    # everything the input had is intact
    assert (adata.X != before.X).nnz == 0
    np.testing.assert_array_equal(adata.obsm["X_pca"], before.obsm["X_pca"])
    np.testing.assert_array_equal(adata.obsm["spatial"], before.obsm["spatial"])
    assert list(adata.obs["batch"]) == list(before.obs["batch"])
    assert adata.uns["mine"] == {"keep": 1} and "counts" in adata.layers


def test_embed_copy_leaves_input_untouched(tiny_model_dir):
    adata, image, px = _external_adata(seed=1)
    out = tl.embed(adata, image, str(tiny_model_dir), pixel_size_um=px, n_domains=2, copy=True, progress=False)
    assert "X_spatia" in out.obsm and "X_spatia" not in adata.obsm


def test_embed_is_deterministic_and_batch_size_invariant(tiny_model_dir):
    adata, image, px = _external_adata(seed=2)
    a = tl.embed(adata, image, str(tiny_model_dir), pixel_size_um=px, batch_size=7, copy=True, progress=False)
    b = tl.embed(adata, image, str(tiny_model_dir), pixel_size_um=px, batch_size=64, copy=True, progress=False)
    np.testing.assert_allclose(a.obsm["X_spatia"], b.obsm["X_spatia"], atol=1e-5)
    np.testing.assert_allclose(a.obsm["X_spatia_niche"], b.obsm["X_spatia_niche"], atol=1e-5)


def test_embed_rejects_cells_outside_the_image(tiny_model_dir):
    adata, image, px = _external_adata(seed=3)
    adata.obsm["spatial"][0] = [5000.0, 5000.0]
    with pytest.raises(ValueError, match="outside"):
        tl.embed(adata, image, str(tiny_model_dir), pixel_size_um=px, progress=False)


def test_embed_cli_round_trip(tiny_model_dir, tmp_path):
    import tifffile

    from spatia_hf.cli import main

    adata, image, px = _external_adata(seed=4)
    adata.write_h5ad(tmp_path / "in.h5ad")
    tifffile.imwrite(tmp_path / "img.tif", image)
    rc = main(["embed", "--model", str(tiny_model_dir), "--adata", str(tmp_path / "in.h5ad"), "--image",
               str(tmp_path / "img.tif"), "--pixel-size", str(px), "--n-domains", "2",
               "--out", str(tmp_path / "out.h5ad")])
    assert rc == 0
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert out.obsm["X_spatia"].shape[0] == adata.n_obs and "X_pca" in out.obsm
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left beside it


def test_embed_cli_missing_file_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    from spatia_hf.cli import main

    rc = main(["embed", "--model", str(tiny_model_dir), "--adata", str(tmp_path / "nope.h5ad"),
               "--image", "x.tif", "--out", str(tmp_path / "o.h5ad")])
    assert rc == 1
    assert "--adata" in capsys.readouterr().err and not (tmp_path / "o.h5ad").exists()
