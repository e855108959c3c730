"""Figures comparing external sources with mini-MIAS: grey-level histograms, example films, DDSM outlines."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from mammo_tf import photometric
from mammo_tf.data.external import MASK_THRESHOLD
from mammo_tf.imageio import read_image


def breast_pixels(image: np.ndarray) -> np.ndarray:
    """Grey levels inside the breast (`mammo_tf.patches.breast_mask`)."""
    from mammo_tf.patches import breast_mask

    return image[breast_mask(image)]


def intensity_histograms(images: Mapping[str, Sequence[np.ndarray]], breast_only: bool = True,
                         fix_inversion: bool = True, bins: int = 64) -> Figure:
    """Grey-level distribution per source (density and cumulative), pooled over its images."""
    if not images:
        raise ValueError("no sources to plot")
    fig, (ax_pdf, ax_cdf) = plt.subplots(1, 2, figsize=(11, 3.6))
    edges = np.linspace(0, 256, bins + 1)
    for name, films in images.items():
        if len(films) == 0:
            raise ValueError(f"source {name!r} has no images")
        pooled = []
        for film in films:
            film = photometric.fix_inversion(film) if fix_inversion else np.asarray(film)
            pooled.append(breast_pixels(film) if breast_only else film.ravel())
        values = np.concatenate(pooled)
        counts, _ = np.histogram(values, bins=edges, density=True)
        ax_pdf.stairs(counts, edges, label=f"{name} ({len(films)} films)", lw=1.5)
        ax_cdf.stairs(np.cumsum(counts) * np.diff(edges), edges, label=name, lw=1.5)
    what = "breast pixels" if breast_only else "all pixels"
    ax_pdf.set(title=f"Grey levels, {what}", xlabel="grey level", ylabel="density", xlim=(0, 256))
    ax_cdf.set(title="Cumulative", xlabel="grey level", ylabel="fraction", xlim=(0, 256), ylim=(0, 1.01))
    ax_pdf.legend(fontsize=8)
    fig.tight_layout()
    return fig


def example_films(images: Mapping[str, np.ndarray], spacings: Mapping[str, float | None] | None = None,
                  target_mm: float = photometric.MIAS_SPACING_MM) -> Figure:
    """One film per source side by side after `photometric.normalise`, drawn to a common mm scale."""
    if not images:
        raise ValueError("no sources to plot")
    spacings = dict(spacings or {})
    fig, axes = plt.subplots(1, len(images), figsize=(3.6 * len(images), 4.2), squeeze=False)
    for ax, (name, film) in zip(axes[0], images.items()):
        spacing = spacings.get(name)
        inverted = photometric.is_inverted(film)
        shown = photometric.normalise(film, spacing, target_mm)
        known = spacing is not None and np.isfinite(spacing)
        # With a known spacing the axes are in mm, so films of different sources compare in size.
        mm = target_mm if known else None
        extent = (0, shown.shape[1] * mm, shown.shape[0] * mm, 0) if mm else None
        ax.imshow(shown, cmap="gray", vmin=0, vmax=255, extent=extent)
        size = f"{shown.shape[0]}x{shown.shape[1]} px @ {target_mm} mm" if known else f"{shown.shape[0]}x{shown.shape[1]} px, spacing unknown"
        ax.set_title(f"{name}\n{size}{', inverted: fixed' if inverted else ''}", fontsize=9)
        if mm:
            ax.set_xlabel("mm")
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return fig


def outline_overlays(ddsm: pd.DataFrame, n: int | None = 8, ncols: int = 4, pad: int = 40) -> Figure:
    """DDSM lesions: the chain-code outline (red) over the mask's contour (cyan), with both boxes."""
    rows = ddsm[ddsm["mask_path"].notna() & ddsm["has_location"]]
    if n is not None:
        rows = rows.head(n)
    if rows.empty:
        raise ValueError("no DDSM lesion with a mask to draw")
    nrows = int(np.ceil(len(rows) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax in axes.ravel()[len(rows):]:
        ax.set_axis_off()
    for ax, row in zip(axes.ravel(), rows.itertuples(index=False)):
        image, mask = read_image(row.path), read_image(row.mask_path) > MASK_THRESHOLD
        ys, xs = np.nonzero(mask)
        y0 = int(max(0, min(row.ymin, ys.min()) - pad))
        x0 = int(max(0, min(row.xmin, xs.min()) - pad))
        y1 = int(min(image.shape[0], max(row.ymax, ys.max() + 1) + pad))
        x1 = int(min(image.shape[1], max(row.xmax, xs.max() + 1) + pad))
        ax.imshow(image[y0:y1, x0:x1], cmap="gray", vmin=0, vmax=255, extent=(x0, x1, y1, y0))
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        for contour in contours:
            ax.plot(contour[:, 0, 0], contour[:, 0, 1], color="cyan", lw=2.5, alpha=0.7)
        ax.plot(row.outline[:, 0], row.outline[:, 1], color="red", lw=1)
        ax.add_patch(Rectangle((row.xmin, row.ymin), row.xmax - row.xmin, row.ymax - row.ymin,
                               fill=False, color="red", ls="--", lw=1))
        ax.add_patch(Rectangle((xs.min(), ys.min()), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min(),
                               fill=False, color="cyan", ls=":", lw=1))
        ax.set_title(f"{row.image_id} #{row.abnormality_no}\n{row.abnormality}, {row.label}", fontsize=8)
        ax.set_axis_off()
    fig.suptitle("DDSM outline (red, chain code) vs mask (cyan)", fontsize=10)
    fig.tight_layout()
    return fig


def format_ci(ci: Mapping | Sequence[float]) -> str:
    """A confidence interval as 'low-high' (3 decimals), or 'n/a' when undefined."""
    low, high = (ci["ci_low"], ci["ci_high"]) if isinstance(ci, Mapping) else ci
    return "n/a" if not (np.isfinite(low) and np.isfinite(high)) else f"{low:.3f}-{high:.3f}"


def roc_axes(ax: Any, curves: list[tuple[str, np.ndarray, np.ndarray, str, str]],
             points: list[tuple[str, dict, str, str]], title: str) -> None:
    """ROC curves (name, y, score, colour, line style) and operating points (name, point, colour, marker) on one axes."""
    from sklearn.metrics import RocCurveDisplay

    for name, y, score, colour, ls in curves:
        if len(np.unique(y)) < 2:
            ax.plot([], [], color=colour, ls=ls, label=f"{name}: undefined (one class)")
            continue
        RocCurveDisplay.from_predictions(y, score, name=name, ax=ax, curve_kwargs={"color": colour, "ls": ls},
                                         plot_chance_level=False)
    for name, pt, colour, marker in points:
        if np.isfinite(pt["sensitivity"]) and np.isfinite(pt["specificity"]):
            ax.plot(1 - pt["specificity"], pt["sensitivity"], marker, color=colour, ms=8, mec="black",
                    label=f"{name}: sens {pt['sensitivity']:.2f}, spec {pt['specificity']:.2f}")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="chance (AUC 0.5)")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    ax.legend(loc="lower right", fontsize=7)


def roc_figure(scored: pd.DataFrame, y: np.ndarray, res: dict, task: str, source: str) -> Figure:
    """ROC on all images (AUC and patient-bootstrap CI in the legend) and on half B with both operating points."""
    fig = Figure(figsize=(11, 5))
    left, right = fig.subplots(1, 2)
    a, p, adapt = res["abnormal_score"]["auc"], res["p_malignant"]["auc"], res["adaptation"]
    roc_axes(left, [
        (f"CNN abnormal score (CI {format_ci(a)})", y, scored["abnormal_score"].to_numpy(), "black", "-"),
        (f"CNN p(malignant) (CI {format_ci(p)})", y, scored["p_malignant"].to_numpy(), "tab:red", "--"),
    ], [("mini-MIAS threshold", res["abnormal_score"]["at_mias_threshold"], "tab:blue", "o")],
        f"{source}, all images ({task})")
    b = (scored["half"] == "B").to_numpy()
    curves = [(f"CNN abnormal score (CI {format_ci(adapt['cnn_auc_B'])})", y[b], scored["abnormal_score"].to_numpy()[b],
               "black", "-")]
    if "logistic_score" in scored and scored.loc[b, "logistic_score"].notna().all() and b.any():
        curves.append((f"logistic, intensity (CI {format_ci(adapt['logistic']['auc_B'])})", y[b],
                       scored.loc[b, "logistic_score"].to_numpy(), "tab:green", "-."))
    roc_axes(right, curves, [("mini-MIAS threshold", adapt["cnn_mias_threshold_B"], "tab:blue", "o"),
                              ("recalibrated on half A", adapt["cnn_recalibrated_B"], "tab:orange", "s")],
              f"{source}, half B (patients not used for recalibration)")
    fig.tight_layout()
    return fig


def score_histograms(scored: pd.DataFrame, mias_films: pd.DataFrame, op: dict, res: dict, source: str) -> Figure:
    """Abnormal-score distributions per class: mini-MIAS out-of-fold films beside the external images, thresholds marked."""
    fig = Figure(figsize=(11, 3.8))
    axes = fig.subplots(1, 2, sharex=True)
    bins = np.linspace(0, 1, 41)
    colours = {0: "tab:blue", 1: "tab:green", 2: "tab:red"}
    mias_names = {0: "normal", 1: "benign", 2: "malignant"}
    for k, name in mias_names.items():
        s = mias_films.loc[mias_films["label_id"] == k, "abnormal_score"]
        if len(s):
            axes[0].hist(s, bins=bins, density=True, histtype="step", lw=1.5, color=colours[k], label=f"{name} ({len(s)})")
    for label, group in scored.groupby("label", sort=False):
        k = int(group["label_id"].iloc[0])
        axes[1].hist(group["abnormal_score"], bins=bins, density=True, histtype="step", lw=1.5,
                     color=colours[k], label=f"{label} ({len(group)})")
    thr_a = res["adaptation"]["threshold_recalibrated_on_A"]
    for ax in axes:
        ax.axvline(op["threshold"], color="black", ls="--", lw=1, label=f"mini-MIAS threshold {op['threshold']:.3f}")
        ax.set(xlabel="abnormal score (1 - p(normal) of the most abnormal patch)", ylabel="density")
    if np.isfinite(thr_a):
        axes[1].axvline(thr_a, color="tab:orange", ls="-.", lw=1, label=f"recalibrated on half A {thr_a:.3f}")
    axes[0].set_title("mini-MIAS (out-of-fold)")
    axes[1].set_title(source)
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
