"""Cell-centred neighbourhoods: the k-d tree search against brute force, chunking, relative
positions, and what they buy the niche model (no tile edges)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spatia_hf.data.neighbourhoods import cell_neighbourhoods

pytestmark = pytest.mark.usefixtures("one_thread")


def _brute_force(xy, k, radius=None, include_centre=True):
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    if not include_centre:
        np.fill_diagonal(d, np.inf)
    out = []
    for i in range(len(xy)):
        order = np.argsort(d[i], kind="stable")[:k]
        if radius is not None:
            order = order[d[i, order] <= radius]
        out.append(set(order.tolist()))
    return out


@pytest.fixture()
def xy():
    return np.random.default_rng(0).uniform(0, 200, size=(300, 2))


@pytest.mark.parametrize("chunk_size", [7, 4096])
@pytest.mark.parametrize("radius", [None, 25.0])
def test_search_matches_brute_force_whatever_the_chunking(xy, chunk_size, radius):
    hoods = cell_neighbourhoods(xy, k=12, radius_um=radius, chunk_size=chunk_size)
    truth = _brute_force(xy, 12, radius)
    assert hoods.index.shape == (300, 12)
    for i in range(len(xy)):
        found = hoods.index[i][hoods.mask[i]]
        assert set(found.tolist()) == truth[i]
        assert found[0] == i  # the centre comes first
    if radius is not None:
        assert not hoods.mask.all()  # the radius cut some neighbourhoods short
        assert (np.linalg.norm(hoods.offsets_um, axis=-1)[hoods.mask] <= radius + 1e-4).all()


def test_offsets_are_member_minus_centre_and_zero_on_padding(xy):
    hoods = cell_neighbourhoods(xy, k=8, radius_um=15.0)
    rows = np.arange(len(xy))[:, None]
    expected = xy[np.where(hoods.mask, hoods.index, 0)] - xy[rows]
    np.testing.assert_allclose(hoods.offsets_um[hoods.mask], expected[hoods.mask], atol=1e-4)
    assert (hoods.offsets_um[~hoods.mask] == 0).all()
    assert (hoods.offsets_um[:, 0] == 0).all()


def test_neighbourhoods_without_the_centre_and_of_chosen_centres(xy):
    hoods = cell_neighbourhoods(xy, k=5, include_centre=False, centres=np.array([3, 10]))
    truth = _brute_force(xy, 5, include_centre=False)
    assert [set(r.tolist()) for r in hoods.index] == [truth[3], truth[10]]


def test_duplicate_positions_still_put_the_centre_first():
    xy = np.zeros((6, 2))
    hoods = cell_neighbourhoods(xy, k=3)
    assert (hoods.index[:, 0] == np.arange(6)).all()
    assert all(len(set(r.tolist())) == 3 for r in hoods.index)


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="xy_um"):
        cell_neighbourhoods(np.zeros((4, 3)), k=2)
    with pytest.raises(ValueError, match="radius_um"):
        cell_neighbourhoods(np.zeros((4, 2)), k=2, radius_um=0.0)


def test_niche_embeddings_of_two_cells_1um_apart_across_an_old_tile_edge_are_close():
    """Grid tiles of 50 µm gave these two cells unrelated contexts; cell-centred ones nearly the same."""
    from spatia_hf import SpatiaConfig, SpatiaModel
    from spatia_hf.inference import embed_cell_niches

    rng = np.random.default_rng(1)
    xy = np.concatenate([[[49.5, 60.0], [50.5, 60.0]], rng.uniform(0, 200, size=(400, 2))])
    emb = rng.standard_normal((len(xy), 32)).astype(np.float32)
    config = SpatiaConfig.from_preset("tiny", gene_vocab=[f"G{i}" for i in range(10)])
    torch.manual_seed(0)
    model = SpatiaModel(config).eval()
    niches = embed_cell_niches(model, emb, xy, np.array(["s"] * len(xy)), num_neighbours=30, progress=False).tokens
    dist = np.linalg.norm(niches[0] - niches, axis=-1)
    far = np.linalg.norm(xy - xy[0], axis=-1) > 60.0  # beyond one neighbourhood (30 cells ~ 27 µm radius here)
    assert dist[1] < 0.25 * np.median(dist[far])
    tiles = np.floor(xy[:2] / 50.0)
    assert tiles[0, 0] != tiles[1, 0]  # they do sit in different grid tiles
