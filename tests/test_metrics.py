"""fsmodels.metrics on hand-computed cases, tied scores and one-class edge cases."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fsmodels.metrics import (
    auc_score, binary_metrics, bootstrap_ci, json_safe, roc_curve_points, youden_threshold,
)


def pairwise_auc(y, s) -> float:
    """Independent AUC: the share of (positive, negative) pairs ranked right, ties 1/2."""
    pos = [b for a, b in zip(y, s) if a == 1]
    neg = [b for a, b in zip(y, s) if a == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_hand_computed_confusion_matrix():
    y = [1, 1, 1, 0, 0, 0, 1, 0]
    s = [0.9, 0.6, 0.4, 0.3, 0.7, 0.1, 0.5, 0.5]  # >= 0.5 is abnormal: tp 3, fn 1, fp 2, tn 2
    m = binary_metrics(y, s)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 2, 2)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert m["auc"] == pytest.approx(pairwise_auc(y, s))


def test_threshold_moves_the_confusion_matrix():
    y = [1, 1, 0, 0]
    s = [0.8, 0.35, 0.3, 0.1]
    assert binary_metrics(y, s, threshold=0.5)["sensitivity"] == pytest.approx(0.5)
    assert binary_metrics(y, s, threshold=0.32)["sensitivity"] == pytest.approx(1.0)
    assert binary_metrics(y, s, threshold=0.32)["specificity"] == pytest.approx(1.0)


def test_auc_with_tied_scores_counts_half():
    # pairs (pos, neg): (.5,.5) tie = 1/2, (.5,.2), (.8,.5), (.8,.2) right = 3.5 / 4
    assert auc_score([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.8]) == pytest.approx(0.875)
    assert auc_score([0, 1, 0, 1], [0.3, 0.3, 0.3, 0.3]) == pytest.approx(0.5)
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200) * 0.5 + 0.3 * y, 1)  # rounded: many ties
    assert auc_score(y, s) == pytest.approx(pairwise_auc(y, s))


def test_auc_perfect_and_reversed():
    assert auc_score([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auc_score([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0


def test_one_class_is_undefined_not_half_and_no_crash():
    only_pos = binary_metrics([1, 1, 1], [0.9, 0.2, 0.6])
    assert math.isnan(only_pos["auc"]) and math.isnan(only_pos["specificity"])
    assert math.isnan(only_pos["youden_threshold"])
    assert only_pos["sensitivity"] == pytest.approx(2 / 3)
    only_neg = binary_metrics([0, 0], [0.1, 0.2])
    assert math.isnan(only_neg["auc"]) and math.isnan(only_neg["sensitivity"]) and math.isnan(only_neg["f1"])
    assert only_neg["specificity"] == 1.0 and only_neg["accuracy"] == 1.0
    empty = binary_metrics([], [])
    assert math.isnan(empty["accuracy"]) and empty["tp"] == 0


def test_roc_points_and_youden_threshold():
    fpr, tpr, thr = roc_curve_points([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert list(fpr) == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert list(tpr) == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert thr[0] == np.inf and list(thr[1:]) == [0.8, 0.4, 0.35, 0.1]
    assert youden_threshold([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == pytest.approx(0.8)
    assert youden_threshold([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.8)


def test_roc_points_match_a_threshold_by_threshold_count_with_ties():
    rng = np.random.default_rng(1)
    y, s = rng.integers(0, 2, 200), np.round(rng.random(200), 1)  # many tied scores
    fpr, tpr, thr = roc_curve_points(y, s)
    for f, t, th in zip(fpr, tpr, thr):
        assert t == ((s >= th) & (y == 1)).sum() / (y == 1).sum()
        assert f == ((s >= th) & (y == 0)).sum() / (y == 0).sum()
    assert list(thr[1:]) == sorted(set(s), reverse=True)


def test_bootstrap_intervals_bracket_the_estimate_and_repeat_with_the_seed():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 120)
    s = np.clip(0.3 * y + rng.random(120) * 0.7, 0, 1)
    point = binary_metrics(y, s)
    ci = bootstrap_ci(y, s, n=300, seed=3)
    assert set(ci) == {"auc_ci", "accuracy_ci", "f1_ci", "sensitivity_ci", "specificity_ci"}
    for name in ("auc", "accuracy", "f1", "sensitivity", "specificity"):
        lo, hi = ci[f"{name}_ci"]
        assert lo < point[name] < hi
        assert hi - lo < 0.4
    assert bootstrap_ci(y, s, n=300, seed=3) == ci
    assert bootstrap_ci(y, s, n=300, seed=4) != ci


def test_bootstrap_one_class_gives_nan_interval():
    ci = bootstrap_ci([1, 1, 1, 1], [0.9, 0.8, 0.3, 0.7], n=50)
    assert all(math.isnan(v) for v in ci["auc_ci"])
    assert ci["sensitivity_ci"][0] <= 0.75 <= ci["sensitivity_ci"][1]


def test_json_safe_writes_undefined_as_null():
    text = json.dumps(json_safe({"auc": float("nan"), "ci": [float("nan"), 0.5], "n": 3}))
    assert json.loads(text) == {"auc": None, "ci": [None, 0.5], "n": 3}


@pytest.mark.parametrize("scores", [[0.1, float("nan"), 0.9, 0.2], [float("nan")] * 4, [0.1, float("inf"), 0.9, 0.2]])
def test_a_non_finite_score_makes_every_metric_nan(scores):
    """A diverged model is not ranked (AUC 1.0 / 0.75 from NaN ordering) nor counted as 'normal'."""
    labels = [0, 1, 1, 0]
    assert math.isnan(auc_score(labels, scores))
    metrics = binary_metrics(labels, scores)
    assert all(math.isnan(metrics[k]) for k in ("auc", "accuracy", "f1", "sensitivity", "specificity"))
    assert all(math.isnan(lo) and math.isnan(hi) for lo, hi in bootstrap_ci(labels, scores, n=20).values())


def test_patient_bootstrap_moves_both_images_of_a_patient_together():
    from fsmodels.metrics import patient_draws

    patients = np.array(["a", "a", "b", "b", "c", "c", "d"])  # d has one image
    for idx in patient_draws(patients, n=200, seed=0):
        drawn = patients[idx]
        for p in ("a", "b", "c"):  # a two-image patient enters with both images, as often as it is drawn
            assert (idx[drawn == p] % 2 == 0).sum() == (idx[drawn == p] % 2 == 1).sum()
        assert len(set(drawn)) <= 4 and len(idx) >= 4  # 4 patients drawn: 4..8 images


def test_patient_bootstrap_is_wider_than_an_image_bootstrap_when_images_of_a_patient_agree():
    rng = np.random.default_rng(0)
    y = np.repeat(rng.integers(0, 2, size=30), 4)  # 30 patients x 4 identical images
    s = np.repeat(rng.random(30), 4)
    patients = np.repeat(np.arange(30), 4)
    by_image = bootstrap_ci(y, s, n=400, seed=0)
    by_patient = bootstrap_ci(y, s, n=400, seed=0, patients=patients)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(by_patient["accuracy_ci"]) > 1.5 * width(by_image["accuracy_ci"])


@pytest.mark.parametrize("images, ties, by_patient", [(80, False, True), (81, True, True), (60, False, False)])
def test_auc_interval_is_bootstrap_ci_auc_interval_with_the_same_draws(images, ties, by_patient):
    from fsmodels.metrics import auc_interval

    rng = np.random.default_rng(images)
    labels = rng.integers(0, 2, images)
    scores = rng.random(images) + 0.3 * labels
    scores = np.round(scores, 1) if ties else scores
    patients = np.repeat(np.arange(images), 2)[:images] if by_patient else None
    lo, hi = auc_interval(labels, scores, patients, n=500, seed=3)
    expected = bootstrap_ci(labels, scores, n=500, seed=3, patients=patients)["auc_ci"]
    assert (lo, hi) == pytest.approx(expected, abs=1e-12) and lo < auc_score(labels, scores) < hi
    assert auc_interval(labels, np.where(labels == 1, np.nan, scores), patients) == pytest.approx([np.nan] * 2, nan_ok=True)
