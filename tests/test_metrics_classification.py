"""Classification metrics: hand-worked report, bootstrap CI, fold summary, gate threshold, plots."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from mammo_tf.metrics.classification import (
    bootstrap_auc_ci,
    rank_auc,
    classification_report_dict,
    safe_roc_auc,
    summarise_folds,
    threshold_for_sensitivity,
)

Y = np.array([0, 0, 1, 1, 2, 2])
P = np.array([
    [0.8, 0.1, 0.1],
    [0.4, 0.5, 0.1],
    [0.2, 0.7, 0.1],
    [0.3, 0.3, 0.4],
    [0.1, 0.2, 0.7],
    [0.2, 0.5, 0.3],
])  # argmax: 0, 1, 1, 2, 2, 1


def test_report_hand_worked():
    r = classification_report_dict(Y, P)
    assert r["n"] == 6 and r["class_names"] == ["normal", "benign", "malignant"]
    assert r["accuracy"] == pytest.approx(3 / 6)
    assert r["balanced_accuracy"] == pytest.approx(0.5)  # recall 1/2 in every class
    assert r["confusion_matrix"] == [[1, 1, 0], [0, 1, 1], [0, 1, 1]]
    # One-vs-rest AUC by counting pairs: normal 8/8, benign 6/8, malignant 7/8.
    assert r["per_class"]["normal"]["roc_auc"] == pytest.approx(1.0)
    assert r["per_class"]["benign"]["roc_auc"] == pytest.approx(6 / 8)
    assert r["per_class"]["malignant"]["roc_auc"] == pytest.approx(7 / 8)
    assert r["macro_roc_auc"] == pytest.approx((1 + 6 / 8 + 7 / 8) / 3)
    assert r["macro_roc_auc"] == pytest.approx(roc_auc_score(Y, P, multi_class="ovr", average="macro"))
    # 1 - p(normal) = .2 .6 | .8 .7 .9 .8: every abnormal film above every normal one.
    assert r["abnormal_vs_normal_auc"] == 1.0
    assert r["per_class"]["benign"]["precision"] == pytest.approx(1 / 3)
    assert r["per_class"]["benign"]["support"] == 2


def test_report_absent_class_is_nan_not_crash():
    r = classification_report_dict(Y[:4], P[:4])  # no malignant film
    mal = r["per_class"]["malignant"]
    assert math.isnan(mal["roc_auc"]) and math.isnan(mal["recall"]) and mal["support"] == 0
    assert r["macro_roc_auc"] == pytest.approx((1.0 + r["per_class"]["benign"]["roc_auc"]) / 2)
    assert r["confusion_matrix"] == [[1, 1, 0], [0, 1, 1], [0, 0, 0]]
    normals = classification_report_dict([0, 0], P[:2])
    assert math.isnan(normals["abnormal_vs_normal_auc"]) and math.isnan(normals["macro_roc_auc"])


def test_report_rejects_bad_input():
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        classification_report_dict(Y, P[:, :2])
    with pytest.raises(ValueError, match="6 samples but proba has 5 rows"):
        classification_report_dict(Y, P[:5])
    with pytest.raises(ValueError, match=r"class ids in \[0, 3\)"):
        classification_report_dict([0, 3], P[:2])


@pytest.mark.parametrize("decimals", [3, 1])  # 1 decimal: many tied scores, within and across classes
def test_rank_auc_equals_scikit_learn(decimals):
    rng = np.random.default_rng(decimals)
    for n, share in ((7, 0.3), (60, 0.5), (400, 0.1)):
        y = rng.random(n) < share
        y[:2] = [True, False]
        s = np.round(y * 0.3 + rng.random(n), decimals)
        assert rank_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert rank_auc([1, 0, 1], [0.9, 0.9, 0.9]) == 0.5 and rank_auc([0, 1], [0.2, 0.1]) == 0.0
    assert math.isnan(rank_auc([1, 1], [0.3, 0.4]))


def test_bootstrap_deterministic_and_brackets_estimate():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(30), np.ones(30)].astype(int)
    s = y * 0.6 + rng.uniform(0, 1, 60)
    a = bootstrap_auc_ci(y, s, n_boot=200, seed=3)
    b = bootstrap_auc_ci(y, s, n_boot=200, seed=3)
    assert a == b
    assert a["auc"] == pytest.approx(roc_auc_score(y, s))
    assert a["ci_low"] < a["auc"] < a["ci_high"] <= 1.0
    assert (a["n_valid"], a["n_units"]) == (200, 60)
    assert bootstrap_auc_ci(y, s, n_boot=200, seed=4) != a


def test_bootstrap_resamples_whole_groups():
    # Every sample copied 3 times into its own group: resampling groups must give exactly the
    # intervals of resampling the originals (AUC is unchanged when each point is tripled).
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(12), np.ones(12)].astype(int)
    s = y * 0.5 + rng.uniform(0, 1, 24)
    plain = bootstrap_auc_ci(y, s, n_boot=200, seed=7)
    grouped = bootstrap_auc_ci(np.repeat(y, 3), np.repeat(s, 3), groups=np.repeat(np.arange(24) * 10, 3),
                               n_boot=200, seed=7)
    assert grouped["n_units"] == 24
    for key in ("auc", "ci_low", "ci_high"):
        assert grouped[key] == pytest.approx(plain[key], abs=1e-12)
    naive = bootstrap_auc_ci(np.repeat(y, 3), np.repeat(s, 3), n_boot=200, seed=7)
    # Treating the copies as independent would understate the uncertainty.
    assert naive["ci_high"] - naive["ci_low"] < grouped["ci_high"] - grouped["ci_low"]


def test_bootstrap_skips_single_class_resamples():
    y = np.r_[np.zeros(9), 1]
    r = bootstrap_auc_ci(y, np.arange(10.0), n_boot=100, seed=0)
    assert r["auc"] == 1.0 and r["ci_low"] == 1.0 and r["ci_high"] == 1.0
    # P(the single positive is left out) = 0.9 ** 10, about 35 of 100 resamples.
    assert 50 < r["n_valid"] < 80
    with pytest.raises(ValueError, match="groups must have one entry per sample"):
        bootstrap_auc_ci(y, np.arange(10.0), groups=[1, 2])


def test_bootstrap_paired_difference_and_strata():
    rng = np.random.default_rng(2)
    y = np.tile(np.r_[np.zeros(10), np.ones(10)].astype(int), 2)
    fold = np.repeat([0, 1], 20)
    good = y * 0.8 + rng.uniform(0, 1, 40)
    weak = y * 0.1 + rng.uniform(0, 1, 40)
    # A score against itself differs by exactly zero on every resample.
    same = bootstrap_auc_ci(y, good, baseline=good, strata=fold, n_boot=50, seed=0)
    assert (same["auc_difference"], same["ci_low"], same["ci_high"]) == (0.0, 0.0, 0.0)
    r = bootstrap_auc_ci(y, good, baseline=weak, groups=np.arange(40) // 2, strata=fold, n_boot=300, seed=1)
    # The point estimate is the mean over folds of the per-fold AUC differences, as the fold tables report.
    per_fold = [roc_auc_score(y[fold == k], good[fold == k]) - roc_auc_score(y[fold == k], weak[fold == k])
                for k in (0, 1)]
    assert r["auc_difference"] == pytest.approx(np.mean(per_fold))
    assert 0.0 < r["ci_low"] < r["auc_difference"] < r["ci_high"]
    # 10 patients a fold, 5 of each class: a one-class resample of a fold (p = 2 / 2 ** 10) is skipped.
    assert r["n_units"] == 20 and 290 <= r["n_valid"] < 300
    # Resampling within folds keeps each fold's own patients: one fold's AUC alone is what a single stratum gives.
    alone = bootstrap_auc_ci(y[fold == 0], good[fold == 0], n_boot=50, seed=0)
    assert alone["auc"] == pytest.approx(roc_auc_score(y[fold == 0], good[fold == 0]))
    with pytest.raises(ValueError, match="strata must have one entry per sample"):
        bootstrap_auc_ci(y, good, strata=[0, 1])
    with pytest.raises(ValueError, match="same length"):
        bootstrap_auc_ci(y, good, baseline=weak[:5])


def test_summarise_folds_mean_std_n():
    folds = [
        {"acc": 0.5, "auc": {"benign": 0.75}, "name": "fold0", "cm": [[1, 2]], "ok": True},
        {"acc": 0.7, "auc": {"benign": float("nan")}, "n": 10},
        {"acc": 0.9, "auc": {"benign": 0.85}, "n": 12},
    ]
    s = summarise_folds(folds)
    assert set(s) == {"acc", "auc.benign", "n"}
    assert s["acc"] == pytest.approx({"mean": 0.7, "std": 0.2, "n": 3})
    assert s["auc.benign"]["mean"] == pytest.approx(0.8) and s["auc.benign"]["n"] == 2
    assert s["auc.benign"]["std"] == pytest.approx(np.std([0.75, 0.85], ddof=1))
    assert s["n"]["n"] == 2
    reports = summarise_folds([classification_report_dict(Y, P), classification_report_dict(Y[:4], P[:4])])
    assert reports["per_class.malignant.roc_auc"]["n"] == 1
    assert reports["accuracy"]["mean"] == pytest.approx((0.5 + 0.5) / 2)
    with pytest.raises(ValueError, match="at least one fold"):
        summarise_folds([])


def test_threshold_for_sensitivity_hand_worked():
    y = [0, 0, 1, 1, 1, 1]
    s = [0.1, 0.4, 0.35, 0.6, 0.8, 0.9]
    assert threshold_for_sensitivity(y, s, 0.95) == 0.35  # all four positives
    assert threshold_for_sensitivity(y, s, 0.75) == 0.6  # three of four
    assert threshold_for_sensitivity(y, s, 0.5) == 0.8
    assert threshold_for_sensitivity([1, 1, 1, 1], [0.2, 0.4, 0.6, 0.8], 0.75) == 0.4
    with pytest.raises(ValueError, match="at least one positive"):
        threshold_for_sensitivity([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="binary"):
        threshold_for_sensitivity([0, 2], [0.1, 0.2])


def test_safe_roc_auc_single_class_is_nan():
    assert math.isnan(safe_roc_auc([1, 1], [0.2, 0.3]))
    assert safe_roc_auc([0, 1], [0.2, 0.3]) == 1.0


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_classification_plots_render(tmp_path):
    from mammo_tf.io import save_figure
    from mammo_tf.plots import classification as plots

    history = {"loss": [1.0, 0.8, 0.6], "val_loss": [1.1, 0.9, 0.8], "auc": [0.6, 0.7, 0.8],
               "val_auc": [0.55, 0.65, 0.7], "learning_rate": [1e-3, 1e-3, 1e-4]}
    csv = pd.DataFrame({"epoch": [0, 1, 2], **history})
    report = classification_report_dict(Y[:4], P[:4])
    figures = {
        "cm": plots.plot_confusion_matrix(report["confusion_matrix"]),
        "roc": plots.plot_roc_curves(Y, P),
        "roc_absent": plots.plot_roc_curves(Y[:4], P[:4]),
        "history": plots.plot_training_curves(history),
        "csv": plots.plot_training_curves(csv),
    }
    assert len(figures["history"].axes) == 3
    assert [ax.get_title() for ax in figures["csv"].axes] == ["loss", "auc", "learning_rate"]
    roc_labels = [t.get_text() for t in figures["roc"].axes[0].get_legend().get_texts()]
    assert len(roc_labels) == 4 and roc_labels[-1].startswith("abnormal vs normal (AUC = 1.00")
    assert "malignant vs rest" in figures["roc_absent"].axes[0].get_title()
    for name, fig in figures.items():
        assert _is_png(save_figure(fig, tmp_path / f"{name}.png")), name
    with pytest.raises(ValueError, match="square"):
        plots.plot_confusion_matrix([[1, 2]])
    with pytest.raises(TypeError, match="Keras History"):
        plots.plot_training_curves([1, 2, 3])


def test_paired_differences_hand_worked():
    from mammo_tf.metrics.classification import paired_differences

    d = paired_differences([0.8, 0.7, 0.9, float("nan")], [0.7, 0.75, 0.6, 0.5])
    # Differences 0.1, -0.05, 0.3 (the NaN fold left out): mean 0.35 / 3, sample std by hand.
    assert d["n"] == 3 and d["ahead"] == 2
    assert d["mean"] == pytest.approx(0.35 / 3)
    assert d["std"] == pytest.approx(((0.1 - 0.35 / 3) ** 2 + (-0.05 - 0.35 / 3) ** 2 + (0.3 - 0.35 / 3) ** 2) ** 0.5 / 2 ** 0.5)
    one = paired_differences([0.5], [0.6])
    assert one["n"] == 1 and one["ahead"] == 0 and one["mean"] == pytest.approx(-0.1) and math.isnan(one["std"])
    with pytest.raises(ValueError, match="same folds"):
        paired_differences([0.1, 0.2], [0.1])
