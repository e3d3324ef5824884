"""Cell states and niche compositions (``SpatiaNicheConfig.num_cell_states``), and the centroid
refinement of spatial domains (``spatia_hf.tl.domains(refine=True)``)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from spatia_hf import SpatiaConfig, SpatiaModel
from spatia_hf.inference import cell_states_for, embed_cell_niches
from spatia_hf.models.cell_states import SpatiaCellStates
from spatia_hf.utils.clustering import refine_to_centroids

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model() -> SpatiaModel:
    torch.manual_seed(0)
    return SpatiaModel(SpatiaConfig.from_preset("tiny", gene_vocab=[f"G{i}" for i in range(10)])).eval()


def layered_tissue(seed: int, n_cells: int = 1500, n_types: int = 5, n_domains: int = 3, width: int = 32,
                   own: float = 0.6):
    """Cells of ``n_types`` types (embedding clusters) in ``n_domains`` vertical layers; in layer i,
    type i makes up ``own`` of the cells and the other types share the rest: the layers show only in
    which cells live together."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 600, size=(n_cells, 2))
    domain = np.minimum((xy[:, 0] / (600 / n_domains)).astype(int), n_domains - 1)
    mix = np.full((n_domains, n_types), (1 - own) / (n_types - 1))
    mix[np.arange(n_domains), np.arange(n_domains)] = own
    types = np.array([rng.choice(n_types, p=mix[d]) for d in domain])
    centres = rng.standard_normal((n_types, width)) * 3.0
    emb = (centres[types] + rng.standard_normal((n_cells, width))).astype(np.float32)
    return xy, emb, domain


def test_composition_is_a_mean_assignment_over_real_cells_and_ignores_order():
    model = tiny_model()
    rng = np.random.default_rng(0)
    model.niche.fit_cell_states(rng.standard_normal((100, 32)).astype(np.float32))
    cells = torch.from_numpy(rng.standard_normal((2, 12, 32)).astype(np.float32))
    positions = torch.randn(2, 12, 2) * 20
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 8:] = False
    out = model.niche(cells, positions, mask)
    comp = out.niche_composition
    assert comp.shape == (2, 8) and comp.dtype == torch.float32
    torch.testing.assert_close(comp.sum(-1), torch.ones(2))
    # padded cells do not count: changing them leaves the composition as it was
    changed = cells.clone()
    changed[1, 8:] += 50.0
    torch.testing.assert_close(model.niche(changed, positions, mask).niche_composition, comp)
    perm = torch.randperm(12)
    torch.testing.assert_close(model.niche(cells[:, perm], positions[:, perm], mask[:, perm]).niche_composition, comp)
    # the presets weight members by a Gaussian of their distance, sigma 0.35 of the farthest counted member's
    d2 = positions[1, :8].pow(2).sum(-1)
    w = torch.exp(-0.5 * d2 / (0.35**2 * d2.max()))
    expected = (model.niche.cell_states.probabilities(cells[1, :8]) * w[:, None]).sum(0) / w.sum()
    torch.testing.assert_close(comp[1], expected)


def test_gaussian_weights_follow_the_local_density_and_none_gives_the_plain_mean():
    rng = np.random.default_rng(3)
    fit = rng.standard_normal((80, 16)).astype(np.float32)
    kernel = SpatiaCellStates(6, 16, neighbours=10, bandwidth=0.35).fit(fit)
    plain = SpatiaCellStates(6, 16, neighbours=10).fit(fit)
    cells = torch.from_numpy(rng.standard_normal((3, 10, 16)).astype(np.float32))
    positions = torch.randn(3, 10, 2) * 15
    positions[:, 0] = 0.0  # the centre cell
    comp = kernel.composition(cells, positions)
    # the bandwidth is a fraction of the neighbourhood's own reach: a denser tissue (all distances / 4) gives
    # the same composition, so no µm constant is involved
    torch.testing.assert_close(kernel.composition(cells, positions / 4), comp)
    # the centre weighs most; moving the farthest cell's state does not move the composition much
    p = kernel.probabilities(cells)
    far = positions.pow(2).sum(-1).argmax(1)
    swapped = cells.clone()
    swapped[torch.arange(3), far] = cells[:, 0]
    shift_far = (kernel.composition(swapped, positions) - comp).abs().sum(-1)
    near = positions.pow(2).sum(-1).masked_fill(torch.arange(10) == 0, float("inf")).argmin(1)
    swapped = cells.clone()
    swapped[torch.arange(3), near] = cells[torch.arange(3), far]
    shift_near = (kernel.composition(swapped, positions) - comp).abs().sum(-1)
    assert (shift_far < 0.05).all() and (shift_near > 2 * shift_far).all()
    torch.testing.assert_close(plain.composition(cells, positions), p.mean(1))


def test_composition_counts_the_cells_nearest_the_centre_only():
    rng = np.random.default_rng(4)
    states = SpatiaCellStates(6, 16, neighbours=3).fit(rng.standard_normal((60, 16)).astype(np.float32))
    cells = torch.from_numpy(rng.standard_normal((1, 8, 16)).astype(np.float32))
    positions = torch.tensor([[[5.0, 0], [0, 0], [40, 0], [0, -2], [30, 30], [1, 1], [-50, 0], [9, 9]]])
    mask = torch.ones(1, 8, dtype=torch.bool)
    mask[0, 5] = False  # padding, though close to the centre
    expected = states.probabilities(cells[0, [1, 3, 0]]).mean(0)
    torch.testing.assert_close(states.composition(cells, positions, mask)[0], expected)


def test_unfitted_states_give_no_composition_and_a_clear_error():
    model = tiny_model()
    assert not model.niche.has_fitted_cell_states
    out = model.niche(torch.randn(1, 5, 32), torch.randn(1, 5, 2))
    assert out.niche_composition is None
    with pytest.raises(RuntimeError, match="fit_cell_states"):
        model.niche.cell_states.probabilities(torch.randn(3, 32))


def test_fitting_refuses_bad_embeddings_naming_the_fix():
    states = SpatiaCellStates(8, 32)
    with pytest.raises(ValueError, match="at least 8 cells"):
        states.fit(np.zeros((5, 32), np.float32))
    with pytest.raises(ValueError, match=r"\[n_cells, 32\]"):
        states.fit(np.zeros((50, 16), np.float32))
    bad = np.zeros((50, 32), np.float32)
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        states.fit(bad)
    off = SpatiaModel(SpatiaConfig.from_preset("tiny", gene_vocab=["A", "B"], niche_config={"num_cell_states": 0}))
    assert off.niche.cell_states is None
    with pytest.raises(ValueError, match="num_cell_states=0"):
        off.niche.fit_cell_states(np.zeros((50, 32), np.float32))


def test_fitted_states_travel_with_the_checkpoint(tmp_path):
    model = tiny_model()
    emb = np.random.default_rng(1).standard_normal((200, 32)).astype(np.float32)
    model.niche.fit_cell_states(emb, seed=3)
    model.save_pretrained(tmp_path)
    loaded = SpatiaModel.from_pretrained(tmp_path).eval()
    assert loaded.niche.has_fitted_cell_states
    x = torch.from_numpy(emb[:40].reshape(2, 20, 32))
    torch.testing.assert_close(loaded.niche.cell_states.probabilities(x), model.niche.cell_states.probabilities(x))


def test_fit_is_seeded():
    emb = np.random.default_rng(2).standard_normal((300, 32)).astype(np.float32)
    a, b = SpatiaCellStates(8, 32).fit(emb, seed=4), SpatiaCellStates(8, 32).fit(emb, seed=4)
    torch.testing.assert_close(a.centres, b.centres)


@pytest.mark.parametrize("seed", [0, 7])
def test_compositions_find_layers_that_only_the_mix_of_cells_shows(seed):
    """Domains by Leiden + refinement on the compositions recover layers defined by their mix of cell
    types, on tissues of two seeds (ARI 0.90 on both when written; a composition that ignored the
    mask, or states fitted on the wrong width, would not)."""
    from spatia_hf.tl import domains

    xy, emb, truth = layered_tissue(seed)
    model = tiny_model()
    model.niche.fit_cell_states(emb, seed=0)
    hoods = embed_cell_niches(model, emb, xy, np.array(["s"] * len(xy)), num_neighbours=30, progress=False)
    assert hoods.compositions.shape == (len(xy), 8)
    a = ad.AnnData(np.zeros((len(xy), 1), np.float32), obsm={"X_spatia_niche": hoods.compositions})
    info = domains(a, n_domains=3)
    assert info["refined"] and info["n_domains"] == 3
    assert adjusted_rand_score(truth, a.obs["spatia_domain"].astype(str)) > 0.8


def test_embedded_compositions_count_more_cells_than_the_niche_model_reads():
    """The presets count 40 cells in a composition, the niche model reads 30: embedding finds the larger
    neighbourhood for the composition (checked against a direct k-d tree computation) and the niche tokens
    are those of the 30-cell neighbourhood."""
    from scipy.spatial import cKDTree

    xy, emb, _ = layered_tissue(1, n_cells=300)
    model = tiny_model()
    model.niche.fit_cell_states(emb, seed=0)
    states = model.niche.cell_states
    assert states.neighbours == 40 and model.config.niche_config.num_neighbours == 30
    sections = np.array(["s"] * len(xy))
    hoods = embed_cell_niches(model, emb, xy, sections, progress=False)
    d, nn = cKDTree(xy).query(xy, k=40)
    w = np.exp(-0.5 * d**2 / (0.35**2 * d[:, -1:] ** 2))
    p = states.probabilities(torch.from_numpy(emb)).numpy()
    expected = (p[nn] * w[..., None]).sum(1) / w.sum(1, keepdims=True)
    np.testing.assert_allclose(hoods.compositions, expected, atol=1e-5)
    thirty = embed_cell_niches(model, emb, xy, sections, cell_states=SpatiaCellStates(8, 32).fit(emb), progress=False)
    np.testing.assert_allclose(hoods.tokens, thirty.tokens, atol=1e-6)


def test_a_model_without_fitted_states_gets_states_fitted_on_the_embedded_cells_and_stays_unchanged():
    model = tiny_model()
    emb = np.random.default_rng(3).standard_normal((120, 32)).astype(np.float32)
    states, source = cell_states_for(model, emb, seed=0)
    assert source == "embedded cells" and states.is_fitted and not model.niche.has_fitted_cell_states
    model.niche.fit_cell_states(emb)
    states, source = cell_states_for(model, emb)
    assert source == "checkpoint" and states is model.niche.cell_states


def test_refinement_moves_a_misplaced_boundary_to_the_midpoint_and_keeps_the_groups():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0.0, 0.3, 200), rng.normal(4.0, 0.3, 200)])[:, None]
    truth = np.repeat([0, 1], 200)
    cut = (x[:, 0] > 0.4).astype(int)  # a graph cut through the first group's edge
    assert adjusted_rand_score(truth, cut) < 0.9
    refined = refine_to_centroids(x, cut)
    assert adjusted_rand_score(truth, refined) == 1.0
    assert refined[0] == 0 and set(refined.tolist()) == {0, 1}
    assert (refine_to_centroids(x, np.zeros(400, int)) == 0).all()
    with pytest.raises(ValueError, match="labels"):
        refine_to_centroids(x[:10], cut)


def rare_state_neighbourhoods(seed: int, n_cells: int = 1200):
    """Compositions of 20-cell neighbourhoods over 8 states: two common states shared by every
    domain, three domains that differ only in which rare state (8% against 2%) they hold."""
    rng = np.random.default_rng(seed)
    mix = np.full((3, 8), 0.02)
    mix[:, :2] = 0.4
    mix[0, 2] = mix[1, 3] = mix[2, 4] = 0.08
    mix[0, 6] = mix[1, 7] = mix[2, 5] = 0.04
    domain = rng.integers(0, 3, n_cells)
    comp = np.stack([rng.multinomial(20, mix[d]) for d in domain]) / 20.0
    return comp.astype(np.float32), domain


@pytest.mark.parametrize("seed", [0, 1])
def test_compositions_are_clustered_by_hellinger_distance(seed):
    """Domains that differ only in rare states: on the raw proportions the common states' counting
    noise hides them (ARI 0.00 on both seeds when written), on their square roots (Hellinger) Leiden
    finds them (0.34 / 0.33)."""
    from spatia_hf.tl import domains

    comp, truth = rare_state_neighbourhoods(seed)
    raw = ad.AnnData(np.zeros((len(comp), 1), np.float32), obsm={"X_spatia_niche": comp})
    sqrt = raw.copy()
    assert domains(raw, n_domains=3, hellinger=False)["metric"] == "euclidean"
    info = domains(sqrt, n_domains=3)
    assert info["metric"] == "hellinger"
    np.testing.assert_allclose(sqrt.obsm["X_spatia_niche_hellinger"], np.sqrt(comp), rtol=1e-6)
    assert sqrt.uns["spatia_domain_neighbors"]["params"]["use_rep"] == "X_spatia_niche_hellinger"
    assert adjusted_rand_score(truth, raw.obs["spatia_domain"].astype(str)) < 0.1
    assert adjusted_rand_score(truth, sqrt.obs["spatia_domain"].astype(str)) > 0.25


def test_only_compositions_get_the_square_root():
    from spatia_hf.utils.clustering import domain_features, is_composition

    comp, _ = rare_state_neighbourhoods(0, 50)
    tokens = np.random.default_rng(0).standard_normal((50, 8))
    assert is_composition(comp) and not is_composition(tokens) and not is_composition(np.abs(tokens))
    assert not is_composition(np.where(np.arange(8) == 0, np.nan, comp))
    x, applied = domain_features(tokens)
    assert not applied and x is tokens
    assert domain_features(comp)[1] and not domain_features(comp, hellinger=False)[1]
    with pytest.raises(ValueError, match="hellinger=True: expected a composition"):
        domain_features(tokens, hellinger=True)
