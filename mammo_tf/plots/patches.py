"""Figures for patches, augmentation and detection crops (each function returns a Figure)."""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Circle, Rectangle

from mammo_tf import augment

LABEL_COLOURS = {
    "normal": "tab:blue", "benign": "tab:green", "malignant": "tab:red",
    "ambiguous": "tab:orange", "unlocated": "tab:gray",
}
BOX_COLOURS = {1: "tab:green", 2: "tab:red"}


def _show(ax: plt.Axes, image: np.ndarray, title: str = "") -> None:
    h, w = image.shape[:2]
    # extent puts pixel (r, c) on [c, c + 1) x [r, r + 1): the continuous coordinates of boxes and patches.
    ax.imshow(np.squeeze(image), cmap="gray", vmin=0, vmax=255 if np.asarray(image).dtype == np.uint8 else 1, extent=(0, w, h, 0))
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def _draw_boxes(ax: plt.Axes, boxes: np.ndarray, labels: Sequence[int] | None = None, lw: float = 1.5) -> None:
    boxes = np.asarray(boxes, dtype=float).reshape(-1, 4)
    labels = [1] * len(boxes) if labels is None else list(labels)
    for (y0, x0, y1, x1), lab in zip(boxes, labels):
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=lw, color=BOX_COLOURS.get(int(lab), "yellow")))


def breast_masks(images: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray], ncols: int = 4) -> Figure:
    """Films with the outline of their breast mask and the breast area fraction."""
    names = list(images)
    nrows = int(np.ceil(len(names) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.3 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        mask = masks[name]
        _show(ax, images[name], f"{name}: breast {mask.mean():.0%}")
        h, w = mask.shape
        ax.contour(np.linspace(0.5, w - 0.5, w), np.linspace(0.5, h - 0.5, h), mask.astype(float), levels=[0.5], colors="yellow", linewidths=1.2)
    for ax in list(axes.flat)[len(names):]:
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def strategies(
    image: np.ndarray,
    records: Mapping[str, pd.DataFrame],
    lesions: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> Figure:
    """One panel per strategy: its patches drawn as rectangles coloured by label over the same film.

    `records` maps a panel title to the patch records of this film; `lesions` holds rows
    (y, x, radius[, class]) drawn as circles; `mask` (optional) is outlined.
    """
    circles = np.zeros((0, 3)) if lesions is None else np.asarray(lesions, dtype=float).reshape(len(lesions), -1)[:, :3]
    fig, axes = plt.subplots(1, len(records), figsize=(4.2 * len(records), 4.6), squeeze=False)
    for ax, (title, recs) in zip(axes.flat, records.items()):
        counts = recs["label"].value_counts()
        _show(ax, image, f"{title}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        if mask is not None:
            h, w = mask.shape
            ax.contour(np.linspace(0.5, w - 0.5, w), np.linspace(0.5, h - 0.5, h), mask.astype(float), levels=[0.5], colors="yellow", linewidths=0.8)
        for rec in recs.itertuples():
            colour = LABEL_COLOURS.get(rec.label, "white")
            ax.add_patch(Rectangle((rec.left, rec.top), rec.size, rec.size, fill=False, lw=1.0 if rec.label == "normal" else 2.0, color=colour, alpha=0.9))
        for y, x, r in circles:
            ax.add_patch(Circle((x, y), r, fill=False, lw=1.5, ls="--", color="magenta"))
    handles = [Rectangle((0, 0), 1, 1, fill=False, color=c, label=k) for k, c in LABEL_COLOURS.items() if k != "unlocated"]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def _describe(t: augment.Transform) -> str:
    parts = []
    if t.angle:
        parts.append(f"{t.angle:+.0f}°")
    if t.k:
        parts.append(f"rot{90 * t.k}")
    if t.hflip:
        parts.append("hflip")
    if t.vflip:
        parts.append("vflip")
    return " ".join(parts) or "identity"


def augmented_patches(patches: Sequence[np.ndarray], n_augment: int = 5, max_angle: float = 30.0, seed: int = 0, titles: Sequence[str] | None = None) -> Figure:
    """Gallery: each row a patch (first column) and `n_augment` random augmentations of it."""
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(len(patches), n_augment + 1, figsize=(1.9 * (n_augment + 1), 2.0 * len(patches)), squeeze=False)
    for i, patch in enumerate(patches):
        _show(axes[i, 0], patch, titles[i] if titles else "original")
        for j in range(1, n_augment + 1):
            t = augment.random_transform(rng, max_angle=max_angle)
            out, _ = augment.apply(patch, None, t)
            _show(axes[i, j], out, _describe(t))
    fig.tight_layout()
    return fig


def augmented_crops(
    crops: Sequence[np.ndarray],
    boxes: Sequence[np.ndarray],
    labels: Sequence[Sequence[int]],
    n_augment: int = 4,
    max_angle: float = 30.0,
    seed: int = 0,
) -> Figure:
    """Gallery: each row a detection crop with its boxes, then `n_augment` augmentations with the boxes moved along."""
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(len(crops), n_augment + 1, figsize=(2.3 * (n_augment + 1), 2.4 * len(crops)), squeeze=False)
    for i, (crop, b, lab) in enumerate(zip(crops, boxes, labels)):
        b = np.asarray(b, dtype=float).reshape(-1, 4)
        _show(axes[i, 0], crop, "original")
        _draw_boxes(axes[i, 0], b, lab)
        for j in range(1, n_augment + 1):
            t = augment.random_transform(rng, max_angle=max_angle)
            out, ob = augment.apply(crop, b, t)
            _show(axes[i, j], out, _describe(t))
            _draw_boxes(axes[i, j], ob, lab)
    fig.tight_layout()
    return fig


def served_crops(epochs: Sequence[tuple[np.ndarray, Mapping[str, np.ndarray]]], titles: Sequence[str] | None = None) -> Figure:
    """Gallery: each column one batch (images, targets) of a `pipelines.crop_dataset`, e.g. one per epoch, boxes drawn."""
    n_rows = len(epochs[0][0])
    fig, axes = plt.subplots(n_rows, len(epochs), figsize=(2.3 * len(epochs), 2.4 * n_rows), squeeze=False)
    for j, (images, target) in enumerate(epochs):
        images, boxes, labels = np.asarray(images), np.asarray(target["boxes"]), np.asarray(target["labels"])
        side = images.shape[1]
        for i in range(n_rows):
            keep = labels[i] > 0
            _show(axes[i, j], images[i, ..., 0], titles[j] if titles is not None and i == 0 else "")
            _draw_boxes(axes[i, j], boxes[i][keep] * side, labels[i][keep])
    fig.tight_layout()
    return fig
