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
