"""Default boxes, box conversions, IoU, SSD encoding, matching and detection decoding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf
from keras.utils import bounding_boxes as keras_boxes

from mammo_tf import anchors as A
from mammo_tf import boxes as B
from mammo_tf.models.ssd import ssd_targets_fn


# ---------------------------------------------------------------- anchors


def test_ssd300_preset_counts_and_scales():
    cfg = A.ssd300_anchor_config()
    assert cfg.feature_map_sizes == ((38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1))
    # Caffe SSD300: min sizes 30, 60, 111, 162, 213, 264, max of the last 315 pixels.
    assert cfg.scales == pytest.approx((0.1, 0.2, 0.37, 0.54, 0.71, 0.88, 1.05))
    assert cfg.boxes_per_location == (4, 6, 6, 6, 4, 4)
    assert cfg.num_anchors == 8732
    assert A.default_boxes(cfg).shape == (8732, 4)


def test_ssd512_preset_counts_and_scales():
    cfg = A.ssd512_anchor_config()
    assert cfg.feature_map_sizes[0] == (64, 64) and len(cfg.feature_map_sizes) == 7
    assert cfg.scales == pytest.approx((0.07, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.05))
    assert cfg.boxes_per_location == (4, 6, 6, 6, 6, 4, 4)
    assert cfg.num_anchors == 24564
    assert A.default_boxes(cfg).shape == (24564, 4)


def test_paper_linear_scales_without_rounding():
    # s_k = 0.2 + 0.7 (k - 1) / 4 for m = 5 maps, extended by one step.
    assert A.ssd_scales(5, first_scale=None, floor_percent=False) == pytest.approx(
        (0.2, 0.375, 0.55, 0.725, 0.9, 1.075)
    )


def test_boxes_per_location():
    assert A.boxes_per_location((1.0, 2.0, 0.5)) == 4
    assert A.boxes_per_location((1.0, 2.0, 3.0, 0.5, 1 / 3)) == 6


def test_default_box_order_hand_worked():
    cfg = A.ssd300_anchor_config(clip=False)
    a = A.default_boxes(cfg)
    c0 = 0.5 / 38
    np.testing.assert_allclose(a[0], [c0, c0, 0.1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(a[1], [c0, c0, 0.1 / math.sqrt(2), 0.1 * math.sqrt(2)], rtol=1e-6)
    np.testing.assert_allclose(a[2], [c0, c0, 0.1 * math.sqrt(2), 0.1 / math.sqrt(2)], rtol=1e-6)
    extra = math.sqrt(0.1 * 0.2)
    np.testing.assert_allclose(a[3], [c0, c0, extra, extra], rtol=1e-6)
    np.testing.assert_allclose(a[4, :2], [c0, 1.5 / 38], rtol=1e-6)  # next column, same row
    np.testing.assert_allclose(a[4 * 38, :2], [1.5 / 38, c0], rtol=1e-6)  # next row
    first_19 = 38 * 38 * 4
    np.testing.assert_allclose(a[first_19], [0.5 / 19, 0.5 / 19, 0.2, 0.2], rtol=1e-6)
    last = math.sqrt(0.88 * 1.05)
    np.testing.assert_allclose(a[-1], [0.5, 0.5, last, last], rtol=1e-6)


def test_default_box_centres_row_major_per_map():
    cfg = A.anchor_config_for(96, [(6, 4), 3], clip=False)
    a = A.default_boxes(cfg)
    start = 0
    for (h, w), k in zip(cfg.feature_map_sizes, cfg.boxes_per_location):
        block = a[start : start + h * w * k].reshape(h, w, k, 4)
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        np.testing.assert_allclose(block[..., 0], np.repeat(((rows + 0.5) / h)[..., None], k, -1), atol=1e-6)
        np.testing.assert_allclose(block[..., 1], np.repeat(((cols + 0.5) / w)[..., None], k, -1), atol=1e-6)
        start += h * w * k
    assert start == len(a) == cfg.num_anchors


def test_clipped_boxes_lie_in_the_image():
    corners = B.centre_to_corners(A.default_boxes(A.ssd300_anchor_config())).numpy()
    assert corners.min() >= -1e-6 and corners.max() <= 1 + 1e-6


def test_anchor_config_validation_and_round_trip():
    with pytest.raises(ValueError, match="scales needs 3"):
        A.AnchorConfig(300, (10, 5), (0.1, 0.2), ((1.0,), (1.0,)))
    with pytest.raises(ValueError, match="aspect_ratios"):
        A.AnchorConfig(300, (10, 5), (0.1, 0.2, 0.3), ((1.0,),))
    cfg = A.ssd300_anchor_config()
    assert A.AnchorConfig.from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------- conversions and IoU


def test_corner_centre_round_trip():
    corners = _random_boxes(np.random.default_rng(0), 20)
    back = B.centre_to_corners(B.corners_to_centre(corners)).numpy()
    np.testing.assert_allclose(back, corners, atol=1e-6)
    np.testing.assert_allclose(B.corners_to_centre([[0.0, 0.2, 0.4, 1.0]]).numpy(), [[0.2, 0.6, 0.4, 0.8]], atol=1e-7)


def test_pixels_to_normalised():
    got = B.pixels_to_normalised([[100, 50, 612, 306]], (1024, 512))
    np.testing.assert_allclose(got, [[100 / 1024, 50 / 512, 612 / 1024, 306 / 512]], rtol=1e-6)


def test_iou_hand_worked():
    a = [[0.0, 0.0, 2.0, 2.0]]
    b = [[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0], [1.0, 1.0, 1.0, 1.0]]
    np.testing.assert_allclose(B.iou(a, b).numpy(), [[1 / 7, 1.0, 0.0, 0.0]], atol=1e-7)


def _numpy_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros((len(a), len(b)))
    for i, p in enumerate(a):
        for j, q in enumerate(b):
            ih = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            iw = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            inter = ih * iw
            union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
            out[i, j] = inter / union
    return out


def _random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    yx = rng.uniform(0, 0.7, (n, 2))
    hw = rng.uniform(0.05, 0.3, (n, 2))
    return np.concatenate([yx, yx + hw], axis=1).astype(np.float32)


def test_iou_against_references():
    rng = np.random.default_rng(1)
    a, b = _random_boxes(rng, 7), _random_boxes(rng, 9)
    ours = B.iou(a, b).numpy()
    np.testing.assert_allclose(ours, _numpy_iou(a, b), atol=1e-6)
    ref = np.asarray(keras_boxes.compute_iou(a, b, bounding_box_format="yxyx"))
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    batched = B.iou(np.stack([a, a]), np.stack([b, b])).numpy()
    assert batched.shape == (2, 7, 9)
    np.testing.assert_allclose(batched[1], ours, atol=1e-7)


# ---------------------------------------------------------------- encoding


def test_encode_decode_round_trip_and_zero_offsets():
    rng = np.random.default_rng(2)
    anchors = B.corners_to_centre(_random_boxes(rng, 50)).numpy()
    gt = B.corners_to_centre(_random_boxes(rng, 50)).numpy()
    offsets = B.encode(gt, anchors)
    np.testing.assert_allclose(B.decode(offsets, anchors).numpy(), gt, atol=1e-5)
    np.testing.assert_allclose(B.encode(anchors, anchors).numpy(), 0.0, atol=1e-6)
    # Hand case: a centre shift of 0.1 anchor heights is 1 in variance units; h 0.5 -> 0.2 is log 0.4 / 0.2.
    t = B.encode([[0.55, 0.5, 0.2, 0.1]], [[0.5, 0.5, 0.5 * 1.0, 0.1]]).numpy()
    np.testing.assert_allclose(t, [[1.0, 0.0, math.log(0.4) / 0.2, 0.0]], atol=1e-5)


# ---------------------------------------------------------------- matching


@pytest.fixture(scope="module")
def anchors300() -> np.ndarray:
    return A.default_boxes(A.ssd300_anchor_config())


def test_match_each_gt_gets_its_best_anchor(anchors300):
    # A box far smaller than any default box: no IoU reaches 0.5, the bipartite step still matches it.
    gt = np.array([[0.50, 0.50, 0.52, 0.52], [0.1, 0.1, 0.4, 0.35]], np.float32)
    labels = np.array([2, 1], np.int32)
    loc, cls = B.match(gt, labels, anchors300)
    assert loc.shape == (8732, 4) and cls.shape == (8732,) and cls.dtype == tf.int32
    overlaps = B.iou(gt, B.centre_to_corners(anchors300)).numpy()
    assert overlaps[0].max() < 0.5
    best = overlaps.argmax(axis=1)
    assert cls.numpy()[best[0]] == 2 and cls.numpy()[best[1]] == 1
    assert int(np.sum(cls.numpy() == 2)) == 1
    # Every other positive has IoU >= 0.5 with its box, every background < 0.5 with all boxes.
    pos1 = np.flatnonzero(cls.numpy() == 1)
    others = pos1[pos1 != best[1]]
    assert len(others) > 0 and np.all(overlaps[1, others] >= 0.5)
    bg = cls.numpy() == 0
    assert np.all(overlaps[:, bg] < 0.5)
    # Positive targets decode back to their ground truth; background targets are zero.
    decoded = B.centre_to_corners(B.decode(loc, anchors300)).numpy()
    np.testing.assert_allclose(decoded[best[0]], gt[0], atol=1e-5)
    np.testing.assert_allclose(decoded[pos1], np.repeat(gt[1:2], len(pos1), 0), atol=1e-5)
    assert np.all(loc.numpy()[bg] == 0)


def test_match_zero_gt_is_all_background(anchors300):
    loc, cls = B.match(np.zeros((0, 4), np.float32), np.zeros((0,), np.int32), anchors300)
    assert cls.shape == (8732,) and not np.any(cls.numpy())
    assert loc.shape == (8732, 4) and not np.any(loc.numpy())


def test_match_rejects_bad_boxes(anchors300):
    with pytest.raises(tf.errors.InvalidArgumentError, match="ymax > ymin"):
        B.match([[0.5, 0.5, 0.4, 0.6]], [1], anchors300)
    with pytest.raises(tf.errors.InvalidArgumentError, match="background"):
        B.match([[0.1, 0.1, 0.4, 0.6]], [0], anchors300)


def test_targets_fn_in_tf_data_with_variable_box_counts():
    cfg = A.anchor_config_for(64, [8, 4, 2, 1])
    boxes = [np.zeros((0, 4), np.float32), np.array([[0.1, 0.1, 0.5, 0.4]], np.float32),
             np.array([[0.1, 0.1, 0.5, 0.4], [0.6, 0.6, 0.9, 0.95]], np.float32)]
    labels = [np.zeros((0,), np.int32), np.array([1], np.int32), np.array([1, 2], np.int32)]
    ds = tf.data.Dataset.from_generator(
        lambda: ((np.zeros((64, 64, 1), np.float32), b, l) for b, l in zip(boxes, labels)),
        output_signature=(
            tf.TensorSpec((64, 64, 1), tf.float32),
            tf.TensorSpec((None, 4), tf.float32),
            tf.TensorSpec((None,), tf.int32),
        ),
    )
    batches = list(ds.map(ssd_targets_fn(cfg)).batch(3))
    assert len(batches) == 1
    image, targets = batches[0]
    assert image.shape == (3, 64, 64, 1)
    assert targets["cls"].shape == (3, cfg.num_anchors) and targets["loc"].shape == (3, cfg.num_anchors, 4)
    cls = targets["cls"].numpy()
    assert not cls[0].any()
    assert set(np.unique(cls[1])) == {0, 1}
    assert set(np.unique(cls[2])) == {0, 1, 2}


# ---------------------------------------------------------------- decoding


def _peaked_logits(n: int, winners: dict[int, int]) -> np.ndarray:
    logits = np.zeros((n, 3), np.float32)
    logits[:, 0] = 10.0
    for i, c in winners.items():
        logits[i] = [-10.0, -10.0, -10.0]
        logits[i, c] = 10.0
    return logits


def test_decode_detections_single_and_batch(anchors300):
    n = len(anchors300)
    # Anchors 0 and 1 share a centre (IoU ~0.7, suppressed), anchor 5000 is elsewhere.
    logits = _peaked_logits(n, {0: 2, 1: 2, 5000: 1})
    offsets = np.zeros((n, 4), np.float32)
    one = B.decode_detections(logits, offsets, anchors300, score_threshold=0.5, max_total=10)
    assert one["boxes"].shape == (10, 4) and one["classes"].dtype == tf.int32
    assert int(one["num_detections"]) == 2
    assert sorted(one["classes"].numpy()[:2].tolist()) == [1, 2]
    assert not one["classes"].numpy()[2:].any()
    expected = np.clip(B.centre_to_corners(anchors300[[5000]]).numpy(), 0, 1)
    k = int(np.flatnonzero(one["classes"].numpy() == 1)[0])
    np.testing.assert_allclose(one["boxes"].numpy()[k], expected[0], atol=1e-5)
    batch = B.decode_detections(np.stack([logits, logits]), np.stack([offsets, offsets]), anchors300,
                                score_threshold=0.5, max_total=10)
    assert batch["boxes"].shape == (2, 10, 4) and batch["num_detections"].numpy().tolist() == [2, 2]
    np.testing.assert_allclose(batch["boxes"].numpy()[1], one["boxes"].numpy(), atol=1e-6)


def test_decode_detections_rejects_bad_shapes(anchors300):
    with pytest.raises(ValueError, match="same rank"):
        B.decode_detections(np.zeros((2, 5, 3)), np.zeros((5, 4)), anchors300[:5])


def test_match_ignore_band():
    # One ground-truth box; anchors: identical (IoU 1), half-overlapping (IoU 1/3), far away (IoU 0).
    gt = np.array([[0.2, 0.2, 0.4, 0.4]], np.float32)
    corners = np.array([[0.2, 0.2, 0.4, 0.4], [0.2, 0.3, 0.4, 0.5], [0.7, 0.7, 0.9, 0.9]], np.float32)
    anchors = B.corners_to_centre(corners).numpy()
    _, cls = B.match(gt, [2], anchors, iou_threshold=0.5)
    assert cls.numpy().tolist() == [2, 0, 0]
    _, cls = B.match(gt, [2], anchors, iou_threshold=0.5, ignore_iou=0.3)
    assert cls.numpy().tolist() == [2, -1, 0]  # neither positive nor a negative to mine
    _, cls = B.match(np.zeros((0, 4), np.float32), np.zeros((0,), np.int32), anchors, ignore_iou=0.3)
    assert cls.numpy().tolist() == [0, 0, 0]
