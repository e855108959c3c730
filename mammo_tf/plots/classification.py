"""Classification figures: confusion matrices, ROC curves, training curves and per-fold comparisons."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from numpy.typing import ArrayLike
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

DEFAULT_CLASS_NAMES: tuple[str, ...] = ("normal", "benign", "malignant")
CLASS_COLOURS: dict[str, str] = {"normal": "tab:blue", "benign": "tab:green", "malignant": "tab:red"}


def plot_confusion_matrix(
    cm: ArrayLike, class_names: Sequence[str] = DEFAULT_CLASS_NAMES, title: str | None = None
) -> Figure:
    """Confusion matrix (rows true, columns predicted) as counts and row-normalised, side by side."""
    counts = np.asarray(cm, dtype=float)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] != len(class_names):
        raise ValueError(f"cm must be square with one row per class ({len(class_names)}), got shape {counts.shape}")
    rows = counts.sum(axis=1, keepdims=True)
    # A class absent from the true labels has an empty row: NaN (blank), not a division error.
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.where(rows > 0, counts / np.where(rows > 0, rows, 1), np.nan)
    fig = Figure(figsize=(11, 4.5))
    ax_counts, ax_norm = fig.subplots(1, 2)
    ConfusionMatrixDisplay(counts.astype(int), display_labels=list(class_names)).plot(
        ax=ax_counts, cmap="Blues", values_format="d", colorbar=False
    )
    ax_counts.set_title("counts")
    ConfusionMatrixDisplay(normalised, display_labels=list(class_names)).plot(
        ax=ax_norm, cmap="Blues", values_format=".2f", colorbar=False, im_kw={"vmin": 0, "vmax": 1}
    )
    ax_norm.set_title("row-normalised (recall per true class)")
    if title:
        fig.suptitle(title)
    return fig


def plot_roc_curves(
    y_true: ArrayLike, proba: ArrayLike, class_names: Sequence[str] = DEFAULT_CLASS_NAMES, title: str | None = None
) -> Figure:
    """One-vs-rest ROC per class plus abnormal-vs-normal (score 1 - p(normal)); undefined curves skipped."""
    y = np.asarray(y_true).reshape(-1)
    p = np.asarray(proba, dtype=float)
    if p.ndim != 2 or p.shape != (len(y), len(class_names)):
        raise ValueError(f"proba must have shape ({len(y)}, {len(class_names)}), got {p.shape}")
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    curves = [(f"{name} vs rest", y == k, p[:, k], CLASS_COLOURS.get(name, f"C{k}"), "-")
              for k, name in enumerate(class_names)]
    curves.append(("abnormal vs normal", y != 0, 1.0 - p[:, 0], "black", "--"))
    skipped = []
    for name, target, score, colour, ls in curves:
        if target.all() or not target.any():
            skipped.append(name)
            continue
        RocCurveDisplay.from_predictions(target, y_score=score, name=name, ax=ax,
                                         curve_kwargs={"color": colour, "ls": ls})
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set(xlabel="false positive rate", ylabel="true positive rate",
           title=title or "ROC" + (f" (no curve: {', '.join(skipped)})" if skipped else ""))
    ax.legend(loc="lower right", fontsize="small")
    return fig


def _history_frame(history: Any) -> pd.DataFrame:
    if hasattr(history, "history"):  # keras.callbacks.History
        history = history.history
    if isinstance(history, pd.DataFrame):
        frame = history.copy()
    elif isinstance(history, Mapping):
        frame = pd.DataFrame({k: list(v) for k, v in history.items()})
    else:
        raise TypeError(
            f"history must be a Keras History, a dict of lists or a DataFrame, got {type(history).__name__}"
        )
    if frame.empty:
        raise ValueError("history is empty")
    return frame


def plot_training_curves(history: Any, title: str | None = None) -> Figure:
    """Loss and each metric per epoch, train vs validation, from a Keras History/dict or CSVLogger DataFrame."""
    frame = _history_frame(history)
    epochs = frame["epoch"].to_numpy() + 1 if "epoch" in frame else np.arange(1, len(frame) + 1)
    metrics = [c for c in frame.columns if c != "epoch" and not c.startswith("val_")]
    metrics.sort(key=lambda c: (c != "loss", c in ("lr", "learning_rate"), c))
    fig = Figure(figsize=(4.2 * len(metrics), 3.6))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, name in zip(axes, metrics):
        schedule = name in ("lr", "learning_rate")
        ax.plot(epochs, frame[name], marker=".", label=None if schedule else "train")
        if f"val_{name}" in frame:
            ax.plot(epochs, frame[f"val_{name}"], marker=".", label="validation")
        ax.set(xlabel="epoch", title=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if schedule:
            ax.set_yscale("log")
        else:
            ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def plot_heatmaps(images: Sequence[np.ndarray], heats: Sequence[np.ndarray], titles: Sequence[str],
                  ncols: int = 4) -> Figure:
    """Films with the classifier's patch abnormality heat map (`1 - p(normal)`, 0..1) overlaid."""
    n = len(images)
    nrows = max(1, int(np.ceil(n / ncols)))
    fig = Figure(figsize=(3.3 * ncols, 3.6 * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    mappable = None
    for ax, image, heat, title in zip(axes, images, heats, titles):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        mappable = ax.imshow(np.ma.masked_invalid(heat), cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.45)
        ax.set_title(title, fontsize=8)
        ax.set_axis_off()
    for ax in axes[n:]:
        ax.set_axis_off()
    if mappable is not None:
        fig.colorbar(mappable, ax=list(axes), shrink=0.6, label="abnormality 1 - p(normal)")
    return fig


def plot_paired_folds(scores: Mapping[str, Sequence[float]], title: str | None = None,
                      metric: str = "abnormal-vs-normal AUC", chance: float | None = 0.5,
                      chance_label: str = "chance") -> Figure:
    """Per-fold scores of several models on the same folds: one column per model, one line per fold."""
    names = list(scores)
    values = np.array([np.asarray(scores[n], dtype=float) for n in names])
    if values.ndim != 2 or values.shape[0] < 1:
        raise ValueError("scores must give every model the same number of folds")
    fig = Figure(figsize=(1.8 + 1.6 * len(names), 4.5))
    ax = fig.subplots()
    xs = np.arange(len(names))
    for k in range(values.shape[1]):
        ax.plot(xs, values[:, k], color="0.6", lw=1, marker="o", ms=5, label="one patient fold" if k == 0 else None)
    ax.errorbar(xs + 0.12, np.nanmean(values, axis=1), yerr=np.nanstd(values, axis=1), fmt="s", color="black",
                capsize=4, label="mean ± std")
    if chance is not None:
        ax.axhline(chance, color="tab:red", ls=":", lw=1, label=chance_label)
    ax.set_xticks(xs, [n.replace(", ", ",\n") for n in names], fontsize=8)
    ax.set_ylabel(metric)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title or f"{metric} per patient fold")
    fig.tight_layout()
    return fig


def plot_validation_vs_test(panels: Mapping[str, tuple[pd.DataFrame, pd.DataFrame, pd.Series]]) -> Figure:
    """Each candidate run's validation AUC against its test AUC, fold by fold, the run chosen per fold ringed."""
    fig = Figure(figsize=(5.2 * len(panels), 4.8))
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (where, (validation, test, choice)) in zip(axes, panels.items()):
        for i, k in enumerate(validation.index):
            colour = f"C{i}"
            ax.scatter(validation.loc[k], test.loc[k], s=22, color=colour, alpha=0.7, label=f"fold {k}")
            ax.scatter(validation.loc[k, choice[k]], test.loc[k, choice[k]], s=140, facecolors="none",
                       edgecolors=colour, linewidths=2)
        lo = float(np.nanmin([validation.min().min(), test.min().min(), 0.4]))
        ax.plot([lo, 1], [lo, 1], color="0.7", ls=":", lw=1, label="validation = test")
        ax.axhline(0.5, color="tab:red", ls=":", lw=1)
        ax.set_xlabel("validation patients: abnormal AUC")
        ax.set_ylabel("test patients: abnormal AUC")
        ax.set_title(f"{where}\n(one dot per run and fold; ringed: chosen on validation)", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig
