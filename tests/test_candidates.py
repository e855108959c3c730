"""The blob-candidate reference detector: candidates on drawn images, labels and radii by hand, a tiny run."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from mammo_tf import candidates as C
from mammo_tf import detector as D
from mammo_tf.io import load_json


def _disc(centre=(80, 120), radius=15, size=200, background=60, value=180) -> np.ndarray:
    image = np.full((size, size), background, np.uint8)
    cv2.circle(image, (centre[1], centre[0]), radius, value, thickness=-1)
    return image


def test_the_strongest_candidate_is_the_bright_disc_at_its_radius():
    boxes, feats = C.blob_candidates(_disc(), np.array([15]), per_scale=5)
    assert feats.shape == (len(boxes), len(C.CANDIDATE_FEATURES))
    top = np.argmax(feats[:, C.CANDIDATE_FEATURES.index("contrast")])
    np.testing.assert_array_equal(boxes[top], [65, 105, 96, 136])   # centre (80, 120), side 2 * 15 + 1
    f = dict(zip(C.CANDIDATE_FEATURES, feats[top]))
    assert f["log_radius"] == pytest.approx(np.log(15))
    assert f["inside_mean"] > f["surround_mean"] > 60 / 255 - 1e-6
    assert f["contrast"] == pytest.approx(f["inside_mean"] - f["surround_mean"], abs=1e-6)
    # Over several radii the disc is still found, and the box at its own radius is labelled with its class.
    boxes, _ = C.blob_candidates(_disc(), np.array([5, 15, 40]), per_scale=5)
    labels = C.candidate_labels(boxes, np.array([[65.0, 105, 96, 136]]), np.array([2]), iou=0.8)
    assert (labels == 2).sum() >= 1 and set(labels) <= {0, 2}


def test_flat_or_dark_images_give_no_candidate():
    for image in (np.full((64, 64), 120, np.uint8), _disc(size=64, centre=(32, 32), radius=5, background=0, value=10)):
        boxes, feats = C.blob_candidates(image, np.array([5]))
        assert boxes.shape == (0, 4) and feats.shape == (0, len(C.CANDIDATE_FEATURES))
    with pytest.raises(ValueError, match="one grey image"):
        C.blob_candidates(np.zeros((8, 8, 3), np.uint8), np.array([2]))


def test_candidate_labels_by_hand():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 5], [20, 20, 30, 30]], float)
    gt = np.array([[0, 0, 10, 10]], float)
    assert C.candidate_labels(boxes, gt, np.array([2])).tolist() == [2, 2, 0]    # IoU 1, 0.5 (inclusive), 0
    assert C.candidate_labels(boxes, gt, np.array([2]), iou=0.6).tolist() == [2, 0, 0]
    assert C.candidate_labels(boxes, np.zeros((0, 4)), np.zeros(0)).tolist() == [0, 0, 0]


def test_radii_are_quantiles_of_the_training_lesions_half_sides():
    boxes = pd.Series([[[0, 0, 10, 10], [0, 0, 20, 18]], [], [[5, 5, 35, 35], [0, 0, 40, 40], [0, 0, 50, 50]]])
    assert C.candidate_radii(boxes, (0.0, 0.5, 1.0)).tolist() == [5, 15, 25]
    assert C.candidate_radii(pd.Series([[[0, 0, 2, 2]]]), (0.5,)).tolist() == [2]   # at least 2 px
    with pytest.raises(ValueError, match="no lesion box"):
        C.candidate_radii(pd.Series([[], []]), (0.5,))
    with pytest.raises(ValueError, match="radius_quantiles"):
        C.CandidateConfig(radius_quantiles=(1.5,))


def test_candidates_go_through_the_ssd_decoding_unchanged():
    exp = D.DetectorExperiment(image_size=100)
    out = C._as_detections(np.array([[10.0, 20, 40, 60]]), np.array([[0.2, 0.5, 0.3]]), 100, exp)
    order = np.argsort(out["labels"])
    assert out["labels"][order].tolist() == [1, 2]
    np.testing.assert_allclose(out["scores"][order], [0.5, 0.3], atol=1e-6)
    np.testing.assert_allclose(out["boxes"], [[0.1, 0.2, 0.4, 0.6]] * 2, atol=1e-6)
    empty = C._as_detections(np.zeros((0, 4)), np.zeros((0, 3)), 100, exp)
    assert empty["boxes"].shape == (0, 4) and len(empty["labels"]) == 0


@pytest.mark.slow
def test_a_tiny_run_writes_its_rows_under_its_own_name(tmp_path, annotations):
    exp = D.DetectorExperiment(name="tiny", protocol="crops", image_size=128, folds=2, max_folds=1, max_patients=16,
                               n_examples=0, seed=0)
    metrics = C.run(exp, tmp_path / C.run_name(exp.name), command="pytest", annotations=annotations)
    rows = [r["row"] for r in metrics["results"]]
    assert rows[0].startswith(C.ROW_NAME) and "Oracle boxes, random class" in rows
    assert "blobs_tiny: blob candidates" in rows and not any("SSD" in r for r in rows)
    info = metrics["folds"][0]["training"]
    assert info["n_train_candidates"] == sum(info["n_train_candidates_by_class"].values()) > 0
    assert 0 <= info["test_lesions_with_a_candidate"] <= 1 and len(info["radii_px"]) >= 1
    saved = load_json(tmp_path / "blobs_tiny" / D.CONFIG_FILE)
    assert saved["candidates"]["per_scale"] == 10 and saved["experiment"]["name"] == "blobs_tiny"
    # Rows rebuilt from the stored summary keep the reference's name.
    assert [r["row"] for r in D.refresh_rows(tmp_path / "blobs_tiny")] == rows
