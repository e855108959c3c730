"""Hard-negative tiles: the lesion-free tiles of training films that a crops detector scores highest.

A detector trained on crops around lesions (and one random crop per normal film) meets, when it
searches whole films tile by tile (:mod:`mammo_tf.tiled`), mostly tissue it never trained on, and
its false positives there outrank the lesions. Bootstrapping, as in Sung and Poggio's face
detector: the training patients' tiles it scores highest, with no lesion within reach, join its
training crops as negatives, and training goes on from the weights it had. Only training patients'
films are searched, so the test patients stay unseen.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mammo_tf.tiled import TileConfig, tile_predictions

COLUMNS = ("refnum", "patient_id", "top", "left", "score")
KIND = "hard_negative"


def lesion_free(origins: np.ndarray, size: int, boxes: np.ndarray, margin: int) -> np.ndarray:
    """Per tile ``[top, left]``: no lesion box comes within ``margin`` px of the ``size`` px tile."""
    origins = np.asarray(origins, np.int64).reshape(-1, 2)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if not len(boxes):
        return np.ones(len(origins), bool)
    lo = origins[:, None, :] - margin                  # (tiles, 1, 2): the tile grown by the margin
    hi = origins[:, None, :] + size + margin
    overlap = (boxes[None, :, :2] < hi) & (boxes[None, :, 2:] > lo)   # per axis, per tile and box
    return ~overlap.all(axis=2).any(axis=1)


def mine(model: Any, exp: Any, anchor_cfg: Any, films: Any, annotations: pd.DataFrame, refnums: Any, n: int,
         margin: int, per_film: int = 2, cfg: TileConfig = TileConfig()) -> pd.DataFrame:
    """The ``n`` highest-scoring lesion-free tiles of films ``refnums`` (at most ``per_film`` each), best first."""
    import keras

    from mammo_tf.data import mias

    if cfg.scales != (1.0,):
        raise ValueError(f"hard negatives are cut from the film at full resolution: scales must be (1.0,), got {cfg.scales}")
    size, rows = int(exp.image_size), []
    refnums = sorted(set(refnums))
    bar = keras.utils.Progbar(len(refnums), unit_name="film")
    for refnum in refnums:
        dets, origins, _ = tile_predictions(model, exp, anchor_cfg, films.image(refnum), films.mask(refnum), cfg)
        free = lesion_free(origins, size, mias.lesion_boxes(annotations, refnum)[0], margin)
        scores = np.array([float(np.max(d["scores"], initial=0.0)) for d in dets])
        best = [i for i in np.argsort(-scores, kind="stable") if free[i] and scores[i] > 0][:per_film]
        patient = int(annotations.loc[annotations["refnum"] == refnum, "patient_id"].iloc[0])
        rows += [(refnum, patient, int(origins[i][0]), int(origins[i][1]), scores[i]) for i in best]
        bar.add(1)
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    return table.sort_values(["score", "refnum", "top", "left"], ascending=[False, True, True, True],
                             kind="stable").head(n).reset_index(drop=True)


def as_crop_records(tiles: pd.DataFrame, size: int) -> pd.DataFrame:
    """Mined tiles as detection-crop records without boxes (the columns of :func:`mammo_tf.patches.detection_crops`)."""
    from mammo_tf.patches import CROP_COLUMNS

    rows = [(r.refnum, int(r.patient_id), int(r.top), int(r.left), size, KIND, -1, [], [], []) for r in tiles.itertuples()]
    return pd.DataFrame(rows, columns=list(CROP_COLUMNS)).astype(
        {"patient_id": np.int64, "top": np.int64, "left": np.int64, "size": np.int64})


def fold_tiles(exp: Any, samples: Any, fold: Any, fold_dir: str | Path) -> pd.DataFrame:
    """This fold's mined tiles, from the ``init_from`` run's fold model; kept in ``hard_negatives.csv`` so a resumed run reuses them."""
    from mammo_tf import detector as D
    from mammo_tf.io import atomic_path

    path = Path(fold_dir) / "hard_negatives.csv"
    if path.is_file():
        return pd.read_csv(path)
    init_dir = D.init_fold_dir(exp, fold)
    model, init_exp, anchors = D.load_detector(init_dir)
    # A lesion box within the largest training shift of a tile could be shifted into it, unlabelled.
    tiles = mine(model, init_exp, anchors, samples.films, samples.annotations, fold.train["refnum"],
                 exp.hard_negative_tiles, margin=exp.max_shift)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".csv") as tmp:
        tiles.to_csv(tmp, index=False)
    return tiles


def with_hard_negatives(exp: Any, samples: Any, fold: Any, fold_dir: str | Path) -> Any:
    """The fold with its mined tiles added to the training records (validation and test untouched)."""
    tiles = fold_tiles(exp, samples, fold, fold_dir)
    if not set(tiles["patient_id"]) <= set(fold.train["patient_id"]):
        raise ValueError(f"{fold_dir}: hard_negatives.csv holds films of patients outside fold {fold.index}'s "
                         "training patients; delete it to mine again")
    extra = as_crop_records(tiles, int(exp.image_size))
    return dataclasses.replace(fold, train=pd.concat([fold.train, extra], ignore_index=True))
