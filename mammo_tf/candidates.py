"""A classical CAD reference for the detector: bright-blob candidates scored by a logistic regression.

Before deep detectors, mammography CAD marked candidates at local maxima of a centre-surround
contrast filter (masses are brighter than the tissue around them) and classified each from a few
hand-made intensity features. This module does that with OpenCV box filters and scikit-learn,
on a detector experiment's own samples and patient folds, and hands its boxes to the same
evaluation as the SSD: a reference that learns from the same training lesions without a network.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import pandas as pd

CANDIDATE_FEATURES = ("log_radius", "inside_mean", "inside_std", "surround_mean", "contrast")


@dataclass(frozen=True)
class CandidateConfig:
    """How candidates are found: radii from the training lesions' radius quantiles, the strongest peaks per radius."""

    radius_quantiles: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    per_scale: int = 10            # strongest local contrast maxima kept per radius and image
    min_inside_mean: float = 0.05  # a candidate's square must be on the breast, not the dark background
    label_iou: float = 0.5         # training label: the class of the lesion it overlaps this much, else background

    def __post_init__(self) -> None:
        if not self.radius_quantiles or not all(0 <= q <= 1 for q in self.radius_quantiles):
            raise ValueError(f"radius_quantiles must be in [0, 1], got {self.radius_quantiles}")
        if self.per_scale < 1:
            raise ValueError(f"per_scale must be >= 1, got {self.per_scale}")
        if not 0 < self.label_iou <= 1:
            raise ValueError(f"label_iou must be in (0, 1], got {self.label_iou}")


def candidate_radii(boxes: pd.Series, quantiles: tuple[float, ...]) -> np.ndarray:
    """Candidate radii in model-input pixels: quantiles of half the sides of these records' lesion boxes (>= 2)."""
    halves = [max(b[2] - b[0], b[3] - b[1]) / 2 for bs in boxes for b in bs]
    if not halves:
        raise ValueError("no lesion box in the training records: no radius to look for")
    return np.unique(np.maximum(np.round(np.quantile(halves, quantiles)), 2).astype(int))


def blob_candidates(image: np.ndarray, radii: np.ndarray, per_scale: int = 10,
                    min_inside_mean: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Square candidates (n, 4) pixel corners and their features (n, 5) at local maxima of centre-surround contrast.

    At radius r the contrast is the mean of the (2r+1)-square minus the mean of the ring out to
    the (4r+1)-square; a peak is a pixel equal to the maximum of its (2r+1)-neighbourhood.
    """
    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"expected one grey image (H, W), got shape {img.shape}")
    img = img.astype(np.float32) / (255.0 if img.dtype == np.uint8 else 1.0)
    h, w = img.shape
    boxes, feats = [], []
    for r in np.asarray(radii, int):
        k_in, k_out = 2 * r + 1, 4 * r + 1
        inside = cv2.blur(img, (k_in, k_in), borderType=cv2.BORDER_REFLECT)
        square = cv2.blur(img * img, (k_in, k_in), borderType=cv2.BORDER_REFLECT)
        outer = cv2.blur(img, (k_out, k_out), borderType=cv2.BORDER_REFLECT)
        surround = (outer * k_out**2 - inside * k_in**2) / (k_out**2 - k_in**2)
        contrast = inside - surround
        peaks = ((contrast == cv2.dilate(contrast, np.ones((k_in, k_in), np.uint8))) & (contrast > 0)
                 & (inside > min_inside_mean))
        ys, xs = np.nonzero(peaks)
        order = np.argsort(-contrast[ys, xs], kind="stable")[:per_scale]
        ys, xs = ys[order], xs[order]
        boxes.append(np.stack([np.clip(ys - r, 0, h), np.clip(xs - r, 0, w),
                               np.clip(ys + r + 1, 0, h), np.clip(xs + r + 1, 0, w)], axis=1).astype(np.float64))
        std = np.sqrt(np.maximum(square[ys, xs] - inside[ys, xs] ** 2, 0.0))
        feats.append(np.stack([np.full(len(ys), np.log(r)), inside[ys, xs], std, surround[ys, xs],
                               contrast[ys, xs]], axis=1).astype(np.float64))
    if not boxes:
        return np.zeros((0, 4)), np.zeros((0, len(CANDIDATE_FEATURES)))
    return np.concatenate(boxes), np.concatenate(feats)


def candidate_labels(boxes: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray, iou: float = 0.5) -> np.ndarray:
    """Each candidate's class: that of the lesion it overlaps most if IoU >= ``iou``, else 0 (background)."""
    from mammo_tf.metrics.detection import iou_matrix

    labels = np.zeros(len(boxes), np.int64)
    if len(boxes) and len(gt_boxes):
        overlaps = iou_matrix(boxes, np.asarray(gt_boxes, np.float64).reshape(-1, 4))
        best = overlaps.argmax(axis=1)
        hit = overlaps[np.arange(len(boxes)), best] >= iou
        labels[hit] = np.asarray(gt_labels, np.int64)[best[hit]]
    return labels


def _window(films: Any, record: Any) -> np.ndarray:
    """A record's model-input image: its window of the (prepared) film."""
    return films.image(record.refnum)[record.top:record.top + record.size, record.left:record.left + record.size]


def _as_detections(boxes: np.ndarray, proba: np.ndarray, size: int, exp: Any) -> dict:
    """One image's candidates and class probabilities -> detections after the SSD's own per-class NMS."""
    from mammo_tf.boxes import corners_to_centre, decode_detections

    if not len(boxes):
        return {"boxes": np.zeros((0, 4)), "labels": np.zeros(0, np.int64), "scores": np.zeros(0)}
    # Candidates as default boxes with zero offsets and log-probabilities as logits: the decoding and
    # NMS are exactly the SSD's.
    anchors = np.asarray(corners_to_centre(np.asarray(boxes / size, np.float32)))
    det = decode_detections(np.log(np.maximum(proba, 1e-12)).astype(np.float32), np.zeros_like(anchors), anchors,
                            score_threshold=exp.score_threshold, iou_threshold=exp.nms_iou_threshold,
                            max_per_class=exp.max_per_class, max_total=exp.max_total,
                            variances=exp.ssd_config().variances)
    n = int(det["num_detections"])
    return {"boxes": np.asarray(det["boxes"])[:n].astype(np.float64),
            "labels": np.asarray(det["classes"])[:n].astype(np.int64),
            "scores": np.asarray(det["scores"])[:n].astype(np.float64)}


def candidate_detections(exp: Any, samples: Any, cfg: CandidateConfig = CandidateConfig()
                         ) -> tuple[Callable[[Any], dict], dict[int, dict]]:
    """``(fold -> {"test", "train"[, "train_recut"]: detections}, per-fold fitting info)`` for the detector's evaluation.

    Per fold, the radii and the logistic regression (class-balanced, on standardised features)
    are fitted on the training records' candidates only.
    """
    from mammo_tf import detector as D
    from mammo_tf.baselines import logistic_proba
    from mammo_tf.metrics.detection import iou_matrix

    info: dict[int, dict] = {}

    def extract(records: pd.DataFrame, radii: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        return [blob_candidates(_window(samples.films, r), radii, cfg.per_scale, cfg.min_inside_mean)
                for r in records.itertuples()]

    def detections(fold: Any) -> dict[str, list[dict]]:
        t0 = time.perf_counter()
        radii = candidate_radii(fold.train["boxes"], cfg.radius_quantiles)
        train = extract(fold.train, radii)
        x = np.concatenate([f for _, f in train])
        y = np.concatenate([candidate_labels(b, np.asarray(g, np.float64).reshape(-1, 4), lab, cfg.label_iou)
                            for (b, _), g, lab in zip(train, fold.train["boxes"], fold.train["box_labels"])])
        splits = {"test": fold.test, "train": fold.train, "train_recut": D.recut_train_records(exp, samples, fold)}
        splits = {k: r for k, r in splits.items() if r is not None and len(r)}
        cands = {k: train if k == "train" else extract(r, radii) for k, r in splits.items()}
        # One regression per fold, fitted on the training candidates, scores every split's.
        every = [c for k in splits for c in cands[k]]
        proba = logistic_proba(x, y, np.concatenate([f for _, f in every]), seed=exp.seed + fold.index)
        parts = iter(np.split(proba, np.cumsum([len(b) for b, _ in every])[:-1]))
        out = {k: [_as_detections(b, next(parts), r.size, exp) for (b, _), r in zip(cands[k], splits[k].itertuples())]
               for k in splits}
        # The ceiling a perfect scorer of these candidates would reach.
        truth = [np.asarray(g, np.float64).reshape(-1, 4) for g in splits["test"]["boxes"]]
        n_lesions = sum(len(g) for g in truth)
        found = sum(int((iou_matrix(g, b).max(axis=1) >= exp.iou_threshold).sum())
                    for (b, _), g in zip(cands["test"], truth) if len(g) and len(b))
        info[fold.index] = {"seconds": time.perf_counter() - t0, "radii_px": radii.tolist(),
                            "n_train_candidates": int(len(y)),
                            "n_train_candidates_by_class": {str(c): int((y == c).sum()) for c in (0, 1, 2)},
                            "test_lesions_with_a_candidate": found / n_lesions if n_lesions else float("nan")}
        return out

    return detections, info


ROW_NAME = "Blob candidates + logistic regression (no network)"


def run_name(experiment_name: str) -> str:
    """The folder (and experiment name) of the blob reference beside detector experiment ``experiment_name``."""
    return f"blobs_{experiment_name}"


def run(exp: Any, out_dir: str | Path, cfg: CandidateConfig = CandidateConfig(), command: str | None = None,
        annotations: pd.DataFrame | None = None) -> dict:
    """Evaluate the blob-candidate reference on ``exp``'s samples and folds into ``out_dir`` (config, metrics, figures)."""
    from mammo_tf import detector as D
    from mammo_tf.data import mias
    from mammo_tf.io import save_json

    out = Path(out_dir)
    # Its own name (rows, lesion tables); the samples and folds do not depend on it.
    exp = dataclasses.replace(exp, name=run_name(exp.name))
    ann = annotations if annotations is not None else mias.load_annotations(exp.data)
    samples = D.make_samples(exp, ann)
    detections, info = candidate_detections(exp, samples, cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / D.CONFIG_FILE, {"experiment": exp.to_dict(), "candidates": asdict(cfg)})
    row = (f"{ROW_NAME}, radii at the training lesions' {', '.join(f'{q:g}' for q in cfg.radius_quantiles)} "
           f"radius quantiles, {cfg.per_scale} peaks each")
    # `info` fills in while the folds are evaluated; the training rows are read after each call.
    return D.evaluate_experiment(exp, out, command=command, samples=samples, annotations=ann, detections=detections,
                                 training_info=info, row_name=row, figure_label="blob candidates")
