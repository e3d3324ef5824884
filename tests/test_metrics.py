"""The shipped evaluate metric modules load offline and agree with values computed by hand."""

import math

import numpy as np
import pytest

from spatia_hf.evaluation.metrics import METRIC_NAMES, METRICS_DIR, compute_metric, load_metric


def test_every_metric_ships_with_a_module_and_card_and_loads_offline():
    import evaluate

    for name in METRIC_NAMES:
        assert (METRICS_DIR / name / f"{name}.py").is_file()
        assert (METRICS_DIR / name / "README.md").is_file()
        assert isinstance(load_metric(name), evaluate.Metric)


def test_unknown_metric_names_the_available_ones():
    with pytest.raises(ValueError, match="per_gene_correlation"):
        load_metric("f1")


def test_plain_sklearn_metrics_are_not_wrapped_as_modules():
    assert not {"accuracy", "macro_f1", "adjusted_rand_index", "normalized_mutual_info"} & set(METRIC_NAMES)


def test_macro_f1_and_accuracy_by_hand():
    from spatia_hf.evaluation.tasks import classification_scores

    out = classification_scores([0, 1, 1, 1, 2], [0, 0, 1, 1, 2])
    # class 0: P=1, R=1/2 -> F1=2/3; class 1: P=2/3, R=1 -> 0.8; class 2: 1
    assert out["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 1.0) / 3) and out["accuracy"] == pytest.approx(0.8)
    # a never-predicted class counts as 0: class 0: P=3/4, R=1 -> 6/7
    assert classification_scores([0, 0, 0, 0], [0, 0, 0, 1])["macro_f1"] == pytest.approx((6 / 7 + 0.0) / 2)


def test_ari_and_nmi_by_hand():
    from spatia_hf.evaluation.tasks import clustering_scores

    # contingency pairs: sum C(n_ij,2)=1, rows 2, cols 1, C(4,2)=6: (1 - 1/3) / (1.5 - 1/3) = 4/7;
    # pred refines ref: MI = H(ref) = ln 2, H(pred) = 1.5 ln 2 -> NMI = ln2 / (1.25 ln 2) = 0.8
    assert clustering_scores([0, 0, 1, 2], [0, 0, 1, 1]) == pytest.approx({"ari": 4 / 7, "nmi": 0.8})
    assert clustering_scores([5, 5, 7, 7], [0, 0, 1, 1])["ari"] == pytest.approx(1.0)


def test_bootstrap_draws_score_exactly_as_sklearn_does():
    from spatia_hf.evaluation.intervals import resamples
    from spatia_hf.evaluation.tasks import (classification_scores, classification_scores_batched, clustering_scores,
                                            clustering_scores_batched)

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, 60)
    pred = np.where(rng.random(60) < 0.6, truth, rng.integers(0, 5, 60))
    rows = resamples(60, seed=1, n_boot=30)
    rows[0] = 0  # a draw of one repeated item: one class on both sides
    got_c = classification_scores_batched(pred.astype(str), truth.astype(str), rows)
    got_k = clustering_scores_batched(pred, truth, rows)
    for b, r in enumerate(rows):
        want = classification_scores(pred[r].astype(str), truth[r].astype(str))
        assert got_c["macro_f1"][b] == pytest.approx(want["macro_f1"]) and got_c["accuracy"][b] == pytest.approx(
            want["accuracy"])
        assert {k: v[b] for k, v in got_k.items()} == pytest.approx(clustering_scores(pred[r], truth[r]))


def test_intervals_pool_seeds_and_name_a_winner_only_when_they_separate():
    from spatia_hf.evaluation.intervals import SeededScores, resamples, separated

    acc = SeededScores()
    x = np.random.default_rng(0).normal(size=200)
    for seed, shift in ((0, 0.0), (1, 0.1), (2, 0.2)):
        acc.add("m", seed, lambda rows, shift=shift: {"mean": x[rows].mean() + shift}, resamples(200, seed, 100))
    assert acc.means()["m"]["mean"] == pytest.approx(x.mean() + 0.1)
    assert acc.per_seed()["m"]["mean"]["2"] == pytest.approx(x.mean() + 0.2)
    lo, hi = acc.intervals()["m"]["mean"]
    assert lo < x.mean() < x.mean() + 0.2 < hi  # covers the seeds' spread and the sampling
    assert separated([0.1, 0.2], [0.3, 0.4]) and not separated([0.1, 0.35], [0.3, 0.4])
    assert not separated([0.1, float("nan")], [0.3, 0.4])


def test_per_gene_correlation_by_hand_and_its_conventions():
    pred = np.array([[1.0, 5.0, 1.0], [2.0, 5.0, 2.0], [3.0, 5.0, 3.0]])
    ref = np.array([[2.0, 1.0, 4.0], [4.0, 2.0, 4.0], [7.0, 3.0, 4.0]])
    out = compute_metric("per_gene_correlation", predictions=pred, references=ref, gene_names=["A", "B", "C"])
    # gene A: deviations (-1,0,1) vs (-7/3,-1/3,8/3): cov 5, var 2 and 114/9
    r_a = 5 / math.sqrt(2 * 114 / 9)
    assert out["pearson_per_gene"][0] == pytest.approx(r_a)
    assert out["spearman_per_gene"][0] == pytest.approx(1.0)
    assert out["pearson_per_gene"][1] == 0.0  # constant prediction of a varying gene
    assert math.isnan(out["pearson_per_gene"][2])  # constant measurement: undefined, excluded
    assert out["n_genes_undefined"] == 1
    assert out["pearson_mean"] == pytest.approx(r_a / 2)
    assert out["spearman_mean"] == pytest.approx(0.5)
    assert out["gene_names"] == ["A", "B", "C"]


def test_per_gene_pearson_scores_stacked_draws_like_one_draw_at_a_time():
    from spatia_hf.utils.stats import per_column_pearson, per_column_spearman

    rng = np.random.default_rng(0)
    pred, ref = rng.normal(size=(5, 30, 4)), rng.normal(size=(5, 30, 4))
    pred[2, :, 1] = 1.0  # a constant prediction scores 0, a constant truth is undefined
    ref[3, :, 2] = 2.0
    stacked, ranked = per_column_pearson(pred, ref), per_column_spearman(pred, ref)
    for b in range(5):
        one = compute_metric("per_gene_correlation", predictions=pred[b], references=ref[b])
        np.testing.assert_allclose(stacked[b], one["pearson_per_gene"], equal_nan=True)
        np.testing.assert_allclose(ranked[b], one["spearman_per_gene"], equal_nan=True)
    assert stacked[2, 1] == 0.0 and np.isnan(stacked[3, 2])


def test_per_gene_correlation_matches_numpy_on_random_data():
    rng = np.random.default_rng(0)
    pred, ref = rng.normal(size=(30, 4)), rng.normal(size=(30, 4))
    out = compute_metric("per_gene_correlation", predictions=pred, references=ref)
    expected = [np.corrcoef(pred[:, j], ref[:, j])[0, 1] for j in range(4)]
    assert out["pearson_per_gene"] == pytest.approx(expected)


def test_per_gene_correlation_rejects_shape_mismatch_with_the_shapes():
    with pytest.raises(ValueError, match=r"\(3, 2\).*\(3, 1\)"):
        compute_metric("per_gene_correlation", predictions=np.ones((3, 2)), references=np.ones((3, 1)))


def test_recall_at_k_by_hand():
    # item 2's expression embedding points at item 0's image: its partner ranks 2nd (of 3)
    expr = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.05]])
    image = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    out = compute_metric("recall_at_k", predictions=expr, references=image, ks=[1, 2])
    assert out["pred_to_ref_recall@1"] == pytest.approx(2 / 3)
    assert out["pred_to_ref_recall@2"] == pytest.approx(1.0)
    # image 2 is closest to expression 2 (cos 0.74 vs 0.71 and 0.71)
    assert out["ref_to_pred_recall@1"] == pytest.approx(1.0)
    assert out["chance@1"] == pytest.approx(1 / 3)


def test_recall_at_k_counts_ties_against_the_query():
    same = np.ones((5, 3))
    out = compute_metric("recall_at_k", predictions=same, references=same, ks=[1, 5])
    assert out["pred_to_ref_recall@1"] == 0.0
    assert out["pred_to_ref_recall@5"] == 1.0


def test_fid_by_hand_in_one_and_two_dimensions():
    # 1-D: means 1 and 3, unbiased variances 2 and 8: (1-3)^2 + 2 + 8 - 2 sqrt(16) = 6
    out = compute_metric("feature_fid_kid", features=[[0.0], [2.0], [1.0], [5.0]],
                         is_generated=[False, False, True, True])
    assert out["fid"] == pytest.approx(6.0)
    # 2-D with diagonal covariances: |dmu|^2 + sum (sqrt(v_r) - sqrt(v_g))^2
    real = np.array([[1, 1], [-1, -1], [1, -1], [-1, 1]], dtype=float)  # mean 0, var 4/3 each
    gen = 3.0 * real + np.array([2.0, -1.0])  # var 12 each, mean (2, -1)
    out = compute_metric("feature_fid_kid", features=np.vstack([real, gen]), is_generated=[False] * 4 + [True] * 4)
    v_r, v_g = 4 / 3, 12.0
    assert out["fid"] == pytest.approx(5.0 + 2 * (math.sqrt(v_r) - math.sqrt(v_g)) ** 2)


def test_kid_by_hand_and_zero_fid_for_identical_sets():
    # k(a, b) = (a b / 1 + 1)^3; Kxx off-diagonal k(0,1)=1, Kyy k(1,2)=27, Kxy mean (1+1+8+27)/4
    out = compute_metric("feature_fid_kid", features=[[0.0], [1.0], [1.0], [2.0]],
                         is_generated=[False, False, True, True], subset_size=2)
    assert out["kid"] == pytest.approx(1 + 27 - 2 * 37 / 4)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    same = compute_metric("feature_fid_kid", features=np.vstack([x, x]), is_generated=[False] * 40 + [True] * 40)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)


def test_kid_subsets_are_seeded():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(60, 4))
    flags = [False] * 30 + [True] * 30
    a = compute_metric("feature_fid_kid", features=feats, is_generated=flags, subset_size=10, subsets=5, seed=3)
    b = compute_metric("feature_fid_kid", features=feats, is_generated=flags, subset_size=10, subsets=5, seed=3)
    assert a["kid"] == b["kid"] and a["kid_std"] > 0


def test_fid_kid_needs_two_of_each_set():
    with pytest.raises(ValueError, match="n_generated=1"):
        compute_metric("feature_fid_kid", features=[[0.0], [1.0], [2.0]], is_generated=[False, False, True])


def test_morphology_shift_by_hand():
    out = compute_metric("morphology_shift", predictions=[0.2, -0.1, 0.3], references=[0.4, -0.4, 0.2])
    assert out["direction_agreement"] == 1.0
    assert out["size_ratio"] == pytest.approx(0.5)  # median of 0.5, 0.25, 1.5
    assert out["slope"] == pytest.approx(0.18 / 0.36)
    wrong = compute_metric("morphology_shift", predictions=[-0.2, 0.1, 0.0], references=[0.4, -0.4, 0.2])
    assert wrong["direction_agreement"] == 0.0  # zero measured shift has the wrong sign too
    assert wrong["size_ratio"] < 0


def test_morphology_shift_refuses_all_zero_truth():
    with pytest.raises(ValueError, match="tolerance"):
        compute_metric("morphology_shift", predictions=[0.1], references=[0.0])
