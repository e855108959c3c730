"""Pretraining on an external folder of films: loading, the patient split, report rows, the stack copied into the folds."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from mammo_tf import classify, pretrain
from mammo_tf.config import ConfigError


def _film(seed: int, h: int = 200, w: int = 160) -> np.ndarray:
    """A dark background with a bright half-disc of 'tissue' on the left, textured per film."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    image = np.full((h, w), 10, np.uint8)
    tissue = (yy - h / 2) ** 2 + xx ** 2 < (0.45 * h) ** 2
    image[tissue] = rng.integers(90, 200, tissue.sum())
    return image


@pytest.fixture
def folder(tmp_path):
    """An rsna-640-like folder: benign/ (cancer-negative) and malignant/, 6 patients of 2 films each."""
    root = tmp_path / "ext"
    for pid in range(6):
        cls = "malignant" if pid % 2 else "benign"
        (root / cls).mkdir(parents=True, exist_ok=True)
        for view in range(2):
            cv2.imwrite(str(root / cls / f"{100 + pid}_{view}_png.rf.x.jpg"), _film(10 * pid + view))
    return root


def test_load_films_prepares_every_film_and_skips_a_broken_one_with_its_reason(folder):
    (folder / "benign" / "999_0_png.rf.x.jpg").write_bytes(b"\xff\xd8 truncated")
    cfg = pretrain.PretrainConfig(data=str(folder))
    records, films, skipped = pretrain.load_films(cfg, 64)
    assert len(records) == 12 and records["size"].eq(64).all()
    assert sorted(records["label_id"].unique()) == [0, 2]  # cancer-negative -> normal, malignant -> malignant
    assert [s["image_id"] for s in skipped] == ["999_0_png.rf.x"] and "ImageReadError" in skipped[0]["error"]
    image = films.image(records["refnum"].iloc[0])
    assert image.shape == (64, 64) and image.dtype == np.uint8 and image.max() > 0


def test_split_patients_keeps_patients_whole_and_both_classes_on_each_side():
    n = 200
    records = pd.DataFrame({"refnum": [f"f{i}" for i in range(n)], "patient_id": np.arange(n) // 4,
                            "label_id": np.where((np.arange(n) // 4) % 3 == 0, 2, 0)})
    train, val = pretrain.split_patients(records, 0.2, seed=0)
    assert not set(train["patient_id"]) & set(val["patient_id"])
    assert len(train) + len(val) == n and len(val) == pytest.approx(n * 0.2, abs=8)
    assert set(val["label_id"]) == set(train["label_id"]) == {0, 2}
    again, _ = pretrain.split_patients(records, 0.2, seed=0)
    pd.testing.assert_frame_equal(train, again)
    with pytest.raises(ConfigError, match="val_fraction"):
        pretrain.split_patients(records, 0.6, seed=0)


def test_rows_report_the_cnn_beside_the_intensity_baseline_and_their_difference():
    res = {"auc": 0.6, "ci_low": 0.5, "ci_high": 0.7}
    split = {"n_films": 10, "n_patients": 4, "n_malignant": 3, "cnn": res,
             "logistic": {**res, "auc": 0.55}, "cnn_minus_logistic": {**res, "auc": 0.05}}
    metrics = {"config": {"data": "../shared/data/rsna-640", "train": {"epochs": 40}}, "results": {"validation": split, "train": split},
               "skipped": [{"image_id": "x", "error": "e"}]}
    rows = pretrain.rows(metrics, {"command": "c", "hardware": "h", "date": "d"})
    assert [r["row"].split(" (")[0] for r in rows] == ["CNN pretrained on rsna-640", "logistic regression, intensity features",
                                                       "CNN minus logistic regression"]
    assert {r["table"] for r in rows} == {
        "Pretraining on another dataset (rsna-640): malignant vs cancer-negative films, held-out patients"}
    assert rows[1]["values"]["validation AUC"] == 0.55 and rows[2]["values"]["train 95 % CI"] == "[0.500, 0.700]"
    assert "1 films skipped" in rows[0]["note"] and "max 40 epochs" in rows[0]["row"]


@pytest.mark.parametrize("bad", [{"strategy": "grid_keep", "patch_options": {}}, {"pretrain": {"epochs": 3}}])
def test_pretrain_is_refused_off_whole_films_or_with_unknown_keys(tmp_path, bad):
    exp = classify.ClassifierExperiment(**{"name": "w", "strategy": "whole", "patch_options": {},
                                           "pretrain": {"data": "x"}, **bad})
    with pytest.raises(ConfigError, match="pretrain|PretrainConfig"):
        classify.run_experiment(exp, tmp_path / "w")


def test_fold_models_start_from_the_pretrained_stack_with_a_fresh_head(tmp_path, folder):
    from mammo_tf.models import classifier as clf

    # Learning rate 0 on mini-MIAS: the fold model keeps the weights it started from.
    exp = classify.ClassifierExperiment(
        name="w", strategy="whole", size=32, patch_options={}, normal_per_abnormal=None, augment=False, max_films=30,
        max_folds=1, model={"pooling": "max"},
        train={"epochs": 1, "learning_rate": 0.0, "batch_size": 8, "early_stopping": False, "tensorboard": False},
        pretrain={"data": str(folder), "val_fraction": 0.34, "n_boot": 20,
                  "train": {"epochs": 2, "batch_size": 4, "early_stopping": False, "tensorboard": False}})
    metrics = classify.run_experiment(exp, tmp_path / "w", command="pytest")
    pre, _ = clf.load_classifier(tmp_path / "w" / "pretrain" / "model.keras")
    fold, _ = clf.load_classifier(tmp_path / "w" / "fold0" / "model.keras")
    for name in ("conv1", "bn1", "conv4", "bn4"):
        for a, b in zip(pre.get_layer(name).get_weights(), fold.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(pre.get_layer("fc").get_weights()[0], fold.get_layer("fc").get_weights()[0])
    assert metrics["pretrain"]["results"]["validation"]["n_patients"] == 2
    tables = {r["table"] for r in metrics["results"]}
    assert classify.WHOLE_FILM_TABLE in tables and any(t.startswith(f"{pretrain.TABLE_PREFIX} (ext)") for t in tables)
    assert any("conv stack pretrained on ext" in r["row"] for r in metrics["results"])
    # A finished pretraining is reloaded, not repeated; one killed before its metrics were written is
    # evaluated again from its saved model, to the same numbers.
    mtime = (tmp_path / "w" / "pretrain" / "model.keras").stat().st_mtime_ns
    for lost in (None, "metrics.json"):
        if lost:
            (tmp_path / "w" / "pretrain" / lost).unlink()
        again = pretrain.run(pretrain.PretrainConfig(**exp.pretrain), clf.ClassifierConfig(input_size=32, pooling="max"),
                             tmp_path / "w" / "pretrain")
        assert again["results"] == metrics["pretrain"]["results"]
        assert (tmp_path / "w" / "pretrain" / "model.keras").stat().st_mtime_ns == mtime
