"""Cascade figures: the speed/accuracy trade-off, and the gate scores of normal and abnormal films."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

QUALITY = {"map": "mAP (VOC, IoU >= 0.5)", "sens_at_1fp": "lesion sensitivity at 1 FP/image"}


def plot_tradeoff(points: pd.DataFrame, metrics: Sequence[str] = ("map", "sens_at_1fp")) -> Figure:
    """Time per film against detection quality, one point per variant (and gate threshold), one panel per metric.

    ``points``: columns ``variant``, ``time_s`` and the `metrics`; optional ``detector`` (one
    colour and line per detector) and ``pass_rate`` (written beside each cascade point). A
    quality that is NaN (an untrained detector) is drawn as a tick on the time axis.
    """
    missing = {"variant", "time_s", *metrics} - set(points.columns)
    if missing:
        raise ValueError(f"points lack columns {sorted(missing)}")
    if points.empty:
        raise ValueError("no point to plot")
    frame = points.assign(detector=points["detector"] if "detector" in points else "detector")
    fig = Figure(figsize=(5.2 * len(metrics), 4.3))
    axes = np.atleast_1d(fig.subplots(1, len(metrics)))
    for ax, metric in zip(axes, metrics):
        for i, (det, group) in enumerate(frame.groupby("detector", sort=False)):
            group = group.sort_values("time_s")
            colour = f"C{i}"
            known = group[np.isfinite(group[metric].to_numpy(float))]
            ax.plot(known["time_s"], known[metric], "-", color=colour, alpha=0.4)
            # Gate thresholds that give the same point share one marker and one label.
            for _, same in group.groupby([group["time_s"].round(6), group[metric].round(6)], sort=False, dropna=False):
                r = same.iloc[0]
                value, every = float(r[metric]), "every film" in str(r["variant"])
                label = "every film" if every else "gate sens ≥ " + "/".join(_short(v) for v in same["variant"])
                if not every and "pass_rate" in same and np.isfinite(r["pass_rate"]):
                    label += f" ({r['pass_rate']:.0%} to detector)"
                if np.isfinite(value):
                    ax.plot(r["time_s"], value, "s" if every else "o", color=colour, ms=8 if every else 6,
                            mfc="white" if every else colour)
                    ax.annotate(label, (r["time_s"], value), textcoords="offset points", xytext=(5, 4), fontsize=7)
                else:
                    ax.axvline(r["time_s"], color=colour, ls=":", lw=1)
                    ax.annotate(f"{label}: quality not measured", (r["time_s"], 0.02), rotation=90, fontsize=7,
                                xytext=(3, 0), textcoords="offset points", va="bottom")
            ax.plot([], [], "s-", color=colour, mfc="white", label=str(det))
        ax.set(xlabel="time per film (s)", ylabel=QUALITY.get(metric, metric), ylim=(0, 1.02),
               title=f"{QUALITY.get(metric, metric)} vs time")
        ax.set_xlim(0, 1.3 * float(frame["time_s"].max()))
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize="small", title="square: every film; dots: cascade", title_fontsize="small")
    return fig


def plot_gate_scores(scores: Sequence[float], labels: Sequence[int], thresholds: Mapping[str, float] | None = None,
                     bins: int = 30) -> Figure:
    """Histograms of the gate's abnormality score for normal and abnormal films, with the gate thresholds marked."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} and {y.shape[0]}")
    fig = Figure(figsize=(6, 3.8))
    ax = fig.subplots()
    edges = np.linspace(min(0.0, s.min(initial=0.0)), max(1.0, s.max(initial=1.0)), bins + 1)
    for name, keep, colour in (("normal films", y == 0, "tab:blue"), ("abnormal films", y > 0, "tab:red")):
        ax.hist(s[keep], bins=edges, alpha=0.5, color=colour, label=f"{name} (n={int(keep.sum())})")
    for i, (name, t) in enumerate((thresholds or {}).items()):
        ax.axvline(t, color="k", ls=("--", ":", "-.", "-")[i % 4], lw=1, label=f"gate {name}: {t:.3f}")
    ax.set(xlabel="gate score: 1 - p(normal) of the most abnormal breast patch", ylabel="films",
           title="Gate scores (out of fold)")
    ax.legend(fontsize="small")
    return fig


def _short(variant: str) -> str:
    """'cascade, gate sens >= 0.95' -> '0.95' (the target sensitivity of one gate threshold)."""
    return str(variant).split(">=")[-1].strip()
