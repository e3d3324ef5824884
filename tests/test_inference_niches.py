"""Niche members are matched to cells by (sample_id, cell_id): instruments number cells per section,
so the same cell id appears in several sections and must never pull another section's cell."""

import numpy as np
import pytest
import torch

from spatia_hf.data import schema


@pytest.fixture(scope="module")
def model():
    from spatia_hf import SpatiaConfig, SpatiaModel

    torch.manual_seed(0)
    config = SpatiaConfig.from_preset("tiny", gene_vocab=[f"G{i}" for i in range(8)], image_size=16, num_channels=2)
    return SpatiaModel(config).eval()


def _two_sections_sharing_ids(width: int):
    """Sections A and B, each with cells "1", "2", "3" (different embeddings) and one niche of all three."""
    import datasets

    rng = np.random.default_rng(0)
    cell_ids = np.array(["1", "2", "3", "1", "2", "3"])
    sample_ids = np.array(["A", "A", "A", "B", "B", "B"])
    emb = rng.normal(size=(6, width)).astype(np.float32)
    rel_x, rel_y = [-5.0, 0.0, 5.0], [0.0, 4.0, -4.0]
    niches = datasets.Dataset.from_dict({
        schema.NICHE_ID: ["n0", "n0"], schema.SAMPLE_ID: ["B", "A"],  # B first: row order must not matter
        schema.CELL_IDS: [["3", "1", "2"], ["1", "2", "3"]],
        schema.CELL_REL_X_UM: [[rel_x[2], rel_x[0], rel_x[1]], rel_x],
        schema.CELL_REL_Y_UM: [[rel_y[2], rel_y[0], rel_y[1]], rel_y]})
    return cell_ids, sample_ids, emb, niches, np.stack([rel_x, rel_y], axis=1).astype(np.float32)


def test_niche_members_are_matched_within_their_section(model):
    from spatia_hf.inference import embed_niches_config

    width = model.config.cell_config.hidden_size
    cell_ids, sample_ids, emb, niches, pos = _two_sections_sharing_ids(width)
    niche_emb, ctx = embed_niches_config(model, niches, cell_ids, emb, cell_sample_ids=sample_ids, batch_size=2,
                                         progress=False)
    # expected: each section's niche run on that section's own cells only
    for rows, niche_row in ((np.arange(3), 1), (np.arange(3, 6), 0)):
        want_niche, want_cells = model.embed_niches(cell_positions=pos[None], cell_embeddings=emb[rows][None],
                                                    cell_attention_mask=np.ones((1, 3), bool),
                                                    return_cell_embeddings=True)
        np.testing.assert_allclose(ctx[rows], want_cells[0], atol=1e-5)
        np.testing.assert_allclose(niche_emb[niche_row], want_niche[0], atol=1e-5)
    # the two sections' niches differ (the check above could fail if both read section A's cells)
    assert not np.allclose(ctx[:3], ctx[3:], atol=1e-3)


def test_repeated_cell_ids_without_sections_are_refused(model):
    from spatia_hf.inference import embed_niches_config

    cell_ids, _, emb, niches, _ = _two_sections_sharing_ids(model.config.cell_config.hidden_size)
    with pytest.raises(ValueError, match="cell_sample_ids"):
        embed_niches_config(model, niches, cell_ids, emb, progress=False)


def test_evaluation_niche_members_use_the_section_too():
    """The evaluation's own niche lookup (tasks 5 and 8) keys members by (sample_id, cell_id) as well."""
    from types import SimpleNamespace

    from spatia_hf.evaluation.spatia_methods import _niche_members

    cell_ids, sample_ids, _, niches, _ = _two_sections_sharing_ids(4)
    inputs = SimpleNamespace(cells=SimpleNamespace(cell_ids=cell_ids, sample_ids=sample_ids))
    members = _niche_members(inputs, niches)
    assert [m[0].tolist() for m in members] == [[5, 3, 4], [0, 1, 2]]


def test_cell_row_index_finds_rows_in_bulk_and_marks_unknown_cells():
    from spatia_hf.inference import CellRowIndex

    cell_ids, sample_ids, *_ = _two_sections_sharing_ids(4)
    index = CellRowIndex(cell_ids, sample_ids)
    assert index.rows("B", ["3", "1", "9"]).tolist() == [5, 3, -1]
    assert index.rows("C", ["1"]).tolist() == [-1] and index.rows("A", []).tolist() == []
    assert index.get(("A", "2")) == 1 and index.get(("A", "7"), -1) == -1
    alone = CellRowIndex(np.array(["x", "y"]))
    assert alone.rows(None, ["y", "x", "z"]).tolist() == [1, 0, -1]
    with pytest.raises(ValueError, match="3 entries for 6"):
        CellRowIndex(cell_ids, sample_ids[:3])
