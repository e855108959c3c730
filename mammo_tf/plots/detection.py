"""Detection figures: PR curves, per-class AP bars, FROC curves and boxes drawn on a film."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from numpy.typing import ArrayLike

# Built on matplotlib.figure.Figure (no pyplot): no global figure registry to leak in loops,
# and no backend needed to render to PNG.

CLASS_COLOURS: dict[str, str] = {"benign": "tab:green", "malignant": "tab:red"}
DEFAULT_LABEL_NAMES: dict[int, str] = {1: "benign", 2: "malignant"}


def _colour(name: str, index: int) -> str:
    return CLASS_COLOURS.get(name, f"C{index}")


def _fmt(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def plot_pr_curves(result: Mapping[str, Any], method: str = "all_point", separate: bool = False) -> Figure:
    """Precision-recall curve per class from `evaluate_detections` (raw curve and its envelope), AP in legend."""
    classes = result["classes"]
    n = max(len(classes), 1)
    fig = Figure(figsize=(5 * n, 4.5) if separate else (5.5, 4.5))
    axes = fig.subplots(1, n, squeeze=False)[0] if separate else [fig.subplots()] * n
    for i, (name, entry) in enumerate(classes.items()):
        ax = axes[i]
        colour = _colour(name, i)
        label = f"{name} (AP={_fmt(entry[f'ap_{method}'])}, n_gt={entry['n_gt']}, n_det={entry['n_det']})"
        rec = np.asarray(entry["recall"], dtype=float)
        prec = np.asarray(entry["precision"], dtype=float)
        if entry["n_gt"] == 0 or not len(rec):
            ax.plot([], [], color=colour, label=label + (" - no ground truth" if entry["n_gt"] == 0 else ""))
        else:
            envelope = np.maximum.accumulate(prec[::-1])[::-1]
            ax.plot(np.r_[0.0, rec], np.r_[prec[0], prec], color=colour, alpha=0.5, lw=1)
            ax.plot(np.r_[0.0, rec], np.r_[envelope[0], envelope], color=colour, lw=2,
                    drawstyle="steps-pre", label=label)
    for ax in axes[: n if separate else 1]:
        ax.set(xlim=(0, 1.0), ylim=(0, 1.05), xlabel="recall", ylabel="precision")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize="small")
    fig.suptitle(f"Precision-recall at IoU >= {result['iou_threshold']:g} ({method.replace('_', '-')} AP)")
    return fig


def plot_ap_bars(
    result: Mapping[str, Any],
    method: str = "all_point",
    reference: Mapping[str, float] | None = None,
    reference_label: str = "reference",
) -> Figure:
    """Per-class AP and mAP as bars, optionally beside a hatched grey reference set (e.g. published numbers)."""
    names = list(result["classes"]) + ["mAP"]
    ours = [result["classes"][c][f"ap_{method}"] for c in result["classes"]] + [result[f"map_{method}"]]
    fig = Figure(figsize=(1.6 * len(names) + 2, 4))
    ax = fig.subplots()
    x = np.arange(len(names))
    width = 0.38 if reference else 0.6
    offset = width / 2 if reference else 0.0
    colours = [_colour(n, i) for i, n in enumerate(names[:-1])] + ["tab:blue"]
    bars = ax.bar(x - offset, np.nan_to_num(ours), width, color=colours, label="this model")
    for bar, value in zip(bars, ours):
        ax.annotate(_fmt(value), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize="small")
    if reference:
        unknown = set(reference) - set(names)
        if unknown:
            raise ValueError(f"reference has names {sorted(unknown)} not among {names}")
        ref = [reference.get(n, float("nan")) for n in names]
        ref_bars = ax.bar(x + offset, np.nan_to_num(ref), width, color="lightgrey", edgecolor="black", hatch="//",
                          label=reference_label)
        for bar, value in zip(ref_bars, ref):
            ax.annotate(_fmt(value), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize="small")
    ax.set_xticks(x, names)
    ax.set(ylim=(0, 1.1), ylabel=f"AP ({method.replace('_', '-')})",
           title=f"Average precision at IoU >= {result['iou_threshold']:g}")
    ax.legend(loc="upper right", fontsize="small")
    return fig


def plot_froc(
    curves: Mapping[str, Any],
    fp_range: tuple[float, float] = (0.125, 8.0),
    log_x: bool = True,
    ax: Axes | None = None,
) -> Figure:
    """FROC curve(s) from `froc` (one result, or a mapping label -> result), grid points marked."""
    if "fps" in curves:
        curves = {"model": curves}
    if ax is None:
        fig = Figure(figsize=(5.5, 4.5))
        ax = fig.subplots()
    else:
        fig = ax.figure
    for i, (label, res) in enumerate(curves.items()):
        colour = f"C{i}"
        hit = "centre in lesion" if res["criterion"] == "centre" else f"IoU >= {res['iou_threshold']:g}"
        ax.plot(res["fps"], res["sensitivity"], drawstyle="steps-post", color=colour,
                label=f"{label} [{hit}] (mean sens.={_fmt(res['mean_sensitivity'])}, {res['n_lesions']} lesions)")
        # Beyond its last operating point the curve cannot go further: show the plateau dotted.
        last_fp, last_sens = res["fps"][-1], res["sensitivity"][-1]
        if last_fp < fp_range[1]:
            ax.plot([last_fp, fp_range[1]], [last_sens, last_sens], ls=":", color=colour)
        ax.plot(res["grid_fps"], res["grid_sensitivity"], "o", color=colour, ms=4)
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set(xlim=fp_range, ylim=(0, 1.02), xlabel="mean false positives per image", ylabel="lesion sensitivity",
           title="FROC")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize="small")
    return fig


def draw_detections(
    image: ArrayLike,
    gt_boxes: ArrayLike,
    gt_labels: ArrayLike,
    det_boxes: ArrayLike,
    det_labels: ArrayLike,
    det_scores: ArrayLike,
    ax: Axes | None = None,
    label_names: Mapping[int, str] = DEFAULT_LABEL_NAMES,
    score_threshold: float = 0.0,
    title: str | None = None,
) -> Figure:
    """A film with ground truth (dashed, thick) and detections (solid, 'class score' text); boxes in pixels."""
    img = np.asarray(image)
    if img.ndim not in (2, 3):
        raise ValueError(f"image must be (H, W) or (H, W, C), got shape {img.shape}")
    gt = np.asarray(gt_boxes, dtype=float).reshape(-1, 4)
    det = np.asarray(det_boxes, dtype=float).reshape(-1, 4)
    gl, dl, ds = (np.asarray(v).reshape(-1) for v in (gt_labels, det_labels, det_scores))
    if len(gl) != len(gt) or len(dl) != len(det) or len(ds) != len(det):
        raise ValueError("draw_detections: one label per box and one score per detection are required")
    if ax is None:
        fig = Figure(figsize=(6, 6))
        ax = fig.subplots()
    else:
        fig = ax.figure
    # 8-bit grey levels as they are, so panels of different crops can be compared by eye
    grey = {"vmin": 0, "vmax": 255} if img.dtype == np.uint8 and img.ndim == 2 else {}
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, **grey)

    def colour(label: int) -> str:
        return CLASS_COLOURS.get(label_names.get(int(label), ""), "yellow")

    for box, label in zip(gt, gl):
        y0, x0, y1, x1 = box
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ls="--", lw=2.5, ec=colour(label)))
        ax.text(x0, y1, f"GT {label_names.get(int(label), label)}", color=colour(label), va="top", fontsize="x-small",
                bbox={"facecolor": "black", "alpha": 0.7, "pad": 1, "lw": 0})
    for box, label, score in sorted(zip(det, dl, ds), key=lambda t: t[2]):
        if score < score_threshold:
            continue
        y0, x0, y1, x1 = box
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ls="-", lw=1.2, ec=colour(label)))
        ax.text(x0, y0, f"{label_names.get(int(label), label)} {score:.2f}", color="white", va="bottom",
                fontsize="x-small", bbox={"facecolor": colour(label), "alpha": 0.6, "pad": 1, "lw": 0})
    ax.set_axis_off()
    ax.set_title(title or "ground truth: dashed; detections: solid")
    return fig


def draw_detection_grid(panels: Sequence[Mapping[str, Any]], ncols: int = 3) -> Figure:
    """Several `draw_detections` panels (each a dict of its keyword arguments) in one figure."""
    if not panels:
        raise ValueError("draw_detection_grid needs at least one panel")
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4 * ncols, 4 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        draw_detections(ax=ax, **panel)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    return fig


def draw_tiled_search(image: ArrayLike, origins: ArrayLike, size: int, gt_boxes: ArrayLike, gt_labels: ArrayLike,
                      detections: Mapping[str, ArrayLike], top: int = 3) -> Figure:
    """A film with the tiles searched (thin, cyan), its lesions and the ``top`` highest-scoring detections."""
    det = {k: np.asarray(v)[:top] for k, v in detections.items()}  # detections come sorted by score
    fig = draw_detections(image, gt_boxes, gt_labels, det["boxes"], det["labels"], det["scores"],
                          title=f"{len(np.asarray(origins))} tiles of {size} px; the best {top} detections")
    ax = fig.axes[0]
    for t, l in np.asarray(origins).reshape(-1, 2):
        ax.add_patch(Rectangle((l, t), size, size, fill=False, lw=0.6, ec="cyan", alpha=0.6))
    return fig


def plot_default_boxes(image: np.ndarray, anchor_cfg: Any, gt_boxes: np.ndarray | None = None,
                       gt_labels: np.ndarray | None = None, match_iou: float = 0.5) -> Figure:
    """Left: the default boxes of one location per feature map. Right: the boxes matched to the ground truth."""
    from mammo_tf import anchors as anc
    from mammo_tf import boxes as bx

    size = image.shape[0]
    defaults = anc.default_boxes(anchor_cfg)
    corners = bx.centre_to_corners(defaults).numpy() * size
    fig = Figure(figsize=(12, 6))
    ax_boxes, ax_match = fig.subplots(1, 2)
    for ax in (ax_boxes, ax_match):
        ax.imshow(image, cmap="gray")
        ax.set_axis_off()
    start = 0
    k_per_map = anchor_cfg.boxes_per_location
    for m, (fh, fw) in enumerate(anchor_cfg.feature_map_sizes):
        k = k_per_map[m]
        centre_cell = ((fh // 2) * fw + fw // 2) * k  # the location nearest the image centre
        colour = _colour(f"map{m}", m)
        for j in range(k):
            y0, x0, y1, x1 = corners[start + centre_cell + j]
            ax_boxes.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1, color=colour,
                                         label=f"{fh}x{fw} map" if j == 0 else None))
        start += fh * fw * k
    ax_boxes.legend(fontsize=7, loc="lower right")
    ax_boxes.set_title("default boxes at the centre location of each map", fontsize=9)
    if gt_boxes is not None and len(gt_boxes):
        labels = np.ones(len(gt_boxes), np.int32) if gt_labels is None else np.asarray(gt_labels, np.int32)
        _, cls = bx.match(np.asarray(gt_boxes, np.float32) / size, labels, defaults, match_iou)
        positive = np.flatnonzero(cls.numpy() > 0)
        for i in positive:
            y0, x0, y1, x1 = corners[i]
            ax_match.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=0.8, color="yellow"))
        for y0, x0, y1, x1 in np.asarray(gt_boxes):
            ax_match.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=2, color="red", ls="--"))
        ax_match.set_title(f"{len(positive)} default boxes matched (IoU >= {match_iou} or best) to the lesion",
                           fontsize=9)
    return fig


def _lesion_group_panels(table: Mapping[str, Mapping[str, Mapping[str, Any]]], draw: Any, ylabel: str,
                         title: str, width: float, top: float) -> Figure:
    """One panel per lesion grouping, its values along x; ``draw(ax, cells, labels, xs)`` puts the bars in."""
    fig = Figure(figsize=(width * len(table), 4.7))
    axes = np.atleast_1d(fig.subplots(1, len(table), sharey=True))
    for ax, (group, cells) in zip(axes, table.items()):
        labels = list(cells)
        xs = np.arange(len(labels))
        draw(ax, cells, labels, xs)
        ax.set_xticks(xs, [v.replace(" (", "\n(") for v in labels], fontsize=7, rotation=45, ha="right")
        ax.set_title(group)
        ax.set_ylim(0, top)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel(ylabel)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_lesions_found(table: Mapping[str, Mapping[str, Mapping[str, Any]]], title: str = "") -> Figure:
    """Share of lesions found at 1 FP per image, model against random boxes, one panel per lesion grouping."""
    def draw(ax: Any, cells: Mapping[str, Mapping[str, Any]], names: list[str], xs: np.ndarray) -> None:
        sens = np.array([cells[n]["sensitivity"] for n in names])
        low, high = (np.array([cells[n]["ci"][i] for n in names]) for i in (0, 1))
        ax.bar(xs - 0.2, sens, 0.4, color="C0", label="SSD (Wilson 95 % CI)",
               yerr=[sens - low, high - sens], capsize=3, error_kw={"lw": 1})
        ax.bar(xs + 0.2, [cells[n]["sensitivity_random"] for n in names], 0.4, color="0.7", label="random boxes")
        for x, n, top in zip(xs, names, high):
            ax.text(x - 0.2, top + 0.02, f"{cells[n]['found']}/{cells[n]['n']}", ha="center", va="bottom", fontsize=7)

    return _lesion_group_panels(
        table, draw, "lesions found at 1 false positive per image",
        f"{title}: which lesions are found (test folds pooled)" if title else "Which lesions are found", 4.2, 1.0)


def plot_paired_lesions(table: Mapping[str, Mapping[str, Mapping[str, Any]]], names: Sequence[str],
                        found: str = "found") -> Figure:
    """Share of the same lesions two detectors find (``found``: what counts, e.g. "boxed at IoU >= 0.5"), per lesion
    grouping, with the sign test's p above each pair."""
    def draw(ax: Any, cells: Mapping[str, Mapping[str, Any]], labels: list[str], xs: np.ndarray) -> None:
        for shift, key, color, name in ((-0.2, "found_a", "C0", names[0]), (0.2, "found_b", "C1", names[1])):
            ax.bar(xs + shift, [cells[v][key] / cells[v]["n"] for v in labels], 0.4, color=color, label=name)
        for x, v in zip(xs, labels):
            c = cells[v]
            top = max(c["found_a"], c["found_b"]) / c["n"]
            q = f" q={c['q']:.2g}" if "q" in c else ""
            ax.text(x, top + 0.02, f"p={c['p']:.2g}{q}\n{c['a_more']}/{c['b_more']}", ha="center", va="bottom",
                    fontsize=6)

    return _lesion_group_panels(
        table, draw, f"share of the same lesions {found} at 1 FP per image",
        "Same test lesions, two detectors (p: exact sign test over lesions, q: Benjamini-Hochberg over the groups; "
        f"{found} more often by: first/second)",
        3.6, 1.15)


def plot_snapshot_selection(selection: Mapping[int, Mapping[str, Any]]) -> Figure:
    """Validation and test mAP at each kept epoch, one panel per fold, the epoch chosen on validation marked."""
    fig = Figure(figsize=(3.6 * len(selection), 3.2))
    axes = np.atleast_1d(fig.subplots(1, len(selection), sharey=True))
    for ax, (fold, sel) in zip(axes, sorted(selection.items())):
        epochs = [r["epoch"] for r in sel["snapshots"]]
        ax.plot(epochs, [r["val_mAP"] for r in sel["snapshots"]], "o-", ms=3, label="validation patients (selects)")
        ax.plot(epochs, [r["test_mAP"] for r in sel["snapshots"]], "s--", ms=3, label="test patients (shown only)")
        ax.axvline(sel["epoch"], color="0.5", ls=":", label=f"kept: epoch {sel['epoch']}")
        ax.set(title=f"fold {fold}", xlabel="epoch")
        ax.legend(fontsize=6)
    axes[0].set_ylabel("mAP")
    fig.suptitle("Epoch kept by validation mAP", fontsize=9)
    fig.tight_layout()
    return fig


def plot_contrast_curve(points: Any, summary: Any, real: Mapping[str, Any] | None = None) -> Figure:
    """Sensitivity at 1 FP/image against planted contrast (folds as dots, each draw's mean ± std, the mean of the draws
    and random boxes from ``summary``), real lesions beside (their fold mean at their median contrast, and pooled within
    bins of their contrast where `real` has them)."""
    fig = Figure(figsize=(7.0, 5.6), layout="constrained")
    ax = fig.subplots()
    seeds = sorted(points["seed"].unique())
    width = 1.5  # grey levels between draws of one contrast, so their bars do not hide each other
    for i, seed in enumerate(seeds):
        draw = points[points["seed"] == seed]
        x = draw["contrast"] + (i - (len(seeds) - 1) / 2) * width
        ax.plot(x, draw["sensitivity"], ".", color=f"C{i}", alpha=0.35, ms=5)
        stats = draw.assign(x=x).groupby("contrast").agg(x=("x", "first"), mean=("sensitivity", "mean"),
                                                         std=("sensitivity", "std"))
        ax.errorbar(stats["x"], stats["mean"], yerr=stats["std"], fmt="o", color=f"C{i}", capsize=3,
                    label=f"planted, draw of seed {seed} (folds, mean ± std)")
    ax.plot(summary["contrast"], summary["mean"], "k--", lw=1, label="planted, mean of the draws")
    ax.plot(summary["contrast"], summary["random"], ":", color="0.5", label="random boxes")
    if real is not None:
        q, sens = real["contrast"], np.asarray(real["fold_sensitivity"], float)
        ax.plot(np.full(len(sens), q["median"]), sens, ".", color="C3", alpha=0.35, ms=5)
        ax.errorbar([q["median"]], [sens.mean()], yerr=[sens.std(ddof=1)],
                    xerr=[[q["median"] - q["q25"]], [q["q75"] - q["median"]]], fmt="s", color="C3", capsize=3,
                    label=f"real lesions, same recipe ({real['found']}/{real['n']}; contrast median, quartiles)")
        bins = real.get("by_contrast", {}).get("bins", [])
        if bins:
            sens = np.array([b["sensitivity"] for b in bins])
            ci = np.array([b["ci"] for b in bins])
            ax.errorbar([b["median"] for b in bins], sens, yerr=[sens - ci[:, 0], ci[:, 1] - sens], fmt="s--",
                        mfc="white", color="C3", capsize=2, lw=0.8,
                        label="real lesions in quartiles of their contrast (pooled, Wilson 95 %)")
    ax.set(xlabel="lesion contrast (grey levels: centre mean minus surrounding breast)",
           ylabel="lesions found at 1 false positive per image", ylim=(0, 1.02),
           xlim=(0, max([points["contrast"].max()] + ([real["contrast"]["q75"]] if real else [])
                        + [b["median"] for b in (real or {}).get("by_contrast", {}).get("bins", [])]) + 8),
           title="Whole-film SSD: how subtle may a lesion be?")
    ax.set_xticks(sorted(set(points["contrast"])), [f"{c:g}" for c in sorted(set(points["contrast"]))])
    ax.grid(alpha=0.3)
    fig.legend(fontsize="small", loc="outside lower center", ncol=2)
    return fig


def plot_found_by_contrast(runs: Mapping[str, Mapping[str, Any]], planted: Any = None,
                           planted_label: str = "planted masses (mean of the draws)") -> Figure:
    """Real lesions found at 1 FP/image per contrast quartile, one line per detector run (`lesions_by_contrast`),
    Wilson 95 % intervals, with the planted masses' mean over draws (a Series: contrast -> sensitivity) beside."""
    fig = Figure(figsize=(7.0, 5.0), layout="constrained")
    ax = fig.subplots()
    for i, (name, result) in enumerate(runs.items()):
        bins = [b for b in result["bins"] if b["n"]]
        x = np.array([b["median"] for b in bins]) + (i - (len(runs) - 1) / 2) * 0.8
        sens = np.array([b["sensitivity"] for b in bins])
        ci = np.array([b["ci"] for b in bins]).reshape(-1, 2)
        found = sum(b["found"] for b in bins)
        ax.errorbar(x, sens, yerr=[sens - ci[:, 0], ci[:, 1] - sens], fmt="o-", color=f"C{i}", capsize=3, lw=1,
                    label=f"{name} ({found}/{sum(b['n'] for b in bins)})")
    if planted is not None and len(planted):
        ax.plot(planted.index, planted.to_numpy(), "k--", lw=1, label=planted_label)
    ax.set(xlabel="lesion contrast (grey levels; each quartile of the real lesions at its median)",
           ylabel="lesions found at 1 false positive per image", ylim=(0, 1.02),
           title="Real lesions found, by their contrast")
    ax.grid(alpha=0.3)
    fig.legend(fontsize="small", loc="outside lower center", ncol=1)
    return fig
