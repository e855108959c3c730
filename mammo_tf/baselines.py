"""Baselines that every model is reported beside, on the same folds."""

from __future__ import annotations

import numpy as np
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

INTENSITY_FEATURES = ("mean", "std", "p10", "p50", "p90", "p99", "skew", "bright_fraction")


def intensity_features(images: np.ndarray, masks: np.ndarray | None = None) -> np.ndarray:
    """A few simple intensity statistics per image or patch, `(N, H, W[, 1])` -> `(N, 8)`."""
    images = np.asarray(images, dtype=np.float32)
    images = images.reshape(images.shape[0], -1)
    if images.max(initial=0) > 1.5:
        images = images / 255.0
    feats = []
    for i, row in enumerate(images):
        values = row if masks is None else row[np.asarray(masks[i]).reshape(-1).astype(bool)]
        if values.size == 0:
            values = row
        mean, std = values.mean(), values.std()
        p10, p50, p90, p99 = np.percentile(values, [10, 50, 90, 99])
        skew = float(((values - mean) ** 3).mean() / (std**3 + 1e-8))
        feats.append([mean, std, p10, p50, p90, p99, skew, float((values > 0.8).mean())])
    return np.asarray(feats, dtype=np.float32)


def majority_proba(y_train: np.ndarray, n_test: int, n_classes: int = 3) -> np.ndarray:
    """Class probabilities of the majority-class baseline (the training prior for every sample)."""
    clf = DummyClassifier(strategy="prior").fit(np.zeros((len(y_train), 1)), y_train)
    proba = np.zeros((n_test, n_classes), dtype=np.float32)
    proba[:, clf.classes_] = clf.predict_proba(np.zeros((n_test, 1)))
    return proba


def logistic_proba(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, n_classes: int = 3, seed: int = 0
) -> np.ndarray:
    """Class probabilities from a class-balanced logistic regression on the given features."""
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed))
    model.fit(x_train, y_train)
    proba = np.zeros((len(x_test), n_classes), dtype=np.float32)
    proba[:, model.classes_] = model.predict_proba(x_test)
    return proba


def oracle_boxes_random_class(
    ground_truths: list[dict], class_ids: tuple[int, ...] = (1, 2), seed: int = 0
) -> list[dict]:
    """Detection reference: every ground-truth box found exactly, its class guessed at random, random score."""
    rng = np.random.default_rng(seed)
    detections = []
    for gt in ground_truths:
        boxes = np.asarray(gt["boxes"], dtype=np.float32).reshape(-1, 4)
        detections.append({
            "boxes": boxes.copy(),
            "labels": rng.choice(class_ids, size=len(boxes)).astype(np.int32),
            "scores": rng.uniform(size=len(boxes)).astype(np.float32),
        })
    return detections


def random_boxes_random_class(
    masks: list[np.ndarray], sides: np.ndarray, n_per_image: int = 10, class_ids: tuple[int, ...] = (1, 2),
    seed: int = 0,
) -> list[dict]:
    """Detection reference with no knowledge of the image: boxes at random places in the region, random class and score.

    Each image gets ``n_per_image`` square boxes centred on pixels drawn uniformly from its region
    mask (``(H, W)`` bool; an empty mask means the whole image), their sides drawn from ``sides``
    (the training lesions', as fractions of the image side). Boxes are normalised ``[y1, x1, y2, x2]``,
    clipped to the image. It tells what FROC and AP a detector gets by chance.
    """
    sides = np.asarray(sides, dtype=np.float64).ravel()
    if sides.size == 0 or not np.all((sides > 0) & (sides <= 1)):
        raise ValueError("sides must be a non-empty set of fractions in (0, 1]")
    if n_per_image < 1:
        raise ValueError(f"n_per_image must be >= 1, got {n_per_image}")
    rng = np.random.default_rng(seed)
    detections = []
    for mask in masks:
        mask = np.asarray(mask, dtype=bool)
        h, w = mask.shape
        ys, xs = np.nonzero(mask) if mask.any() else np.nonzero(np.ones_like(mask))
        pick = rng.integers(0, len(ys), size=n_per_image)
        centre = np.stack([(ys[pick] + 0.5) / h, (xs[pick] + 0.5) / w], axis=1)
        half = rng.choice(sides, size=n_per_image)[:, None] / 2.0
        boxes = np.clip(np.concatenate([centre - half, centre + half], axis=1), 0.0, 1.0)
        detections.append({
            "boxes": boxes,
            "labels": rng.choice(class_ids, size=n_per_image).astype(np.int64),
            "scores": rng.uniform(size=n_per_image),
        })
    return detections
