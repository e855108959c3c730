"""Whole films searched at full resolution: a crops-trained SSD slid over the breast in tiles.

The whole-film protocol resizes the breast to the detector's input (1024 px films to 300 px), so
small lesions shrink to a few pixels. A detector trained on full-resolution crops can instead look
at every tile of the film that holds some breast, and its tiles' detections are merged by
per-class NMS in film pixels. No location is given: every test film is searched all over, so the
result sits in the whole-film table beside the resized-film detectors, on the same patient folds
(the crops run's fold k model scores the whole-film fold k, whose patients it never saw).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

TILED_NOTE = "whole films, no prior location: the breast searched in full-resolution tiles, normal films included"


@dataclass(frozen=True)
class TileConfig:
    """Where the tiles go: the detector's input side, every ``stride`` film pixels over the breast."""

    stride: int | None = None  # film pixels between tile origins; None: two thirds of the tile side (200 for 300)
    min_breast: float = 0.05   # a tile is searched when at least this share of it is breast

    def __post_init__(self) -> None:
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if not 0.0 <= self.min_breast <= 1.0:
            raise ValueError(f"min_breast must be in [0, 1], got {self.min_breast}")

    def stride_for(self, size: int) -> int:
        """The stride for tiles of side ``size``: overlapping, so that a lesion cut by one tile's edge is whole in the next."""
        return self.stride if self.stride is not None else max(1, round(2 * size / 3))


def _starts(lo: int, hi: int, size: int, stride: int, limit: int) -> np.ndarray:
    """Tile origins along one axis covering [lo, hi), the last flush with hi, all inside [0, limit - size]."""
    last = min(max(hi - size, lo), limit - size)
    first = min(lo, last)
    return np.unique(np.append(np.arange(first, last, stride), last))


def tile_origins(mask: np.ndarray, size: int, stride: int, min_breast: float = 0.05) -> np.ndarray:
    """(n, 2) ``[top, left]`` of ``size`` squares every ``stride`` px over the mask's bounding box, enough of each breast."""
    mask = np.asarray(mask, bool)
    h, w = mask.shape
    if size > min(h, w):
        raise ValueError(f"tile size {size} exceeds the {h}x{w} image")
    if not 1 <= stride <= size:
        raise ValueError(f"stride must be in 1..{size} (the tile size), or the tiles leave gaps; got {stride}")
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return np.zeros((0, 2), np.int64)
    tops = _starts(int(rows[0]), int(rows[-1]) + 1, size, stride, h)
    lefts = _starts(int(cols[0]), int(cols[-1]) + 1, size, stride, w)
    grid = np.array([(t, l) for t in tops for l in lefts], np.int64)
    # Integral image: each tile's breast share in O(1).
    ii = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    t, l = grid[:, 0], grid[:, 1]
    area = ii[t + size, l + size] - ii[t, l + size] - ii[t + size, l] + ii[t, l]
    return grid[area >= min_breast * size * size]


def merge_tiles(tile_detections: list[dict], origins: np.ndarray, size: int, nms_iou: float,
                max_total: int) -> dict:
    """One film's detections in film pixels: tile boxes moved to their origins, per-class NMS, the best ``max_total``."""
    from mammo_tf.boxes import suppress_across_classes

    boxes, labels, scores = np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0)
    if tile_detections:
        origins = np.asarray(origins, np.float64).reshape(-1, 2)
        boxes = np.concatenate([np.asarray(d["boxes"], np.float64).reshape(-1, 4) * size + np.tile(o, 2)
                                for d, o in zip(tile_detections, origins)])
        labels = np.concatenate([np.asarray(d["labels"], np.int64) for d in tile_detections])
        scores = np.concatenate([np.asarray(d["scores"], np.float64) for d in tile_detections])
    # A lesion seen by overlapping tiles is one detection per class, as within a tile.
    keep = [np.flatnonzero(labels == c)[suppress_across_classes(boxes[labels == c], scores[labels == c], nms_iou)]
            for c in np.unique(labels)]
    keep = np.concatenate(keep) if keep else np.zeros(0, np.int64)
    keep = keep[np.argsort(-scores[keep], kind="stable")][:max_total]
    return {"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]}


def tile_predictions(model: Any, exp: Any, anchor_cfg: Any, image: np.ndarray, mask: np.ndarray, cfg: TileConfig,
                     batch_size: int = 16) -> tuple[list[dict], np.ndarray]:
    """(each tile's detections, boxes normalised to the tile; ``[top, left]`` of each tile) over a film's breast."""
    from mammo_tf import detector as D

    size = int(exp.image_size)
    origins = tile_origins(mask, size, cfg.stride_for(size), cfg.min_breast)
    tiles = [image[t:t + size, l:l + size] for t, l in origins]
    channels = exp.ssd_config().input_channels
    batches = (D.model_input(tiles[i:i + batch_size], channels) for i in range(0, len(tiles), batch_size))
    return D.predict_batches(model, batches, anchor_cfg, exp), origins


def detect_film(model: Any, exp: Any, anchor_cfg: Any, image: np.ndarray, mask: np.ndarray, cfg: TileConfig,
                batch_size: int = 16) -> tuple[dict, np.ndarray]:
    """(detections in film pixels, ``[top, left]`` of each tile searched) of a crops-trained detector over a film's breast."""
    dets, origins = tile_predictions(model, exp, anchor_cfg, image, mask, cfg, batch_size)
    return merge_tiles(dets, origins, int(exp.image_size), exp.nms_iou_threshold, exp.max_total), origins


def tiled_detections(crops_dir: str | Path, samples: Any, cfg: TileConfig,
                     films: Any) -> tuple[Callable[[Any], dict], dict[int, dict]]:
    """``fold -> {"test", "train": detections}`` (boxes normalised on the prepared films) and each fold's tile counts."""
    import keras

    from mammo_tf import detector as D

    info: dict[int, dict] = {}

    def detections(fold: Any) -> dict[str, list[dict]]:
        fold_dir = Path(crops_dir) / "folds" / f"fold{fold.index}"
        model, crops_exp, anchors = D.load_detector(fold_dir)
        D.check_unseen(fold_dir, fold)
        t0, n_tiles, out = time.perf_counter(), {}, {}
        bar = keras.utils.Progbar(len(fold.test) + len(fold.train), unit_name="film")
        for split, records in (("test", fold.test), ("train", fold.train)):
            found = []
            for refnum in records["refnum"]:
                det, origins = detect_film(model, crops_exp, anchors, films.image(refnum), films.mask(refnum), cfg)
                n_tiles[split] = n_tiles.get(split, 0) + len(origins)
                transform = samples.transforms[refnum]
                found.append({**det, "boxes": transform.to_prepared(det["boxes"]) / transform.size})
                bar.add(1)
            out[split] = found
        info[fold.index] = {"seconds": time.perf_counter() - t0, "detector": Path(crops_dir).as_posix(),
                            "tiles_per_test_film": n_tiles["test"] / len(fold.test),
                            "tiles_per_train_film": n_tiles["train"] / len(fold.train)}
        return out

    return detections, info


def run_name(crops_name: str) -> str:
    """The folder (and experiment name) of the tiled search with crops detector ``crops_name``."""
    return f"tiled_{crops_name}"


def run(crops_dir: str | Path, out_dir: str | Path, cfg: TileConfig = TileConfig(), command: str | None = None,
        annotations: Any = None) -> dict:
    """Score a crops-protocol detector run's fold models on whole films, tile by tile, into ``out_dir``."""
    from mammo_tf import detector as D
    from mammo_tf import patches as P
    from mammo_tf.config import ConfigError, from_dict
    from mammo_tf.data import mias
    from mammo_tf.io import load_json, save_json

    crops_dir, out = Path(crops_dir), Path(out_dir)
    prov = load_json(crops_dir / "metrics.json").get("provenance", {}) if (crops_dir / "metrics.json").is_file() else {}
    crops_exp = from_dict(D.DetectorExperiment, load_json(crops_dir / D.CONFIG_FILE)["experiment"])
    if crops_exp.protocol != "crops" or crops_exp.naive_split:
        raise ConfigError(f"{crops_dir}: tiles need a detector trained on patient-split crops "
                          f"(protocol {crops_exp.protocol!r}, naive_split {crops_exp.naive_split})")
    # The same patient folds and whole-film test samples as every whole-film detector.
    exp = dataclasses.replace(crops_exp, name=run_name(crops_exp.name), protocol="whole", max_shift=0,
                              init_from=None, hard_negative_tiles=0)  # how the crops model trained: crops_dir's config
    ann = annotations if annotations is not None else mias.load_annotations(exp.data)
    samples = D.make_samples(exp, ann)
    films = P.FilmCache(load_image=P.film_loader(exp.data))
    detections, info = tiled_detections(crops_dir, samples, cfg, films)
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / D.CONFIG_FILE, {"experiment": exp.to_dict(), "tiles": asdict(cfg), "detector": crops_dir.as_posix()})
    row = (f"SSD{crops_exp.image_size} {crops_exp.ssd_config().backbone} trained on crops ({crops_exp.name}), "
           f"{crops_exp.image_size} px tiles every {cfg.stride_for(crops_exp.image_size)} px at full resolution")
    return D.evaluate_experiment(exp, out, command=command, samples=samples, annotations=ann, detections=detections,
                                 training_info=info, trained_by=prov.get("trained_by", prov) or None, row_name=row,
                                 figure_label="tiled SSD", protocol_note=TILED_NOTE)
