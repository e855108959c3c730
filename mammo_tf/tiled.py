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
from typing import Any, Callable, Sequence

import numpy as np

MAX_SCALE = 4.0  # a film enlarged further holds more tiles than a search can afford (16x at 4)
TILED_NOTE = "whole films, no prior location: the breast searched in full-resolution tiles, normal films included"


@dataclass(frozen=True)
class TileConfig:
    """Where the tiles go (the detector's input side, every ``stride`` pixels over the breast, at each film scale)
    and how their boxes merge (voting, partner models)."""

    stride: int | None = None  # pixels between tile origins (of the film at each scale); None: two thirds of the tile (200 for 300)
    min_breast: float = 0.05   # a tile is searched when at least this share of it is breast
    # The film sizes searched (an image pyramid): at 0.5 a tile covers twice the film's width, so that a
    # lesion larger than a full-resolution tile fits one, at the size the detector was trained to box; at 2 a
    # tile covers half of it, so that a small lesion (a calcification cluster) is boxed twice as large.
    scales: tuple[float, ...] = (1.0,)
    # Test-time augmentation: the mirrored film searched too, its boxes mirrored back before the merge.
    hflip: bool = False
    # Box voting (Gidaris & Komodakis, 2015): each box kept by the merge's NMS takes the score-weighted mean
    # corners of the same-class boxes overlapping it by IoU >= this; None: the kept box as it is.
    vote_iou: float | None = None
    # An ensemble: other crops runs (folders beside the main one) whose fold models search the same tiles, their
    # boxes pooled with the main model's before the merge (and the vote), so that their errors can average out.
    partners: tuple[str, ...] = ()
    # With partners and voting, as in weighted boxes fusion (Solovyev et al., 2021): each kept box's score scaled by
    # the share of the models with a same-class box overlapping it by vote_iou, so that one model's false
    # positives rank below what the models agree on.
    agreement: bool = False

    def __post_init__(self) -> None:
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if not 0.0 <= self.min_breast <= 1.0:
            raise ValueError(f"min_breast must be in [0, 1], got {self.min_breast}")
        object.__setattr__(self, "scales", tuple(float(x) for x in self.scales))
        if (not self.scales or len(set(self.scales)) != len(self.scales)
                or not all(0 < x <= MAX_SCALE for x in self.scales)):
            raise ValueError(f"scales must be distinct film scales in (0, {MAX_SCALE:g}], got {list(self.scales)}")
        if self.vote_iou is not None and not 0.0 < self.vote_iou <= 1.0:
            raise ValueError(f"vote_iou must be in (0, 1] or None, got {self.vote_iou}")
        partners = (self.partners,) if isinstance(self.partners, str) else tuple(self.partners)
        object.__setattr__(self, "partners", partners)
        if len(set(self.partners)) != len(self.partners) or not all(isinstance(x, str) and x for x in self.partners):
            raise ValueError(f"partners must be distinct run names, got {list(self.partners)}")
        if self.agreement and (not self.partners or self.vote_iou is None):
            raise ValueError("agreement scores the models' votes: it needs partners and vote_iou")

    def suffix(self) -> str:
        """What sets this search apart from the default one, for its output folder's name ('' for the default)."""
        default = TileConfig()
        parts = ([f"stride{self.stride}"] if self.stride != default.stride else []) + (
            [f"breast{self.min_breast:g}"] if self.min_breast != default.min_breast else []) + (
            ["scales" + "-".join(f"{x:g}" for x in self.scales)] if self.scales != default.scales else []) + (
            ["hflip"] if self.hflip else []) + ([f"vote{self.vote_iou:g}"] if self.vote_iou is not None else []) + (
            [f"plus_{x}" for x in self.partners]) + (["agree"] if self.agreement else [])
        return "".join(f"_{x}" for x in parts)

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


def vote_boxes(kept: np.ndarray, boxes: np.ndarray, scores: np.ndarray, iou: float,
               voters: np.ndarray | None = None) -> np.ndarray:
    """Box voting: each of ``kept`` replaced by the score-weighted mean of ``boxes`` overlapping it by IoU >= ``iou``
    (``voters``: that overlap mask, when the caller has it already)."""
    from mammo_tf.metrics.detection import iou_matrix

    kept = np.asarray(kept, np.float64).reshape(-1, 4)
    if not len(kept):
        return kept
    voters = iou_matrix(kept, boxes) >= iou if voters is None else voters
    weights = voters * np.asarray(scores, np.float64)[None, :]
    total = weights.sum(axis=1, keepdims=True)
    # A kept box is one of ``boxes`` (IoU 1 with itself), so its own score is in the total; unless it has no area
    # (IoU 0 with everything, itself included): nothing to average, it stays as it is.
    flat = ((kept[:, 2] - kept[:, 0]) * (kept[:, 3] - kept[:, 1]) <= 0)[:, None]
    if np.any((total <= 0) & ~flat):
        raise ValueError("vote_boxes: every kept box must be among the boxes, with a positive score")
    return np.where(total > 0, weights @ np.asarray(boxes, np.float64) / np.where(total > 0, total, 1.0), kept)


def merge_tiles(tile_detections: list[dict], origins: np.ndarray, size: float | np.ndarray, nms_iou: float,
                max_total: int, vote_iou: float | None = None, sources: np.ndarray | None = None) -> dict:
    """One film's detections in film pixels: tile boxes scaled to their tile's side in film pixels (``size``, one or
    per tile) and moved to its origin, per-class NMS (and box voting at ``vote_iou``), the best ``max_total``. With
    ``sources`` (the model of each tile, 0..n-1) each kept box's score is scaled by the share of models voting for it."""
    from mammo_tf.boxes import suppress_across_classes
    from mammo_tf.metrics.detection import iou_matrix

    if sources is not None and vote_iou is None:
        raise ValueError("merge_tiles: sources count the models' votes, so they need vote_iou")
    boxes, labels, scores, box_sources = np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64)
    if tile_detections:
        origins = np.asarray(origins, np.float64).reshape(-1, 2)
        sides = np.broadcast_to(np.asarray(size, np.float64), (len(origins),))
        boxes = np.concatenate([np.asarray(d["boxes"], np.float64).reshape(-1, 4) * side + np.tile(o, 2)
                                for d, o, side in zip(tile_detections, origins, sides)])
        labels = np.concatenate([np.asarray(d["labels"], np.int64) for d in tile_detections])
        scores = np.concatenate([np.asarray(d["scores"], np.float64) for d in tile_detections])
        if sources is not None:
            box_sources = np.repeat(np.asarray(sources, np.int64), [len(d["scores"]) for d in tile_detections])
    # A lesion seen by overlapping tiles is one detection per class, as within a tile.
    keep = [np.flatnonzero(labels == c)[suppress_across_classes(boxes[labels == c], scores[labels == c], nms_iou)]
            for c in np.unique(labels)]
    keep = np.concatenate(keep) if keep else np.zeros(0, np.int64)
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    if sources is None:  # the scores keep their order: only the best max_total need a vote
        keep = keep[:max_total]
    kept, kept_scores = boxes[keep].copy(), scores[keep].copy()
    models = np.unique(sources) if sources is not None else ()
    for c in np.unique(labels[keep]) if vote_iou is not None else ():
        mine, same = labels[keep] == c, labels == c
        voters = iou_matrix(kept[mine], boxes[same]) >= vote_iou
        kept[mine] = vote_boxes(kept[mine], boxes[same], scores[same], vote_iou, voters)
        if sources is not None:
            kept_scores[mine] *= sum((voters & (box_sources[same] == m)).any(axis=1) for m in models) / len(models)
    order = np.argsort(-kept_scores, kind="stable")[:max_total]
    return {"boxes": kept[order], "labels": labels[keep][order], "scores": kept_scores[order]}


def _scaled(image: np.ndarray, mask: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The film and its breast mask at ``scale`` of their size (area averaging down, bilinear up)."""
    import cv2

    if scale == 1.0:
        return image, mask
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    # Bilinear up, as the training zoom (tf.image.resize) enlarges its crops.
    return (cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR),
            cv2.resize(np.asarray(mask, np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool))


def tile_predictions(model: Any, exp: Any, anchor_cfg: Any, image: np.ndarray, mask: np.ndarray, cfg: TileConfig,
                     batch_size: int = 16) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """Over a film's breast, at each of ``cfg.scales`` (and mirrored, with ``cfg.hflip``): each tile's detections
    (boxes normalised to the tile, as on the film), its ``[top, left]`` and its side, both in film pixels."""
    from mammo_tf import detector as D

    size, channels = int(exp.image_size), exp.ssd_config().input_channels
    dets, origins, sides = [], [], []
    for scale in cfg.scales:
        for mirrored in (False, True) if cfg.hflip else (False,):
            im, m = _scaled(image, mask, scale)
            if mirrored:
                im, m = im[:, ::-1], m[:, ::-1]
            at = tile_origins(m, size, cfg.stride_for(size), cfg.min_breast)
            tiles = [im[t:t + size, l:l + size] for t, l in at]
            batches = (D.model_input(tiles[i:i + batch_size], channels) for i in range(0, len(tiles), batch_size))
            found = D.predict_batches(model, batches, anchor_cfg, exp)
            if mirrored:
                # A mirrored tile at left l is the film's tile at width - l - size, its boxes mirrored within it.
                found = [{**d, "boxes": np.asarray(d["boxes"], np.float64).reshape(-1, 4)[:, [0, 3, 2, 1]]
                          * [1, -1, 1, -1] + [0, 1, 0, 1]} for d in found]
                at = np.stack([at[:, 0], m.shape[1] - size - at[:, 1]], axis=1) if len(at) else at
            dets += found
            origins.append(at / scale)
            sides.append(np.full(len(at), size / scale))
    return dets, np.concatenate(origins).reshape(-1, 2), np.concatenate(sides)


def detect_film(model: Any, exp: Any, anchor_cfg: Any, image: np.ndarray, mask: np.ndarray, cfg: TileConfig,
                batch_size: int = 16, partners: Sequence[tuple[Any, Any, Any]] = ()) -> tuple[dict, np.ndarray]:
    """(detections in film pixels, ``[top, left]`` in film pixels of each tile searched) of a crops-trained detector
    over a film's breast, pooled before the merge with those of each ``(model, exp, anchor_cfg)`` in ``partners``."""
    models = [(model, exp, anchor_cfg), *partners]
    found = [tile_predictions(m, e, a, image, mask, cfg, batch_size) for m, e, a in models]
    dets = [d for f in found for d in f[0]]
    origins, sides = np.concatenate([f[1] for f in found]), np.concatenate([f[2] for f in found])
    sources = np.concatenate([np.full(len(f[0]), i) for i, f in enumerate(found)]) if cfg.agreement else None
    merged = merge_tiles(dets, origins, sides, exp.nms_iou_threshold, exp.max_total, cfg.vote_iou, sources)
    return merged, found[0][1]


def tiled_detections(crops_dir: str | Path, samples: Any, cfg: TileConfig,
                     films: Any) -> tuple[Callable[[Any], dict], dict[int, dict]]:
    """``fold -> {"test", "train": detections}`` (boxes normalised on the prepared films) and each fold's tile counts."""
    import keras

    from mammo_tf import detector as D

    info: dict[int, dict] = {}
    crops_dir = Path(crops_dir)

    def detections(fold: Any) -> dict[str, list[dict]]:
        runs = [crops_dir, *(crops_dir.parent / x for x in cfg.partners)]
        fold_dirs = [run / "folds" / f"fold{fold.index}" for run in runs]
        for fold_dir in fold_dirs:
            D.check_unseen(fold_dir, fold)
        (model, crops_exp, anchors), *partners = [D.load_detector(d) for d in fold_dirs]
        t0, n_tiles, out = time.perf_counter(), {}, {}
        bar = keras.utils.Progbar(len(fold.test) + len(fold.train), unit_name="film")
        for split, records in (("test", fold.test), ("train", fold.train)):
            found = []
            for refnum in records["refnum"]:
                det, origins = detect_film(model, crops_exp, anchors, films.image(refnum), films.mask(refnum), cfg,
                                           partners=partners)
                n_tiles[split] = n_tiles.get(split, 0) + len(origins)
                transform = samples.transforms[refnum]
                found.append({**det, "boxes": transform.to_prepared(det["boxes"]) / transform.size})
                bar.add(1)
            out[split] = found
        info[fold.index] = {"seconds": time.perf_counter() - t0, "detector": crops_dir.as_posix(),
                            **({"partners": [run.as_posix() for run in runs[1:]]} if cfg.partners else {}),
                            "tiles_per_test_film": n_tiles["test"] / len(fold.test),
                            "tiles_per_train_film": n_tiles["train"] / len(fold.train)}
        return out

    return detections, info


def study_entry(entry: str | dict) -> tuple[str, TileConfig]:
    """(crops run name, tile settings) of a ``tiled_detectors`` entry of a study config: a name, or
    ``{name: ..., scales: [...], stride: ..., min_breast: ...}``."""
    if isinstance(entry, str):
        return entry, TileConfig()
    settings = {k: v for k, v in entry.items() if k != "name"}
    unknown = set(settings) - {f.name for f in dataclasses.fields(TileConfig)}
    if unknown or "name" not in entry:
        raise ValueError(f"a tiled_detectors entry needs a name and takes {[f.name for f in dataclasses.fields(TileConfig)]}; "
                         f"got {entry}")
    return entry["name"], TileConfig(**settings)


def run_name(crops_name: str, cfg: TileConfig = TileConfig()) -> str:
    """The folder (and experiment name) of the tiled search ``cfg`` with crops detector ``crops_name``."""
    return f"tiled_{crops_name}{cfg.suffix()}"


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
    if crops_dir.name in cfg.partners:
        raise ConfigError(f"{crops_dir}: a run cannot be its own ensemble partner")
    run_dirs = [crops_dir, *(crops_dir.parent / x for x in cfg.partners)]
    run_exps = [from_dict(D.DetectorExperiment, load_json(d / D.CONFIG_FILE)["experiment"]) for d in run_dirs]
    crops_exp = run_exps[0]
    for run_dir, run_exp in zip(run_dirs, run_exps):
        if run_exp.protocol != "crops" or run_exp.naive_split:
            raise ConfigError(f"{run_dir}: tiles need a detector trained on patient-split crops "
                              f"(protocol {run_exp.protocol!r}, naive_split {run_exp.naive_split})")
        if run_exp.clahe_clip != crops_exp.clahe_clip:
            raise ConfigError(f"{run_dir}: its films are equalised otherwise (clahe_clip {run_exp.clahe_clip}) than "
                              f"{crops_dir}'s ({crops_exp.clahe_clip}); pooled runs share one film cache")
    # The same patient folds and whole-film test samples as every whole-film detector.
    exp = dataclasses.replace(crops_exp, name=run_name(crops_exp.name, cfg), protocol="whole", max_shift=0, max_zoom_out=1.0,
                              init_from=None, hard_negative_tiles=0, clahe_clip=None)  # how the crops model trained: crops_dir's config
    ann = annotations if annotations is not None else mias.load_annotations(exp.data)
    samples = D.make_samples(exp, ann)
    films = P.FilmCache(load_image=P.film_loader(exp.data), clahe_clip=crops_exp.clahe_clip)
    detections, info = tiled_detections(crops_dir, samples, cfg, films)
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / D.CONFIG_FILE, {"experiment": exp.to_dict(), "tiles": asdict(cfg), "detector": crops_dir.as_posix()})
    scales = " and ".join("full" if x == 1 else f"{x:g}x" for x in cfg.scales)
    row = (f"SSD{crops_exp.image_size} {crops_exp.ssd_config().backbone} trained on crops ({crops_exp.name}), "
           f"{crops_exp.image_size} px tiles every {cfg.stride_for(crops_exp.image_size)} px at {scales} resolution"
           + (f", films equalised (CLAHE, clip {crops_exp.clahe_clip:g})" if crops_exp.clahe_clip is not None else "")
           + (", mirrored film too" if cfg.hflip else "")
           + (f", box voting at IoU {cfg.vote_iou:g}" if cfg.vote_iou is not None else "")
           + "".join(f", boxes pooled with those of {x}" for x in cfg.partners)
           + (", scores scaled by the models' agreement" if cfg.agreement else ""))
    return D.evaluate_experiment(exp, out, command=command, samples=samples, annotations=ann, detections=detections,
                                 training_info=info, trained_by=prov.get("trained_by", prov) or None, row_name=row,
                                 figure_label="tiled SSD", protocol_note=TILED_NOTE)
