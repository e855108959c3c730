"""Lesion detection on image files (`mammo-tf detect`): a trained detector, any film, an overlay and a JSON each.

A whole-film model sees the breast resized as in training; a crops-protocol model searches the
film at its own resolution in tiles (:func:`mammo_tf.detector.detect_films`). Boxes come back in
the file's pixel coordinates. The cascade (:func:`mammo_tf.cascade.detect_cascade`) writes its
outputs through :func:`write_detections` too.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mammo_tf import patches as P
from mammo_tf.detector import CLASS_NAMES, DetectorExperiment, detect_films, load_detector
from mammo_tf.io import save_figure, save_json

CROPS_MODEL_NOTE = (
    "this model was trained on full-resolution crops (crops protocol): each film is searched at its own "
    "resolution in tiles of the model's input size (mammo_tf.tiled), so it should be at about 0.2 mm per "
    "pixel, as mini-MIAS is"
)


def detect_images(paths: Sequence[str | Path], model_dir: str | Path, out_dir: str | Path,
                  score_threshold: float = 0.5, batch_size: int = 8) -> list[dict]:
    """Detect lesions on image files (PGM/PNG/JPEG/TIFF/DICOM); per image an overlay PNG and a JSON.

    Each film is searched as :func:`mammo_tf.detector.detect_films` says (the breast resized, or full-resolution
    tiles for a crops-protocol model) and the boxes are given in the file's pixel coordinates.
    Images go through the model ``batch_size`` at a time (one image is a batch of one). A file
    that cannot be read or prepared gets an ``error`` entry and the others are still processed.
    Returns one dict per path, in order (also written to ``out_dir/results.json``).
    """
    if not 0.0 <= score_threshold < 1.0:
        raise ValueError(f"score_threshold must be in [0, 1), got {score_threshold}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model, exp, anchors = load_detector(model_dir)
    exp = dataclasses.replace(exp, score_threshold=score_threshold)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in paths]
    names = unique_names(paths)
    results: list[dict] = []
    for start in range(0, len(paths), batch_size):
        results += _detect_chunk(paths[start:start + batch_size], names[start:start + batch_size], model, exp,
                                 anchors, out)
    summary: dict[str, Any] = {"model": str(model_dir), "protocol": exp.protocol, "score_threshold": score_threshold}
    if exp.protocol == "crops":
        summary["note"] = CROPS_MODEL_NOTE
    save_json(out / "results.json", {**summary, "results": results})
    return results


def unique_names(paths: Sequence[Path]) -> list[str]:
    """Output names from the file stems, numbered when two inputs share a stem."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        n = seen.get(path.stem, 0)
        names.append(path.stem if n == 0 else f"{path.stem}_{n}")
        seen[path.stem] = n + 1
    return names


def _detect_chunk(paths: Sequence[Path], names: Sequence[str], model: Any, exp: DetectorExperiment, anchors: Any,
                  out: Path) -> list[dict]:
    """Read, prepare, detect and write one batch of files; unreadable files become error entries."""
    from mammo_tf.imageio import read_image

    entries: list[dict] = []
    ready: list[tuple[dict, np.ndarray, tuple | None]] = []  # entry, film, prepare_whole's output (whole models)
    for path, name in zip(paths, names):
        entry: dict[str, Any] = {"path": str(path), "name": name}
        entries.append(entry)
        try:
            image = read_image(path)
            # Prepared here, so that a film without a breast is its own error entry (tiles just find none).
            prepared = P.prepare_whole(image, None, size=exp.image_size) if exp.protocol == "whole" else None
        except (ValueError, OSError) as err:  # ImageReadError is a ValueError; so is an empty breast mask
            entry["error"] = f"{type(err).__name__}: {err}"
            continue
        ready.append((entry, image, prepared))
    if not ready:
        return entries
    entries_ok, images, prepared = zip(*ready)
    dets = detect_films(model, exp, anchors, images, len(ready), prepared=prepared if exp.protocol == "whole" else None)
    for entry, image, det in zip(entries_ok, images, dets):
        write_detections(entry, image, det["boxes"], det["labels"], det["scores"], exp.score_threshold, out)
    return entries


def write_detections(entry: dict, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                     score_threshold: float, out: Path, note: str = "") -> dict:
    """Fill `entry` (with "path", "name") with pixel detections; write its overlay PNG and JSON into `out`."""
    from mammo_tf.plots.detection import draw_detections

    entry.update({
        "image_shape": list(image.shape),
        "box_format": "[ymin, xmin, ymax, xmax], pixels of the input image",
        "boxes": np.round(boxes, 1).tolist(),
        "classes": np.asarray(labels).tolist(),
        "class_names": [CLASS_NAMES.get(int(c), str(c)) for c in labels],
        "scores": np.round(scores, 4).tolist(),
        "score_threshold": score_threshold,
    })
    fig = draw_detections(image, np.zeros((0, 4)), [], boxes, labels, scores,
                          title=f"{Path(entry['path']).name}: {len(boxes)} detections, score >= {score_threshold:g}{note}")
    entry["overlay"] = str(save_figure(fig, Path(out) / f"{entry['name']}.detections.png"))
    entry["json"] = str(Path(out) / f"{entry['name']}.detections.json")
    save_json(entry["json"], entry)
    return entry


def format_results(results: Sequence[dict]) -> str:
    """One line per image (for the CLI): detections or the error."""
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"{r['path']}: ERROR {r['error']}")
        else:
            best = max(r["scores"], default=float("nan"))
            lines.append(f"{r['path']}: {len(r['boxes'])} detections"
                         + ("" if math.isnan(best) else f" (best {best:.2f})") + f" -> {r['overlay']}")
    return "\n".join(lines)
