"""Figures that describe the mini-MIAS database: distributions and films with their lesions."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.patches import Circle
import pandas as pd
from matplotlib.figure import Figure

from mammo_tf.data import mias

SEVERITY_COLOURS = {"B": "tab:green", "M": "tab:red"}


def distributions(annotations: pd.DataFrame) -> Figure:
    """Four panels: image labels, abnormality by severity, tissue by label, lesion radius."""
    images = mias.images_table(annotations)
    lesions = annotations[annotations["abnormality"] != "NORM"]
    fig = Figure(figsize=(16, 3.6))
    axes = fig.subplots(1, 4)
    images["label"].value_counts().reindex(mias.CLASSES).plot.bar(ax=axes[0], color=["tab:blue", "tab:green", "tab:red"])
    axes[0].set_title("Films per label")
    pd.crosstab(lesions["abnormality"], lesions["severity"].map(mias.SEVERITIES)).plot.bar(
        ax=axes[1], stacked=True, color=["tab:green", "tab:red"]
    )
    axes[1].set_title("Lesion rows: class x severity")
    pd.crosstab(images["tissue"].map(mias.TISSUES), images["label"])[list(mias.CLASSES)].plot.bar(
        ax=axes[2], stacked=True, color=["tab:blue", "tab:green", "tab:red"]
    )
    axes[2].set_title("Films: tissue x label")
    located = lesions[lesions["has_location"]]
    for sev, colour in SEVERITY_COLOURS.items():
        axes[3].hist(located.loc[located["severity"] == sev, "radius"], bins=20, alpha=0.6,
                     color=colour, label=mias.SEVERITIES[sev])
    axes[3].set_title("Lesion radius (pixels, 200 µm)")
    axes[3].legend()
    for ax in axes[:3]:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def draw_lesions(ax: Axes, image: np.ndarray, lesions: pd.DataFrame, title: str = "") -> Axes:
    """Show a film with its located lesions as circles (top-left coordinates)."""
    ax.imshow(image, cmap="gray", vmin=0, vmax=255)
    for row in lesions[lesions["has_location"]].itertuples():
        ax.add_patch(Circle((row.x, row.y), row.radius, fill=False, lw=1.5,
                                color=SEVERITY_COLOURS[row.severity]))
        ax.plot(row.x, row.y, "+", color=SEVERITY_COLOURS[row.severity], ms=6)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    return ax


def film_grid(annotations: pd.DataFrame, refnums: Sequence[str],
              load: Callable[[str], np.ndarray] = mias.load_image, ncols: int = 4) -> Figure:
    """A grid of films with their lesion circles drawn where the table puts them."""
    nrows = int(np.ceil(len(refnums) / ncols))
    fig = Figure(figsize=(3.2 * ncols, 3.4 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, refnum in zip(axes.flat, refnums):
        rows = annotations[annotations["refnum"] == refnum]
        first = rows.iloc[0]
        kinds = ", ".join(f"{a} {s or ''}".strip() for a, s in zip(rows["abnormality"], rows["severity"]))
        draw_lesions(ax, load(refnum), rows, f"{refnum} ({first['label']}): {kinds}")
    for ax in list(axes.flat)[len(refnums):]:
        ax.set_axis_off()
    fig.tight_layout()
    return fig
