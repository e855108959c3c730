"""The SSD detection experiment on mini-MIAS: data, training, evaluation and inference.

Two protocols (``DetectorExperiment.protocol``):

* ``"crops"``: the poster's protocol. Square crops at full resolution are cut around every
  located lesion (plus crops of normal films), and the test set is made the same way. The crop
  position is chosen knowing where the lesion is, so **the test crops give the lesion location
  away**: the numbers are not those of a screening setting. Every output says so.
* ``"whole"``: no prior information. Every film (normal films included) is cropped to its
  breast's bounding box, padded to a square and resized (:func:`mammo_tf.patches.prepare_whole`);
  detections are mapped back to film pixels and evaluated there.

Splits are over patients (``docs/conventions.md``), except with ``naive_split: true``: the
leakage audit, a random split of the (augmented) crops or of the films, labelled **LEAKY**.
Films with an unlocated lesion (mdb059, mdb216, mdb233, mdb245) are left out of both protocols:
their lesion cannot be placed, so they could be neither trained on nor scored.

Outputs of :func:`run_experiment` in ``out_dir``: ``metrics.json`` (per-fold metrics, mean ± std,
the oracle and chance references, report rows), ``model.keras`` + ``config.json`` (the fold-0 model, for
:func:`mammo_tf.detect.detect_images`), figures ``*.png``, ``folds/fold<k>/`` (each fold's model, checkpoints,
logs), and ``images/`` (detections drawn on licensed films; git-ignored).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from mammo_tf import patches as P
from mammo_tf.config import (ConfigError, from_dict, hardware_label, keep_training_provenance, load_config,
                             provenance)
from mammo_tf.data import mias
from mammo_tf.io import atomic_path, load_json, save_figure, save_json

PROTOCOLS = ("crops", "whole")
CLASS_NAMES = {1: "benign", 2: "malignant"}
# The poster's published numbers: the only hard-coded results, shown as a labelled reference.
POSTER_REFERENCE = {"benign": 0.80, "malignant": 0.806, "mAP": 0.803}
POSTER_NOTE = "reported by the poster (crops around lesions), not reproduced here"
CROPS_NOTE = (
    "crops protocol: test crops are cut around the lesions (plus normal crops), so the lesion "
    "location is given away; not a screening setting"
)
WHOLE_NOTE = "whole films, no prior location: breast-cropped, downsampled, normal films included"
PLANTED_NOTE = ("PLANTED: not mini-MIAS's lesions but synthetic Gaussian masses of contrast {contrast:g} grey "
                "levels in half of its normal films (mammo_tf.planted), a detection-limit check")
LEAKY_NOTE = "LEAKY: random split of samples instead of by patient (leakage audit only)"
ORACLE_NOTE = "reference: every ground-truth box found exactly, class and score random"
RANDOM_BOXES_PER_IMAGE = 10
RANDOM_NOTE = (f"chance reference: {RANDOM_BOXES_PER_IMAGE} boxes per image centred at random in the breast, sides "
               "drawn from the training lesions', class and score random")
MODEL_FILE = "model.keras"
CONFIG_FILE = "config.json"


# --------------------------------------------------------------------------- configuration


SELECT_ON = ("val_loss", "val_mAP")
AUGMENT_OPS = ("flips_rot90", "left_right", "none")


@dataclasses.dataclass
class DetectorExperiment:
    """One detection experiment; ``ssd`` is an SSDConfig dict, ``train`` a TrainConfig dict.

    ``image_size``: the model's input side; for ``"crops"`` the crop side in film pixels (full
    resolution), for ``"whole"`` the side the breast-cropped film is resized to. ``iou_threshold``
    is the evaluation's; ``match_iou`` the training's default-box matching threshold.
    ``score_threshold``, ``nms_iou_threshold``, ``max_per_class``, ``max_total``: the NMS of
    :func:`mammo_tf.boxes.decode_detections`. ``naive_split``: the leakage audit (LEAKY).
    ``select_on``: what the best checkpoint and early stopping watch (early stopping keeps the best
    epoch), ``"val_loss"`` or ``"val_mAP"`` (the validation patients' mAP, computed after every
    epoch as the test's is; needs early stopping, which does the selecting, or ``snapshot_every``).
    ``snapshot_every``: with ``select_on: val_mAP`` and no early stopping, the validation mAP is
    measured every this many epochs (and at the last) and the best of those epochs is kept; the
    array path (:mod:`mammo_tf.detector_arrays`) keeps every such epoch's outputs instead, so that
    a run trained elsewhere is selected where it is scored.
    """

    name: str = "detector"
    protocol: str = "whole"
    image_size: int = 300
    ssd: dict = dataclasses.field(default_factory=dict)
    train: dict = dataclasses.field(default_factory=dict)
    folds: int = 5
    max_folds: int | None = None          # run only the first folds (small setting)
    max_patients: int | None = None       # stratified subset of patients (small setting)
    val_fraction: float = 0.2             # of each fold's training patients; 0 = no validation
    iou_threshold: float = 0.5            # evaluation: detection matches ground truth
    match_iou: float = 0.5                # training: default box matches ground truth
    ignore_iou: float | None = None       # training: boxes with ignore_iou <= IoU < match_iou are ignored
    score_threshold: float = 0.01
    nms_iou_threshold: float = 0.45
    max_per_class: int = 100
    max_total: int = 200
    neg_pos_ratio: float = 3.0
    min_negatives: int = 0
    loc_weight: float = 1.0               # alpha of the MultiBox loss: the box regression's weight against the class term
    augment: bool = True
    augment_ops: str = "flips_rot90"      # flips_rot90 | left_right (mirror images only: still plausible mammograms) | none
    max_angle: float = 0.0
    zoom_min_scale: float = 1.0           # < 1: SSD's random crop, a zoom in by up to 1 / zoom_min_scale (1: off)
    max_shift: int = 0                    # crops: each epoch re-cuts a training crop up to this many px away (0: off)
    max_zoom_out: float = 1.0             # crops, > 1: a training crop cut from a film window up to this many times its side, shrunk
    crops_per_lesion: int = 1
    n_normal: int | None = None           # crops protocol: normal crops in all (None: one per normal film)
    naive_split: bool = False
    backbone_from: str | None = None      # cnn backbone: a classifier experiment folder; fold k starts from its fold k
    init_from: str | None = None          # crops: a crops detector run folder; fold k goes on from its fold k model
    hard_negative_tiles: int = 0          # with init_from: lesion-free training tiles it scores highest, added as negatives
    select_on: str = "val_loss"           # val_loss | val_mAP
    snapshot_every: int = 0               # val_mAP without early stopping: measure every n epochs, keep the best
    planted_contrast: float | None = None  # whole: not the lesions but masses of this contrast planted in normal films
    clahe_clip: float | None = None       # crops: each film equalised first (OpenCV CLAHE, 8x8 tiles, this clip limit)
    n_examples: int = 6
    seed: int = 0
    data: str | None = None

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if not 32 <= int(self.image_size) <= mias.IMAGE_SIZE:
            raise ConfigError(f"image_size must be in 32..{mias.IMAGE_SIZE}, got {self.image_size}")
        if self.folds < 2:
            raise ConfigError(f"folds must be >= 2, got {self.folds}")
        if self.max_folds is not None and not 1 <= self.max_folds <= self.folds:
            raise ConfigError(f"max_folds must be in 1..{self.folds}, got {self.max_folds}")
        if self.max_patients is not None and self.max_patients < self.folds:
            raise ConfigError(f"max_patients ({self.max_patients}) must be >= folds ({self.folds})")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for key in ("iou_threshold", "match_iou", "nms_iou_threshold"):
            if not 0.0 < getattr(self, key) <= 1.0:
                raise ConfigError(f"{key} must be in (0, 1], got {getattr(self, key)}")
        if not 0.0 <= self.score_threshold < 1.0:
            raise ConfigError(f"score_threshold must be in [0, 1), got {self.score_threshold}")
        if not self.loc_weight > 0:
            raise ConfigError(f"loc_weight must be > 0, got {self.loc_weight}")
        if self.crops_per_lesion < 1:
            raise ConfigError(f"crops_per_lesion must be >= 1, got {self.crops_per_lesion}")
        if not 0.1 <= self.zoom_min_scale <= 1.0:
            raise ConfigError(f"zoom_min_scale must be in [0.1, 1], got {self.zoom_min_scale}")
        if self.max_shift < 0 or (self.max_shift and self.protocol != "crops"):
            raise ConfigError(f"max_shift must be >= 0, and is for the crops protocol only; got {self.max_shift} "
                              f"with protocol {self.protocol!r}")
        if not 1.0 <= self.max_zoom_out <= 3.0 or (self.max_zoom_out > 1 and self.protocol != "crops"):
            raise ConfigError(f"max_zoom_out must be in [1, 3], and above 1 for the crops protocol only; got "
                              f"{self.max_zoom_out} with protocol {self.protocol!r}")
        if self.hard_negative_tiles < 0 or (self.hard_negative_tiles and not self.init_from):
            raise ConfigError(f"hard_negative_tiles ({self.hard_negative_tiles}) must be >= 0, and are mined by the "
                              "init_from run's models: set init_from")
        if self.init_from and (self.protocol != "crops" or self.naive_split or self.backbone_from):
            raise ConfigError("init_from goes on from a crops detector's fold models: it needs protocol: crops, "
                              "patient folds (no naive_split) and no backbone_from")
        if self.planted_contrast is not None and (self.protocol != "whole" or not self.planted_contrast > 0):
            raise ConfigError(f"planted_contrast must be > 0 (grey levels), and is for the whole protocol only; got "
                              f"{self.planted_contrast} with protocol {self.protocol!r}")
        if self.clahe_clip is not None and (self.protocol != "crops" or not self.clahe_clip > 0):
            raise ConfigError(f"clahe_clip must be > 0, and is for the crops protocol only (crops and tiles are cut "
                              f"from the equalised film); got {self.clahe_clip} with protocol {self.protocol!r}")
        if self.augment_ops not in AUGMENT_OPS:
            raise ConfigError(f"augment_ops must be one of {AUGMENT_OPS}, got {self.augment_ops!r}")
        if self.select_on not in SELECT_ON:
            raise ConfigError(f"select_on must be one of {SELECT_ON}, got {self.select_on!r}")
        if self.select_on == "val_mAP" and self.val_fraction == 0:
            raise ConfigError("select_on: val_mAP needs validation patients (val_fraction > 0)")
        if self.snapshot_every < 0 or (self.snapshot_every and self.select_on != "val_mAP"):
            raise ConfigError(f"snapshot_every ({self.snapshot_every}) must be >= 0, and is read with select_on: "
                              "val_mAP only")
        if self.snapshot_every and self.train_config().early_stopping:
            raise ConfigError("snapshot_every selects among epochs itself: set train.early_stopping: false")
        if self.select_on == "val_mAP" and not (self.train_config().early_stopping or self.snapshot_every):
            raise ConfigError("select_on: val_mAP selects through early stopping or snapshots: set "
                              "train.early_stopping: true or snapshot_every: n")
        if "image_size" in self.ssd and int(self.ssd["image_size"]) != int(self.image_size):
            raise ConfigError(f"ssd.image_size ({self.ssd['image_size']}) differs from image_size ({self.image_size})")
        self.ssd_config()  # validate the nested configs now, not after the data is loaded
        self.train_config()

    def ssd_config(self) -> Any:
        """The SSDConfig (image size taken from the experiment)."""
        from mammo_tf.models.ssd import SSDConfig

        try:
            return SSDConfig.from_dict({**self.ssd, "image_size": int(self.image_size)})
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{self.name}: bad ssd config: {err}") from err

    def train_config(self) -> Any:
        """The TrainConfig (seed defaults to the experiment's)."""
        from mammo_tf.training import TrainConfig

        return from_dict(TrainConfig, {"seed": self.seed, **self.train})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``from_dict(DetectorExperiment, d)`` inverts it)."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    @property
    def n_folds_run(self) -> int:
        """How many folds are trained and evaluated."""
        return self.max_folds or self.folds


def load_experiment(path: str | Path) -> DetectorExperiment:
    """Read a detector experiment from a YAML file (unknown keys are an error)."""
    return from_dict(DetectorExperiment, load_config(path))


# --------------------------------------------------------------------------- samples and folds


@dataclasses.dataclass
class Samples:
    """The experiment's samples: one record per crop or prepared film, and the films to slice them from."""

    records: pd.DataFrame                 # refnum, patient_id, top, left, size, boxes, box_labels (pixels)
    films: P.FilmCache                    # raw films (crops) or prepared squares (whole)
    transforms: dict[str, P.WholeTransform]  # whole protocol: film pixels <-> prepared pixels
    excluded: list[str]                   # films left out (unlocated lesions)
    annotations: pd.DataFrame             # the annotations of the films used


@dataclasses.dataclass
class Fold:
    """Train, validation and test records of one fold."""

    index: int
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    leaky: bool = False
    stratified_val: bool = True


def usable_annotations(annotations: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Drop films with an unlocated lesion (they can be neither trained on nor scored); return them too."""
    images = mias.images_table(annotations)
    bad = sorted(images.loc[images["n_located"] < images["n_lesions"], "refnum"])
    return annotations[~annotations["refnum"].isin(bad)].reset_index(drop=True), bad


def subset_patients(annotations: pd.DataFrame, n: int | None, seed: int = 0) -> pd.DataFrame:
    """The annotations of ``n`` patients drawn stratified by patient label (all when ``n`` is None)."""
    from sklearn.model_selection import train_test_split

    from mammo_tf.data.splits import patient_table

    patients = patient_table(annotations)
    if n is None or n >= len(patients):
        return annotations
    ids, labels = patients["patient_id"].to_numpy(), patients["label_id"].to_numpy()
    try:
        chosen, _ = train_test_split(ids, train_size=n, random_state=seed, stratify=labels)
    except ValueError:  # too few patients to keep every class: an unstratified draw
        chosen, _ = train_test_split(ids, train_size=n, random_state=seed)
    return annotations[annotations["patient_id"].isin(chosen)].reset_index(drop=True)


def whole_records(
    annotations: pd.DataFrame, size: int, load_image: Any = None
) -> tuple[pd.DataFrame, P.FilmCache, dict[str, P.WholeTransform]]:
    """One record per film, prepared by `prepare_whole` (boxes in prepared pixels), and the prepared films."""
    load = load_image or P.film_loader()
    images, transforms, rows = {}, {}, []
    for info in mias.images_table(annotations).itertuples():
        boxes, labels = mias.lesion_boxes(annotations, info.refnum)
        prepared, pboxes, transform = P.prepare_whole(load(info.refnum), boxes, size=size)
        images[info.refnum], transforms[info.refnum] = prepared, transform
        rows.append((info.refnum, int(info.patient_id), 0, 0, size, "film", np.round(pboxes, 2).tolist(),
                     labels.tolist()))
    records = pd.DataFrame(rows, columns=["refnum", "patient_id", "top", "left", "size", "kind", "boxes", "box_labels"])
    return records, P.FilmCache(load_image=images.__getitem__), transforms


def film_reader(exp: DetectorExperiment, annotations: pd.DataFrame) -> Callable[[str], np.ndarray]:
    """The experiment's film reader: mini-MIAS's films, with the masses `annotations` plants when it plants."""
    load = P.film_loader(exp.data)
    if exp.planted_contrast is None:
        return load
    from mammo_tf.planted import planted_loader

    return planted_loader(load, annotations, exp.planted_contrast)


def make_samples(exp: DetectorExperiment, annotations: pd.DataFrame | None = None) -> Samples:
    """The experiment's samples: detection crops (crops protocol) or prepared whole films."""
    ann = annotations if annotations is not None else mias.load_annotations(exp.data)
    ann, excluded = usable_annotations(ann)
    ann = subset_patients(ann, exp.max_patients, exp.seed)
    if exp.planted_contrast is not None:
        from mammo_tf.planted import planted_annotations

        ann = planted_annotations(ann, P.FilmCache(P.film_loader(exp.data)), exp.seed)
    if exp.protocol == "whole":
        records, films, transforms = whole_records(ann, exp.image_size, film_reader(exp, ann))
        return Samples(records, films, transforms, excluded, ann)
    films = P.FilmCache(load_image=P.film_loader(exp.data), clahe_clip=exp.clahe_clip)
    records = P.detection_crops(ann, exp.image_size, crops_per_lesion=exp.crops_per_lesion, n_normal=exp.n_normal,
                                seed=exp.seed, films=films)
    return Samples(records, films, {}, excluded, ann)


def _train_val(annotations: pd.DataFrame, patients: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """(train patients, val patients, stratified?): `train_val_split`, or a plain random split when a class is too small."""
    from sklearn.model_selection import train_test_split

    from mammo_tf.data.splits import train_val_split

    if fraction == 0:
        return np.sort(patients), patients[:0], True
    try:
        tr, va = train_val_split(annotations, patients, fraction, seed)
        return tr, va, True
    except ValueError:  # tiny subsets: a class cannot appear on both sides
        tr, va = train_test_split(np.asarray(patients), test_size=fraction, random_state=seed)
        return np.sort(tr), np.sort(va), False


def make_folds(exp: DetectorExperiment, samples: Samples) -> list[Fold]:
    """The experiment's folds: `patient_folds` (stratified by patient label), or naive (LEAKY) over records."""
    from sklearn.model_selection import KFold, train_test_split

    from mammo_tf.data.splits import patient_folds
    from mammo_tf.pipelines import assert_no_patient_leak

    records = samples.records
    folds: list[Fold] = []
    if exp.naive_split:
        # The leakage audit: samples, not patients, are split (crops of one lesion land on both sides).
        kfold = KFold(n_splits=exp.folds, shuffle=True, random_state=exp.seed)
        for k, (train_rows, test_rows) in enumerate(kfold.split(np.arange(len(records)))):
            if k >= exp.n_folds_run:
                break
            tr, va = (train_test_split(train_rows, test_size=exp.val_fraction, random_state=exp.seed + k)
                      if exp.val_fraction else (train_rows, train_rows[:0]))
            pick = lambda rows: records.iloc[np.sort(rows)].reset_index(drop=True)  # noqa: E731
            folds.append(Fold(k, pick(tr), pick(va), pick(test_rows), leaky=True))
        return folds
    ann = samples.annotations
    # Folds over the full table (films with unlocated lesions included) when no subset is drawn, so
    # that they are exactly the classifier's folds: the cascade and a classifier-initialised
    # backbone then never meet a patient that the other model trained on.
    fold_ann = mias.load_annotations(exp.data) if exp.max_patients is None else ann
    for k, (train_patients, test_patients) in enumerate(patient_folds(fold_ann, exp.folds, exp.seed)):
        if k >= exp.n_folds_run:
            break
        # Planted masses use the normal films only: a patient without one has nothing to train on.
        train_patients = np.intersect1d(train_patients, ann["patient_id"].unique())
        tr, va, stratified = _train_val(ann, train_patients, exp.val_fraction, exp.seed + k)
        pick = lambda p: records[records["patient_id"].isin(p)].reset_index(drop=True)  # noqa: E731
        fold = Fold(k, pick(tr), pick(va), pick(test_patients), stratified_val=stratified)
        assert_no_patient_leak(fold.train, fold.val, fold.test)
        if fold.train.empty or fold.test.empty:
            raise ValueError(f"fold {k} has no training or no test samples: use more patients")
        folds.append(fold)
    return folds


# --------------------------------------------------------------------------- tf.data


def _max_boxes(records: pd.DataFrame) -> int:
    return max(1, int(records["boxes"].map(len).max())) if len(records) else 1


def image_dataset(records: pd.DataFrame, films: P.FilmCache, batch_size: int, channels: int = 1) -> Any:
    """Batches of model-ready images (B, S, S, C) float32 in [0, 1], in record order (no targets)."""
    from mammo_tf.pipelines import crop_dataset

    ds = crop_dataset(records, training=False, batch_size=batch_size, max_boxes=_max_boxes(records), films=films)
    return ds.map(lambda x, y: _channels(x, channels))


def _channels(x: Any, channels: int) -> Any:
    import tensorflow as tf

    return tf.image.grayscale_to_rgb(x) if channels == 3 else x


def detection_dataset(
    records: pd.DataFrame,
    films: P.FilmCache,
    anchor_cfg: Any,
    *,
    training: bool,
    batch_size: int,
    seed: int = 0,
    augment: bool = True,
    augment_ops: str = "flips_rot90",
    max_angle: float = 0.0,
    zoom_min_scale: float = 1.0,
    max_shift: int = 0,
    max_zoom_out: float = 1.0,
    match_iou: float = 0.5,
    variances: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
    channels: int = 1,
    ignore_iou: float | None = None,
) -> Any:
    """Batches of ``(image (B, S, S, C) float32 [0, 1], {"cls": (B, N), "loc": (B, N, 4)})`` SSD targets.

    Images and boxes come from :func:`mammo_tf.pipelines.crop_dataset` (boxes normalised by the
    image size, moved with the image by the training augmentation); each image's boxes are then
    matched to the default boxes by :func:`mammo_tf.models.ssd.ssd_targets_fn`.
    """
    import tensorflow as tf

    from mammo_tf.models.ssd import ssd_targets_fn
    from mammo_tf.pipelines import crop_dataset

    if records.empty:
        raise ValueError("no records for a detection dataset")
    targets = ssd_targets_fn(anchor_cfg, match_iou, variances, ignore_iou)
    ds = crop_dataset(records, training=training, batch_size=1, seed=seed, augment_train=augment,
                      max_angle=max_angle, rot90s=augment_ops == "flips_rot90", flips=augment_ops != "none",
                      flips_up_down=augment_ops == "flips_rot90", zoom_min_scale=zoom_min_scale, max_shift=max_shift,
                      max_zoom_out=max_zoom_out, max_boxes=_max_boxes(records), films=films)

    def to_targets(x: tf.Tensor, y: dict) -> tuple:
        b, lab = y["boxes"], y["labels"]
        # Padding rows (label 0), and any box a rotation squeezed flat, are not ground truth.
        keep = (lab > 0) & (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        return targets(_channels(x, channels), tf.boolean_mask(b, keep), tf.boolean_mask(lab, keep))

    ds = ds.unbatch().map(to_targets, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
    # unbatch() forgets the length; Keras needs it to size epochs without a "ran out of data" stop.
    ds = ds.apply(tf.data.experimental.assert_cardinality(math.ceil(len(records) / batch_size)))
    return ds.prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------- model and training


def _trainer_class() -> type:
    """The Keras model that trains an SSD with MultiBoxLoss on dict targets (built lazily: imports Keras)."""
    import keras

    from mammo_tf.training import replicas_in_sync

    class SSDTrainer(keras.Model):
        """Wraps the functional SSD; ``compute_loss`` hands the dict targets and outputs to MultiBoxLoss.

        Keras' compiled losses route one loss per output, which cannot feed the two-output dict
        ``{"cls", "loc"}`` to one loss; only the wrapped functional model is ever saved.
        """

        def __init__(self, ssd: keras.Model, loss: Any, **kwargs: Any) -> None:
            super().__init__(name=f"{ssd.name}_trainer", **kwargs)
            self.ssd = ssd
            self.multibox = loss
            self.cls_loss = keras.metrics.Mean(name="cls_loss")
            self.loc_loss = keras.metrics.Mean(name="loc_loss")
            self.built = True  # the wrapped SSD is built (BackupAndRestore needs weights before fit)

        def call(self, inputs: Any, training: bool = False) -> Any:
            return self.ssd(inputs, training=training)

        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):  # noqa: ANN001
            parts = self.multibox.components(y, y_pred)
            # Weighted by batch size as Keras weights its loss tracker, so that cls + alpha loc = loss.
            n = keras.ops.shape(y["cls"])[0]
            self.cls_loss.update_state(parts["cls"], sample_weight=n)
            self.loc_loss.update_state(parts["loc"], sample_weight=n)
            total = parts["total"]
            if self.losses:  # the layers' regularisation losses (e.g. the cnn backbone's l2)
                total = total + keras.ops.sum([keras.ops.cast(v, "float32") for v in self.losses])
            # Under tf.distribute Keras sums the replicas' gradients (and un-scales its loss tracker),
            # so each replica returns its share, as Keras' own losses do.
            return total / replicas_in_sync()

    return SSDTrainer


def anchor_config(ssd_cfg: Any) -> Any:
    """The default-box configuration of an SSD config (built once with random weights, cheap)."""
    from mammo_tf.models.ssd import build_ssd

    return build_ssd(dataclasses.replace(ssd_cfg, weights="random"))[1]


def save_detector(model: Any, exp: DetectorExperiment, anchor_cfg: Any, model_dir: str | Path, **extra: Any) -> Path:
    """Write ``model.keras`` and ``config.json`` (experiment, SSDConfig, anchors) atomically."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(model_dir / MODEL_FILE, suffix=".keras") as tmp:
        model.save(tmp)
    cfg = {"experiment": exp.to_dict(), "ssd": exp.ssd_config().to_dict(), "anchors": anchor_cfg.to_dict(),
           "classes": {str(k): v for k, v in CLASS_NAMES.items()}, **extra}
    save_json(model_dir / CONFIG_FILE, cfg)
    return model_dir


def load_detector(model_dir: str | Path) -> tuple[Any, DetectorExperiment, Any]:
    """(model, experiment, anchor config) of a saved detector; the model is loaded in Keras safe mode."""
    from mammo_tf.anchors import AnchorConfig
    from mammo_tf.models.ssd import load_ssd

    model_dir = Path(model_dir)
    for name in (MODEL_FILE, CONFIG_FILE):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir}: no {name} (not a trained detector folder)")
    cfg = load_json(model_dir / CONFIG_FILE)
    exp = from_dict(DetectorExperiment, cfg["experiment"])
    anchors = AnchorConfig.from_dict(cfg["anchors"])
    model = load_ssd(model_dir / MODEL_FILE)
    n_out = int(model.output["cls_logits"].shape[1]) if isinstance(model.output, dict) else None
    if n_out is not None and n_out != anchors.num_anchors:
        raise ValueError(f"{model_dir}: the model predicts {n_out} boxes but config.json has {anchors.num_anchors} anchors")
    return model, exp, anchors


def train_fold(exp: DetectorExperiment, samples: Samples, fold: Fold, fold_dir: str | Path, verbose: int | str = 0) -> dict:
    """Train one fold (resumable) and save its model; returns the history and timing."""
    import keras

    from mammo_tf import training
    from mammo_tf.models.ssd import build_ssd

    fold_dir = Path(fold_dir)
    ssd_cfg, tcfg = exp.ssd_config(), exp.train_config()
    if exp.backbone_from:
        ssd_cfg = dataclasses.replace(ssd_cfg, weights=str(_backbone_weights(exp, fold)))
    init_model = init_fold_dir(exp, fold) / MODEL_FILE if exp.init_from else None
    previous = keras.mixed_precision.global_policy().name
    precision = training.set_precision(tcfg.mixed_precision)
    try:
        anchors = anchor_config(ssd_cfg)
        common = dict(batch_size=tcfg.batch_size, match_iou=exp.match_iou, variances=ssd_cfg.variances,
                      channels=ssd_cfg.input_channels, ignore_iou=exp.ignore_iou)
        train_ds = detection_dataset(fold.train, samples.films, anchors, training=True, seed=tcfg.seed + fold.index,
                                     augment=exp.augment, augment_ops=exp.augment_ops, max_angle=exp.max_angle,
                                     zoom_min_scale=exp.zoom_min_scale, max_shift=exp.max_shift,
                                     max_zoom_out=exp.max_zoom_out, **common)
        val_ds = (detection_dataset(fold.val, samples.films, anchors, training=False, **common)
                  if len(fold.val) else None)
        trainer_cls = _trainer_class()
        loss = multibox_loss(exp)
        select = {}
        if exp.select_on == "val_mAP":
            select = dict(monitor="val_mAP", mode="max", metrics=[_validation_map_callback(exp, samples, fold.val, anchors)])
        t0 = time.perf_counter()
        # With snapshots and no early stopping, the best measured epoch is still the one kept.
        keep_best = tcfg.early_stopping or bool(exp.snapshot_every)
        def build() -> Any:
            ssd = build_ssd(ssd_cfg)[0]
            if init_model is not None:  # a resumed fit then restores its own backup over these weights
                ssd.load_weights(init_model)
            return trainer_cls(ssd, loss)

        trainer, history = training.fit(build, lambda: {}, train_ds, val_ds, tcfg, fold_dir, verbose=verbose,
                                        keep_best=keep_best, **select)
        seconds = time.perf_counter() - t0
        save_detector(trainer.ssd, exp, anchors, fold_dir, fold=fold.index, precision=precision,
                      train_refnums=sorted(set(fold.train["refnum"])), leaky=fold.leaky)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    epochs = len(history) if len(history) else tcfg.epochs
    if len(history):
        save_figure(_training_curves(history, f"fold {fold.index}"), fold_dir / "training_curves.png")
    # Wall-clock rate of the whole fit (graph tracing and validation included).
    return {"seconds": seconds, "epochs": epochs, "n_train": len(fold.train), "n_val": len(fold.val),
            "train_images_per_s": len(fold.train) * epochs / seconds, "precision": precision}


def multibox_loss(exp: DetectorExperiment) -> Any:
    """The experiment's MultiBox loss (hard negatives, their floor, the box term's weight)."""
    from mammo_tf.losses import MultiBoxLoss

    return MultiBoxLoss(neg_pos_ratio=exp.neg_pos_ratio, min_negatives=exp.min_negatives, alpha=exp.loc_weight)


def is_snapshot_epoch(exp: DetectorExperiment, epoch: int) -> bool:
    """Whether 1-based ``epoch`` is one at which the validation mAP is measured (every epoch without snapshots)."""
    every = exp.snapshot_every or 1
    return epoch % every == 0 or epoch == exp.train_config().epochs


def _validation_map_callback(exp: DetectorExperiment, samples: Samples, records: pd.DataFrame, anchors: Any) -> Any:
    """A Keras callback that logs ``val_mAP``, the validation records' mAP, every ``exp.snapshot_every`` epochs (NaN between)."""
    import keras

    gts = _ground_truth(exp, records, samples.annotations)
    if not any(len(g["boxes"]) for g in gts):
        raise ConfigError(f"{exp.name}: the validation patients have no lesion, so val_mAP is undefined "
                          "(use more patients or select_on: val_loss)")
    channels = exp.ssd_config().input_channels

    class ValidationMAP(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            if not is_snapshot_epoch(exp, epoch + 1):
                if logs is not None:  # NaN is never "best", and keeps the column in the CSV log
                    logs["val_mAP"] = float("nan")
                return
            images = image_dataset(records, samples.films, exp.train_config().batch_size, channels)
            dets = _to_eval_pixels(exp, samples, records, predict_batches(self.model.ssd, images, anchors, exp))
            if logs is not None:
                logs["val_mAP"] = detection_metrics(gts, dets, exp.iou_threshold)[0]["map"]

    return ValidationMAP()


def _backbone_weights(exp: DetectorExperiment, fold: Fold) -> Path:
    """The classifier model of the same fold, after checking it never trained on this fold's test patients."""
    if exp.naive_split or exp.ssd_config().backbone != "cnn":
        raise ConfigError("backbone_from needs the cnn backbone and patient-level folds")
    source = Path(exp.backbone_from) / f"fold{fold.index}"
    predictions = source / "film_predictions.csv"
    if not (source / MODEL_FILE).is_file() or not predictions.is_file():
        raise ConfigError(f"backbone_from: {source} has no trained classifier ({MODEL_FILE}, film_predictions.csv)")
    tested = set(pd.read_csv(predictions)["refnum"])
    unseen = set(fold.test["refnum"]) - tested
    if unseen:
        raise ConfigError(f"backbone_from: the classifier of fold {fold.index} trained on test films {sorted(unseen)[:5]}; "
                          "its folds differ from the detector's")
    return source / MODEL_FILE


def init_fold_dir(exp: DetectorExperiment, fold: Fold) -> Path:
    """The ``init_from`` run's fold model for ``fold``, after checking it never saw the fold's test films and has this SSD."""
    source = Path(exp.init_from) / "folds" / f"fold{fold.index}"
    if not (source / MODEL_FILE).is_file() or not (source / CONFIG_FILE).is_file():
        raise ConfigError(f"init_from: {source} has no trained detector ({MODEL_FILE}, {CONFIG_FILE})")
    check_unseen(source, fold)
    theirs = load_json(source / CONFIG_FILE)
    if theirs["ssd"] != exp.ssd_config().to_dict() or theirs["experiment"]["protocol"] != exp.protocol:
        raise ConfigError(f"init_from: {source} is another network or protocol than {exp.name}'s; "
                          "use the same ssd settings and image_size")
    return source


def _training_curves(history: pd.DataFrame, title: str) -> Any:
    from mammo_tf.plots.classification import plot_training_curves

    return plot_training_curves(history, title=title)


# --------------------------------------------------------------------------- prediction


def predict_batches(model: Any, batches: Iterable[Any], anchor_cfg: Any, exp: DetectorExperiment) -> list[dict]:
    """Detections per image (boxes normalised, labels 1/2, scores) for an iterable of image batches."""
    from mammo_tf.anchors import default_boxes

    anchors = default_boxes(anchor_cfg)
    out: list[dict] = []
    for batch in batches:
        out += decode_batch(model(batch, training=False), anchors, exp)
    return out


def decode_batch(pred: Any, anchors: Any, exp: DetectorExperiment) -> list[dict]:
    """Per-image detections (boxes normalised, labels 1/2, scores) of one batch of raw SSD outputs (NMS)."""
    from mammo_tf.boxes import decode_detections

    det = decode_detections(pred["cls_logits"], pred["box_offsets"], anchors, score_threshold=exp.score_threshold,
                            iou_threshold=exp.nms_iou_threshold, max_per_class=exp.max_per_class,
                            max_total=exp.max_total, variances=exp.ssd_config().variances)
    det = {k: np.asarray(v) for k, v in det.items()}
    return [{"boxes": det["boxes"][i, :n].astype(np.float64), "labels": det["classes"][i, :n].astype(np.int64),
             "scores": det["scores"][i, :n].astype(np.float64)} for i, n in enumerate(det["num_detections"])]


def model_input(prepared: Sequence[np.ndarray], channels: int = 1) -> np.ndarray:
    """Prepared uint8 squares -> the detector's input batch (B, S, S, channels), float32 in [0, 1]."""
    batch = np.stack(prepared).astype(np.float32)[..., None] / 255.0
    return np.repeat(batch, 3, axis=-1) if channels == 3 else batch


def detect_prepared(model: Any, exp: DetectorExperiment, anchor_cfg: Any, prepared: Sequence[np.ndarray],
                    transforms: Sequence[P.WholeTransform], image_shapes: Sequence[Sequence[int]],
                    batch_size: int = 8) -> list[dict]:
    """Detections in each original film's pixels, from films already prepared by `prepare_whole`."""
    channels = exp.ssd_config().input_channels
    batches = (model_input(prepared[i:i + batch_size], channels) for i in range(0, len(prepared), batch_size))
    dets = predict_batches(model, batches, anchor_cfg, exp)
    return [{**d, "boxes": to_original_pixels(d["boxes"], t, shape)}
            for d, t, shape in zip(dets, transforms, image_shapes)]


def detect_films(model: Any, exp: DetectorExperiment, anchor_cfg: Any, images: Sequence[np.ndarray],
                 batch_size: int = 8, masks: Sequence[np.ndarray] | None = None,
                 prepared: Sequence[tuple] | None = None) -> list[dict]:
    """Detections in each film's own pixels: a whole-protocol model sees the breast resized to its input
    (``prepared``: `prepare_whole`'s outputs, when made already), a crops-protocol model searches the film at
    full resolution, tile by tile (:mod:`mammo_tf.tiled`; ``masks``: the films' breast masks, when made)."""
    if exp.protocol == "crops":
        from mammo_tf import tiled

        masks = masks if masks is not None else [P.breast_mask(im) for im in images]
        if exp.clahe_clip is not None:  # after the masks: those are the raw films'
            images = [P.clahe(im, exp.clahe_clip) for im in images]
        return [tiled.detect_film(model, exp, anchor_cfg, im, m, tiled.TileConfig(), batch_size)[0]
                for im, m in zip(images, masks)]
    prepared = prepared or [P.prepare_whole(im, None, size=exp.image_size) for im in images]
    return detect_prepared(model, exp, anchor_cfg, [p[0] for p in prepared], [p[2] for p in prepared],
                           [im.shape for im in images], batch_size)


def to_original_pixels(boxes: np.ndarray, transform: P.WholeTransform, image_shape: Sequence[int]) -> np.ndarray:
    """Normalised boxes on a prepared whole film -> pixel boxes on the original film (clipped to it)."""
    pixels = transform.to_original(np.asarray(boxes, np.float64).reshape(-1, 4) * transform.size)
    h, w = image_shape[:2]
    return np.clip(pixels, 0, [h, w, h, w])


# --------------------------------------------------------------------------- evaluation


def _ground_truth(exp: DetectorExperiment, records: pd.DataFrame, annotations: pd.DataFrame) -> list[dict]:
    """Per record: ground-truth boxes in evaluation pixels (crop pixels, or original film pixels)."""
    if exp.protocol == "whole":
        out = []
        for r in records["refnum"]:
            b, lab = mias.lesion_boxes(annotations, r)
            out.append({"boxes": b.astype(np.float64), "labels": lab.astype(np.int64)})
        return out
    return [{"boxes": np.asarray(b, np.float64).reshape(-1, 4), "labels": np.asarray(lab, np.int64)}
            for b, lab in zip(records["boxes"], records["box_labels"])]


def _to_eval_pixels(exp: DetectorExperiment, samples: Samples, records: pd.DataFrame, dets: list[dict]) -> list[dict]:
    out = []
    for r, d in zip(records["refnum"], dets):
        if exp.protocol == "whole":
            boxes = to_original_pixels(d["boxes"], samples.transforms[r], (mias.IMAGE_SIZE, mias.IMAGE_SIZE))
        else:
            boxes = d["boxes"] * exp.image_size
        out.append({**d, "boxes": boxes})
    return out


# Looser IoU thresholds at which the class-agnostic lesion AP is reported too: mini-MIAS boxes come
# from rough circles, and these tell a box that is off in size from a lesion missed altogether.
LESION_IOUS = (0.3, 0.1)


def as_lesions(ground_truths: list[dict], detections: list[dict],
               nms_iou_threshold: float = 0.45) -> tuple[list[dict], list[dict]]:
    """The same images with one class, "lesion": every label 1, and a benign and a malignant box on
    one spot merged by class-agnostic NMS (the higher score kept), so neither counts as a duplicate."""
    from mammo_tf.boxes import suppress_across_classes

    gts = [{"boxes": g["boxes"], "labels": np.ones(len(g["labels"]), np.int64)} for g in ground_truths]
    dets = []
    for d in detections:
        keep = suppress_across_classes(d["boxes"], d["scores"], nms_iou_threshold)
        dets.append({"boxes": np.asarray(d["boxes"])[keep], "scores": np.asarray(d["scores"])[keep],
                     "labels": np.ones(len(keep), np.int64)})
    return gts, dets


def image_scores(detections: Sequence[dict]) -> np.ndarray:
    """Each image's highest detection score (0 without detections): the detector read as an image classifier."""
    return np.array([float(np.max(d["scores"])) if len(d["scores"]) else 0.0 for d in detections])


def lesion_ap(ground_truths: list[dict], detections: list[dict], iou_threshold: float = 0.5) -> float:
    """All-point VOC AP of one class, "lesion", on images already passed through :func:`as_lesions`."""
    from mammo_tf.metrics.detection import evaluate_detections

    ev = evaluate_detections(ground_truths, detections, iou_threshold=iou_threshold, class_ids=(1,),
                             class_names=("lesion",))
    return ev["classes"]["lesion"]["ap_all_point"]


def detection_metrics(ground_truths: list[dict], detections: list[dict], iou_threshold: float = 0.5,
                      nms_iou_threshold: float = 0.45) -> tuple[dict, dict, dict]:
    """(flat scalar metrics, evaluate_detections result, froc result with its `hit_localisation` at 1 FP) of one set of images."""
    from mammo_tf.metrics.classification import safe_roc_auc
    from mammo_tf.metrics.detection import evaluate_detections, froc, hit_localisation, sensitivity_at_fp

    ev = evaluate_detections(ground_truths, detections, iou_threshold=iou_threshold)
    fr = froc(ground_truths, detections)
    # The centre criterion is lenient to large boxes (on a lesion-centred crop, any big central box
    # hits): the IoU criterion is kept beside it.
    fr_iou = froc(ground_truths, detections, criterion="iou", iou_threshold=iou_threshold)
    flat = {
        "benign_ap": ev["classes"]["benign"]["ap_all_point"],
        "malignant_ap": ev["classes"]["malignant"]["ap_all_point"],
        "map": ev["map_all_point"],
        "benign_ap_11": ev["classes"]["benign"]["ap_11_point"],
        "malignant_ap_11": ev["classes"]["malignant"]["ap_11_point"],
        "map_11": ev["map_11_point"],
        "sens_at_1fp": sensitivity_at_fp(fr, 1.0),
        "froc_mean_sensitivity": fr["mean_sensitivity"],
        "sens_at_1fp_iou": sensitivity_at_fp(fr_iou, 1.0),
        "froc_iou_mean_sensitivity": fr_iou["mean_sensitivity"],
        "n_images": len(ground_truths),
        "n_benign": ev["classes"]["benign"]["n_gt"],
        "n_malignant": ev["classes"]["malignant"]["n_gt"],
    }
    # Images with a lesion against images without, scored by their best detection (cf. the classifiers' film AUC).
    flat["image_auc"] = safe_roc_auc([len(g["boxes"]) > 0 for g in ground_truths], image_scores(detections))
    # With the class ignored, AP measures the boxes alone: how much of the mAP gap is the class.
    lesion_gts, lesion_dets = as_lesions(ground_truths, detections, nms_iou_threshold)
    flat["lesion_ap"] = lesion_ap(lesion_gts, lesion_dets, iou_threshold)
    for t in LESION_IOUS:
        flat[f"lesion_ap_iou{t:g}"] = lesion_ap(lesion_gts, lesion_dets, t)
    # The lesions found at 1 FP per image by their centre: how well their boxes fit (why AP can lag the FROC).
    fr["hit_localisation"] = hit_localisation(fr, 1.0)
    flat.update({f"hit_{k}": fr["hit_localisation"][k] for k in HIT_KEYS})
    return flat, ev, fr


HIT_KEYS = ("iou_median", "iou50_share", "size_log2_median", "size_corr")
ROW_VALUES = {"benign AP": "benign_ap", "malignant AP": "malignant_ap", "mAP": "map", "mAP (VOC07 11-pt)": "map_11",
              "sens@1FP": "sens_at_1fp", "lesion AP (class ignored)": "lesion_ap",
              "lesion AP, IoU >= 0.1": "lesion_ap_iou0.1", "image AUC (best score)": "image_auc",
              "train mAP (fit check)": "train_mAP", "train mAP, crops cut elsewhere": "train_recut_mAP"}

# The seed offset of the re-cut training crops (crops protocol): the same lesions and normal films,
# each crop at another position.
RECUT_SEED_OFFSET = 101


def recut_train_records(exp: DetectorExperiment, samples: Samples, fold: Fold) -> pd.DataFrame | None:
    """The fold's training crops cut afresh at other seeded positions (crops protocol; else None).

    A model that has learnt its training lesions finds them there about as well as in its own
    crops; one that has memorised its crops does not.
    """
    if exp.protocol != "crops":
        return None
    ann = samples.annotations[samples.annotations["refnum"].isin(set(fold.train["refnum"]))]
    return P.detection_crops(ann, exp.image_size, crops_per_lesion=exp.crops_per_lesion, n_normal=exp.n_normal,
                             seed=exp.seed + RECUT_SEED_OFFSET, films=samples.films)


def anchor_coverage(records: pd.DataFrame, anchor_cfg: Any, match_iou: float = 0.5) -> dict:
    """How well the default boxes fit the lesions: each lesion box's best IoU with a default box, and how many match it."""
    from mammo_tf.anchors import default_boxes
    from mammo_tf.boxes import centre_to_corners, iou

    corners = centre_to_corners(default_boxes(anchor_cfg))
    best, matched = [], []
    for boxes, size in zip(records["boxes"], records["size"]):
        if len(boxes):
            overlaps = np.asarray(iou(np.asarray(boxes, np.float32).reshape(-1, 4) / float(size), corners))
            best += overlaps.max(axis=1).tolist()
            matched += (overlaps >= match_iou).sum(axis=1).tolist()
    best_arr = np.asarray(best)
    return {"n_lesions": len(best), "match_iou": match_iou,
            "median_best_iou": float(np.median(best_arr)) if best else float("nan"),
            f"share_best_iou_ge_{match_iou:g}": float((best_arr >= match_iou).mean()) if best else float("nan"),
            "median_matched_default_boxes": float(np.median(matched)) if best else float("nan")}


def _row_values(summary: dict) -> dict:
    """Report cells: [mean, std] over folds, or the plain value when there is one fold."""
    values = {}
    for column, key in ROW_VALUES.items():
        s = summary.get(key, {"mean": float("nan"), "n": 0})
        values[column] = [s["mean"], s["std"]] if s["n"] > 1 else s["mean"]
    return values


def check_unseen(fold_dir: str | Path, fold: Fold) -> None:
    """Fail unless the fold model in ``fold_dir`` never trained on a film of ``fold``'s test set (leaky folds excepted)."""
    seen = set(load_json(Path(fold_dir) / CONFIG_FILE).get("train_refnums", [])) & set(fold.test["refnum"])
    if seen and not fold.leaky:
        raise ConfigError(f"{fold_dir}: this model trained on {len(seen)} of the fold's test films "
                          f"(e.g. {sorted(seen)[:3]}): it was trained with other folds; retrain it")


def saved_model_detections(exp: DetectorExperiment, samples: Samples, out_dir: str | Path) -> Callable[[Fold], dict]:
    """``fold -> {"test", "train"[, "train_recut"]: detections}`` (normalised boxes, record order) of each fold's saved model."""

    def detections(fold: Fold) -> dict[str, list[dict]]:
        fold_dir = Path(out_dir) / "folds" / f"fold{fold.index}"
        model, _, anchors = load_detector(fold_dir)
        check_unseen(fold_dir, fold)
        batch, channels = exp.train_config().batch_size, exp.ssd_config().input_channels
        # The training set too: does the model fit it, and its lesions beyond its crops? (Fit checks, not results.)
        splits = {"test": fold.test, "train": fold.train, "train_recut": recut_train_records(exp, samples, fold)}
        return {split: predict_batches(model, image_dataset(records, samples.films, batch, channels), anchors, exp)
                for split, records in splits.items() if records is not None and len(records)}

    return detections


def evaluate_experiment(exp: DetectorExperiment, out_dir: str | Path, command: str | None = None,
                        samples: Samples | None = None, annotations: pd.DataFrame | None = None,
                        training_info: dict | None = None,
                        detections: Callable[[Fold], dict] | None = None, trained_by: dict | None = None,
                        row_name: str | None = None, figure_label: str = "SSD",
                        protocol_note: str | None = None) -> dict:
    """Evaluate every fold's model on its test set, beside the oracle and chance references; write metrics and figures.

    ``detections``: where each fold's detections come from (default: its saved model, see
    :func:`saved_model_detections`); ``trained_by``: the provenance of a training run made
    elsewhere (e.g. on a GPU machine, :mod:`mammo_tf.detector_arrays`); ``row_name`` and
    ``figure_label``: what the report row and the figures call a detector that is not the SSD
    of ``exp`` (e.g. :mod:`mammo_tf.candidates`); ``protocol_note``: how the test samples were
    searched, when not as ``exp.protocol`` says (e.g. :mod:`mammo_tf.tiled`).
    """
    from mammo_tf.baselines import oracle_boxes_random_class, random_boxes_random_class
    from mammo_tf.metrics.classification import summarise_folds
    from mammo_tf.plots import detection as dplots

    out = Path(out_dir)
    ann = annotations if annotations is not None else mias.load_annotations(exp.data)
    samples = samples or make_samples(exp, ann)
    folds = make_folds(exp, samples)
    detections = detections or saved_model_detections(exp, samples, out)
    fold_rows, model_metrics, base_metrics, random_metrics = [], [], [], []
    pooled_gt, pooled_det, pooled_random, examples, lesions = [], [], [], [], []
    hits: dict[str, list[dict]] = {"test": [], "train": []}
    for fold in folds:
        fold_dir = out / "folds" / f"fold{fold.index}"
        found = detections(fold)
        dets = _to_eval_pixels(exp, samples, fold.test, found["test"])
        gts = _ground_truth(exp, fold.test, samples.annotations)
        flat, ev, fr = detection_metrics(gts, dets, exp.iou_threshold, exp.nms_iou_threshold)
        base, _, _ = detection_metrics(gts, oracle_boxes_random_class(gts, seed=exp.seed + fold.index),
                                       exp.iou_threshold, exp.nms_iou_threshold)
        guesses = random_boxes_random_class([_breast_region(samples, r) for r in fold.test.itertuples()],
                                            _lesion_sides(exp, fold.train), RANDOM_BOXES_PER_IMAGE,
                                            seed=exp.seed + fold.index)
        guesses = _to_eval_pixels(exp, samples, fold.test, guesses)
        chance, _, chance_froc = detection_metrics(gts, guesses, exp.iou_threshold, exp.nms_iou_threshold)
        hits["test"].append(fr["hit_localisation"])
        lesions.append(_lesions_found(exp, fold.test, samples.annotations, fr, chance_froc, fold.index,
                                      hits["test"][-1]))
        train_dets = _to_eval_pixels(exp, samples, fold.train, found["train"])
        train_gts = _ground_truth(exp, fold.train, samples.annotations)
        train_flat, _, train_fr = detection_metrics(train_gts, train_dets, exp.iou_threshold, exp.nms_iou_threshold)
        flat["train_mAP"] = train_flat["map"]
        flat.update({f"train_hit_{k}": train_flat[f"hit_{k}"] for k in HIT_KEYS})
        hits["train"].append(train_fr["hit_localisation"])
        if "train_recut" in found:
            recut = recut_train_records(exp, samples, fold)
            flat["train_recut_mAP"] = detection_metrics(
                _ground_truth(exp, recut, samples.annotations), _to_eval_pixels(exp, samples, recut, found["train_recut"]),
                exp.iou_threshold, exp.nms_iou_threshold)[0]["map"]
        model_metrics.append(flat)
        base_metrics.append(base)
        random_metrics.append(chance)
        pooled_gt += gts
        pooled_det += dets
        pooled_random += guesses
        row = {"fold": fold.index, "leaky": fold.leaky, "stratified_val": fold.stratified_val,
               "n_train": len(fold.train), "n_val": len(fold.val), "n_test": len(fold.test),
               "train_patients": sorted(int(p) for p in set(fold.train["patient_id"])),
               "val_patients": sorted(int(p) for p in set(fold.val["patient_id"])),
               "test_patients": sorted(int(p) for p in set(fold.test["patient_id"])),
               "model": flat, "oracle_boxes_random_class": base, "random_boxes_random_class": chance}
        if training_info and fold.index in training_info:
            row["training"] = training_info[fold.index]
        elif (fold_dir / "training.json").is_file():
            row["training"] = load_json(fold_dir / "training.json")
        fold_rows.append(row)
        save_figure(dplots.plot_pr_curves(ev), fold_dir / "pr_curves.png")
        if fold.index == folds[0].index:
            examples = _example_panels(exp, samples, fold.test, gts, dets)
    summary = summarise_folds(model_metrics)
    base_summary = summarise_folds(base_metrics)
    random_summary = summarise_folds(random_metrics)
    pooled, pooled_ev, pooled_fr = detection_metrics(pooled_gt, pooled_det, exp.iou_threshold, exp.nms_iou_threshold)

    reference = (None if exp.planted_contrast is not None  # the poster's numbers are not about planted masses
                 else {"benign": POSTER_REFERENCE["benign"], "malignant": POSTER_REFERENCE["malignant"],
                       "mAP": POSTER_REFERENCE["mAP"]})
    save_figure(dplots.plot_pr_curves(pooled_ev), out / "pr_curves.png")
    save_figure(dplots.plot_ap_bars(pooled_ev, reference=reference, reference_label="poster (reported)"),
                out / "ap_bars.png")
    chance_fr = detection_metrics(pooled_gt, pooled_random, exp.iou_threshold)[2]
    save_figure(dplots.plot_froc({figure_label: pooled_fr, "random boxes (chance)": chance_fr}), out / "froc.png")
    log = out / "folds" / f"fold{folds[0].index}" / "training_log.csv"
    if log.is_file() and log.stat().st_size:
        save_figure(_training_curves(pd.read_csv(log), f"{exp.name}, fold {folds[0].index}"), out / "training_curves.png")
    if examples:
        # Detections drawn on the films are licensed derivatives: images/ is git-ignored.
        save_figure(dplots.draw_detection_grid(examples), out / "images" / "detections.png")

    prov = provenance(command)
    if trained_by:
        prov["trained_by"] = trained_by
    elif not training_info:  # nothing trained in this call: a re-evaluation
        keep_training_provenance(prov, out / "metrics.json")
    metrics = {
        "experiment": exp.to_dict(),
        "protocol_note": protocol_note or (CROPS_NOTE if exp.protocol == "crops" else WHOLE_NOTE),
        **({"planted": PLANTED_NOTE.format(contrast=exp.planted_contrast)}
           if exp.planted_contrast is not None else {}),
        "leaky": exp.naive_split,
        "excluded_films": samples.excluded,
        "n_samples": len(samples.records),
        # The default boxes' fit to every sample's lesions (no model involved): a low share would cap the AP.
        "anchor_coverage": anchor_coverage(samples.records, anchor_config(exp.ssd_config()), exp.match_iou),
        "folds": fold_rows,
        "summary": {"model": summary, "oracle_boxes_random_class": base_summary,
                    "random_boxes_random_class": random_summary},
        "pooled": pooled,
        "hit_localisation": {**{split: pooled_localisation(h) for split, h in hits.items()}, "note": HIT_NOTE},
        "results": _result_rows(exp, summary, base_summary, len(folds), prov, random_summary, row_name,
                                protocol_note),
        "provenance": prov,
    }
    if row_name:  # a detector other than exp's SSD: kept, so that `refresh_rows` names it again
        metrics.update(row_name=row_name, figure_label=figure_label)
    if lesions:
        every = pd.concat(lesions, ignore_index=True)
        # Per lesion, keyed by fold, crop and the lesion's place in its film, so that two detectors on the same test
        # samples can be compared lesion by lesion (`paired_detection`); no annotation is copied.
        with atomic_path(out / LESIONS_FILE) as tmp:
            every[list(LESION_KEYS) + ["found", "found_random", "hit_iou", "hit_size_log2"]].to_csv(
                tmp, index=False, float_format="%.4g")
        metrics["lesions_found"] = lesions_found_summary(every)
        metrics["results"] += _lesion_rows(exp, metrics["lesions_found"], prov, figure_label)
        metrics["results"] += _hit_rows(exp, metrics["hit_localisation"], prov, figure_label)
        save_figure(dplots.plot_lesions_found(metrics["lesions_found"], exp.name), out / "lesions_found.png")
    save_json(out / "metrics.json", metrics)
    return metrics


HIT_NOTE = ("lesions found at 1 false positive per image (box centre in the lesion, each fold at its own threshold), "
            "pooled over the folds: the IoU of each one's best hitting box with its own, and log2 of their sizes' "
            "ratio (box over lesion, sides of equal-area squares); size r: Pearson r of box and lesion log sizes")


def pooled_localisation(per_fold: Sequence[dict]) -> dict[str, float]:
    """`localisation_summary` of the lesions of every fold's `hit_localisation`, pooled."""
    from mammo_tf.metrics.detection import localisation_summary

    keys = ("iou", "size_log2", "lesion_log2_side")
    return localisation_summary(*(np.concatenate([np.asarray(h[k]) for h in per_fold]) if per_fold else np.zeros(0)
                                  for k in keys))


def _augmentation_label(exp: DetectorExperiment) -> str:
    """How the training images were augmented, for the report row."""
    if not exp.augment:
        return "no augmentation"
    ops = {"flips_rot90": ["flips/rot90"], "left_right": ["left-right flips"], "none": []}[exp.augment_ops]
    if exp.max_angle > 0:
        ops.append(f"rotation up to {exp.max_angle:g} deg")
    if exp.zoom_min_scale < 1:
        ops.append(f"zoom in up to {1 / exp.zoom_min_scale:.2g}x")
    if exp.max_zoom_out > 1:
        ops.append(f"zoom out up to {exp.max_zoom_out:.2g}x")
    if exp.max_shift:
        ops.append(f"re-cut up to {exp.max_shift} px away")
    return "/".join(ops) or "no augmentation"


def _breast_region(samples: Samples, record: Any) -> np.ndarray:
    """The breast mask of one sample in model-input pixels (a crop's window of its film's mask, or the prepared film's)."""
    # A whole-protocol record is the prepared film itself (top = left = 0, size = its side).
    return samples.films.mask(record.refnum)[record.top:record.top + record.size, record.left:record.left + record.size]


def _lesion_sides(exp: DetectorExperiment, records: pd.DataFrame) -> np.ndarray:
    """Sides of the lesion boxes in these records, as fractions of the model input (the random reference's sizes)."""
    sides = [max(b[2] - b[0], b[3] - b[1]) / exp.image_size for boxes in records["boxes"] for b in boxes]
    return np.clip(np.asarray(sides or [0.1]), 1e-3, 1.0)


def _result_rows(exp: DetectorExperiment, summary: dict, base: dict, n_folds: int, prov: dict,
                 chance: dict | None = None, row_name: str | None = None, protocol_note: str | None = None) -> list[dict]:
    from mammo_tf.training import schedule_label

    cfg = exp.ssd_config()
    split = (f"{LEAKY_NOTE}; {n_folds} of {exp.folds} random folds" if exp.naive_split
             else f"{n_folds} of {exp.folds} patient folds")
    protocol = protocol_note or (CROPS_NOTE if exp.protocol == "crops" else WHOLE_NOTE)
    table = _table(exp, "Detection (mini-MIAS, crops around lesions: location given)" if exp.protocol == "crops"
                   else "Detection (mini-MIAS, whole films: no prior location)")
    if exp.planted_contrast is not None:
        protocol = PLANTED_NOTE.format(contrast=exp.planted_contrast)
    hardware = hardware_label(prov)
    trained = prov.get("trained_by", {}).get("hardware")
    if trained and hardware_label({"hardware": trained}) != hardware:  # trained on another machine (a GPU)
        hardware = f"trained on {hardware_label({'hardware': trained})}; evaluated on {hardware}"
    common = {"table": table, "command": prov["command"], "hardware": hardware, "date": prov["date"]}
    init = (f"init: {Path(exp.backbone_from).name} fold classifier" if exp.backbone_from
            else f"init: {Path(exp.init_from).name} fold model" if exp.init_from else cfg.weights)
    if exp.hard_negative_tiles:
        init += f", {exp.hard_negative_tiles} hard-negative tiles"
    carried = prov.get("trained_by", {}).get("init_weights")
    if carried and carried != cfg.weights:  # trained elsewhere from a copy (detector_arrays)
        init += f" via {Path(carried).name}"
    if cfg.freeze_through:
        init += f", frozen to {cfg.freeze_through}"
    if cfg.fc6_input_norm:
        init += ", pool5 L2-normalised"
    crops = f", {exp.crops_per_lesion} crops per lesion" if exp.protocol == "crops" and exp.crops_per_lesion > 1 else ""
    box_weight = f", box loss weight {exp.loc_weight:g}" if exp.loc_weight != 1 else ""
    box_weight += f", films equalised (CLAHE, clip {exp.clahe_clip:g})" if exp.clahe_clip is not None else ""
    tcfg = exp.train_config()
    schedule = (f"{tcfg.epochs} epochs, the best val mAP of every {exp.snapshot_every} kept" if exp.snapshot_every
                else schedule_label(tcfg, exp.select_on.replace('_', ' ')))
    model = f"SSD{exp.image_size} {cfg.backbone} ({init}, {schedule}, {_augmentation_label(exp)}{crops}{box_weight})"
    if exp.planted_contrast is not None:
        # another seed plants other masses: its row must not read like the first draw's
        model += f" on planted masses of contrast {exp.planted_contrast:g}" + (f", seed {exp.seed}" if exp.seed else "")
    name = (row_name or model) + (" [LEAKY split]" if exp.naive_split else "")
    return [
        {**common, "row": name, "values": _row_values(summary),
         "note": f"{protocol}; {split}; VOC AP at IoU >= {exp.iou_threshold:g}; FROC: box centre in lesion"},
        {**common, "row": "Oracle boxes, random class", "values": _row_values(base), "note": f"{ORACLE_NOTE}; {split}"},
        *([{**common, "row": chance_row_name(exp), "values": _row_values(chance), "note": f"{RANDOM_NOTE}; {split}"}]
          if chance else []),
        *([] if exp.planted_contrast is not None else [{**common, "row": "Poster (reference)",
         "values": {"benign AP": POSTER_REFERENCE["benign"], "malignant AP": POSTER_REFERENCE["malignant"],
                    "mAP": POSTER_REFERENCE["mAP"]},
         "note": POSTER_NOTE}]),
    ]


def _table(exp: DetectorExperiment, title: str) -> str:
    """A results table's title; runs on planted masses get tables of their own, never beside the real lesions'."""
    return title if exp.planted_contrast is None else f"{title.replace('mini-MIAS', 'planted masses')} [PLANTED]"


# Which lesions the whole-film detector finds, by groups fixed before any result was seen: the MIAS
# abnormality class, breast tissue, severity and the annotated radius (film pixels of 200 um).
RADIUS_BINS = {"radius < 25 px": (0, 25), "radius 25-49 px": (25, 50), "radius >= 50 px": (50, np.inf)}
LESIONS_TABLES = {
    "whole": "Detection, whole films: lesions found at 1 false positive per image, by lesion type",
    "crops": "Detection, crops around lesions (location given): lesions found at 1 false positive per crop, "
             "by lesion type"}


LESIONS_FILE = "lesions_found.csv"
# What names one test lesion in one test sample (a lesion seen in several crops is several).
LESION_KEYS = ("fold", "refnum", "crop_top", "crop_left", "lesion")


def _test_lesions(exp: DetectorExperiment, records: pd.DataFrame, annotations: pd.DataFrame) -> pd.DataFrame:
    """The annotation row of every ground-truth box `_ground_truth` gives for these records, in its order, with its sample's crop position."""
    located = annotations[annotations["has_location"]]
    parts = []
    for r in records.itertuples():
        rows = located[located["refnum"] == r.refnum]
        if rows.empty:  # a normal film or its crop
            continue
        if exp.protocol == "crops":
            # A crop carries the film's lesions that stay at least half visible in it, in the film's order.
            _, _, keep = P.crop_boxes(mias.lesion_boxes(annotations, r.refnum)[0], r.top, r.left, r.size)
            if int(keep.sum()) != len(r.boxes):
                raise RuntimeError(f"{r.refnum} crop at ({r.top}, {r.left}): {len(r.boxes)} boxes, "
                                   f"{int(keep.sum())} lesions")
            rows = rows[keep]
        parts.append(rows.assign(crop_top=r.top, crop_left=r.left))  # a prepared whole film: 0, 0
    return pd.concat(parts) if parts else located.iloc[:0].assign(crop_top=0, crop_left=0)


def _lesions_found(exp: DetectorExperiment, records: pd.DataFrame, annotations: pd.DataFrame, model_froc: dict,
                   chance_froc: dict, fold: int, loc: dict) -> pd.DataFrame:
    """Each test lesion (in `_ground_truth`'s order), found or not at 1 FP per image by model and chance, and
    how the model's hit boxes it (``loc``: `hit_localisation` of ``model_froc``)."""
    from mammo_tf.metrics.detection import found_at_fp

    rows = _test_lesions(exp, records, annotations)
    if len(rows) != len(model_froc["lesion_scores"]):
        raise RuntimeError(f"fold {fold}: {len(rows)} located lesions but {len(model_froc['lesion_scores'])} scored")
    return rows[["refnum", "crop_top", "crop_left", "abnormality", "tissue", "severity", "radius"]].assign(
        lesion=lesion_numbers(annotations).loc[rows.index].to_numpy(), fold=fold, found=found_at_fp(model_froc, 1.0),
        found_random=found_at_fp(chance_froc, 1.0), hit_iou=loc["iou"], hit_size_log2=loc["size_log2"])


def lesion_numbers(annotations: pd.DataFrame) -> pd.Series:
    """Each located lesion's place among its film's located lesions (0, 1, ...): a key that survives filtering."""
    located = annotations[annotations["has_location"]]
    return located.groupby("refnum", sort=False).cumcount()


def lesion_groups(lesions: pd.DataFrame) -> dict[str, pd.Series]:
    """Each lesion's abnormality, tissue, severity and radius bin, named and in reading order, to group by."""
    radius = pd.Series(pd.NA, index=lesions.index, dtype="object")
    for name, (lo, hi) in RADIUS_BINS.items():
        radius[(lesions["radius"] >= lo) & (lesions["radius"] < hi)] = name
    # Categories keep a reading order (fatty to dense, small to large) and drop values absent here.
    return {"abnormality": lesions["abnormality"].map(lambda a: f"{a} ({mias.ABNORMALITY_NAMES[a]})"),
            "tissue": pd.Categorical(lesions["tissue"].map(mias.TISSUES), categories=list(mias.TISSUES.values())),
            "severity": lesions["severity"].map(mias.SEVERITIES),
            "radius": pd.Categorical(radius, categories=list(RADIUS_BINS))}


def lesions_found_summary(lesions: pd.DataFrame) -> dict[str, dict[str, dict]]:
    """Lesions found per group and value, pooled over folds, with a Wilson 95 % interval for the model's share."""
    from scipy.stats import binomtest

    out: dict[str, dict[str, dict]] = {}
    for group, key in lesion_groups(lesions).items():
        for value, g in lesions.groupby(key, sort=True, observed=True):
            n, k = len(g), int(g["found"].sum())
            ci = binomtest(k, n).proportion_ci(method="wilson")
            out.setdefault(group, {})[str(value)] = {
                "n": n, "found": k, "found_random": int(g["found_random"].sum()), "sensitivity": k / n,
                "sensitivity_random": float(g["found_random"].mean()), "ci": [float(ci.low), float(ci.high)]}
    return out


def chance_row_name(exp: DetectorExperiment) -> str:
    """The chance reference's row label; on whole films its boxes depend on the size films are resized to, so that is named."""
    return "Random boxes, random class" + (f", drawn on {exp.image_size} px films" if exp.protocol == "whole" else "")


def _lesion_rows(exp: DetectorExperiment, table: dict[str, dict[str, dict]], prov: dict,
                 figure_label: str = "SSD") -> list[dict]:
    """The model's and the random boxes' lesions found per group, one row each, as 'found/n'."""
    common = {"table": _table(exp, LESIONS_TABLES[exp.protocol]), "command": prov["command"],
              "hardware": hardware_label(prov), "date": prov["date"]}
    what = ("located test lesions" if exp.protocol == "whole" else
            "lesions in the test crops (one seen in several crops counts in each)")
    note = (f"{what} pooled over the folds, each fold at its own threshold for at most 1 false positive per image "
            "(box centre in the lesion); random boxes: the chance reference of the detection table")
    cells = lambda key: {v: f"{c[key]}/{c['n']}" for g in table.values() for v, c in g.items()}  # noqa: E731
    # Named like the detection table's chance row, so that runs on the same test samples share one row.
    return [{**common, "row": f"{exp.name}: {figure_label}", "values": cells("found"), "note": note},
            {**common, "row": chance_row_name(exp), "values": cells("found_random"), "note": note}]


HIT_TABLES = {
    "whole": "Detection, whole films: how the lesions found at 1 false positive per image are boxed",
    "crops": "Detection, crops around lesions (location given): how the lesions found at 1 false positive per crop "
             "are boxed"}


def _hit_rows(exp: DetectorExperiment, loc: dict, prov: dict, figure_label: str = "SSD") -> list[dict]:
    """One row: the found test lesions' box fit (`pooled_localisation`), and the size correlation on training samples."""
    test, train = loc["test"], loc["train"]
    values = {"lesions found": test["n_found"], "median IoU": test["iou_median"], "IoU >= 0.5": test["iou50_share"],
              "median log2 size ratio": test["size_log2_median"], "size r": test["size_corr"],
              "size r, training samples": train["size_corr"], "IoU >= 0.5, training samples": train["iou50_share"]}
    return [{"table": _table(exp, HIT_TABLES[exp.protocol]), "command": prov["command"],
             "hardware": hardware_label(prov), "date": prov["date"], "row": f"{exp.name}: {figure_label}",
             "values": values, "note": HIT_NOTE}]


def refresh_rows(model_dir: str | Path) -> list[dict]:
    """Rebuild the report rows of an evaluated detector from its stored summary (labels change, numbers cannot)."""
    path = Path(model_dir) / "metrics.json"
    metrics = load_json(path)
    exp = from_dict(DetectorExperiment, metrics["experiment"])
    summary = metrics["summary"]
    metrics["results"] = _result_rows(exp, summary["model"], summary["oracle_boxes_random_class"],
                                      len(metrics["folds"]), metrics["provenance"], summary.get("random_boxes_random_class"),
                                      metrics.get("row_name"), metrics.get("protocol_note"))
    if "lesions_found" in metrics:
        metrics["results"] += _lesion_rows(exp, metrics["lesions_found"], metrics["provenance"],
                                           metrics.get("figure_label", "SSD"))
    if "hit_localisation" in metrics and "lesions_found" in metrics:
        metrics["hit_localisation"]["note"] = HIT_NOTE
        metrics["results"] += _hit_rows(exp, metrics["hit_localisation"], metrics["provenance"],
                                        metrics.get("figure_label", "SSD"))
    save_json(path, metrics)
    return metrics["results"]


def _example_panels(exp: DetectorExperiment, samples: Samples, records: pd.DataFrame, gts: list[dict],
                    dets: list[dict], max_drawn: int = 5) -> list[dict]:
    """Up to `n_examples` panels for `draw_detection_grid` (lesion samples first), each with its top detections."""
    order = sorted(range(len(records)), key=lambda i: (len(gts[i]["boxes"]) == 0, i))[: exp.n_examples]
    load = film_reader(exp, samples.annotations) if exp.protocol == "whole" else None
    panels = []
    for i in order:
        top = np.argsort(-dets[i]["scores"], kind="stable")[:max_drawn]  # an untrained model would bury the film
        rec = records.iloc[i]
        if exp.protocol == "whole":
            image = load(rec["refnum"])
        else:
            image = P.cut(samples.films.image(rec["refnum"]), rec)
        panels.append({"image": image, "gt_boxes": gts[i]["boxes"], "gt_labels": gts[i]["labels"],
                       "det_boxes": dets[i]["boxes"][top], "det_labels": dets[i]["labels"][top],
                       "det_scores": dets[i]["scores"][top], "title": f"{rec['refnum']}: {len(gts[i]['boxes'])} lesions, top {len(top)} detections"})
    return panels


# --------------------------------------------------------------------------- the experiment


def train_experiment(exp: DetectorExperiment, out_dir: str | Path, samples: Samples | None = None,
                     annotations: pd.DataFrame | None = None, verbose: int | str = 0) -> dict[int, dict]:
    """Train every fold (a fold whose model is saved is skipped; a killed fold resumes) and save fold 0's model."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ann = annotations if annotations is not None else mias.load_annotations(exp.data)
    samples = samples or make_samples(exp, ann)
    info: dict[int, dict] = {}
    folds = make_folds(exp, samples)
    for fold in folds:
        fold_dir = out / "folds" / f"fold{fold.index}"
        stamp = fold_dir / "experiment.json"
        if stamp.is_file() and _training_key(from_dict(DetectorExperiment, load_json(stamp))) != _training_key(exp):
            # Another configuration trained here: its logs and backups must not leak into this run.
            shutil.rmtree(fold_dir)
        if (fold_dir / MODEL_FILE).is_file() and stamp.is_file():
            # Trained already; only fields that leave this fold's training alone may have changed.
            _restamp(fold_dir, exp)
            continue
        save_json(stamp, exp.to_dict())
        if exp.hard_negative_tiles:
            from mammo_tf.hard_negatives import with_hard_negatives

            fold = with_hard_negatives(exp, samples, fold, fold_dir)
        info[fold.index] = train_fold(exp, samples, fold, fold_dir, verbose=verbose)
        save_json(fold_dir / "training.json", info[fold.index])
    # The deployable model: fold 0's (trained on that fold's training patients only).
    first = out / "folds" / f"fold{folds[0].index}"
    for name in (MODEL_FILE, CONFIG_FILE):
        with atomic_path(out / name) as tmp:
            shutil.copyfile(first / name, tmp)
    return info


# Fields that change which folds run, what is drawn or what the run is called, never how a fold
# trains: a finished fold is kept when only these differ (running 5 folds after 3 reuses the first 3).
NOT_TRAINING_FIELDS = ("name", "max_folds", "n_examples")


def _training_key(exp: DetectorExperiment) -> dict:
    """The experiment as a dict without `NOT_TRAINING_FIELDS` (through the dataclass: a later field at its default is no change)."""
    return {k: v for k, v in exp.to_dict().items() if k not in NOT_TRAINING_FIELDS}


def _restamp(fold_dir: Path, exp: DetectorExperiment) -> None:
    """Write the current experiment into a kept fold's stamp and config, so a re-evaluation reads today's settings."""
    if load_json(fold_dir / "experiment.json") == exp.to_dict():
        return
    save_json(fold_dir / "experiment.json", exp.to_dict())
    cfg = load_json(fold_dir / CONFIG_FILE)
    save_json(fold_dir / CONFIG_FILE, {**cfg, "experiment": exp.to_dict()})


def run_experiment(exp: DetectorExperiment, out_dir: str | Path, command: str | None = None,
                   verbose: int | str = 0) -> dict:
    """Train all folds, evaluate them beside the oracle and chance references, write metrics.json, figures and the model."""
    from mammo_tf.training import set_seeds

    set_seeds(exp.seed)
    ann = mias.load_annotations(exp.data)
    samples = make_samples(exp, ann)
    info = train_experiment(exp, out_dir, samples, ann, verbose=verbose)
    return evaluate_experiment(exp, out_dir, command, samples, ann, training_info=info)


# --------------------------------------------------------------------------- inference
