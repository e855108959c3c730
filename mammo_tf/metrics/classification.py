"""Classification metrics: thin wrappers over scikit-learn that survive absent classes (NaN)."""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import rankdata
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

DEFAULT_CLASS_NAMES: tuple[str, ...] = ("normal", "benign", "malignant")


def _labels_and_proba(y_true: ArrayLike, proba: ArrayLike, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).reshape(-1)
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != n_classes:
        raise ValueError(f"proba must have shape (n, {n_classes}) (one column per class), got {p.shape}")
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"y_true has {y.shape[0]} samples but proba has {p.shape[0]} rows")
    if not len(y):
        raise ValueError("y_true is empty")
    if not np.all(np.isfinite(p)):
        raise ValueError("proba contains NaN or inf")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y.astype(np.float64), 1), 0)):
            raise ValueError("y_true must hold integer class ids")
        y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"y_true must hold class ids in [0, {n_classes}), got range [{y.min()}, {y.max()}]")
    return y, p


def _binary(y_true: ArrayLike, score: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).reshape(-1)
    s = np.asarray(score, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"y_true and score must have the same length, got {y.shape[0]} and {s.shape[0]}")
    if not np.all(np.isfinite(s)):
        raise ValueError("score contains NaN or inf")
    if not np.all(np.isin(y, (0, 1))):
        raise ValueError("y_true must be binary (0/1 or bool)")
    return y.astype(np.int64), s


def safe_roc_auc(y_true: ArrayLike, score: ArrayLike) -> float:
    """Binary ROC AUC, NaN when only one class is present instead of raising."""
    y, s = _binary(y_true, score)
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, s))


def rank_auc(y_true: ArrayLike, score: ArrayLike) -> float:
    """Binary ROC AUC as the Mann-Whitney U over n1 * n0 (ties as mid-ranks): ``roc_auc_score`` to rounding."""
    y, s = _binary(y_true, score)
    n1 = int(y.sum())
    if n1 in (0, len(y)):
        return float("nan")
    # A bootstrap computes thousands of AUCs on small arrays, where scikit-learn's input checks cost
    # some ten times the arithmetic; the rank identity gives the same number without them.
    return float((rankdata(s)[y == 1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * (len(y) - n1)))


def classification_report_dict(
    y_true: ArrayLike,
    proba: ArrayLike,
    class_names: Sequence[str] = DEFAULT_CLASS_NAMES,
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, one-vs-rest and abnormal-vs-normal ROC AUC, confusion matrix.

    Predictions are ``argmax(proba)``. Class 0 is "normal": the abnormal-vs-normal score is
    ``1 - proba[:, 0]``. A class absent from ``y_true`` gets NaN AUC/recall and is left out of
    ``macro_roc_auc`` (the mean of the defined one-vs-rest AUCs, as scikit-learn's
    ``multi_class="ovr"`` macro average when every class is present); balanced accuracy is
    scikit-learn's (mean recall over the classes present in ``y_true``).
    """
    names = tuple(class_names)
    y, p = _labels_and_proba(y_true, proba, len(names))
    labels = list(range(len(names)))
    pred = p.argmax(axis=1)
    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true": expected on small folds.
        warnings.simplefilter("ignore", UserWarning)
        balanced = float(balanced_accuracy_score(y, pred))
    precision, recall, f1, support = precision_recall_fscore_support(
        y, pred, labels=labels, zero_division=np.nan
    )
    per_class: dict[str, dict[str, Any]] = {}
    aucs = []
    for k, name in enumerate(names):
        auc = safe_roc_auc(y == k, p[:, k])
        aucs.append(auc)
        per_class[name] = {
            "roc_auc": auc,
            "precision": float(precision[k]),
            "recall": float(recall[k]),
            "f1": float(f1[k]),
            "support": int(support[k]),
        }
    defined = [a for a in aucs if not math.isnan(a)]
    return {
        "n": int(len(y)),
        "class_names": list(names),
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": balanced,
        "macro_roc_auc": float(np.mean(defined)) if defined else float("nan"),
        "abnormal_vs_normal_auc": safe_roc_auc(y != 0, 1.0 - p[:, 0]),
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
    }


def bootstrap_auc_ci(
    y_true: ArrayLike,
    score: ArrayLike,
    groups: ArrayLike | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    baseline: ArrayLike | None = None,
    strata: ArrayLike | None = None,
    auc: Callable[[np.ndarray, np.ndarray], float] = rank_auc,
) -> dict[str, Any]:
    """Percentile bootstrap CI of a binary ROC AUC (or of AUC minus a baseline's), resampling whole groups.

    With ``baseline`` (a second score for the same samples) the statistic is the paired difference
    ``AUC(score) - AUC(baseline)``, both computed on each resample. With ``strata`` (e.g. the
    cross-validation fold of every sample), groups are resampled within their stratum and the
    statistic is the mean of the per-stratum values, as a mean over folds is. Resamples in which
    a stratum holds a single class have no AUC and are skipped; ``n_valid`` counts the rest.
    ``auc`` computes each AUC (``benchmarks/bench_bootstrap.py`` times ``roc_auc_score`` beside it).
    """
    y, s = _binary(y_true, score)
    b = None if baseline is None else _binary(y, baseline)[1]
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    g = np.arange(len(y)) if groups is None else np.asarray(groups).reshape(-1)
    st = np.zeros(len(y), dtype=int) if strata is None else np.asarray(strata).reshape(-1)
    for name, values in (("groups", g), ("strata", st)):
        if values.shape != y.shape:
            raise ValueError(f"{name} must have one entry per sample: {values.shape[0]} != {y.shape[0]}")
    # The unit of resampling is the group (a patient's patches enter or leave together), within its stratum.
    strata_units = []
    for stratum in np.unique(st):
        members = np.flatnonzero(st == stratum)
        _, inverse = np.unique(g[members], return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        strata_units.append([members[u] for u in np.split(order, np.cumsum(np.bincount(inverse))[:-1])])

    def statistic(parts: list[np.ndarray]) -> float:
        values = []
        for idx in parts:
            if y[idx].min() == y[idx].max():
                return float("nan")
            value = auc(y[idx], s[idx])
            values.append(value - auc(y[idx], b[idx]) if b is not None else value)
        return float(np.mean(values))

    point = statistic([np.concatenate(units) for units in strata_units])
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        parts = [np.concatenate([units[u] for u in rng.integers(0, len(units), size=len(units))])
                 for units in strata_units]
        value = statistic(parts)
        if not math.isnan(value):
            boots.append(value)
    if boots:
        low, high = np.quantile(boots, [alpha / 2.0, 1.0 - alpha / 2.0])
    else:
        low = high = float("nan")
    return {
        "auc" if b is None else "auc_difference": point,
        "ci_low": float(low),
        "ci_high": float(high),
        "alpha": float(alpha),
        "n_boot": int(n_boot),
        "n_valid": len(boots),
        "n_units": sum(len(units) for units in strata_units),
    }


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        elif isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
            flat[name] = float(value)
    return flat


def summarise_folds(folds: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, sample std (ddof=1) and n of every scalar metric across folds (nested keys joined by '.').

    Non-scalar entries (lists, arrays, strings, booleans) are skipped; NaN values (e.g. an AUC
    undefined in one fold) are left out, so ``n`` counts the folds where the metric exists.
    """
    if not folds:
        raise ValueError("summarise_folds needs at least one fold")
    flats = [_flatten(f) for f in folds]
    keys: list[str] = []
    for f in flats:
        keys.extend(k for k in f if k not in keys)
    out: dict[str, dict[str, float]] = {}
    for key in keys:
        values = np.array([f[key] for f in flats if key in f and not math.isnan(f[key])])
        n = len(values)
        out[key] = {
            "mean": float(values.mean()) if n else float("nan"),
            "std": float(values.std(ddof=1)) if n > 1 else float("nan"),
            "n": n,
        }
    return out


def paired_differences(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Per-fold ``a - b`` summarised: mean, sample std, n, and in how many folds ``a`` is ahead (NaN pairs left out)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need the same folds, got {len(a)} and {len(b)}")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    d = d[~np.isnan(d)]
    n = len(d)
    return {"mean": float(d.mean()) if n else float("nan"), "std": float(d.std(ddof=1)) if n > 1 else float("nan"),
            "n": n, "ahead": int((d > 0).sum())}


def threshold_for_sensitivity(y_true: ArrayLike, score: ArrayLike, sensitivity: float = 0.95) -> float:
    """Highest threshold whose rule ``score >= threshold`` reaches the target sensitivity on this data."""
    y, s = _binary(y_true, score)
    if not 0.0 < sensitivity <= 1.0:
        raise ValueError(f"sensitivity must be in (0, 1], got {sensitivity}")
    if not y.any():
        raise ValueError("threshold_for_sensitivity needs at least one positive sample")
    if y.all():
        # roc_curve needs negatives; with none, the lowest positive score keeps every positive.
        return float(np.sort(s)[::-1][int(math.ceil(sensitivity * len(s) - 1e-9)) - 1])
    _, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    # tpr is non-decreasing as the threshold falls; the first index reaching the target is the
    # highest threshold that does.
    idx = int(np.argmax(tpr >= sensitivity - 1e-12))
    return float(thresholds[idx])
