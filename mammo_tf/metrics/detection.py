"""Detection metrics: PASCAL VOC matching and average precision, and lesion-level FROC.

Conventions (see docs/conventions.md): boxes are ``[ymin, xmin, ymax, xmax]`` in any units
consistent between ground truth and detections (pixels or normalised); lesion classes
``1 = benign``, ``2 = malignant``. Box areas are continuous (``(ymax - ymin) * (xmax - xmin)``),
as in pycocotools, not the ``+1`` pixel convention of the VOC MATLAB devkit.

Matching decisions, stated once:

* A detection matches a ground-truth box when ``IoU >= iou_threshold`` (inclusive). This is
  what the VOC devkit (``VOCevaldet.m``: ``ovmax >= VOCopts.minoverlap``) and pycocotools
  (``if ious[d, g] < iou: continue``) do; the popular ``voc_eval.py`` re-implementation uses a
  strict ``>``, which differs only for an IoU of exactly the threshold.
* Detections are matched per image and per class in order of descending score; ties keep the
  order the detections were given in (stable sort, as both reference implementations do), and
  across images the earlier image comes first.
* ``matching="voc"`` (default): each detection looks at its best-overlapping ground-truth box of
  its class; if that box is already taken the detection is a false positive (a duplicate),
  even when another free box overlaps it enough. ``matching="coco"``: the detection takes the
  best-overlapping box *among those not yet matched* (pycocotools' rule). The two differ only
  when one detection overlaps two ground-truth boxes of its class above the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike

Matching = Literal["voc", "coco"]
APMethod = Literal["all_point", "11_point", "101_point"]
Criterion = Literal["centre", "iou"]

AP_METHODS: tuple[str, ...] = ("all_point", "11_point", "101_point")
DEFAULT_CLASS_IDS: tuple[int, ...] = (1, 2)
DEFAULT_CLASS_NAMES: tuple[str, ...] = ("benign", "malignant")
# LUNA16 / CAD-literature operating points (mean false positives per image).
DEFAULT_FROC_FPS: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

# VOC2007: recall levels exactly 0, 0.1, ..., 1 (k / 10; the devkits' 0:0.1:1 has float
# artefacts at 0.3, 0.6 and 0.7 that change the result when a recall lands exactly there).
_RECALL_11 = np.arange(11) / 10.0
# pycocotools' own grid (np.linspace, 1 ulp off k / 100 at ten points), so that "101_point"
# reproduces its AP@IoU bit for bit.
_RECALL_101 = np.linspace(0.0, 1.0, 101)

ImageTruth = Mapping[str, ArrayLike] | Sequence[ArrayLike]
ImageDetections = Mapping[str, ArrayLike] | Sequence[ArrayLike]


@dataclass(frozen=True)
class MatchResult:
    """Outcome of matching one image's detections (arrays follow the detections' input order)."""

    tp: np.ndarray  # bool (n_det,): True positive; False = false positive
    matched_gt: np.ndarray  # int (n_det,): index of the matched ground-truth box, -1 if none
    best_iou: np.ndarray  # float (n_det,): best IoU with any ground-truth box of the same class
    gt_detected: np.ndarray  # bool (n_gt,): whether each ground-truth box was matched


# --------------------------------------------------------------------------- validation


def _boxes(value: ArrayLike, what: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{what}: boxes must have shape (n, 4) [ymin, xmin, ymax, xmax], got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}: boxes contain NaN or inf")
    if np.any(arr[:, 2] < arr[:, 0]) or np.any(arr[:, 3] < arr[:, 1]):
        raise ValueError(f"{what}: boxes must be [ymin, xmin, ymax, xmax] with ymin <= ymax and xmin <= xmax")
    return arr


def _vector(value: ArrayLike, n: int, what: str, dtype: Any) -> np.ndarray:
    arr = np.asarray(value, dtype=dtype).reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"{what}: expected {n} values (one per box), got {arr.shape[0]}")
    if dtype is np.float64 and not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}: contains NaN or inf")
    return arr


def _unpack_truth(item: ImageTruth, what: str) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(item, Mapping):
        missing = {"boxes", "labels"} - set(item)
        if missing:
            raise ValueError(f"{what}: missing key(s) {sorted(missing)}")
        boxes, labels = item["boxes"], item["labels"]
    else:
        if len(item) != 2:
            raise ValueError(f"{what}: expected (boxes, labels), got {len(item)} items")
        boxes, labels = item
    b = _boxes(boxes, what)
    return b, _vector(labels, len(b), f"{what} labels", np.int64)


def _unpack_detections(item: ImageDetections, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if isinstance(item, Mapping):
        missing = {"boxes", "labels", "scores"} - set(item)
        if missing:
            raise ValueError(f"{what}: missing key(s) {sorted(missing)}")
        boxes, labels, scores = item["boxes"], item["labels"], item["scores"]
    else:
        if len(item) != 3:
            raise ValueError(f"{what}: expected (boxes, labels, scores), got {len(item)} items")
        boxes, labels, scores = item
    b = _boxes(boxes, what)
    return b, _vector(labels, len(b), f"{what} labels", np.int64), _vector(scores, len(b), f"{what} scores", np.float64)


def _check_threshold(iou_threshold: float) -> None:
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")


def _paired(ground_truths: Sequence[ImageTruth], detections: Sequence[ImageDetections]) -> None:
    if len(ground_truths) != len(detections):
        raise ValueError(
            f"ground_truths and detections must list the same images: {len(ground_truths)} != {len(detections)}"
        )


# --------------------------------------------------------------------------- IoU and matching


def iou_matrix(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Pairwise IoU of boxes ``a`` (n, 4) and ``b`` (m, 4) in [ymin, xmin, ymax, xmax] -> (n, m)."""
    a = _boxes(a, "iou_matrix a")
    b = _boxes(b, "iou_matrix b")
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    hw = np.clip(bottom_right - top_left, 0.0, None)
    inter = hw[..., 0] * hw[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    # Two degenerate (zero-area) boxes have no meaningful overlap: IoU 0, not 0/0.
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def match_detections(
    gt_boxes: ArrayLike,
    gt_labels: ArrayLike,
    det_boxes: ArrayLike,
    det_labels: ArrayLike,
    det_scores: ArrayLike,
    iou_threshold: float = 0.5,
    matching: Matching = "voc",
) -> MatchResult:
    """Greedy per-class matching of one image's detections by descending score (IoU >= threshold)."""
    _check_threshold(iou_threshold)
    if matching not in ("voc", "coco"):
        raise ValueError(f"matching must be 'voc' or 'coco', got {matching!r}")
    gb = _boxes(gt_boxes, "gt_boxes")
    gl = _vector(gt_labels, len(gb), "gt_labels", np.int64)
    db = _boxes(det_boxes, "det_boxes")
    dl = _vector(det_labels, len(db), "det_labels", np.int64)
    ds = _vector(det_scores, len(db), "det_scores", np.float64)

    ious = iou_matrix(db, gb)
    # Other classes can never match: -inf keeps them out of every argmax.
    ious = np.where(dl[:, None] == gl[None, :], ious, -np.inf)
    tp = np.zeros(len(db), dtype=bool)
    matched_gt = np.full(len(db), -1, dtype=np.int64)
    best_iou = np.zeros(len(db), dtype=np.float64)
    gt_detected = np.zeros(len(gb), dtype=bool)
    if len(gb):
        best_iou = np.maximum(ious.max(axis=1), 0.0)
    for d in np.argsort(-ds, kind="stable"):
        if not len(gb):
            break
        row = ious[d] if matching == "voc" else np.where(gt_detected, -np.inf, ious[d])
        j = int(np.argmax(row))
        if row[j] >= iou_threshold and not gt_detected[j]:
            tp[d] = True
            matched_gt[d] = j
            gt_detected[j] = True
    return MatchResult(tp=tp, matched_gt=matched_gt, best_iou=best_iou, gt_detected=gt_detected)


# --------------------------------------------------------------------------- average precision


def precision_recall(scores: ArrayLike, tp: ArrayLike, n_gt: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank detections by descending score (stable) -> (recall, precision, sorted scores) after each one."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    t = np.asarray(tp, dtype=bool).reshape(-1)
    if s.shape != t.shape:
        raise ValueError(f"scores and tp must have the same length, got {s.shape[0]} and {t.shape[0]}")
    if n_gt < 0:
        raise ValueError(f"n_gt must be >= 0, got {n_gt}")
    order = np.argsort(-s, kind="stable")
    t = t[order]
    cum_tp = np.cumsum(t).astype(np.float64)
    cum_fp = np.cumsum(~t).astype(np.float64)
    if t.sum() > n_gt:
        raise ValueError(f"{int(t.sum())} true positives exceed the {n_gt} ground-truth boxes")
    recall = cum_tp / n_gt if n_gt > 0 else np.full_like(cum_tp, np.nan)
    precision = cum_tp / (cum_tp + cum_fp) if len(t) else cum_tp
    return recall, precision, s[order]


def average_precision(recall: ArrayLike, precision: ArrayLike, method: APMethod = "all_point") -> float:
    """VOC AP from a ranked PR curve: 'all_point' (VOC2010+), '11_point' (VOC2007) or '101_point' (COCO)."""
    rec = np.asarray(recall, dtype=np.float64).reshape(-1)
    prec = np.asarray(precision, dtype=np.float64).reshape(-1)
    if rec.shape != prec.shape:
        raise ValueError(f"recall and precision must have the same length, got {rec.shape[0]} and {prec.shape[0]}")
    if method not in AP_METHODS:
        raise ValueError(f"method must be one of {AP_METHODS}, got {method!r}")
    if not len(rec):
        return 0.0
    if np.any(np.isnan(rec)) or np.any(np.isnan(prec)):
        raise ValueError("recall/precision contain NaN (no ground truth for this class?)")
    if np.any(np.diff(rec) < 0):
        raise ValueError("recall must be non-decreasing (points in order of descending score)")
    if method == "all_point":
        mrec = np.concatenate([[0.0], rec, [1.0]])
        # Precision envelope: at each point, the best precision reachable at this recall or more.
        mpre = np.maximum.accumulate(np.concatenate([[0.0], prec, [0.0]])[::-1])[::-1]
        step = np.nonzero(mrec[1:] != mrec[:-1])[0]
        return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))
    grid = _RECALL_11 if method == "11_point" else _RECALL_101
    envelope = np.maximum.accumulate(prec[::-1])[::-1]
    first = np.searchsorted(rec, grid, side="left")  # first point with recall >= r
    reached = first < len(rec)
    sampled = np.zeros(len(grid))
    sampled[reached] = envelope[first[reached]]
    return float(sampled.mean())


def evaluate_detections(
    ground_truths: Sequence[ImageTruth],
    detections: Sequence[ImageDetections],
    iou_threshold: float = 0.5,
    class_ids: Sequence[int] = DEFAULT_CLASS_IDS,
    class_names: Sequence[str] = DEFAULT_CLASS_NAMES,
    matching: Matching = "voc",
) -> dict[str, Any]:
    """Per-class VOC AP (all-point, 11-point, COCO 101-point), mAP and PR curves over a set of images.

    ``ground_truths[i]`` is ``{"boxes", "labels"}`` (or a tuple) and ``detections[i]`` is
    ``{"boxes", "labels", "scores"}`` for the same image ``i``; boxes and labels of classes not in
    ``class_ids`` are ignored. A class with no ground-truth box has AP NaN and is left out of the
    mAP (its detections are all false positives but there is no recall to rank them against).
    """
    _check_threshold(iou_threshold)
    _paired(ground_truths, detections)
    class_ids = tuple(int(c) for c in class_ids)
    class_names = tuple(class_names)
    if len(class_ids) != len(class_names):
        raise ValueError(f"class_ids {class_ids} and class_names {class_names} must have the same length")
    if len(set(class_ids)) != len(class_ids):
        raise ValueError(f"class_ids must be distinct, got {class_ids}")

    scores: dict[int, list[np.ndarray]] = {c: [] for c in class_ids}
    tps: dict[int, list[np.ndarray]] = {c: [] for c in class_ids}
    n_gt = dict.fromkeys(class_ids, 0)
    for i, (gt, det) in enumerate(zip(ground_truths, detections)):
        gb, gl = _unpack_truth(gt, f"ground_truths[{i}]")
        db, dl, ds = _unpack_detections(det, f"detections[{i}]")
        result = match_detections(gb, gl, db, dl, ds, iou_threshold=iou_threshold, matching=matching)
        for c in class_ids:
            n_gt[c] += int(np.sum(gl == c))
            keep = dl == c
            scores[c].append(ds[keep])
            tps[c].append(result.tp[keep])

    per_class: dict[str, dict[str, Any]] = {}
    for c, name in zip(class_ids, class_names):
        s = np.concatenate(scores[c])
        t = np.concatenate(tps[c])
        entry: dict[str, Any] = {"class_id": c, "n_gt": n_gt[c], "n_det": int(len(s)), "n_tp": int(t.sum())}
        if n_gt[c] == 0:
            rec, prec, sorted_scores = np.full(len(s), np.nan), np.zeros(len(s)), np.sort(s)[::-1]
            entry.update({f"ap_{m}": float("nan") for m in AP_METHODS})
        else:
            rec, prec, sorted_scores = precision_recall(s, t, n_gt[c])
            entry.update({f"ap_{m}": average_precision(rec, prec, m) for m in AP_METHODS})
        entry.update({"recall": rec, "precision": prec, "scores": sorted_scores})
        per_class[name] = entry

    out: dict[str, Any] = {
        "iou_threshold": float(iou_threshold),
        "matching": matching,
        "n_images": len(ground_truths),
        "classes": per_class,
    }
    for m in AP_METHODS:
        aps = [e[f"ap_{m}"] for e in per_class.values() if e["n_gt"] > 0]
        out[f"map_{m}"] = float(np.mean(aps)) if aps else float("nan")
    return out


# --------------------------------------------------------------------------- FROC


def _hits(gt_boxes: np.ndarray, det_boxes: np.ndarray, criterion: Criterion, iou_threshold: float) -> np.ndarray:
    """(n_det, n_gt) bool: whether each detection hits each lesion."""
    if criterion == "iou":
        return iou_matrix(det_boxes, gt_boxes) >= iou_threshold
    cy = (det_boxes[:, 0] + det_boxes[:, 2]) / 2.0
    cx = (det_boxes[:, 1] + det_boxes[:, 3]) / 2.0
    return (
        (cy[:, None] >= gt_boxes[None, :, 0])
        & (cy[:, None] <= gt_boxes[None, :, 2])
        & (cx[:, None] >= gt_boxes[None, :, 1])
        & (cx[:, None] <= gt_boxes[None, :, 3])
    )


def froc(
    ground_truths: Sequence[ImageTruth],
    detections: Sequence[ImageDetections],
    criterion: Criterion = "centre",
    iou_threshold: float = 0.5,
    fps_per_image: Sequence[float] = DEFAULT_FROC_FPS,
    class_id: int | None = None,
) -> dict[str, Any]:
    """Lesion-level FROC: sensitivity against mean false positives per image over all images.

    A detection *hits* a lesion when its box centre lies inside the lesion box
    (``criterion="centre"``, the default, common in mammography CAD) or when their
    ``IoU >= iou_threshold`` (``criterion="iou"``). A lesion is found at threshold ``t`` when
    any detection with score ``>= t`` hits it; a detection is a false positive when it hits no
    lesion. Several detections on one lesion count it once and are not false positives.
    Every image counts in the per-image mean, lesion-free ones included. Class-agnostic
    (``class_id=None``) unless a class id is given, which keeps only that class's lesions and
    detections. ``grid_sensitivity`` reads the curve as a step function (best sensitivity with
    at most that many false positives per image, no interpolation).
    """
    if criterion not in ("centre", "iou"):
        raise ValueError(f"criterion must be 'centre' or 'iou', got {criterion!r}")
    _check_threshold(iou_threshold)
    _paired(ground_truths, detections)
    grid = np.asarray(fps_per_image, dtype=np.float64).reshape(-1)
    if np.any(~np.isfinite(grid)) or np.any(grid < 0):
        raise ValueError(f"fps_per_image must be finite and >= 0, got {grid.tolist()}")
    if not len(ground_truths):
        raise ValueError("froc needs at least one image")

    lesion_scores: list[np.ndarray] = []
    lesion_boxes: list[np.ndarray] = []
    hit_boxes: list[np.ndarray] = []
    fp_scores: list[np.ndarray] = []
    all_scores: list[np.ndarray] = []
    for i, (gt, det) in enumerate(zip(ground_truths, detections)):
        gb, gl = _unpack_truth(gt, f"ground_truths[{i}]")
        db, dl, ds = _unpack_detections(det, f"detections[{i}]")
        if class_id is not None:
            gb, db, ds = gb[gl == class_id], db[dl == class_id], ds[dl == class_id]
        hit = _hits(gb, db, criterion, iou_threshold)
        # Each lesion's best score among the detections that hit it (-inf: never found).
        lesion_scores.append(np.where(hit, ds[:, None], -np.inf).max(axis=0) if len(db) else np.full(len(gb), -np.inf))
        # The box of that best hit (NaN: never found), to tell a lesion found in the right place from one boxed well.
        box = np.full((len(gb), 4), np.nan)
        if len(db):
            found = hit.any(axis=0)
            box[found] = db[np.where(hit, ds[:, None], -np.inf).argmax(axis=0)[found]]
        hit_boxes.append(box)
        lesion_boxes.append(gb.reshape(-1, 4))
        fp_scores.append(ds[~hit.any(axis=1)] if len(gb) else ds)
        all_scores.append(ds)

    per_lesion = np.concatenate(lesion_scores) if lesion_scores else np.zeros(0)
    lesion = np.sort(per_lesion)
    fps_sorted = np.sort(np.concatenate(fp_scores))
    thresholds = np.concatenate([[np.inf], np.unique(np.concatenate(all_scores))[::-1]])
    n_images, n_lesions = len(ground_truths), len(lesion)
    # Counts of scores >= t, via the sorted arrays.
    n_fp = len(fps_sorted) - np.searchsorted(fps_sorted, thresholds, side="left")
    n_found = n_lesions - np.searchsorted(lesion, thresholds, side="left")
    fps = n_fp / n_images
    sensitivity = n_found / n_lesions if n_lesions else np.full(len(thresholds), np.nan)
    result: dict[str, Any] = {
        "criterion": criterion,
        "iou_threshold": float(iou_threshold) if criterion == "iou" else None,
        "class_id": class_id,
        "n_images": n_images,
        "n_lesions": n_lesions,
        "thresholds": thresholds,
        "fps": fps,
        "sensitivity": sensitivity,
        "grid_fps": grid,
        # Each lesion's best hitting score, in the order the lesions were given (-inf: never hit).
        "lesion_scores": per_lesion,
        "lesion_boxes": np.concatenate(lesion_boxes) if lesion_boxes else np.zeros((0, 4)),
        "lesion_hit_boxes": np.concatenate(hit_boxes) if hit_boxes else np.zeros((0, 4)),
    }
    result["grid_sensitivity"] = np.array([sensitivity_at_fp(result, f) for f in grid])
    result["mean_sensitivity"] = float(np.mean(result["grid_sensitivity"])) if len(grid) else float("nan")
    return result


def sensitivity_at_fp(froc_result: Mapping[str, Any], fp: float = 1.0) -> float:
    """Best lesion sensitivity of a FROC curve with at most ``fp`` mean false positives per image."""
    if not np.isfinite(fp) or fp < 0:
        raise ValueError(f"fp must be finite and >= 0, got {fp}")
    fps = np.asarray(froc_result["fps"], dtype=np.float64)
    sens = np.asarray(froc_result["sensitivity"], dtype=np.float64)
    # Both are non-decreasing as the threshold falls: the last point within budget is the best.
    idx = int(np.searchsorted(fps, fp, side="right")) - 1
    return float(sens[idx]) if idx >= 0 else 0.0


def found_at_fp(froc_result: Mapping[str, Any], fp: float = 1.0) -> np.ndarray:
    """Per lesion (in the order given to `froc`), whether it is found at the best operating point within ``fp``."""
    if not np.isfinite(fp) or fp < 0:
        raise ValueError(f"fp must be finite and >= 0, got {fp}")
    fps = np.asarray(froc_result["fps"], dtype=np.float64)
    scores = np.asarray(froc_result["lesion_scores"], dtype=np.float64)
    # The same operating point as `sensitivity_at_fp`: the lowest threshold still within the budget.
    idx = int(np.searchsorted(fps, fp, side="right")) - 1
    return scores >= froc_result["thresholds"][idx] if idx >= 0 else np.zeros(len(scores), bool)



def _side(boxes: np.ndarray) -> np.ndarray:
    """The side of the square with each box's area."""
    return np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))


def hit_localisation(froc_result: Mapping[str, Any], fp: float = 1.0) -> dict[str, Any]:
    """How well the lesions found at ``fp`` false positives per image are boxed, per lesion and summed up.

    Per lesion (in the order given to `froc`; NaN where not found): ``iou``, of its best hitting
    box with its own; ``size_log2``, log2 of their sizes' ratio (the side of an equal-area square,
    box over lesion); ``lesion_log2_side``. A detector can find every lesion by its centre and
    still score no AP: these say whether the size or the place is off. Summed up as
    :func:`localisation_summary`.
    """
    found = found_at_fp(froc_result, fp)
    gt_boxes = np.asarray(froc_result["lesion_boxes"], np.float64).reshape(-1, 4)
    boxes = np.asarray(froc_result["lesion_hit_boxes"], np.float64).reshape(-1, 4)
    iou, size_log2 = np.full(len(found), np.nan), np.full(len(found), np.nan)
    if found.any():
        iou[found] = np.diag(iou_matrix(boxes[found], gt_boxes[found]))
        size_log2[found] = np.log2(_side(boxes[found]) / _side(gt_boxes[found]))
    per_lesion = {"iou": iou, "size_log2": size_log2, "lesion_log2_side": np.log2(_side(gt_boxes))}
    return {**per_lesion, **localisation_summary(**per_lesion)}


def localisation_summary(iou: ArrayLike, size_log2: ArrayLike, lesion_log2_side: ArrayLike) -> dict[str, float]:
    """Over the found lesions (finite ``iou``): how many, the median IoU, the share with IoU >= 0.5 (what
    VOC AP needs), the median and spread of the size ratio, and the Pearson correlation of box and
    lesion log sizes (does the box grow with the lesion?)."""
    iou, size_log2, log_gt = (np.asarray(a, np.float64).reshape(-1) for a in (iou, size_log2, lesion_log2_side))
    found = np.isfinite(iou)
    n = int(found.sum())
    log_gt, log_box = log_gt[found], log_gt[found] + size_log2[found]
    varied = n >= 3 and np.ptp(log_gt) > 0 and np.ptp(log_box) > 0
    nan = float("nan")
    return {
        "n_found": n,
        "iou_median": float(np.median(iou[found])) if n else nan,
        "iou50_share": float(np.mean(iou[found] >= 0.5)) if n else nan,
        "size_log2_median": float(np.median(size_log2[found])) if n else nan,
        "size_log2_sd": float(np.std(size_log2[found], ddof=1)) if n >= 2 else nan,
        "size_corr": float(np.corrcoef(log_gt, log_box)[0, 1]) if varied else nan,
    }
