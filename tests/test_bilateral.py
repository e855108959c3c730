"""Bilateral film scores: pairing by patient, hand-worked AUCs, the report rows from stored predictions."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mammo_tf import bilateral as B


def test_patient_of_pairs_consecutive_films():
    assert [B.patient_of(r) for r in ("mdb001", "mdb002", "mdb003", "mdb322")] == [1, 1, 2, 161]
    with pytest.raises(ValueError, match="not a MIAS film name"):
        B.patient_of("img001")


def test_contralateral_difference_by_hand():
    s = pd.Series({"mdb001": 0.9, "mdb002": 0.4, "mdb003": 0.2, "mdb005": 0.7})
    d = B.contralateral_difference(s)
    assert d["mdb001"] == pytest.approx(0.5) and d["mdb002"] == pytest.approx(-0.5)
    assert np.isnan(d["mdb003"]) and np.isnan(d["mdb005"])  # their other films are absent
    with pytest.raises(ValueError, match="more than two films"):
        B.contralateral_difference(pd.Series([0.1, 0.2, 0.3], index=["mdb001", "mdb002", "mdb002"]))


def _fold(k: int = 0) -> pd.DataFrame:
    # Patient 1: abnormal left film, dense (high) scores on both sides; patient 2: both normal, low;
    # patient 3: abnormal right film, low scores on both sides.
    return pd.DataFrame({"refnum": ["mdb001", "mdb002", "mdb003", "mdb004", "mdb005", "mdb006"],
                         "abnormal_score": [0.875, 0.75, 0.25, 0.375, 0.125, 0.5],  # exact in binary: ties are ties
                         "label_id": [1, 0, 0, 0, 0, 2], "fold": k})


def test_fold_aucs_by_hand():
    aucs = B.fold_aucs(_fold())
    # max rule: abnormal scores 0.875, 0.5 against normals 0.75, 0.25, 0.375, 0.125: 7 of 8 pairs.
    assert aucs["max"] == pytest.approx(7 / 8)
    # bilateral: abnormal +0.125, +0.375 against normals -0.125, -0.125, +0.125, -0.375 (one tie).
    assert aucs["bilateral"] == pytest.approx(7.5 / 8)
    assert aucs["n_films"] == aucs["n_paired"] == 6


def test_evaluate_reads_stored_runs_and_writes_rows(tmp_path):
    run = tmp_path / "models" / "cnn_fake"
    for k in range(2):
        (run / f"fold{k}").mkdir(parents=True)
        _fold(k).to_csv(run / f"fold{k}" / "film_predictions.csv", index=False)
    folds = [{"fold": k, "image": {"logistic": {"abnormal_vs_normal_auc": 0.5 + 0.1 * k}}} for k in range(2)]
    (run / "metrics.json").write_text(json.dumps({"folds": folds, "results": []}))
    (tmp_path / "models" / "cascade_x").mkdir()
    (tmp_path / "models" / "cascade_x" / "metrics.json").write_text("{}")  # no film predictions: skipped
    metrics = B.evaluate(tmp_path / "models", tmp_path / "out", command="pytest")
    (row,) = metrics["results"]
    assert row["row"] == "cnn_fake" and row["table"] == B.TABLE and row["command"] == "pytest"
    assert row["values"]["max rule AUC"][0] == pytest.approx(7 / 8)
    assert row["values"]["Δ AUC"][0] == pytest.approx(0.5 / 8) and row["values"]["folds ahead (bilateral)"] == "2/2"
    assert row["values"]["logistic (intensity) AUC"][0] == pytest.approx(0.55)
    assert (tmp_path / "out" / "bilateral_folds.png").is_file()
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["results"][0]["row"] == "cnn_fake"
    with pytest.raises(ValueError, match="no classifier run"):
        B.evaluate(tmp_path / "out", tmp_path / "out2")
