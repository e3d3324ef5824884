"""Splits, baselines and task functions: honest baselines beat chance on separable synthetic data."""

import math

import numpy as np
import pytest

from spatia_hf.evaluation import baselines as B
from spatia_hf.evaluation import tasks as T
from spatia_hf.evaluation.morphology import log_fold_shift, true_log_shift
from spatia_hf.evaluation.splits import cell_split, leave_one_section_out, section_split


@pytest.fixture(scope="module")
def synth():
    """Two small synthetic sections as arrays (no dataset build, no images)."""
    from spatia_hf.data.synthetic import make_synthetic_sections

    secs = make_synthetic_sections(2, 150, seed=1)
    import scipy.sparse as sp

    counts = sp.vstack([s.counts_csr() for s in secs]).tocsr().astype(np.float32)
    types = np.concatenate([s.obs["cell_type"].astype(str).to_numpy() for s in secs])
    domains = np.concatenate([s.obs["domain"].astype(str).to_numpy() for s in secs])
    sample_ids = np.concatenate([[s.sample_id] * s.n_cells for s in secs])
    xy = np.concatenate([s.centroids_um for s in secs])
    return {"counts": counts, "types": types, "domains": domains, "sample_ids": sample_ids, "xy": xy,
            "genes": secs[0].genes, "gt": secs[0].uns["synthetic_ground_truth"]}


def _blobs(n_per=40, k=3, dim=6, seed=0, spread=0.3):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(k, dim))
    labels = np.repeat(np.arange(k), n_per)
    return centres[labels] + spread * rng.normal(size=(k * n_per, dim)), labels.astype(str)


# ----------------------------------------------------------------------------- splits
def test_section_split_holds_out_whole_sections_like_training_does():
    ids = np.array(["s1", "s0", "s1", "s2", "s0", "s2"])
    split = section_split(ids)
    assert split.held_out_sections == ("s2",)  # training's default: the last section by name
    assert set(ids[split.test]) == {"s2"} and "s2" not in set(ids[split.train])
    assert split.to_json() == {"kind": "section", "seed": 0, "n_train": 4, "n_test": 2, "held_out_sections": ["s2"]}
    with pytest.raises(ValueError, match="'s9'"):
        section_split(ids, ["s9"])
    with pytest.raises(ValueError, match="single section"):
        section_split(["a", "a"])


def test_cell_split_is_seeded_disjoint_and_stratified_by_section():
    ids = np.array(["a"] * 40 + ["b"] * 40)
    s1, s2 = cell_split(80, 0.25, seed=3, stratify=ids), cell_split(80, 0.25, seed=3, stratify=ids)
    assert np.array_equal(s1.test, s2.test) and not np.array_equal(s1.test, cell_split(80, 0.25, 4, ids).test)
    assert len(s1.test) == 20 and np.intersect1d(s1.train, s1.test).size == 0
    assert (ids[s1.test] == "a").sum() == 10


def test_leave_one_section_out_covers_every_section_once():
    folds = leave_one_section_out(["x", "y", "z"])
    assert [f.held_out_sections for f in folds] == [("x",), ("y",), ("z",)]
    assert sorted(np.concatenate([f.test for f in folds]).tolist()) == [0, 1, 2]


# ----------------------------------------------------------------------------- expression and space
def test_log1p_normalize_by_hand_and_with_an_observed_library():
    x = np.array([[1.0, 3.0], [0.0, 0.0]])
    out = B.log1p_normalize(x, target_sum=4.0)
    assert out[0] == pytest.approx(np.log1p([1.0, 3.0]))  # library 4 -> scale 1
    assert (out[1] == 0).all()  # an empty cell stays zero instead of dividing by zero
    assert B.log1p_normalize(x, target_sum=4.0, library=[2.0, 1.0])[0] == pytest.approx(np.log1p([2.0, 6.0]))


def test_spatial_smoothing_averages_within_radius_and_section():
    x = np.array([[0.0], [2.0], [10.0], [100.0]])
    xy = np.array([[0.0, 0.0], [5.0, 0.0], [100.0, 0.0], [0.0, 0.0]])
    out = B.spatial_smoothing(x, xy, ["a", "a", "a", "b"], radius_um=10.0)
    assert out[:, 0] == pytest.approx([1.0, 1.0, 10.0, 100.0])


def test_expression_baselines_annotate_cell_types_far_above_chance(synth):
    split = section_split(synth["sample_ids"])
    x = B.log1p_normalize(synth["counts"])
    feats = {"PCA": B.pca_features(x, split.train, 20), "log1p": x}
    r = T.run_cell_annotation(feats, synth["types"], split)
    chance = 1.0 / len(np.unique(synth["types"]))
    for m in feats:
        assert r.scores[m]["macro_f1"] > 0.8 > 2 * chance
    assert r.method_kinds == {"PCA": "baseline", "log1p": "baseline"}


def test_spatial_smoothing_recovers_domains_better_than_cells_alone(synth):
    split = section_split(synth["sample_ids"])
    pcs = B.pca_features(B.log1p_normalize(synth["counts"]), split.train, 20)
    feats = {"cell only": pcs, "smoothed": B.spatial_smoothing(pcs, synth["xy"], synth["sample_ids"], 30.0)}
    r = T.run_domain_clustering(feats, synth["domains"], synth["sample_ids"], split.test, method="kmeans")
    assert r.scores["smoothed"]["ari"] > r.scores["cell only"]["ari"] + 0.2
    assert set(r.details["ari_per_section"]["smoothed"]) == {split.held_out_sections[0]}


def test_task5_compares_compositions_by_hellinger_distance_and_other_features_as_they_are():
    """Task 5 clusters like ``tl.domains``: the square root of a composition, other embeddings raw."""
    from test_cell_states import rare_state_neighbourhoods

    comp, truth = rare_state_neighbourhoods(0, 600)
    feats = {"composition": comp, "token": np.log(comp + 0.05)}
    r = T.run_domain_clustering(feats, truth.astype(str), np.array(["s"] * len(truth)))
    assert r.details["algorithm"] == ["leiden+centroids", "leiden+centroids+hellinger"]
    assert r.scores["composition"]["ari"] > 0.2


def test_task5_scores_one_training_run_per_seed_so_the_interval_covers_training(synth):
    """A method given as several training runs (a peer whose training is not reproducible): seed j clusters run
    j mod runs, so per-seed values differ when the runs do, and the same runs in one array give one value."""
    split = section_split(synth["sample_ids"])
    pcs = B.pca_features(B.log1p_normalize(synth["counts"]), split.train, 20)
    good = B.spatial_smoothing(pcs, synth["xy"], synth["sample_ids"], 30.0)
    noise = np.random.default_rng(0).normal(size=good.shape)
    feats = {"good": good, "runs": [good, noise, good]}
    r = T.run_domain_clustering(feats, synth["domains"], synth["sample_ids"], split.test, method="kmeans",
                                seed=[0, 1, 2])
    good_ari, runs_ari = r.per_seed["good"]["ari"], r.per_seed["runs"]["ari"]
    assert runs_ari["1"] < 0.2 < runs_ari["0"] and runs_ari["0"] == pytest.approx(good_ari["0"])
    assert r.scores["runs"]["ari"] < r.scores["good"]["ari"]
    lo, hi = r.intervals["runs"]["ari"]
    assert lo < runs_ari["0"] and hi - lo > r.intervals["good"]["ari"][1] - r.intervals["good"]["ari"][0]
    with pytest.raises(ValueError, match=r"features\['runs'\]: 4 training runs for 3 seeds"):
        T.run_domain_clustering({"runs": [good] * 4}, synth["domains"], synth["sample_ids"], split.test,
                                method="kmeans", seed=[0, 1, 2])


def test_spatial_knn_beats_mean_imputation_on_neighbour_driven_genes(synth):
    split = cell_split(len(synth["types"]), 0.3, seed=0, stratify=synth["sample_ids"])
    cols = [synth["genes"].index(g) for g in synth["gt"]["neighbor_genes"]]
    y = B.log1p_normalize(synth["counts"])[:, cols]
    preds = {"mean": B.mean_imputation(y[split.train], len(split.test)),
             "spatial": B.spatial_knn_imputation(synth["xy"][split.train], y[split.train],
                                                 synth["sample_ids"][split.train], synth["xy"][split.test],
                                                 synth["sample_ids"][split.test], k=8)}
    r = T.run_niche_imputation(preds, y[split.test], list(synth["gt"]["neighbor_genes"]), split)
    assert r.scores["mean"]["pearson"] == 0.0
    assert r.scores["spatial"]["pearson"] > 0.2


def test_spatial_knn_needs_training_cells_in_each_test_section():
    with pytest.raises(ValueError, match="cell-level split"):
        B.spatial_knn_imputation(np.zeros((2, 2)), np.zeros((2, 1)), ["a", "a"], np.zeros((1, 2)), ["b"])


def test_knn_expression_and_ridge_recover_linear_signal():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    y = x @ rng.normal(size=(5, 3)) + 0.1 * rng.normal(size=(200, 3))
    tr, te = np.arange(150), np.arange(150, 200)
    preds = {"knn": B.knn_expression_imputation(x[tr], y[tr], x[te], k=5),
             "ridge": B.ridge_regression(x[tr], y[tr], x[te])}
    r = T.run_gene_imputation(preds, y[te], ["g1", "g2", "g3"])
    assert r.scores["ridge"]["pearson"] > 0.95
    assert r.scores["knn"]["pearson"] > 0.6
    assert r.scores["ridge"]["spearman"] > 0.9


def test_pca_cca_retrieval_beats_random():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 4))  # shared latent of the two modalities
    expr = z @ rng.normal(size=(4, 30)) + 0.3 * rng.normal(size=(300, 30))
    img = z @ rng.normal(size=(4, 20)) + 0.3 * rng.normal(size=(300, 20))
    tr, te = np.arange(200), np.arange(200, 300)
    pairs = {"PCA-CCA": B.pca_cca_embeddings(expr, img, tr, te, n_pca=10, n_components=4),
             "random": B.random_embeddings(100, 8, seed=0)}
    r = T.run_retrieval(pairs, ks=(1, 10), kinds={"random": "reference"})
    assert r.scores["PCA-CCA"]["recall@10"] > 0.5
    assert r.scores["random"]["recall@10"] < 0.3
    assert r.best("baseline")[0] == "PCA-CCA" and r.method_kinds["random"] == "reference"


def _disc_images(n, rng, size=16):
    """Two classes of 1-channel crops: small or large bright disc, jittered, noisy (uint8)."""
    yy, xx = np.mgrid[:size, :size]
    labels = rng.integers(0, 2, n)
    imgs = np.zeros((n, 1, size, size), np.uint8)
    for i, lab in enumerate(labels):
        cy, cx = size / 2 + rng.uniform(-1.5, 1.5, 2)
        r = 2.0 if lab == 0 else 5.0
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) * 180.0
        imgs[i, 0] = np.clip(disc + rng.normal(20, 10, (size, size)), 0, 255).astype(np.uint8)
    return imgs, np.where(labels == 0, "small", "large")


def test_image_cnn_is_seeded_and_separates_visible_classes():
    rng = np.random.default_rng(0)
    imgs, labels = _disc_images(160, rng)
    tr, te = np.arange(120), np.arange(120, 160)
    a = B.train_image_cnn(imgs, labels, tr, epochs=4, batch_size=32, width=8, seed=0)
    b = B.train_image_cnn(imgs, labels, tr, epochs=4, batch_size=32, width=8, seed=0)
    assert a.losses == b.losses and a.losses[-1] < a.losses[0]
    assert (a.predict(imgs[te]) == labels[te]).mean() > 0.8  # chance 0.5
    assert a.features(imgs[:5]).shape == (5, 32)
    # its features feed the same probe as every other method
    r = T.run_image_annotation({"image-CNN": a.features(imgs), "pixels": B.pixel_features(imgs, 4)}, labels,
                               section_split(np.where(np.arange(160) < 120, "s0", "s1")))
    assert r.scores["image-CNN"]["macro_f1"] > 0.8


def test_observational_shift_recovers_a_known_slope():
    rng = np.random.default_rng(0)
    log_expr = rng.normal(size=500)
    covariate = B.one_hot(rng.choice(["a", "b"], 500))
    log_area = 0.5 * log_expr + covariate @ np.array([3.0, 3.5]) + 0.05 * rng.normal(size=500)
    shift = B.observational_shift(log_expr, log_area, np.log([2.0, 0.5]), covariate)
    assert shift == pytest.approx([0.5 * math.log(2), -0.5 * math.log(2)], rel=0.05)


def test_shifts_are_log_folds_and_truth_comes_from_the_ground_truth_exponent():
    assert log_fold_shift([1.0, 2.0, 0.0], [2.0, 4.0, 3.0]) == pytest.approx(math.log(2))  # 0: no nucleus, skipped
    gt = {"morphology_genes": {"NUCSIZE": {"exponent": 0.5}}}
    assert true_log_shift(gt, "NUCSIZE", 4.0) == pytest.approx(math.log(2))
    with pytest.raises(KeyError, match="NUCSIZE"):
        true_log_shift(gt, "OTHER", 2.0)


# ----------------------------------------------------------------------------- task functions
@pytest.mark.parametrize("method", ["kmeans", "leiden"])
def test_clustering_recovers_separated_groups(method):
    if method == "leiden" and not T.leiden_available():
        pytest.skip("leidenalg/igraph not installed")
    x, labels = _blobs(30, 3)
    r = T.run_cell_clustering({"blobs": x}, labels, method=method)
    assert r.scores["blobs"]["ari"] == pytest.approx(1.0) and r.scores["blobs"]["nmi"] == pytest.approx(1.0)
    assert r.details["algorithm"] == [method]


def test_section_classification_scores_held_out_sections_only():
    labels = np.array(["healthy", "disease"] * 4)
    ids = [f"s{i}" for i in range(8)]
    feats = {"separable": np.where(labels == "disease", 1.0, -1.0)[:, None] + np.arange(8)[:, None] * 0.01,
             "uninformative": np.zeros((8, 1))}
    r = T.run_section_classification(feats, labels, ids, held_out=["s4", "s5", "s6", "s7"])
    assert r.not_estimable is None and r.split["held_out_sections"] == ["s4", "s5", "s6", "s7"]
    assert r.scores["separable"]["accuracy"] == 1.0
    assert r.scores["uninformative"]["accuracy"] <= 0.5
    assert r.details["sample_ids"] == ["s4", "s5", "s6", "s7"]  # the training sections are never scored
    with pytest.raises(ValueError, match="single class"):
        T.run_section_classification(feats, ["a"] * 8, ids, held_out=["s7"])


def test_section_classification_with_too_few_held_out_sections_is_not_estimable():
    labels = np.array(["healthy", "disease"] * 2)
    feats = {"separable": np.where(labels == "disease", 1.0, -1.0)[:, None]}
    r = T.run_section_classification(feats, labels, ["s0", "s1", "s2", "s3"], held_out=["s3"])
    assert r.scores == {} and "1 held-out section(s) ['s3']" in r.not_estimable
    assert "at least 2 held-out sections of each of at least 2 classes" in r.not_estimable


def test_finetuned_annotation_scores_given_predictions_and_checks_their_length():
    labels = np.array(["a", "b", "a", "b"])
    split = section_split(["s0", "s0", "s1", "s1"])
    r = T.run_finetuned_annotation({"SPATIA": ["a", "a"]}, labels, split)
    assert r.scores["SPATIA"]["accuracy"] == 0.5 and r.method_kinds["SPATIA"] == "spatia"
    with pytest.raises(ValueError, match="expected 2"):
        T.run_finetuned_annotation({"SPATIA": ["a"]}, labels, split)


def test_generation_task_ranks_matching_images_above_mismatched_ones():
    x, labels = _blobs(40, 3, dim=4, seed=1)
    real, real_lab = x[::2], labels[::2]
    held, held_lab = x[1::2], labels[1::2]
    shuffled = held[np.random.default_rng(0).permutation(len(held))]
    r = T.run_generation(real, real_lab, {"matching": held, "shuffled": shuffled, "noise": held * 0 + 5.0 +
                                          np.random.default_rng(1).normal(size=held.shape)}, held_lab)
    assert r.scores["matching"]["type_accuracy"] > 0.9 > r.scores["shuffled"]["type_accuracy"]
    assert r.scores["noise"]["fid"] > r.scores["matching"]["fid"]
    assert r.best("baseline")[0] in ("matching", "shuffled")  # lowest FID wins (lower is better)


def test_perturbation_task_and_method_kinds():
    r = T.run_perturbation({"SPATIA (unmerged)": [0.3, -0.3], "spatial null": [0.0, 0.0]},
                           [0.35, -0.35], ["G x2", "G x0.5"])
    assert r.method_kinds == {"SPATIA (unmerged)": "spatia", "spatial null": "baseline"}
    assert r.scores["SPATIA (unmerged)"]["direction_agreement"] == 1.0
    assert r.scores["SPATIA (unmerged)"]["size_ratio"] == pytest.approx(0.3 / 0.35)


@pytest.mark.filterwarnings("ignore:All-NaN slice")
def test_perturbation_scores_every_edited_pair_and_leaves_methods_without_pairs_out():
    """Per-pair direction: 3 cells x 2 folds, one pair wrong, one without a nucleus (NaN), so 4 of 5 right;
    the bootstrap resamples cells for both the medians and the pairs; a method without pairs gets NaN."""
    pairs = np.array([[0.4, -0.2], [0.3, 0.1], [np.nan, -0.5]])
    medians = np.nanmedian(pairs, axis=0)
    r = T.run_perturbation({"gen": medians, "regression": [0.3, -0.3]}, [0.35, -0.35], ["G x2", "G x0.5"],
                           resample={"gen": (3, lambda rows: np.nanmedian(pairs[rows], axis=0))},
                           pair_shifts={"gen": pairs})
    assert r.scores["gen"]["pair_direction_agreement"] == pytest.approx(0.8)
    assert r.scores["gen"]["direction_agreement"] == 1.0
    assert np.isnan(r.scores["regression"]["pair_direction_agreement"])
    lo, hi = r.intervals["gen"]["pair_direction_agreement"]
    assert 0.0 <= lo < 0.8 < hi <= 1.0
    assert T.pair_direction_agreement(pairs, [0.35, 0.0]) == pytest.approx(2 / 2)  # a fold without effect: left out
    with pytest.raises(ValueError, match=r"pair_shifts\['gen'\]"):
        T.run_perturbation({"gen": medians}, [0.35, -0.35], pair_shifts={"gen": pairs[:, :1]})


def test_task_functions_name_the_bad_method():
    with pytest.raises(ValueError, match=r"features\['bad'\] has 3 rows: expected 4"):
        T.run_cell_annotation({"bad": np.zeros((3, 2))}, ["a", "b", "a", "b"], section_split(["s0", "s0", "s1", "s1"]))
