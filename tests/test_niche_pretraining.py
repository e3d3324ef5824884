"""Every scale is pretrained: cell-centred neighbourhood examples in local blocks, the
neighbourhood-expression and tissue objectives, and spatial domains by Leiden."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from spatia_hf.data.synthetic import build_tiny_dataset

    return build_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny", n_sections=2, n_cells=80, seed=0)


@pytest.fixture(scope="module")
def cells(tiny_dir):
    from spatia_hf.data.datasets import load_spatia_dataset

    return load_spatia_dataset(tiny_dir, ("cells",))["cells"]


def test_cell_niche_examples_are_each_cells_nearest_cells_of_its_section(cells):
    from spatia_hf.data import schema
    from spatia_hf.data.datasets import CellNicheDataset

    ds = CellNicheDataset(cells, num_neighbours=6)
    assert len(ds) == len(cells)
    ex = ds[5]
    niche = ex["niche"]
    assert niche[schema.NICHE_ID] == cells[5][schema.CELL_ID] and niche[schema.CELL_IDS][0] == niche[schema.NICHE_ID]
    assert list(ex["cells"][schema.CELL_ID]) == list(niche[schema.CELL_IDS])
    same = np.asarray(cells[schema.SAMPLE_ID]) == cells[5][schema.SAMPLE_ID]
    xy = np.stack([np.asarray(cells[schema.X_UM]), np.asarray(cells[schema.Y_UM])], 1)
    d = np.where(same, np.linalg.norm(xy - xy[5], axis=1), np.inf)
    nearest = set(np.asarray(cells[schema.CELL_ID])[np.argsort(d)[:6]].tolist())
    assert set(niche[schema.CELL_IDS].tolist()) == nearest
    rel = np.stack([niche[schema.CELL_REL_X_UM], niche[schema.CELL_REL_Y_UM]], 1)
    ids = list(np.asarray(cells[schema.CELL_ID]))
    np.testing.assert_allclose(rel, xy[[ids.index(c) for c in niche[schema.CELL_IDS]]] - xy[5], atol=1e-3)


def test_local_blocks_hold_nearby_centres_of_one_section(cells):
    from spatia_hf.data.datasets import CellNicheDataset

    ds = CellNicheDataset(cells, num_neighbours=6)
    sampler = ds.train_sampler(4, seed=0)
    order = np.asarray(list(sampler))
    assert len(order) == len(ds)
    first = list(iter(sampler))
    assert first != order.tolist()  # a new order every pass
    blocks = order[: 4 * (len(order) // 4)].reshape(-1, 4)
    assert all(len(set(ds.sample_ids[b])) == 1 for b in blocks)
    spread = [np.ptp(ds.xy_um[b], axis=0).max() for b in blocks]
    section = np.ptp(ds.xy_um[ds.sample_ids == ds.sample_ids[0]], axis=0).max()
    assert np.median(spread) < 0.6 * section


def test_neighbourhood_profiles_are_the_mean_over_the_niche_cells():
    from spatia_hf.models.modeling_heads import neighbourhood_profiles

    # 2 niches x 2 slots; niche 0 has cells A, B; niche 1 only C (slot 3 is padding)
    ids = torch.tensor([[3, 4], [3, 5], [4, 0]])
    values = torch.tensor([[1.0, 2.0], [3.0, 0.0], [5.0, 0.0]])
    mask = ids != 0
    index = torch.tensor([0, 1, 2])
    target, valid = neighbourhood_profiles(ids, values, mask, index, (2, 2), vocab_size=6)
    assert torch.allclose(target[0, 3:6], torch.tensor([2.0, 1.0, 0.0]))
    assert valid[0].tolist() == [False, False, False, True, True, True]
    assert torch.allclose(target[1, 4], torch.tensor(5.0)) and valid[1].tolist() == [False] * 4 + [True, False]


def test_group_tokens_lays_out_each_group_with_padding():
    from spatia_hf.models.modeling_heads import group_tokens

    x = torch.arange(5.0)[:, None].expand(5, 3)
    pos = torch.arange(10.0).view(5, 2)
    emb, p, real, rows = group_tokens(x, pos, torch.tensor([7, 9, 7, 9, 7]))
    assert real.tolist() == [[True, True, True], [True, True, False]]
    assert rows[real].tolist() == [0, 2, 4, 1, 3]
    assert torch.equal(emb[0, :, 0], torch.tensor([0.0, 2.0, 4.0])) and torch.equal(p[1, 1], pos[3])


def test_pretraining_trains_the_tissue_model_and_the_new_objectives_fall(tiny_dir, tmp_path):
    from spatia_hf.training.arguments import DataArguments, ModelArguments
    from spatia_hf.training.pretrain import build_pretraining_data, load_pretraining_model
    from spatia_hf.data.datasets import load_spatia_dataset
    from spatia_hf.training.setup import build_processor

    model_args = ModelArguments(preset="tiny")
    data_args = DataArguments(dataset_dir=str(tiny_dir))
    dataset = load_spatia_dataset(tiny_dir, ("cells", "niches"))
    model = load_pretraining_model(model_args, data_args, dataset, seed=0)
    model.config.niche_config.num_neighbours = 8
    processor = build_processor(model_args, model.config, dataset, 0)
    train, _, collator = build_pretraining_data(data_args, dataset, processor, model, seed=0)
    order = list(train.train_sampler(8, seed=0))
    batch = collator(train.__getitems__(order[:8]))
    assert {"niche_centres_um", "niche_groups"} <= set(batch)
    tissue_before = {k: v.detach().clone() for k, v in model.spatia.tissue.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    torch.manual_seed(0)
    for _ in range(12):  # the same batch: each objective must fit it
        out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append((out.niche_profile_loss.item(), out.tissue_loss.item()))
    losses = np.asarray(losses)
    assert np.isfinite(losses).all()
    assert losses[-3:, 0].mean() < 0.7 * losses[:3, 0].mean()
    assert losses[-3:, 1].mean() < 0.7 * losses[:3, 1].mean()
    changed = [k for k, v in model.spatia.tissue.named_parameters() if not torch.equal(v, tissue_before[k])]
    assert len(changed) == len(tissue_before)  # every tissue weight was trained


def test_overlapping_neighbourhoods_encode_each_distinct_cell_once(tiny_dir):
    """A batch of nearby neighbourhoods shares most cells: the collator names the distinct cells, the
    model encodes each once (a cell repeated in the contrastive batch would be its own negative) and the
    niche objectives see exactly what they saw with every member encoded on its own."""
    from spatia_hf.data.datasets import load_spatia_dataset
    from spatia_hf.models.modeling_heads import first_occurrences
    from spatia_hf.training.arguments import DataArguments, ModelArguments
    from spatia_hf.training.pretrain import build_pretraining_data, load_pretraining_model
    from spatia_hf.training.setup import build_processor

    uids = torch.tensor([4, 2, 4, 7, 2, 9])
    first, inverse = first_occurrences(uids)
    assert first.tolist() == [1, 0, 3, 5] and torch.equal(uids[first][inverse], uids)

    model_args, data_args = ModelArguments(preset="tiny"), DataArguments(dataset_dir=str(tiny_dir))
    dataset = load_spatia_dataset(tiny_dir, ("cells", "niches"))
    model = load_pretraining_model(model_args, data_args, dataset, seed=0).eval()
    model.config.niche_config.num_neighbours = 8
    processor = build_processor(model_args, model.config, dataset, 0)
    train, _, collator = build_pretraining_data(data_args, dataset, processor, model, seed=0)
    batch = collator(train.__getitems__(list(train.train_sampler(6, seed=0))[:6]))
    real = batch["cell_attention_mask"].bool()
    distinct = int(batch["cell_uids"].max()) + 1
    assert (batch["cell_uids"][~real] == -1).all() and distinct < int(real.sum())  # neighbourhoods overlap
    seen = []
    hook = model.spatia.cell.register_forward_hook(lambda m, args, out: seen.append(out.cell_embeds.shape[0]))
    with torch.no_grad():
        torch.manual_seed(0)
        once = model(**batch)
        torch.manual_seed(0)
        each = model(**{k: v for k, v in batch.items() if k != "cell_uids"})
    hook.remove()
    assert seen == [distinct, int(real.sum())]
    assert once.contrastive_logits.shape == (distinct, distinct)
    for name in ("niche_loss", "niche_profile_loss", "tissue_loss"):
        torch.testing.assert_close(getattr(once, name), getattr(each, name), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(once.cell_embeds, each.cell_embeds, rtol=1e-4, atol=1e-5)


def test_leiden_domains_search_the_resolution_for_a_target_count():
    import anndata as ad

    from spatia_hf.tl import domains

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, size=(4, 8))
    x = np.concatenate([c + rng.normal(0, 0.5, size=(60, 8)) for c in centres]).astype(np.float32)
    a = ad.AnnData(np.zeros((len(x), 1), np.float32), obsm={"X_emb": x})
    found = domains(a, use_rep="X_emb", n_domains=4)
    assert found["n_domains"] == 4 and found["cluster_method"] == "leiden"
    truth = np.repeat(np.arange(4), 60)
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(truth, a.obs["spatia_domain"].astype(str)) > 0.99
    many = domains(a, use_rep="X_emb", resolution=5.0, key_added="fine")
    assert many["n_domains"] > 4 and a.obs["fine"].dtype == "category"
    with pytest.raises(ValueError, match="kmeans' needs n_domains"):
        domains(a, use_rep="X_emb", method="kmeans")
    with pytest.raises(ValueError, match="give one"):
        domains(a, use_rep="X_emb", n_domains=3, resolution=1.0)
