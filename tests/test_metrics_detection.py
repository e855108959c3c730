"""Detection metrics: hand-worked VOC AP and FROC cases, and a cross-check against pycocotools."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest

from mammo_tf.metrics.detection import (
    average_precision,
    evaluate_detections,
    found_at_fp,
    froc,
    iou_matrix,
    match_detections,
    precision_recall,
    sensitivity_at_fp,
)

A = [0.0, 0.0, 10.0, 10.0]
B = [50.0, 50.0, 60.0, 60.0]
C = [20.0, 20.0, 40.0, 40.0]
D = [70.0, 0.0, 90.0, 30.0]
NOWHERE = [200.0, 200.0, 210.0, 210.0]


def gt(boxes, labels):
    return {"boxes": np.array(boxes, dtype=float).reshape(-1, 4), "labels": np.array(labels, dtype=int)}


def det(boxes, labels, scores):
    return {
        "boxes": np.array(boxes, dtype=float).reshape(-1, 4),
        "labels": np.array(labels, dtype=int),
        "scores": np.array(scores, dtype=float),
    }


# --------------------------------------------------------------------------- IoU


def test_iou_matrix_hand_values_and_shape():
    a = np.array([[0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 2, 2]], dtype=float)
    b = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [2, 2, 4, 4], [5, 5, 6, 6]], dtype=float)
    m = iou_matrix(a, b)
    assert m.shape == (3, 4)
    np.testing.assert_allclose(m[0], [1 / 7, 1.0, 0.0, 0.0])  # overlap 1 of union 7; same; touching; apart
    assert iou_matrix(np.zeros((0, 4)), b).shape == (0, 4)
    assert iou_matrix(a, []).shape == (3, 0)
    # Degenerate (zero-area) boxes give 0, not NaN.
    assert iou_matrix([[1, 1, 1, 1]], [[1, 1, 1, 1]])[0, 0] == 0.0


def test_iou_matrix_rejects_bad_boxes():
    with pytest.raises(ValueError, match=r"shape \(n, 4\)"):
        iou_matrix(np.zeros((2, 3)), np.zeros((1, 4)))
    with pytest.raises(ValueError, match="ymin <= ymax"):
        iou_matrix([[5, 0, 1, 1]], [[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="NaN"):
        iou_matrix([[0, 0, np.nan, 1]], [[0, 0, 1, 1]])


# --------------------------------------------------------------------------- matching


def test_threshold_is_inclusive():
    # IoU exactly 0.5: a 1x2 box against the 1x1 box in its left half.
    assert iou_matrix([[0, 0, 1, 2]], [[0, 0, 1, 1]])[0, 0] == 0.5
    hit = match_detections([[0, 0, 1, 1]], [1], [[0, 0, 1, 2]], [1], [0.9], iou_threshold=0.5)
    miss = match_detections([[0, 0, 1, 1]], [1], [[0, 0, 1, 2]], [1], [0.9], iou_threshold=0.51)
    assert hit.tp.tolist() == [True] and miss.tp.tolist() == [False]


def test_duplicate_detection_is_false_positive():
    r = match_detections([A], [1], [A, A], [1, 1], [0.8, 0.9])
    # The higher score (second in input order) takes the box; the other is a duplicate.
    assert r.tp.tolist() == [False, True]
    assert r.matched_gt.tolist() == [-1, 0]
    assert r.gt_detected.tolist() == [True]
    np.testing.assert_allclose(r.best_iou, [1.0, 1.0])


def test_wrong_class_never_matches():
    r = match_detections([A], [1], [A], [2], [0.9])
    assert r.tp.tolist() == [False] and r.gt_detected.tolist() == [False]
    assert r.best_iou.tolist() == [0.0]


def test_tied_scores_follow_input_order():
    shifted = [0.0, 0.0, 10.0, 12.0]  # IoU 10/12 with A
    r = match_detections([A], [1], [shifted, A], [1, 1], [0.5, 0.5])
    # Same score: the detection given first is matched first even though the second overlaps more.
    assert r.tp.tolist() == [True, False]
    # The ranked curve is order-dependent under ties, exactly as in the VOC devkit and pycocotools.
    rec, prec, _ = precision_recall([0.5, 0.5], [False, True], n_gt=1)
    np.testing.assert_allclose(prec, [0.0, 0.5])
    rec, prec, _ = precision_recall([0.5, 0.5], [True, False], n_gt=1)
    np.testing.assert_allclose(prec, [1.0, 0.5])


def test_voc_and_coco_rules_differ_on_overlapping_ground_truth():
    g1, g2 = [0, 0, 10, 10], [0, 2, 10, 12]  # two overlapping lesions (IoU 8/12)
    d1 = g1  # takes g1
    d2 = [0, 0.5, 10, 10.5]  # IoU 95/105 with g1 (best, but taken), 85/115 with g2 (free, >= 0.5)
    ious = iou_matrix([d2], [g1, g2])[0]
    assert ious[0] > ious[1] >= 0.5
    voc = match_detections([g1, g2], [1, 1], [d1, d2], [1, 1], [0.9, 0.8], matching="voc")
    coco = match_detections([g1, g2], [1, 1], [d1, d2], [1, 1], [0.9, 0.8], matching="coco")
    assert voc.tp.tolist() == [True, False] and voc.gt_detected.tolist() == [True, False]
    assert coco.tp.tolist() == [True, True] and coco.matched_gt.tolist() == [0, 1]


def test_match_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="det_scores: expected 2 values"):
        match_detections([A], [1], [A, B], [1, 1], [0.9])
    with pytest.raises(ValueError, match="matching must be"):
        match_detections([A], [1], [A], [1], [0.9], matching="pascal")
    with pytest.raises(ValueError, match="iou_threshold"):
        match_detections([A], [1], [A], [1], [0.9], iou_threshold=0.0)


# --------------------------------------------------------------------------- AP


def test_perfect_detection_ap_is_one():
    gts = [gt([A, B], [1, 2]), gt([C], [1]), gt([], [])]
    dets = [det([A, B], [1, 2], [0.9, 0.8]), det([C], [1], [0.7]), det([], [], [])]
    r = evaluate_detections(gts, dets)
    for m in ("all_point", "11_point", "101_point"):
        assert r[f"map_{m}"] == 1.0
        assert r["classes"]["benign"][f"ap_{m}"] == 1.0
        assert r["classes"]["malignant"][f"ap_{m}"] == 1.0
    assert r["classes"]["benign"]["n_gt"] == 2 and r["classes"]["benign"]["n_tp"] == 2
    assert r["n_images"] == 3


def test_all_misses_ap_is_zero():
    gts = [gt([A], [1]), gt([B], [2])]
    dets = [det([NOWHERE], [1], [0.9]), det([A], [2], [0.8])]  # the second is on the wrong image spot
    r = evaluate_detections(gts, dets)
    for m in ("all_point", "11_point", "101_point"):
        assert r[f"map_{m}"] == 0.0
    np.testing.assert_array_equal(r["classes"]["benign"]["recall"], [0.0])
    np.testing.assert_array_equal(r["classes"]["benign"]["precision"], [0.0])


def test_undetected_lesions_cap_recall():
    gts = [gt([A, B], [1, 1]), gt([C, D], [1, 1])]
    dets = [det([A], [1], [0.9]), det([C], [1], [0.8])]
    e = evaluate_detections(gts, dets)["classes"]["benign"]
    np.testing.assert_allclose(e["recall"], [0.25, 0.5])
    np.testing.assert_allclose(e["precision"], [1.0, 1.0])
    assert e["ap_all_point"] == pytest.approx(0.5)
    assert e["ap_11_point"] == pytest.approx(6 / 11)  # recall levels 0, .1, ..., .5
    assert e["ap_101_point"] == pytest.approx(51 / 101)  # recall levels 0, .01, ..., .5


def test_hand_worked_case_both_voc_definitions():
    # Ranked: TP(A) FP TP(C) FP(duplicate on A) TP(B); D is never found -> n_gt = 4.
    gts = [gt([A, B], [1, 1]), gt([C, D], [1, 1])]
    dets = [
        det([A, NOWHERE, A, B], [1, 1, 1, 1], [0.9, 0.8, 0.6, 0.5]),
        det([C], [1], [0.7]),
    ]
    e = evaluate_detections(gts, dets, class_ids=(1,), class_names=("benign",))["classes"]["benign"]
    np.testing.assert_allclose(e["scores"], [0.9, 0.8, 0.7, 0.6, 0.5])
    np.testing.assert_allclose(e["recall"], [0.25, 0.25, 0.5, 0.5, 0.75])
    np.testing.assert_allclose(e["precision"], [1, 1 / 2, 2 / 3, 2 / 4, 3 / 5])
    # All-point: 0.25 * 1 + 0.25 * 2/3 + 0.25 * 3/5 (envelope) = 17/30.
    assert e["ap_all_point"] == pytest.approx(17 / 30, abs=1e-12)
    # 11-point: r = 0..0.2 -> 1 (3), 0.3..0.5 -> 2/3 (3), 0.6..0.7 -> 3/5 (2), 0.8..1 -> 0 (3).
    assert e["ap_11_point"] == pytest.approx((3 + 3 * 2 / 3 + 2 * 3 / 5) / 11, abs=1e-12)
    # 101-point: 0..0.25 -> 1 (26), 0.26..0.5 -> 2/3 (25), 0.51..0.75 -> 3/5 (25), rest 0.
    assert e["ap_101_point"] == pytest.approx((26 + 25 * 2 / 3 + 25 * 3 / 5) / 101, abs=1e-12)
    assert (e["n_gt"], e["n_det"], e["n_tp"]) == (4, 5, 3)


def test_average_precision_direct():
    assert average_precision([], [], "all_point") == 0.0
    assert average_precision([0.5, 1.0], [1.0, 0.5], "all_point") == pytest.approx(0.75)
    with pytest.raises(ValueError, match="method must be one of"):
        average_precision([1.0], [1.0], "voc")
    with pytest.raises(ValueError, match="non-decreasing"):
        average_precision([1.0, 0.5], [1.0, 1.0])


def test_class_without_ground_truth_is_nan_and_left_out_of_map():
    r = evaluate_detections([gt([A], [1])], [det([A, B], [1, 2], [0.9, 0.8])])
    mal = r["classes"]["malignant"]
    assert math.isnan(mal["ap_all_point"]) and mal["n_gt"] == 0 and mal["n_det"] == 1
    assert r["map_all_point"] == 1.0  # benign only


def test_evaluate_rejects_unpaired_inputs():
    with pytest.raises(ValueError, match="same images: 2 != 1"):
        evaluate_detections([gt([A], [1]), gt([], [])], [det([A], [1], [0.9])])
    with pytest.raises(ValueError, match=r"detections\[0\]: missing key"):
        evaluate_detections([gt([A], [1])], [{"boxes": [A], "labels": [1]}])


def test_real_mias_ground_truth_scores_perfectly(annotations):
    from mammo_tf.data import mias

    refnums = mias.images_table(annotations)["refnum"].tolist()
    truths = [mias.lesion_boxes(annotations, r) for r in refnums]
    dets = [(b, lab, np.ones(len(b))) for b, lab in truths]
    r = evaluate_detections(truths, dets)
    assert r["classes"]["benign"]["n_gt"] == 68 and r["classes"]["malignant"]["n_gt"] == 51
    assert r["map_all_point"] == 1.0 and r["map_11_point"] == 1.0
    f = froc(truths, dets)
    assert f["n_lesions"] == 119 and f["n_images"] == len(refnums)
    assert sensitivity_at_fp(f, 0.0) == 1.0


# --------------------------------------------------------------------------- pycocotools cross-check


def _random_set(rng: np.random.Generator, n_images: int, overlapping: bool):
    """Seeded images with 0-4 lesions, jittered/duplicated/wrong-class detections and false positives."""
    gts, dets = [], []
    for _ in range(n_images):
        boxes, labels = [], []
        for k in range(rng.integers(0, 5)):
            if overlapping and boxes and rng.random() < 0.4:
                # A second lesion beside an existing one, so that one detection can overlap both.
                y0, x0, y1, x1 = boxes[-1]
                s = rng.uniform(0.1, 0.3) * (x1 - x0)
                boxes.append([y0, x0 + s, y1, x1 + s])
                labels.append(labels[-1])
            else:
                # Separated set: lesions on a diagonal of 200-pixel cells, at most 80 pixels wide.
                cy, cx = (rng.uniform(30, 970, 2) if overlapping
                          else 200 * np.array(divmod(k * 6, 5)) + 100 + rng.uniform(-20, 20, 2))
                h, w = rng.uniform(20, 80, 2)
                boxes.append([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2])
                labels.append(int(rng.integers(1, 3)))
        d_boxes, d_labels = [], []
        for b, lab in zip(boxes, labels):
            for _ in range(rng.choice([0, 1, 1, 2])):  # missed, found, found twice
                h, w = b[2] - b[0], b[3] - b[1]
                jitter = rng.normal(0, 0.15, 4) * [h, w, h, w]
                d_boxes.append(list(np.array(b) + jitter))
                d_labels.append(lab if rng.random() < 0.85 else 3 - lab)
        for _ in range(rng.integers(0, 3)):
            cy, cx = rng.uniform(30, 970, 2)
            h, w = rng.uniform(20, 80, 2)
            d_boxes.append([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2])
            d_labels.append(int(rng.integers(1, 3)))
        d_boxes = np.array(d_boxes, dtype=float).reshape(-1, 4)
        d_boxes[:, 2:] = np.maximum(d_boxes[:, 2:], d_boxes[:, :2] + 1.0)  # keep jittered boxes valid
        # Coarse scores so that ties occur within and across images.
        scores = np.round(rng.uniform(0, 1, len(d_boxes)), 1)
        gts.append(gt(boxes, labels))
        dets.append(det(d_boxes, d_labels, scores))
    return gts, dets


def _pycocotools(gts, dets):
    """Per-detection matched flags (in our global detection order) and AP@0.5 per class from COCOeval."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(b):
        return [float(b[1]), float(b[0]), float(b[3] - b[1]), float(b[2] - b[0])]

    anns, results = [], []
    for i, (g, d) in enumerate(zip(gts, dets)):
        for b, lab in zip(g["boxes"], g["labels"]):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(lab), "bbox": xywh(b),
                         "area": float((b[2] - b[0]) * (b[3] - b[1])), "iscrowd": 0})
        for b, lab, s in zip(d["boxes"], d["labels"], d["scores"]):
            results.append({"image_id": i + 1, "category_id": int(lab), "bbox": xywh(b), "score": float(s)})
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"images": [{"id": i + 1} for i in range(len(gts))],
                           "categories": [{"id": 1}, {"id": 2}], "annotations": anns}
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)  # detection ids are 1.. in our global order
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.iouThrs = np.array([0.5])
        ev.params.maxDets = [10_000]
        ev.params.areaRng = [[0.0, 1e12]]
        ev.params.areaRngLbl = ["all"]
        ev.evaluate()
        ev.accumulate()
    matched = np.zeros(len(results), dtype=bool)
    for e in ev.evalImgs:
        if e is not None:
            matched[np.array(e["dtIds"], dtype=int) - 1] = e["dtMatches"][0] > 0
    ap = {c: float(ev.eval["precision"][0, :, k, 0, 0].mean()) for k, c in enumerate((1, 2))}
    recall = {c: float(ev.eval["recall"][0, k, 0, 0]) for k, c in enumerate((1, 2))}
    return matched, ap, recall


@pytest.mark.parametrize(("overlapping", "matching"), [(True, "coco"), (False, "voc")])
def test_cross_check_against_pycocotools(overlapping, matching):
    """Same TP/FP for every detection and the same AP@0.5 (101-point) as pycocotools.

    Independent: pycocotools computes IoU in C from xywh boxes and matches in its own loop.
    The tolerance (1e-12) covers only its ``np.spacing(1)`` in the precision denominator. With
    overlapping lesions our ``matching="coco"`` must agree; on the separated set, where no
    detection reaches IoU 0.5 with two lesions of its class, the default VOC rule must agree too.
    """
    gts, dets = _random_set(np.random.default_rng(1234 + overlapping), n_images=40, overlapping=overlapping)
    ours_tp, n_close, n_ambiguous = [], 0, 0
    for g, d in zip(gts, dets):
        ious = iou_matrix(d["boxes"], g["boxes"])
        same = d["labels"][:, None] == g["labels"][None, :]
        n_close += int(np.sum(np.abs(ious - 0.5) < 1e-9))
        n_ambiguous += int(np.sum(((ious >= 0.5) & same).sum(axis=1) >= 2))
        ours_tp.append(match_detections(g["boxes"], g["labels"], d["boxes"], d["labels"], d["scores"],
                                        matching=matching).tp)
    assert n_close == 0  # no IoU within float noise of the threshold: decisions are unambiguous
    if overlapping:
        assert n_ambiguous > 0  # the fixture does exercise detections covering two lesions
    else:
        assert n_ambiguous == 0
    matched, coco_ap, coco_recall = _pycocotools(gts, dets)
    ours_tp = np.concatenate(ours_tp)
    assert 50 < len(ours_tp) and 0 < ours_tp.sum() < len(ours_tp)
    np.testing.assert_array_equal(ours_tp, matched)

    r = evaluate_detections(gts, dets, matching=matching)
    for name, c in (("benign", 1), ("malignant", 2)):
        e = r["classes"][name]
        assert e["n_gt"] > 5
        assert e["ap_101_point"] == pytest.approx(coco_ap[c], abs=1e-12)
        assert e["recall"][-1] == pytest.approx(coco_recall[c], abs=1e-12)
        assert 0.0 < e["ap_101_point"] < 1.0


def test_voc_rule_differs_from_coco_rule_only_where_a_detection_covers_two_lesions():
    gts, dets = _random_set(np.random.default_rng(1235), n_images=40, overlapping=True)
    n_differ = 0
    for g, d in zip(gts, dets):
        args = (g["boxes"], g["labels"], d["boxes"], d["labels"], d["scores"])
        voc, coco = match_detections(*args).tp, match_detections(*args, matching="coco").tp
        same = d["labels"][:, None] == g["labels"][None, :]
        ambiguous = np.any(((iou_matrix(d["boxes"], g["boxes"]) >= 0.5) & same).sum(axis=1) >= 2)
        if not ambiguous:
            np.testing.assert_array_equal(voc, coco)
        n_differ += int(np.sum(voc != coco))
    assert n_differ > 0


# --------------------------------------------------------------------------- FROC

L1 = [100.0, 100.0, 200.0, 200.0]
L2 = [500.0, 500.0, 600.0, 600.0]
INSIDE_L1 = [110.0, 110.0, 210.0, 210.0]  # centre (160, 160), IoU 8100/11900
INSIDE_L2 = [510.0, 510.0, 600.0, 600.0]  # centre (555, 555), IoU 0.81
BIG_ON_L1 = [90.0, 90.0, 290.0, 290.0]  # centre (190, 190) inside L1, IoU 0.25
FAR = [800.0, 800.0, 850.0, 850.0]


def _froc_case():
    gts = [gt([L1], [1]), gt([L2], [2]), gt([], [])]
    dets = [
        det([INSIDE_L1, FAR, BIG_ON_L1], [1, 1, 2], [0.9, 0.8, 0.5]),
        det([INSIDE_L2], [2], [0.6]),
        det([FAR, FAR], [1, 2], [0.7, 0.4]),
    ]
    return gts, dets


def test_froc_hand_worked_centre_criterion():
    f = froc(*_froc_case())
    # Thresholds inf, .9, .8, .7, .6, .5 (second hit on L1: neither new lesion nor FP), .4.
    np.testing.assert_allclose(f["thresholds"], [np.inf, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    np.testing.assert_allclose(f["sensitivity"], [0, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(f["fps"], [0, 0, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 1.0])  # 3 images, lesion-free one too
    assert (f["n_images"], f["n_lesions"], f["criterion"]) == (3, 2, "centre")
    assert sensitivity_at_fp(f, 0.0) == 0.5
    assert sensitivity_at_fp(f, 0.5) == 0.5
    assert sensitivity_at_fp(f, 2 / 3) == 1.0
    np.testing.assert_allclose(f["grid_sensitivity"], [0.5, 0.5, 0.5, 1, 1, 1, 1])
    assert f["mean_sensitivity"] == pytest.approx(5.5 / 7)


def test_found_at_fp_names_the_lesions_behind_each_operating_point():
    f = froc(*_froc_case())
    # L1 (first image) is hit at .9 (and .5), L2 at .6; given in input order.
    np.testing.assert_allclose(f["lesion_scores"], [0.9, 0.6])
    assert found_at_fp(f, 0.0).tolist() == [True, False]      # threshold .9: no false positive yet
    assert found_at_fp(f, 0.5).tolist() == [True, False]      # .8 brings a false positive, not L2
    assert found_at_fp(f, 2 / 3).tolist() == [True, True]     # down to .5: L2 found at .6
    for fp in (0.0, 0.5, 2 / 3, 1.0, 8.0):
        assert found_at_fp(f, fp).mean() == sensitivity_at_fp(f, fp)
    missed = froc([gt([L1], [1])], [det([FAR], [1], [0.9])])
    assert found_at_fp(missed, 8.0).tolist() == [False] and missed["lesion_scores"].tolist() == [-np.inf]
    with pytest.raises(ValueError, match="fp"):
        found_at_fp(f, -1.0)


def test_froc_iou_criterion_and_class_filter():
    gts, dets = _froc_case()
    f = froc(gts, dets, criterion="iou", iou_threshold=0.5)
    # BIG_ON_L1 (IoU 0.25) no longer hits: at threshold .5 it is a third false positive.
    np.testing.assert_allclose(f["fps"], [0, 0, 1 / 3, 2 / 3, 2 / 3, 1.0, 4 / 3])
    np.testing.assert_allclose(f["sensitivity"], [0, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(iou_matrix([INSIDE_L1, BIG_ON_L1], [L1])[:, 0], [8100 / 11900, 0.25])
    malignant = froc(gts, dets, class_id=2)
    # Malignant lesion L2 only; malignant detections: BIG_ON_L1 (.5, FP here), INSIDE_L2 (.6), FAR (.4).
    np.testing.assert_allclose(malignant["thresholds"], [np.inf, 0.6, 0.5, 0.4])
    np.testing.assert_allclose(malignant["sensitivity"], [0, 1, 1, 1])
    np.testing.assert_allclose(malignant["fps"], [0, 0, 1 / 3, 2 / 3])


def test_froc_without_detections_and_bad_input():
    f = froc([gt([L1], [1]), gt([], [])], [det([], [], []), det([], [], [])])
    assert f["sensitivity"].tolist() == [0.0] and f["fps"].tolist() == [0.0]
    assert sensitivity_at_fp(f, 8.0) == 0.0
    with pytest.raises(ValueError, match="criterion"):
        froc(*_froc_case(), criterion="distance")
    with pytest.raises(ValueError, match="fp must be"):
        sensitivity_at_fp(f, -1.0)


# --------------------------------------------------------------------------- plots


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_detection_plots_render(tmp_path):
    from mammo_tf.io import save_figure
    from mammo_tf.plots import detection as plots

    gts = [gt([A, B], [1, 1]), gt([C, D], [1, 2])]
    dets = [det([A, NOWHERE, A, B], [1, 1, 1, 2], [0.9, 0.8, 0.6, 0.5]), det([C, D], [1, 2], [0.7, 0.3])]
    r = evaluate_detections(gts, dets)
    f = froc(gts, dets)
    figures = {
        "pr": plots.plot_pr_curves(r),
        "pr_separate": plots.plot_pr_curves(r, method="11_point", separate=True),
        "ap": plots.plot_ap_bars(r, reference={"benign": 0.6, "malignant": 0.7, "mAP": 0.65},
                                 reference_label="poster"),
        "froc": plots.plot_froc({"a": f, "b": froc(gts, dets, criterion="iou")}),
        "boxes": plots.draw_detections(np.zeros((100, 100), np.uint8), gts[0]["boxes"], gts[0]["labels"],
                                       dets[0]["boxes"], dets[0]["labels"], dets[0]["scores"]),
        "grid": plots.draw_detection_grid([
            {"image": np.zeros((100, 100), np.uint8), "gt_boxes": g["boxes"], "gt_labels": g["labels"],
             "det_boxes": d["boxes"], "det_labels": d["labels"], "det_scores": d["scores"]}
            for g, d in zip(gts, dets)]),
    }
    legend = [t.get_text() for t in figures["ap"].axes[0].get_legend().get_texts()]
    assert legend == ["this model", "poster"]
    pr_legend = [t.get_text() for t in figures["pr"].axes[0].get_legend().get_texts()]
    assert pr_legend[0].startswith(f"benign (AP={r['classes']['benign']['ap_all_point']:.3f}")
    assert len(figures["pr_separate"].axes) == 2
    for name, fig in figures.items():
        path = save_figure(fig, tmp_path / f"{name}.png")
        assert _is_png(path), name
    with pytest.raises(ValueError, match="reference has names"):
        plots.plot_ap_bars(r, reference={"calcification": 0.5})


def test_hit_localisation_hand_worked():
    from mammo_tf.metrics.detection import hit_localisation

    f = froc(*_froc_case())
    # L1's best hit is INSIDE_L1 (.9, not BIG_ON_L1 at .5), L2's is INSIDE_L2 (.6).
    np.testing.assert_allclose(f["lesion_hit_boxes"], [INSIDE_L1, INSIDE_L2])
    np.testing.assert_allclose(f["lesion_boxes"], [L1, L2])
    loc = hit_localisation(f, 2 / 3)
    np.testing.assert_allclose(loc["iou"], [8100 / 11900, 0.81])
    np.testing.assert_allclose(loc["size_log2"], [0.0, np.log2(90 / 100)])
    assert loc["n_found"] == 2 and loc["iou50_share"] == 1.0
    assert loc["iou_median"] == pytest.approx((8100 / 11900 + 0.81) / 2)
    assert math.isnan(loc["size_corr"])  # two lesions of one size: no correlation to speak of
    # At 0 FP per image only L1 is found: L2's entries are NaN.
    early = hit_localisation(f, 0.0)
    assert early["n_found"] == 1 and math.isnan(early["iou"][1]) and math.isnan(early["size_log2_sd"])
    # Boxes that grow with the lesions correlate fully, however far off their size.
    sizes = [10.0, 20.0, 40.0]
    gts = [gt([[0, 0, s, s]], [1]) for s in sizes]
    dets = [det([[0, 0, 1.5 * s, 1.5 * s]], [1], [0.9]) for s in sizes]
    grow = hit_localisation(froc(gts, dets), 1.0)
    assert grow["size_corr"] == pytest.approx(1.0)
    assert grow["size_log2_median"] == pytest.approx(np.log2(1.5)) and grow["size_log2_sd"] == pytest.approx(0.0)
    none = hit_localisation(froc([gt([L1], [1])], [det([], [], [])]), 1.0)
    assert none["n_found"] == 0 and np.isnan(none["iou"]).all() and math.isnan(none["iou_median"])
