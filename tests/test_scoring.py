"""Classification metrics against scikit-learn and NumPy references, on fresh random predictions."""

import warnings

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from bridle_jax.data import weighted_sampler
from bridle_jax.evaluators import scoring


def _sklearn_ap(scores, targets):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No positive class found in y_true"
        return np.array(
            [average_precision_score(targets[:, c], scores[:, c]) for c in range(scores.shape[1])], np.float64
        )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_precision_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n, c = 97, 13
    # few distinct values -> many tied scores; plus one continuous column block
    scores = rng.integers(0, 5, size=(n, c)).astype(np.float32) / 4
    scores[:, :3] = rng.normal(size=(n, 3))
    targets = (rng.random((n, c)) < rng.uniform(0.05, 0.6, size=c)).astype(np.int64)
    targets[:, 5] = 0  # no positive
    targets[:, 6] = 1  # all positive
    targets[0, 7], targets[1:, 7] = 1, 0  # exactly one positive
    ours = scoring.average_precision(scores, targets)
    ref = _sklearn_ap(scores.astype(np.float64), targets)
    has_pos = targets.sum(0) > 0
    np.testing.assert_allclose(ours[has_pos], ref[has_pos], rtol=1e-12, atol=1e-14)
    assert np.isnan(ours[5]) and ref[5] == 0.0  # sklearn's convention for an undefined AP; ours: NaN
    assert ours[6] == pytest.approx(1.0)


def test_average_precision_tie_order_does_not_matter():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 3, size=(40, 4)).astype(np.float64)
    targets = rng.random((40, 4)) < 0.4
    targets[0] = True
    perm = rng.permutation(40)
    np.testing.assert_allclose(
        scoring.average_precision(scores, targets), scoring.average_precision(scores[perm], targets[perm]), rtol=1e-14
    )
    # a hand case: scores [3, 2, 2, 1], labels [1, 0, 1, 1] -> thresholds 3 (P=1, R=1/3), 2 (P=2/3, R=2/3), 1 (P=3/4)
    ap = scoring.average_precision(np.array([[3.0], [2.0], [2.0], [1.0]]), np.array([[1], [0], [1], [1]]))
    assert ap[0] == pytest.approx((1.0 + 2 / 3 + 3 / 4) / 3)


def test_mean_average_precision_excludes_classes_without_positives():
    rng = np.random.default_rng(4)
    scores = rng.normal(size=(60, 8))
    targets = (rng.random((60, 8)) < 0.3).astype(np.int32)
    targets[:, [2, 5]] = 0
    result = scoring.mean_average_precision(scores, targets)
    ref = _sklearn_ap(scores, targets)
    keep = [c for c in range(8) if c not in (2, 5)]
    assert result["mAP"] == pytest.approx(float(np.mean(ref[keep])), rel=1e-12)
    assert result["num_classes_used"] == 6 and result["num_classes_without_positives"] == 2
    assert result["per_class"][2] is None and result["per_class"][0] == pytest.approx(ref[0], rel=1e-12)
    with pytest.raises(ValueError, match="no class"):
        scoring.mean_average_precision(scores, np.zeros_like(targets))


def test_average_precision_bad_input():
    with pytest.raises(ValueError, match="targets: expected 0/1 values, got 2 at row 1, column 0"):
        scoring.average_precision(np.ones((3, 2)), np.array([[0, 1], [2, 0], [1, 1]]))
    with pytest.raises(ValueError, match=r"targets: expected shape \(3, 2\)"):
        scoring.average_precision(np.ones((3, 2)), np.ones((3, 3)))
    with pytest.raises(ValueError, match="scores: expected finite"):
        scoring.average_precision(np.array([[np.nan], [1.0]]), np.array([[1], [0]]))
    with pytest.raises(ValueError, match="2-D"):
        scoring.average_precision(np.ones(3), np.ones(3))


@pytest.mark.parametrize("seed", [0, 1])
def test_topk_accuracy_matches_stable_argsort(seed):
    rng = np.random.default_rng(seed)
    n, c = 200, 10
    logits = rng.integers(0, 4, size=(n, c)).astype(np.float32)  # heavy ties
    logits[: n // 2] = rng.normal(size=(n // 2, c))
    labels = rng.integers(0, c, size=n)
    ours = scoring.topk_accuracy(logits, labels, ks=(1, 3, 5, 12))
    order = np.argsort(-logits.astype(np.float64), axis=1, kind="stable")
    for k in (1, 3, 5):
        ref = np.mean(np.any(order[:, :k] == labels[:, None], axis=1))
        assert ours[f"top{k}"] == pytest.approx(ref, abs=1e-15)
    assert ours["top12"] == 1.0  # k > C is clipped to C, as in timm
    assert ours["top1"] < ours["top3"] < ours["top5"] < 1.0


def test_topk_accuracy_ties_hand_case():
    logits = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 2.0, 2.0]])
    labels = np.array([0, 1, 2])
    # row 0: label 0 first among the tie -> top-1 correct; row 1: label 1 second -> not; row 2: label 2 second
    assert scoring.topk_accuracy(logits, labels, ks=(1, 2)) == {"top1": 1 / 3, "top2": 1.0}


def test_topk_accuracy_bad_input():
    with pytest.raises(ValueError, match=r"labels: expected class indices in \[0, 3\), got 3 at row 1"):
        scoring.topk_accuracy(np.ones((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="labels: expected shape"):
        scoring.topk_accuracy(np.ones((2, 3)), np.array([0]))
    with pytest.raises(ValueError, match="ks"):
        scoring.topk_accuracy(np.ones((2, 3)), np.array([0, 1]), ks=(0,))


def test_kfold_splits_disjoint_complete_each_fold_tested_once():
    rng = np.random.default_rng(5)
    folds = rng.integers(1, 6, size=123)
    folds[:5] = [1, 2, 3, 4, 5]
    splits = scoring.kfold_splits(folds, scoring.ESC50_FOLDS)
    assert [s.fold for s in splits] == [1, 2, 3, 4, 5]
    tested = np.concatenate([s.test for s in splits])
    assert np.array_equal(np.sort(tested), np.arange(123))  # each example tested exactly once
    for s in splits:
        assert np.intersect1d(s.train, s.test).size == 0
        assert np.array_equal(np.union1d(s.train, s.test), np.arange(123))
        assert np.all(folds[s.test] == s.fold) and np.all(folds[s.train] != s.fold)
    with pytest.raises(ValueError, match="example 2 is in fold 7"):
        scoring.kfold_splits(np.array([1, 2, 7, 3, 4, 5]), scoring.ESC50_FOLDS)
    with pytest.raises(ValueError, match=r"folds \[5\] have no examples"):
        scoring.kfold_splits(np.array([1, 2, 3, 4]), scoring.ESC50_FOLDS)
    with pytest.raises(ValueError, match="at least 2 folds"):
        scoring.kfold_splits(np.array([3, 3, 3]))


def test_esc50_folds_and_summary():
    pairs = scoring.esc50_folds()
    assert pairs[0] == ((2, 3, 4, 5), 1) and [t for _, t in pairs] == [1, 2, 3, 4, 5]
    for train, test in pairs:
        assert test not in train and sorted(train + (test,)) == [1, 2, 3, 4, 5]
    rng = np.random.default_rng(6)
    values = rng.uniform(0.7, 0.9, size=5)
    s = scoring.summarize_folds(values)
    assert s["mean"] == pytest.approx(values.mean()) and s["std"] == pytest.approx(values.std(ddof=1))
    assert scoring.summarize_folds(values, ddof=0)["std"] == pytest.approx(values.std())
    assert scoring.summarize_folds([0.5])["std"] is None
    with pytest.raises(ValueError, match="finite"):
        scoring.summarize_folds([0.5, np.nan])


def test_weighted_sampler_weights_hand_case():
    y = np.array([[1, 0, 0], [1, 1, 0], [1, 0, 1], [0, 0, 0]])
    w = weighted_sampler.weighted_sampler_weights(y)
    lw = 1000.0 / (np.array([3, 1, 1]) + 0.01)  # label counts 3, 1, 1
    np.testing.assert_allclose(w, [lw[0], lw[0] + lw[1], lw[0] + lw[2], 0.0], rtol=1e-15)
    assert w[1] > w[0]  # an example with a rare label is drawn more often
    with pytest.raises(ValueError, match="multi_hot: expected 0/1 values"):
        weighted_sampler.weighted_sampler_weights(np.array([[0.5, 1.0]]))
