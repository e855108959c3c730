"""The detection references: oracle boxes with a guessed class, and random boxes in the breast."""

from __future__ import annotations

import numpy as np
import pytest

from mammo_tf.baselines import oracle_boxes_random_class, random_boxes_random_class
from mammo_tf.metrics.detection import evaluate_detections, froc


def test_oracle_boxes_are_the_ground_truth_with_guessed_classes():
    gts = [{"boxes": np.array([[10, 10, 50, 50], [60, 60, 90, 90]], float), "labels": np.array([1, 2])},
           {"boxes": np.zeros((0, 4)), "labels": np.zeros(0, int)}]
    dets = oracle_boxes_random_class(gts, seed=3)
    np.testing.assert_array_equal(dets[0]["boxes"], gts[0]["boxes"])
    assert len(dets[1]["boxes"]) == 0 and set(dets[0]["labels"]) <= {1, 2}
    assert froc(gts, dets)["mean_sensitivity"] == 1.0  # every lesion is hit, whatever the class


def test_random_boxes_lie_in_the_region_with_the_given_sides():
    mask = np.zeros((100, 200), bool)
    mask[40:50, 150:160] = True  # centres must fall in this 10 x 10 block
    dets = random_boxes_random_class([mask, np.zeros((50, 50), bool)], sides=[0.1, 0.2], n_per_image=50, seed=1)
    b = dets[0]["boxes"]
    cy, cx = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    assert b.shape == (50, 4) and ((cy >= 0.4) & (cy <= 0.5)).all() and ((cx >= 0.75) & (cx <= 0.8)).all()
    # Unclipped here: sides are exactly the ones given, as fractions of each image axis.
    assert set(np.round(b[:, 2] - b[:, 0], 9)) <= {0.1, 0.2} and set(np.round(b[:, 3] - b[:, 1], 9)) <= {0.1, 0.2}
    assert set(dets[0]["labels"]) == {1, 2} and ((dets[0]["scores"] >= 0) & (dets[0]["scores"] < 1)).all()
    # An empty region means the whole image; boxes are clipped to it.
    e = dets[1]["boxes"]
    assert (e >= 0).all() and (e <= 1).all() and len(e) == 50
    again = random_boxes_random_class([mask, np.zeros((50, 50), bool)], sides=[0.1, 0.2], n_per_image=50, seed=1)
    np.testing.assert_array_equal(again[0]["boxes"], b)
    with pytest.raises(ValueError, match="sides"):
        random_boxes_random_class([mask], sides=[])
    with pytest.raises(ValueError, match="sides"):
        random_boxes_random_class([mask], sides=[1.5])


def test_random_boxes_find_a_lesion_filling_the_region_and_miss_one_outside_it():
    region = np.zeros((100, 100), bool)
    region[:, :50] = True
    inside = {"boxes": np.array([[0.0, 0.0, 100.0, 50.0]]), "labels": np.array([1])}
    outside = {"boxes": np.array([[40.0, 80.0, 60.0, 100.0]]), "labels": np.array([1])}
    dets = random_boxes_random_class([region, region], sides=[0.02], n_per_image=20, seed=0)
    dets = [{**d, "boxes": d["boxes"] * 100.0} for d in dets]
    assert froc([inside], dets[:1])["mean_sensitivity"] == 1.0  # every centre lies in the lesion
    assert froc([outside], dets[1:])["mean_sensitivity"] == 0.0
    # Tiny boxes never reach IoU 0.5 with the large lesion: AP 0 with the IoU criterion.
    assert evaluate_detections([inside], dets[:1], iou_threshold=0.5)["classes"]["benign"]["ap_all_point"] == 0.0
