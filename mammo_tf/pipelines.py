"""tf.data input pipelines from patch and crop records, with patient-level split checks.

The films a pipeline needs are read once into one in-memory uint8 stack (322 films x 1 MB fit),
and patches are sliced from it inside the graph, so no derived pixels are ever written to disk.
Order of a patch pipeline: slice -> cache (uint8) -> [training: shuffle or class resampling] ->
scale to float32 [0, 1], shape (size, size, 1) -> [training: augmentation] -> batch -> prefetch.
Augmentation uses stateless random ops seeded from `tf.data.Dataset.random(seed)`, so a pipeline
is reproducible for a given seed and still draws new transforms every epoch.
"""

from __future__ import annotations

from itertools import combinations
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from mammo_tf import augment
from mammo_tf.data import mias
from mammo_tf.patches import FilmCache

AUTOTUNE = -1  # tf.data.AUTOTUNE, without importing TensorFlow at module import


# --------------------------------------------------------------------------- splits


def split_records(records: pd.DataFrame, train_patients: Iterable[int], test_patients: Iterable[int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Records of the train and test patients (disjoint patient sets required)."""
    train_set, test_set = {int(p) for p in train_patients}, {int(p) for p in test_patients}
    both = sorted(train_set & test_set)
    if both:
        raise ValueError(f"{len(both)} patients are in both the train and test sets, e.g. {both[:10]}")
    train = records[records["patient_id"].isin(train_set)].reset_index(drop=True)
    test = records[records["patient_id"].isin(test_set)].reset_index(drop=True)
    return train, test


def assert_no_patient_leak(*record_frames: pd.DataFrame) -> None:
    """Raise AssertionError if any patient appears in more than one of the frames."""
    sets = [set(frame["patient_id"].astype(int)) for frame in record_frames]
    for (i, a), (j, b) in combinations(enumerate(sets), 2):
        both = sorted(a & b)
        if both:
            raise AssertionError(f"patient leak: {len(both)} patients in both frame {i} and frame {j}, e.g. {both[:10]}")


# --------------------------------------------------------------------------- class balance


def class_weights(records: pd.DataFrame, n_classes: int = len(mias.CLASSES)) -> dict[int, float]:
    """Balanced class weights {class id: weight} for `model.fit(class_weight=...)` (absent classes weigh 0)."""
    from sklearn.utils.class_weight import compute_class_weight

    y = records["label_id"].to_numpy()
    _check_labels(y, n_classes)
    present = np.unique(y)
    weights = compute_class_weight("balanced", classes=present, y=y)
    out = {c: 0.0 for c in range(n_classes)}
    out.update({int(c): float(w) for c, w in zip(present, weights)})
    return out


def _check_labels(y: np.ndarray, n_classes: int) -> None:
    if len(y) == 0:
        raise ValueError("no records")
    bad = sorted(set(np.unique(y).tolist()) - set(range(n_classes)))
    if bad:
        raise ValueError(f"label ids {bad} outside 0..{n_classes - 1} (drop ambiguous/unlocated patches first)")


# --------------------------------------------------------------------------- datasets


def _single_size(records: pd.DataFrame) -> int:
    sizes = records["size"].unique()
    if len(sizes) != 1:
        raise ValueError(f"records mix window sizes {sorted(sizes)}; a pipeline takes one size")
    return int(sizes[0])


def film_stack(refnums: Sequence[str], films: FilmCache | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """The films `refnums` stacked into one uint8 array, and each refnum's index in it."""
    films = films if films is not None else FilmCache()
    order = sorted(set(refnums))
    if not order:
        raise ValueError("no films to load")
    return np.stack([films.image(r) for r in order]), {r: i for i, r in enumerate(order)}


def _windows(records: pd.DataFrame, films: FilmCache | None, shifts: np.ndarray | None = None, seed: int = 0,
             zoom_out: np.ndarray | None = None):
    """Dataset of (uint8 window (size, size, 1), row index, origin offset (2,) float32, scale) sliced from the film stack.

    ``shifts`` (N, 4) int ``[lo_y, hi_y, lo_x, hi_x]``: each time the dataset is iterated, window i
    moves by an offset drawn uniformly from its range (see :func:`shift_ranges`); without, offsets are 0.
    ``zoom_out`` (N,) float >= 1: window i is cut ``k`` times larger (``k`` uniform in ``[1, zoom_out[i]]``,
    capped by the film), placed at random so that it holds the (moved) record, and resized to the
    record's size. A point at film offset ``p`` from the record's origin lands at ``(p - offset) / scale``.
    """
    import tensorflow as tf

    size = _single_size(records)
    stack, index = film_stack(records["refnum"].tolist(), films)
    stack_t = tf.constant(stack[..., None])
    film_idx = records["refnum"].map(index).to_numpy(np.int32)
    tops = records["top"].to_numpy(np.int32)
    lefts = records["left"].to_numpy(np.int32)
    if (tops < 0).any() or (lefts < 0).any() or (tops + size > stack.shape[1]).any() or (lefts + size > stack.shape[2]).any():
        raise ValueError("some records fall outside their film")
    ranges = np.zeros((len(records), 4), np.int32) if shifts is None else np.asarray(shifts, np.int32)
    zooms = np.ones(len(records), np.float32) if zoom_out is None else np.asarray(zoom_out, np.float32)
    if (zooms < 1).any():
        raise ValueError("zoom_out factors must be >= 1")
    zooming = bool((zooms > 1).any())
    film_hw = np.asarray(stack.shape[1:3], np.int32)

    def _uniform_int(lo, hi, seed):
        u = tf.random.stateless_uniform([2], seed)
        return tf.minimum(lo + tf.cast(tf.floor(u * tf.cast(hi - lo + 1, tf.float32)), tf.int32), hi)  # u == 1 steps past

    def window(i, t, l, row, r, z, s):
        # Folded, so that the shift is drawn apart from the augmentation that uses the same stream.
        offset = _uniform_int(tf.stack([r[0], r[2]]), tf.stack([r[1], r[3]]), tf.random.experimental.stateless_fold_in(s, 1))
        corner = tf.stack([t, l]) + offset
        if not zooming:
            win = tf.slice(stack_t, tf.stack([i, corner[0], corner[1], 0]), [1, size, size, 1])[0]
            return win, row, tf.cast(offset, tf.float32), tf.constant(1.0)
        k = tf.random.stateless_uniform([], tf.random.experimental.stateless_fold_in(s, 2), 1.0, z)
        side = tf.minimum(tf.cast(tf.round(k * size), tf.int32), tf.reduce_min(film_hw))
        # The larger window holds the moved record whole and stays in its film.
        lo, hi = tf.maximum(0, corner + size - side), tf.minimum(corner, film_hw - side)
        top_left = _uniform_int(lo, hi, tf.random.experimental.stateless_fold_in(s, 3))
        win = tf.slice(stack_t, tf.concat([[i], top_left, [0]], 0), tf.stack([1, side, side, 1]))[0]
        win = tf.cast(tf.clip_by_value(tf.round(tf.image.resize(win, [size, size], antialias=True)), 0, 255), tf.uint8)
        return win, row, tf.cast(top_left - tf.stack([t, l]), tf.float32), tf.cast(side, tf.float32) / size

    rows = np.arange(len(records), dtype=np.int32)
    ds = tf.data.Dataset.from_tensor_slices((film_idx, tops, lefts, rows, ranges, zooms))
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    ds = tf.data.Dataset.zip((ds, seeds)).map(lambda a, s: window(*a, s), num_parallel_calls=tf.data.AUTOTUNE)
    return ds, size


def shift_ranges(crops: pd.DataFrame, max_shift: int, film_shape: tuple[int, int]) -> np.ndarray:
    """Per crop, the origin offsets ``[lo_y, hi_y, lo_x, hi_x]`` (at most ``max_shift`` px) that keep it in its film and its boxes whole.

    Every box the crop carries stays wholly inside the moved crop. Along an axis where a box
    touches the crop's edge (it was clipped, or is larger than the crop) the crop does not move:
    the box's true edge lies outside, and a shift would misplace it.
    """
    size = _single_size(crops)
    out = np.zeros((len(crops), 4), np.int32)
    for i, (top, left, boxes) in enumerate(zip(crops["top"], crops["left"], crops["boxes"])):
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        for axis, origin, n in ((0, top, film_shape[0]), (1, left, film_shape[1])):
            lo, hi = max(-max_shift, -int(origin)), min(max_shift, n - size - int(origin))
            if len(b):
                near, far = b[:, axis], b[:, axis + 2]
                if (near <= 0).any() or (far >= size).any():
                    lo = hi = 0
                else:
                    # The box moves by -offset: its near edge must stay >= 0 and its far edge <= size.
                    lo, hi = max(lo, int(np.ceil(far.max() - size))), min(hi, int(np.floor(near.min())))
            out[i, 2 * axis: 2 * axis + 2] = (lo, hi) if lo <= hi else (0, 0)
    return out


def zoom_out_limits(crops: pd.DataFrame, max_zoom_out: float) -> np.ndarray:
    """Per crop, the largest zoom out (:func:`_windows`) that keeps its boxes true: 1 where a box touches the crop's edge.

    A box clipped by the crop (or larger than it) ends at the crop's edge, while its lesion goes on
    into the film around it: a larger window would show the lesion beyond its box.
    """
    if max_zoom_out < 1:
        raise ValueError(f"max_zoom_out must be >= 1, got {max_zoom_out}")
    size = _single_size(crops)
    out = np.full(len(crops), max_zoom_out, np.float32)
    for i, boxes in enumerate(crops["boxes"]):
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
        if len(b) and ((b[:, :2] <= 0).any() or (b[:, 2:] >= size).any()):
            out[i] = 1.0
    return out


def patch_dataset(
    records: pd.DataFrame,
    *,
    training: bool = False,
    batch_size: int = 32,
    seed: int = 0,
    augment_train: bool = True,
    max_angle: float = 0.0,
    balance: str | None = None,
    cache: bool = True,
    films: FilmCache | None = None,
    n_classes: int = len(mias.CLASSES),
) -> "tf.data.Dataset":
    """Batches of (float32 patches (B, size, size, 1) in [0, 1], int32 labels (B,)) from patch records.

    `training` shuffles (seeded, reshuffled every epoch) and, with `augment_train`, applies random
    90-degree rotations, flips and, with `max_angle` > 0, arbitrary rotations. `balance="resample"`
    (training only) draws the classes with equal probability via `sample_from_datasets`; an epoch
    then has len(records) patches. For the other balancing option pass `class_weights(records)` to
    `model.fit`.
    """
    import tensorflow as tf

    if balance not in (None, "resample"):
        raise ValueError(f"balance must be None or 'resample', got {balance!r}")
    if balance and not training:
        raise ValueError("balance='resample' is for training pipelines only")
    labels = records["label_id"].to_numpy()
    _check_labels(labels, n_classes)
    ds, size = _windows(records, films)
    labels_t = tf.constant(labels.astype(np.int32))
    ds = ds.map(lambda x, row, _offset, _scale: (x, tf.gather(labels_t, row)), num_parallel_calls=tf.data.AUTOTUNE)
    if cache:
        ds = ds.cache()
    if training:
        if balance == "resample":
            present = np.unique(labels)
            per_class = [
                ds.filter(lambda x, y, c=int(c): tf.equal(y, c)).shuffle(int((labels == c).sum()), seed=seed + int(c), reshuffle_each_iteration=True).repeat()
                for c in present
            ]
            ds = tf.data.Dataset.sample_from_datasets(per_class, seed=seed, rerandomize_each_iteration=True).take(len(records))
        else:
            ds = ds.shuffle(len(records), seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32) / 255.0, y), num_parallel_calls=tf.data.AUTOTUNE)
    if training and augment_train:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda xy, s: (augment.tf_augment(xy[0], s, max_angle=max_angle), xy[1]),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    # Every map keeps order (deterministic by default), so the seed alone fixes the stream.
    ds = ds.map(lambda x, y: (tf.ensure_shape(x, (size, size, 1)), y))
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def fold_datasets(
    records: pd.DataFrame,
    train_patients: Iterable[int],
    val_patients: Iterable[int],
    test_patients: Iterable[int],
    films: FilmCache | None = None,
    **kwargs,
) -> dict[str, "tf.data.Dataset"]:
    """Train (shuffled, augmented), validation and test pipelines of one fold from three disjoint patient sets."""
    train_patients, val_patients, test_patients = ({int(p) for p in ids} for ids in (train_patients, val_patients, test_patients))
    train, test = split_records(records, train_patients, test_patients)
    val, _ = split_records(records, val_patients, train_patients | test_patients)
    assert_no_patient_leak(train, val, test)
    films = films if films is not None else FilmCache()
    eval_kwargs = {k: v for k, v in kwargs.items() if k not in ("balance", "augment_train", "max_angle")}
    return {
        "train": patch_dataset(train, training=True, films=films, **kwargs),
        "val": patch_dataset(val, training=False, films=films, **eval_kwargs),
        "test": patch_dataset(test, training=False, films=films, **eval_kwargs),
    }


def crop_dataset(
    crops: pd.DataFrame,
    *,
    training: bool = False,
    batch_size: int = 8,
    seed: int = 0,
    augment_train: bool = True,
    max_angle: float = 0.0,
    rot90s: bool = True,
    flips_up_down: bool = True,
    max_boxes: int = 4,
    cache: bool = True,
    films: FilmCache | None = None,
    flips: bool = True,
    zoom_min_scale: float = 1.0,
    max_shift: int = 0,
    max_zoom_out: float = 1.0,
) -> "tf.data.Dataset":
    """Batches of (float32 crops (B, S, S, 1), {"boxes": (B, max_boxes, 4) normalised, "labels": (B, max_boxes)}).

    Boxes come from `patches.detection_crops` records, normalised by the crop size (model side);
    padding rows have box zeros and label 0 (background). Augmentation (random flips, 90-degree
    rotations unless ``rot90s=False``, up-down flips unless ``flips_up_down=False``, rotations up to
    ``max_angle``; no flips with ``flips=False``; SSD's random crop, a zoom in by up to
    ``1 / zoom_min_scale``, when that is below 1) moves boxes with the image. With ``max_shift``,
    each training crop is cut afresh every epoch, its origin moved by up to that many pixels in the
    film (:func:`shift_ranges`: its boxes stay whole inside), so the network never sees one
    lesion at the same position twice. With ``max_zoom_out`` above 1, each training crop is cut
    from a film window up to that many times its side around it and shrunk to its size (SSD's
    zoom out, with the film around the crop instead of a flat fill; :func:`zoom_out_limits`).
    """
    import tensorflow as tf

    n_boxes = crops["boxes"].map(len)
    if (n_boxes > max_boxes).any():
        raise ValueError(f"a crop holds {int(n_boxes.max())} boxes, more than max_boxes={max_boxes}")
    size = _single_size(crops)
    boxes = np.zeros((len(crops), max_boxes, 4), np.float32)
    labels = np.zeros((len(crops), max_boxes), np.int32)
    for i, (b, l) in enumerate(zip(crops["boxes"], crops["box_labels"])):
        if len(b):
            boxes[i, : len(b)] = np.asarray(b, np.float32)
            labels[i, : len(l)] = l
    shifting = training and augment_train and max_shift > 0
    zooming_out = training and augment_train and max_zoom_out > 1
    films = films if films is not None else FilmCache()
    shifts = shift_ranges(crops, max_shift, films.image(crops["refnum"].iloc[0]).shape[:2]) if shifting else None
    zooms = zoom_out_limits(crops, max_zoom_out) if zooming_out else None
    ds, _ = _windows(crops, films, shifts, seed=seed, zoom_out=zooms)
    boxes_t, labels_t = tf.constant(boxes), tf.constant(labels)

    def with_boxes(x, row, offset, scale):
        b, lab = tf.gather(boxes_t, row), tf.gather(labels_t, row)
        moved = (b - tf.tile(offset, [2])) / scale
        # Padding rows stay zero.
        return x, moved * tf.cast(lab > 0, tf.float32)[:, None], lab

    ds = ds.map(with_boxes, num_parallel_calls=tf.data.AUTOTUNE)
    if cache and not (shifting or zooming_out):  # a cache would freeze the first epoch's draws
        ds = ds.cache()
    if training:
        ds = ds.shuffle(len(crops), seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(lambda x, b, l: (tf.cast(x, tf.float32) / 255.0, b, l), num_parallel_calls=tf.data.AUTOTUNE)
    if training and augment_train:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)

        def aug(xbl, s):
            x, b, l = xbl
            if zoom_min_scale < 1.0:
                # The reversed pair is a seed of its own: zoom and flips are drawn independently.
                x, b, l = augment.tf_zoom_with_boxes(x, b, l, tf.reverse(s, [0]), zoom_min_scale)
            x2, b2 = augment.tf_augment_with_boxes(x, b, s, max_angle=max_angle, rot90s=rot90s, flips=flips,
                                                   flips_up_down=flips_up_down)
            # Padding rows must stay zero whatever the transform did to them.
            return x2, b2 * tf.cast(l > 0, tf.float32)[:, None], l

        ds = tf.data.Dataset.zip((ds, seeds)).map(aug, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(
        lambda x, b, l: (tf.ensure_shape(x, (size, size, 1)), {"boxes": b / float(size), "labels": l}),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
