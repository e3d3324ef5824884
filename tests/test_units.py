"""Centroids in the wrong unit are refused before any crop is cut, with the other unit named."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from spatia_hf.data.readers.anndata_reader import read_anndata
from spatia_hf.data.readers.units import check_spatial_units

PX = 0.2125  # µm per pixel (Xenium)
SIDE = 2000  # image side, px


def _um_centroids(seed=0, n=200):
    """Cells spread over a 2000 px image, given in µm (what spatialdata-io's Xenium table holds)."""
    return np.random.default_rng(seed).uniform(100, SIDE - 100, size=(n, 2)) * PX


def test_um_read_as_pixels_is_refused_naming_um():
    xy = _um_centroids()
    with pytest.raises(ValueError, match=r"they look like µm; pass spatial_units='um'") as err:
        check_spatial_units(xy, "px", PX, (SIDE, SIDE))
    assert "2000 x 2000 px image" in str(err.value) and "check_units=False" in str(err.value)


def test_pixels_read_as_um_is_refused_naming_pixels():
    xy = _um_centroids() / PX  # pixels
    with pytest.raises(ValueError, match=r"outside it. Fix: they look like image pixels; pass spatial_units='px'"):
        check_spatial_units(xy, "um", PX, (SIDE, SIDE))


def test_right_units_pass():
    xy = _um_centroids()
    check_spatial_units(xy, "um", PX, (SIDE, SIDE))
    check_spatial_units(xy / PX, "px", PX, (SIDE, SIDE))


def test_cells_off_the_image_in_both_units_name_the_pixel_size():
    xy = _um_centroids() + 10_000
    with pytest.raises(ValueError, match="outside it. Fix: check pixel_size_um"):
        check_spatial_units(xy, "um", PX, (SIDE, SIDE))


def test_a_few_edge_cells_off_the_image_are_left_to_the_builder():
    xy = _um_centroids() / PX
    xy[:5] = -3.0  # 2.5% just off the edge
    check_spatial_units(xy, "px", PX, (SIDE, SIDE))


def test_read_anndata_checks_units_and_can_be_told_not_to():
    n = 50
    adata = ad.AnnData(sp.csr_matrix(np.ones((n, 3), np.float32)),
                       obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]), var=pd.DataFrame(index=["A", "B", "C"]))
    adata.obsm["spatial"] = _um_centroids(n=n)
    image = np.zeros((1, SIDE, SIDE), np.uint16)
    with pytest.raises(ValueError, match="AnnData: obsm\\['spatial'\\] centroids span x"):
        read_anndata(adata, image, PX)
    section = read_anndata(adata, image, PX, spatial_units="um")
    np.testing.assert_allclose(section.centroids_um, adata.obsm["spatial"])
    read_anndata(adata, image, PX, check_units=False)  # the user says the corner is right


def test_um_read_as_pixels_of_a_half_micron_image_is_caught_too():
    xy = np.random.default_rng(1).uniform(10, 390, size=(300, 2))  # µm on a 800 px image at 0.5 µm/px
    with pytest.raises(ValueError, match="they look like µm"):
        check_spatial_units(xy, "px", 0.5, (800, 800))
    check_spatial_units(xy, "um", 0.5, (800, 800))
