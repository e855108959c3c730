"""Box geometry for the SSD detector: conversions, IoU, target encoding, matching and decoding.

Everything here is written once in TensorFlow ops, so that the same code runs eagerly on NumPy
arrays (call ``.numpy()`` on the result), inside ``tf.data`` map functions and inside a
``tf.function`` training step. Inputs may be NumPy arrays, lists or tensors; outputs are
``tf.Tensor``. Box formats follow ``docs/conventions.md``: corners ``[ymin, xmin, ymax, xmax]``
and centre form ``[cy, cx, h, w]``, both normalised to ``[0, 1]`` on the model side.

Target encoding is SSD's (Liu et al. 2016, after Erhan et al. and the released Caffe code):
``t_cy = (cy - a_cy) / (a_h v0)``, ``t_cx = (cx - a_cx) / (a_w v1)``, ``t_h = log(h / a_h) / v2``,
``t_w = log(w / a_w) / v3`` with variances ``v = (0.1, 0.1, 0.2, 0.2)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from mammo_tf.anchors import VARIANCES  # re-exported: the encoding's default

ArrayLike = Any  # np.ndarray | tf.Tensor | nested lists


def _as_boxes(boxes: ArrayLike, name: str) -> tf.Tensor:
    """A float32 tensor whose last axis has the 4 box coordinates."""
    t = tf.convert_to_tensor(boxes, dtype=tf.float32)
    if t.shape.rank is not None and t.shape.rank >= 1 and t.shape[-1] not in (None, 4):
        raise ValueError(f"{name} must have 4 coordinates on its last axis, got shape {t.shape}")
    return t


def corners_to_centre(boxes: ArrayLike) -> tf.Tensor:
    """``[ymin, xmin, ymax, xmax]`` -> ``[cy, cx, h, w]`` (any leading shape)."""
    b = _as_boxes(boxes, "boxes")
    return tf.concat([(b[..., :2] + b[..., 2:]) / 2.0, b[..., 2:] - b[..., :2]], axis=-1)


def centre_to_corners(boxes: ArrayLike) -> tf.Tensor:
    """``[cy, cx, h, w]`` -> ``[ymin, xmin, ymax, xmax]`` (any leading shape)."""
    b = _as_boxes(boxes, "boxes")
    return tf.concat([b[..., :2] - b[..., 2:] / 2.0, b[..., :2] + b[..., 2:] / 2.0], axis=-1)


def iou(boxes_a: ArrayLike, boxes_b: ArrayLike) -> tf.Tensor:
    """Pairwise IoU of corner boxes, ``(..., N, 4) x (..., M, 4) -> (..., N, M)``; 0 for empty unions."""
    a = _as_boxes(boxes_a, "boxes_a")[..., :, None, :]
    b = _as_boxes(boxes_b, "boxes_b")[..., None, :, :]
    inter_h = tf.maximum(tf.minimum(a[..., 2], b[..., 2]) - tf.maximum(a[..., 0], b[..., 0]), 0.0)
    inter_w = tf.maximum(tf.minimum(a[..., 3], b[..., 3]) - tf.maximum(a[..., 1], b[..., 1]), 0.0)
    inter = inter_h * inter_w
    area_a = tf.maximum(a[..., 2] - a[..., 0], 0.0) * tf.maximum(a[..., 3] - a[..., 1], 0.0)
    area_b = tf.maximum(b[..., 2] - b[..., 0], 0.0) * tf.maximum(b[..., 3] - b[..., 1], 0.0)
    return tf.math.divide_no_nan(inter, area_a + area_b - inter)


def encode(
    gt_boxes_centre: ArrayLike, anchors: ArrayLike, variances: Sequence[float] = VARIANCES
) -> tf.Tensor:
    """SSD offsets of centre-form boxes relative to their anchors (both ``(..., 4)``, broadcast)."""
    g = _as_boxes(gt_boxes_centre, "gt_boxes_centre")
    a = _as_boxes(anchors, "anchors")
    v = tf.constant(variances, tf.float32)
    centre = (g[..., :2] - a[..., :2]) / a[..., 2:] / v[:2]
    # Degenerate sizes would give -inf; matched boxes are checked positive in match().
    size = tf.math.log(tf.maximum(g[..., 2:], 1e-8) / a[..., 2:]) / v[2:]
    return tf.concat([centre, size], axis=-1)


def decode(offsets: ArrayLike, anchors: ArrayLike, variances: Sequence[float] = VARIANCES) -> tf.Tensor:
    """Inverse of :func:`encode`: centre-form boxes from offsets (``(..., 4)``, broadcast)."""
    t = _as_boxes(offsets, "offsets")
    a = _as_boxes(anchors, "anchors")
    v = tf.constant(variances, tf.float32)
    centre = t[..., :2] * v[:2] * a[..., 2:] + a[..., :2]
    size = tf.exp(t[..., 2:] * v[2:]) * a[..., 2:]
    return tf.concat([centre, size], axis=-1)


def match(
    gt_boxes: ArrayLike,
    gt_labels: ArrayLike,
    anchors: ArrayLike,
    iou_threshold: float = 0.5,
    variances: Sequence[float] = VARIANCES,
    ignore_iou: float | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """SSD matching of one image's ground truth to the default boxes.

    ``gt_boxes``: ``(G, 4)`` normalised corners, ``G >= 0``; ``gt_labels``: ``(G,)`` class ids
    ``>= 1``; ``anchors``: ``(N, 4)`` centre form. Each ground-truth box first takes the default
    box with which it has the highest IoU (the bipartite step of the paper; when two boxes share
    one best default box the later wins), then every other default box is matched to the ground
    truth of highest IoU if that IoU is ``>= iou_threshold``. Returns the encoded ``loc_targets``
    ``(N, 4)`` float32 (zeros for background) and ``cls_targets`` ``(N,)`` int32 (0 = background).
    With ``ignore_iou`` (not in the SSD paper; the ignore band of Faster R-CNN and RetinaNet), default
    boxes that overlap a lesion with ``ignore_iou <= IoU < iou_threshold`` get ``-1``: neither positive
    nor negative, so hard-negative mining cannot pick boxes that look exactly like the lesion.
    """
    gt = tf.reshape(_as_boxes(gt_boxes, "gt_boxes"), [-1, 4])
    labels = tf.reshape(tf.cast(gt_labels, tf.int32), [-1])
    anc = tf.reshape(_as_boxes(anchors, "anchors"), [-1, 4])
    n_anchors = tf.shape(anc)[0]
    n_gt = tf.shape(gt)[0]
    checks = [
        tf.debugging.assert_equal(
            tf.shape(labels)[0], n_gt, message="gt_labels must have one label per ground-truth box"
        ),
        tf.debugging.assert_greater(
            gt[:, 2:], gt[:, :2], message="ground-truth boxes need ymax > ymin and xmax > xmin"
        ),
        tf.debugging.assert_greater(labels, 0, message="ground-truth labels must be >= 1 (0 is background)"),
    ]
    with tf.control_dependencies(checks):
        anc_corners = centre_to_corners(anc)

    def _no_gt() -> tuple[tf.Tensor, tf.Tensor]:
        return tf.zeros([n_anchors, 4], tf.float32), tf.zeros([n_anchors], tf.int32)

    def _with_gt() -> tuple[tf.Tensor, tf.Tensor]:
        overlaps = iou(gt, anc_corners)  # (G, N)
        best_gt = tf.argmax(overlaps, axis=0, output_type=tf.int32)  # (N,)
        best_gt_iou = tf.reduce_max(overlaps, axis=0)  # (N,)
        best_anchor = tf.argmax(overlaps, axis=1, output_type=tf.int32)  # (G,)
        # Bipartite step: force each ground truth onto its best default box.
        best_gt = tf.tensor_scatter_nd_update(best_gt, best_anchor[:, None], tf.range(n_gt))
        best_gt_iou = tf.tensor_scatter_nd_update(
            best_gt_iou, best_anchor[:, None], tf.fill([n_gt], 2.0)
        )
        positive = best_gt_iou >= iou_threshold
        background = tf.zeros_like(best_gt) if ignore_iou is None else tf.where(best_gt_iou >= ignore_iou, -1, 0)
        cls = tf.where(positive, tf.gather(labels, best_gt), background)
        matched = corners_to_centre(tf.gather(gt, best_gt))
        loc = tf.where(positive[:, None], encode(matched, anc, variances), 0.0)
        return loc, cls

    loc, cls = tf.cond(n_gt > 0, _with_gt, _no_gt)
    return tf.ensure_shape(loc, [anc.shape[0], 4]), tf.ensure_shape(cls, [anc.shape[0]])


def decode_detections(
    cls_logits: ArrayLike,
    box_offsets: ArrayLike,
    anchors: ArrayLike,
    score_threshold: float = 0.01,
    iou_threshold: float = 0.45,
    max_per_class: int = 100,
    max_total: int = 200,
    variances: Sequence[float] = VARIANCES,
) -> dict[str, tf.Tensor]:
    """Per-class NMS detections from raw SSD outputs, one image ``(N, C)`` or a batch ``(B, N, C)``.

    Scores are the softmax over classes with the background (class 0) left out; NMS is
    ``tf.image.combined_non_max_suppression`` with boxes clipped to ``[0, 1]``. Returns a dict
    with ``boxes`` ``(..., max_total, 4)`` normalised corners, ``scores`` ``(..., max_total)``,
    ``classes`` ``(..., max_total)`` int32 detector class ids (``>= 1``) and ``num_detections``
    (``(...)`` int32); entries past ``num_detections`` are zero padding. The leading batch axis is
    present only when the input had one.
    """
    logits = tf.convert_to_tensor(cls_logits, tf.float32)
    offsets = _as_boxes(box_offsets, "box_offsets")
    if logits.shape.rank not in (2, 3) or offsets.shape.rank != logits.shape.rank:
        raise ValueError(
            f"expected cls_logits (N, C) / (B, N, C) and box_offsets of the same rank, got "
            f"{logits.shape} and {offsets.shape}"
        )
    if logits.shape[-1] is not None and logits.shape[-1] < 2:
        raise ValueError(f"cls_logits needs background plus at least one class, got {logits.shape}")
    single = logits.shape.rank == 2
    if single:
        logits, offsets = logits[None], offsets[None]
    boxes = centre_to_corners(decode(offsets, _as_boxes(anchors, "anchors"), variances))
    scores = tf.nn.softmax(logits, axis=-1)[..., 1:]
    nms = tf.image.combined_non_max_suppression(
        boxes[:, :, None, :],
        scores,
        max_output_size_per_class=max_per_class,
        max_total_size=max_total,
        iou_threshold=iou_threshold,
        score_threshold=score_threshold,
        clip_boxes=True,
    )
    valid = tf.range(max_total)[None, :] < nms.valid_detections[:, None]
    out = {
        "boxes": nms.nmsed_boxes,
        "scores": nms.nmsed_scores,
        "classes": tf.where(valid, tf.cast(nms.nmsed_classes, tf.int32) + 1, 0),
        "num_detections": nms.valid_detections,
    }
    if single:
        out = {k: v[0] for k, v in out.items()}
    return out


def suppress_across_classes(boxes: ArrayLike, scores: ArrayLike, iou_threshold: float = 0.45) -> np.ndarray:
    """Indices kept by class-agnostic NMS (``tf.image.non_max_suppression``) over one image's detections, by score."""
    b = _as_boxes(boxes, "boxes")
    if b.shape[0] == 0:
        return np.zeros(0, np.int64)
    keep = tf.image.non_max_suppression(b, tf.convert_to_tensor(scores, tf.float32), max_output_size=int(b.shape[0]),
                                        iou_threshold=iou_threshold)
    return keep.numpy().astype(np.int64)


def pixels_to_normalised(boxes: ArrayLike, image_shape: Sequence[int]) -> np.ndarray:
    """Pixel corner boxes -> normalised corner boxes for an image of shape ``(H, W, ...)``."""
    h, w = float(image_shape[0]), float(image_shape[1])
    return (np.asarray(boxes, np.float32).reshape(-1, 4) / np.array([h, w, h, w], np.float32))
