"""Figures comparing external sources with mini-MIAS: grey-level histograms, example films, DDSM outlines."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
