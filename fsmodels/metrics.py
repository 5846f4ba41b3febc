"""Binary classification metrics, implemented once (abnormal = 1 = positive).

Undefined values are ``float('nan')``, never a made-up number: AUC and the
Youden threshold need both classes, sensitivity needs positives, specificity
needs negatives, F1 needs a positive label or prediction. A non-finite score
(a diverged model) makes every metric nan: a NaN is neither ranked nor counted
as "normal". AUC is the Mann-Whitney statistic with mid-ranks, so tied scores
count one half.
"""
from __future__ import annotations

import math

import numpy as np

NAN = float("nan")
CI_METRICS = ("auc", "accuracy", "f1", "sensitivity", "specificity")  # metrics that get bootstrap intervals
SPLIT_METRICS = (*CI_METRICS, "loss")  # what every scored split reports (metrics.json `val` / `test` keys)
# the per-epoch validation metrics that may select epochs and trials (never a test metric)
SELECTABLE_METRICS = tuple(f"val_{name}" for name in SPLIT_METRICS)
# per-epoch fit diagnostics beside validation (reported per epoch and, as best_<name>, at the best epoch; never
# selected on): the training pass's AUC (under-fitting) and the validation AUC's patient-bootstrap 95 % interval
FIT_METRICS = ("train_auc", "val_auc_lo", "val_auc_hi")
BINARY_KEYS = (*CI_METRICS, "youden_threshold", "tp", "fp", "tn", "fn")  # binary_metrics' keys, in its order


def _ratio(num, den):
    """num / den, nan where den is 0; numbers or arrays (a bootstrap's counts per resample)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.divide(num, den, out=np.full(np.broadcast(num, den).shape, NAN), where=den != 0)
    return float(out) if out.ndim == 0 else out


def _arrays(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    return y, s


def all_finite(scores) -> bool:
    """False when any score is nan or infinite: the model that gave them diverged."""
    return bool(np.all(np.isfinite(np.asarray(scores, dtype=np.float64))))


def auc_score(y_true, scores) -> float:
    """ROC AUC via mid-ranks (ties = 1/2); nan when only one class is present or a score is not finite."""
    y, s = _arrays(y_true, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0 or not all_finite(s):
        return NAN
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(y.size, dtype=np.float64)
    # mid-rank of each run of equal scores: mean of its 1-based positions
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], y.size]
    mids = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(mids, ends - starts)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve_points(y_true, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, from (0, 0) at +inf to (1, 1).

    A point at threshold t counts ``score >= t`` as positive. With one class the
    undefined axis is all nan.
    """
    y, s = _arrays(y_true, scores)
    # one sort and cumulative counts: O(n log n), where a threshold x image table is O(n^2) every epoch
    order = np.argsort(-s, kind="mergesort")
    s_desc, y_desc = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_desc)), s.size - 1] if s.size else np.zeros(0, dtype=np.int64)
    thresholds = np.r_[np.inf, s_desc[last]]
    tp = np.r_[0, np.cumsum(y_desc == 1)[last]]
    fp = np.r_[0, np.cumsum(y_desc == 0)[last]]
    n_pos, n_neg = int(y.sum()), int((y == 0).sum())
    tpr = tp / n_pos if n_pos else np.full(tp.shape, np.nan)
    fpr = fp / n_neg if n_neg else np.full(fp.shape, np.nan)
    return fpr.astype(np.float64), tpr.astype(np.float64), thresholds


def youden_threshold(y_true, scores) -> float:
    """The score threshold maximising sensitivity + specificity - 1 (nan with one class)."""
    fpr, tpr, thresholds = roc_curve_points(y_true, scores)
    j = tpr - fpr
    if np.all(np.isnan(j)):
        return NAN
    best = int(np.nanargmax(j))
    return float(thresholds[best]) if np.isfinite(thresholds[best]) else float(thresholds[1])


def operating_threshold(youden: float | None) -> float:
    """The decision threshold a model is selected, tested and deployed at: its validation Youden threshold,
    0.5 when that is undefined (one class in validation, or diverged scores)."""
    return float(youden) if youden is not None and math.isfinite(youden) else 0.5


def confusion(y_true, scores, threshold: float = 0.5) -> dict:
    """tp, fp, tn, fn with ``score >= threshold`` predicted abnormal."""
    y, s = _arrays(y_true, scores)
    pred = s >= threshold
    return dict(
        tp=int((pred & (y == 1)).sum()),
        fp=int((pred & (y == 0)).sum()),
        tn=int((~pred & (y == 0)).sum()),
        fn=int((~pred & (y == 1)).sum()),
    )


def rates(tp, fp, tn, fn) -> dict:
    """accuracy, f1, sensitivity, specificity from a confusion matrix (nan when undefined); counts may be arrays."""
    return dict(
        accuracy=_ratio(tp + tn, tp + fp + tn + fn),
        f1=_ratio(2 * tp, 2 * tp + fp + fn),
        sensitivity=_ratio(tp, tp + fn),
        specificity=_ratio(tn, tn + fp),
    )


def binary_metrics(y_true, scores, threshold: float | None = 0.5) -> dict:
    """auc, accuracy, f1, sensitivity, specificity, youden_threshold, tp, fp, tn, fn (all nan if a score is not).

    The rates and counts are at ``threshold``; None: at these scores' own ``operating_threshold``.
    """
    if not all_finite(scores):
        _arrays(y_true, scores)
        return dict.fromkeys(BINARY_KEYS, NAN)
    youden = youden_threshold(y_true, scores)
    counts = confusion(y_true, scores, operating_threshold(youden) if threshold is None else threshold)
    return dict(auc=auc_score(y_true, scores), **rates(**counts), youden_threshold=youden, **counts)


def _units(patients, size: int) -> tuple[np.ndarray, int]:
    """Each image's resampling unit (its patient, so both views move together; else the image) and the unit count."""
    if patients is None:
        return np.arange(size), size
    codes = np.unique(np.asarray(patients).astype(str), return_inverse=True)[1].ravel()
    return codes, int(codes.max()) + 1 if codes.size else 0


def _picks(units: int, n: int, seed: int) -> np.ndarray:
    """(n, units): the units each of ``n`` resamples draws with replacement. Every bootstrap in fsweep draws here."""
    if not units:
        return np.zeros((n, 0), dtype=np.int64)
    return np.random.default_rng(seed).integers(0, units, size=(n, units))


def patient_draws(patients, n: int, seed: int) -> list[np.ndarray]:
    """``n`` bootstrap resamples of image indices that draw whole PATIENTS with replacement.

    All images of a drawn patient enter together (both views), so the images of one
    patient, which are not independent, never count as independent evidence. The same
    draws as ``bootstrap_ci`` with ``patients``, as index arrays (paired comparisons apply
    one resample to several trials).
    """
    codes, units = _units(patients, len(patients))
    members = [np.flatnonzero(codes == c) for c in range(units)]
    return [np.concatenate([members[p] for p in row]) if row.size else np.zeros(0, dtype=np.int64)
            for row in _picks(units, n, seed)]


def bootstrap_weights(size: int, patients, n: int, seed: int) -> np.ndarray:
    """(n, size): how many times each image is in each resample (``patient_draws``' draws as multiplicities)."""
    codes, units = _units(patients, size)
    counts = np.zeros((n, units))
    np.add.at(counts, (np.repeat(np.arange(n), units), _picks(units, n, seed).ravel()), 1.0)
    return counts[:, codes]


def _percentile_interval(values: np.ndarray, level: float) -> list[float]:
    """The percentile interval of the defined (non-nan) resampled values; [nan, nan] when none is defined."""
    values = values[~np.isnan(values)]
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(values, [tail, 100.0 - tail]) if values.size else (NAN, NAN)
    return [float(lo), float(hi)]


def _weighted_aucs(y: np.ndarray, s: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each resample's AUC: the Mann-Whitney count (ties 1/2) with every image weighted by its multiplicity,
    which equals the mid-rank AUC of the resampled images (nan for a resample with one class)."""
    pos, neg = y == 1, y == 0
    wins = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
    w_pos, w_neg = weights[:, pos], weights[:, neg]
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((w_pos @ wins) * w_neg).sum(1) / (w_pos.sum(1) * w_neg.sum(1))


def bootstrap_ci(y_true, scores, n: int = 1000, seed: int = 0, threshold: float = 0.5, level: float = 0.95,
                 patients=None) -> dict:
    """Percentile bootstrap intervals ``{'<metric>_ci': [lo, hi]}`` over resampled patients (or images).

    With ``patients`` (one id per image) whole patients are resampled (``patient_draws``);
    without, single images. Resamples where a metric is undefined (e.g. one class drawn) are
    left out of that metric's interval; an interval with no defined resample is [nan, nan].
    Vectorised over resamples (weighted counts), so it is cheap enough for every epoch.
    """
    y, s = _arrays(y_true, scores)
    if not all_finite(s):
        return {f"{name}_ci": [NAN, NAN] for name in CI_METRICS}
    weights = bootstrap_weights(y.size, patients, n, seed)
    pred = s >= threshold
    counts = {name: weights @ mask.astype(np.float64) for name, mask in (
        ("tp", pred & (y == 1)), ("fp", pred & (y == 0)), ("tn", ~pred & (y == 0)), ("fn", ~pred & (y == 1)))}
    values = {"auc": _weighted_aucs(y, s, weights), **rates(**counts)}
    return {f"{name}_ci": _percentile_interval(values[name], level) for name in CI_METRICS}


def auc_interval(y_true, scores, patients=None, n: int = 1000, seed: int = 0, level: float = 0.95) -> list[float]:
    """``bootstrap_ci``'s ``auc_ci`` (the same computation, so the card's interval is the leaderboard's)."""
    return bootstrap_ci(y_true, scores, n=n, seed=seed, level=level, patients=patients)["auc_ci"]


def json_safe(value):
    """nan/inf -> None recursively, so metrics files are strict JSON ("undefined" stays visible as null)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
