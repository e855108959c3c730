"""External validation: the mini-MIAS-trained classifier and detector on films from other sources.

Three pieces, each writing metrics, figures and per-image predictions to an output folder:

* `evaluate_classifier_external`: the whole-mammogram classifier (the fold models of a
  `mammo_tf.classify` experiment, averaged) on a set such as rsna-640. Discrimination (ROC AUC,
  patient-level bootstrap CI) needs no threshold. Sensitivity and specificity are read at the
  operating point **chosen on mini-MIAS only** (the out-of-fold film predictions of the
  experiment), then after the cheapest adaptation: the threshold recalibrated on one half of the
  external patients and tested on the other half (patient-disjoint). Beside them, on the same
  images: a logistic regression on intensity features (fitted on the same half) and chance.
* `evaluate_detector_external`: the SSD (`mammo_tf.detector`) on a set with lesion outlines
  (mini-DDSM): lesion sensitivity against mean false positives per image (FROC, lesion-free
  views included), beside the same detections moved to random places in the breast.
* `shift_figures`: what differs between the sources (grey levels, example films).

Preparation (`prepare_external`): grey levels flipped when the background is bright, then the
film brought to the mini-MIAS scale of 0.2 mm per pixel when the spacing is known (DDSM). When it
is not (rsna-640: whole film squeezed to 640 x 640 by the export), the film is resized to
1024 x 1024 like a mini-MIAS film (`UNKNOWN_SPACING_NOTE` gives the assumption).

Labels: rsna-640 has no benign class (its ``negative`` images are cancer-negative screening
films, normal *or* benign); mini-DDSM's sample has no malignant case. The task evaluated is
therefore "malignant vs rest" where a set has malignant images, else "lesion vs lesion-free".
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import pandas as pd

from mammo_tf import photometric
from mammo_tf.classify import is_trained_fold
from mammo_tf.config import from_dict, load_config, provenance
from mammo_tf.data import external
from mammo_tf.io import load_json, save_figure, save_json
from mammo_tf.metrics import classification as cm
from mammo_tf.plots.external import format_ci

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
MIAS_FILM_SIZE = 1024
TARGET_SENSITIVITY = 0.95
HALVES = ("A", "B")
UNKNOWN_SPACING_NOTE = (
    "pixel spacing unknown (rsna-640: whole film squeezed to 640x640, aspect ratio lost): resized to "
    "1024x1024 like a mini-MIAS film, assuming a similar field of view (an 18x24 to 24x30 cm detector "
    "over 1024 px is 0.18-0.29 mm per pixel; mini-MIAS: 0.2 mm)"
)
ENSEMBLE_NOTE = (
    "ensemble: mean of the fold models' whole-mammogram probabilities; its threshold is the one "
    "reaching {target:.0%} sensitivity (abnormal vs normal) on the fold models' out-of-fold mini-MIAS films"
)


@dataclasses.dataclass
class ExternalSetting:
    """One external-validation setting (configs/external_*.yaml); paths relative to the repository root."""

    name: str = "external_small"
    rsna: str = "../shared/data/rsna-640"
    ddsm: str = "../shared/data/mini-ddsm-sample"
    mias_data: str | None = None           # None: $MAMMO_TF_DATA
    classifier: str | None = "models/cnn128_lesion_centred"
    detector: str | None = None
    max_images: int | None = 40            # None: every image
    target_sensitivity: float = TARGET_SENSITIVITY
    n_boot: int = 1000
    n_examples: int = 6
    shift_films: int = 8
    score_threshold: float = 0.01          # detector: keep detections down to this score (FROC)
    seed: int = 0

    def path(self, value: str | None) -> Path | None:
        """A setting's path, resolved against the repository root when relative."""
        if value is None:
            return None
        p = Path(value)
        return p if p.is_absolute() else (REPO_ROOT / p).resolve()


def load_setting(path: str | Path) -> ExternalSetting:
    """Read an external-validation setting from YAML (unknown keys are an error)."""
    return from_dict(ExternalSetting, load_config(path))


# --------------------------------------------------------------------------- preparation


def prepare_external(image: np.ndarray, spacing_mm: float | Sequence[float] | None = None,
                     size_if_unknown: int = MIAS_FILM_SIZE) -> np.ndarray:
    """Fix inverted grey levels, then resample to 0.2 mm per pixel, or to 1024x1024 when the spacing is unknown.

    Unknown spacing (None or NaN) is the rsna-640 case: the export squeezed each whole film to
    640 x 640, so neither the pixel size nor the aspect ratio can be recovered. A mini-MIAS film
    also holds a whole breast in 1024 px, so the film is resized to `size_if_unknown` square
    (see `UNKNOWN_SPACING_NOTE` for the scale this assumes).
    """
    image = photometric.fix_inversion(image)
    unknown = spacing_mm is None or (np.isscalar(spacing_mm) and not np.isfinite(spacing_mm))
    if not unknown:
        return photometric.rescale_spacing(image, spacing_mm, photometric.MIAS_SPACING_MM)
    if size_if_unknown < 1:
        raise ValueError(f"size_if_unknown must be positive, got {size_if_unknown}")
    if image.shape == (size_if_unknown, size_if_unknown):
        return image.copy()
    shrinking = size_if_unknown ** 2 <= image.size
    return cv2.resize(image, (size_if_unknown, size_if_unknown),
                      interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


# --------------------------------------------------------------------------- subsets and halves


def _patient_strata(images: pd.DataFrame) -> pd.DataFrame:
    """One row per patient (sorted): its worst label and its number of images."""
    for col in ("image_id", "patient_id", "label_id"):
        if col not in images:
            raise ValueError(f"images table has no {col!r} column")
    per = images.groupby("patient_id", sort=True).agg(label_id=("label_id", "max"), n=("image_id", "size"))
    return per.reset_index()


def select_images(images: pd.DataFrame, max_images: int | None, seed: int = 0) -> pd.DataFrame:
    """About `max_images` images from whole patients, stratified by the patient's worst label (all when None)."""
    if max_images is None or max_images >= len(images):
        return images.reset_index(drop=True)
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    per = _patient_strata(images)
    rng = np.random.default_rng(seed)
    chosen: list = []
    for _, group in per.groupby("label_id", sort=True):
        # Each stratum gets its share of the images, filled with the patients that fit in it (in
        # random order); a stratum where none fits keeps its smallest patient.
        quota = max(1, round(max_images * group["n"].sum() / len(images)))
        order = rng.permutation(len(group))
        taken = 0
        for i in order:
            n = int(group["n"].iloc[i])
            if taken + n <= quota:
                chosen.append(group["patient_id"].iloc[i])
                taken += n
        if not taken:
            chosen.append(group["patient_id"].iloc[order[int(np.argmin(group["n"].to_numpy()[order]))]])
    return images[images["patient_id"].isin(chosen)].reset_index(drop=True)


def patient_halves(images: pd.DataFrame, seed: int = 0) -> pd.Series:
    """'A' or 'B' per image: patients split in two halves at random (seeded), stratified by worst label."""
    per = _patient_strata(images)
    rng = np.random.default_rng(seed)
    half: dict = {}
    turn = 0
    for _, group in per.groupby("label_id", sort=True):
        # Alternating through a shuffled stratum balances the halves within it; `turn` carries
        # over so that odd strata do not all favour half A.
        for pid in group["patient_id"].to_numpy()[rng.permutation(len(group))]:
            half[pid] = HALVES[turn % 2]
            turn += 1
    return images["patient_id"].map(half).rename("half")


# --------------------------------------------------------------------------- the classifier experiment folder


def model_kind(model_dir: str | Path) -> str:
    """'classifier' (a `mammo_tf.classify` experiment folder) or 'detector' (a `mammo_tf.detector` folder)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: model folder not found")
    if (model_dir / "config.yaml").is_file() and is_trained_fold(model_dir / "fold0"):
        if "strategy" in load_config(model_dir / "config.yaml"):
            return "classifier"
    if (model_dir / "model.keras").is_file() and (model_dir / "config.json").is_file():
        if "ssd" in load_json(model_dir / "config.json"):
            return "detector"
    raise ValueError(f"{model_dir}: neither a classifier experiment (config.yaml with 'strategy' + a trained fold0/) "
                     "nor a detector (model.keras + config.json with 'ssd')")


def find_models(models_dir: str | Path, kind: str) -> list[Path]:
    """Folders under `models_dir` holding a model of `kind` ('classifier' or 'detector'), sorted by name."""
    found = []
    for p in sorted(Path(models_dir).iterdir()) if Path(models_dir).is_dir() else []:
        try:
            if p.is_dir() and model_kind(p) == kind:
                found.append(p)
        except (ValueError, FileNotFoundError):
            continue
    return found


def results_frame(metrics: dict) -> pd.DataFrame:
    """The report rows of a metrics dict as a table (values formatted as in the README)."""
    from mammo_tf.report import format_value

    rows = [{"row": r["row"], **{k: format_value(v) for k, v in r["values"].items()}, "note": r.get("note", "")}
            for r in metrics["results"]]
    return pd.DataFrame(rows).fillna("").set_index("row")


def fold_dirs(model_dir: str | Path) -> list[Path]:
    """The fold folders of a classifier experiment holding both a model and its out-of-fold film predictions."""
    model_dir = Path(model_dir)
    folds = sorted((p for p in model_dir.glob("fold*") if p.name[4:].isdigit()), key=lambda p: int(p.name[4:]))
    ready = [p for p in folds if is_trained_fold(p) and (p / "film_predictions.csv").is_file()]
    if not ready:
        raise FileNotFoundError(f"{model_dir}: no fold<k>/ with both a trained model and film_predictions.csv")
    return ready


def expected_folds(model_dir: str | Path) -> int:
    """How many folds the experiment's config says it runs."""
    cfg = load_config(Path(model_dir) / "config.yaml")
    folds = int(cfg.get("folds", 5))
    return min(folds, int(cfg.get("max_folds") or folds))


def mias_film_predictions(folds: Sequence[Path]) -> pd.DataFrame:
    """The out-of-fold mini-MIAS film predictions of the given folds, with patient ids (films 2k-1, 2k: patient k)."""
    films = pd.concat([pd.read_csv(Path(f) / "film_predictions.csv") for f in folds], ignore_index=True)
    need = {"refnum", "normal", "benign", "malignant", "abnormal_score", "label_id"}
    if need - set(films.columns):
        raise ValueError(f"film_predictions.csv lacks columns {sorted(need - set(films.columns))}")
    if films["refnum"].duplicated().any():
        raise ValueError("a mini-MIAS film is predicted by more than one fold: not out-of-fold predictions")
    films["patient_id"] = (films["refnum"].str[3:].astype(int) + 1) // 2
    return films


def mias_operating_point(films: pd.DataFrame, sensitivity: float = TARGET_SENSITIVITY) -> dict:
    """Threshold on `abnormal_score` reaching `sensitivity` for abnormal films on mini-MIAS out-of-fold predictions only."""
    y = (films["label_id"].to_numpy() > 0).astype(int)
    score = films["abnormal_score"].to_numpy(dtype=float)
    threshold = cm.threshold_for_sensitivity(y, score, sensitivity)
    return {"threshold": threshold, "target_sensitivity": sensitivity, "task": "abnormal (benign or malignant) vs normal",
            "data": "mini-MIAS out-of-fold film predictions", "n_films": int(len(y)), "n_abnormal": int(y.sum()),
            **operating_point(y, score, threshold)}


class FoldEnsemble:
    """The fold models as one scorer for `classify.score_image` (called or `predict`ed): their mean probabilities.

    Every patch batch goes through all fold models in one call; the per-fold probabilities of the
    patches scored since the last `pop_fold_proba` are kept, so that each fold model's own
    whole-mammogram score can be read with the same rule.
    """

    def __init__(self, models: Sequence[Any], names: Sequence[str] | None = None, pad_to: int = 16):
        import keras

        if not models:
            raise ValueError("FoldEnsemble needs at least one model")
        self.names = list(names) if names is not None else [f"fold{k}" for k in range(len(models))]
        if len(self.names) != len(models):
            raise ValueError(f"{len(models)} models but {len(self.names)} names")
        shapes = {tuple(m.input_shape[1:]) for m in models}
        if len(shapes) != 1:
            raise ValueError(f"fold models disagree on their input shape: {sorted(shapes)}")
        for k, m in enumerate(models):
            m.name = f"fold_model_{k}"  # Keras needs unique names for the nested models
        inputs = keras.Input(models[0].input_shape[1:])
        self._stack = keras.Model(inputs, keras.ops.stack([m(inputs) for m in models], axis=1))
        self.input_shape = models[0].input_shape
        self.n_models = len(models)
        self._pad_to = pad_to
        self._seen: list[np.ndarray] = []

    def predict(self, x: np.ndarray, batch_size: int = 64, verbose: int = 0) -> np.ndarray:
        """Mean class probabilities over the fold models, `(n, n_classes)`."""
        x = np.asarray(x, np.float32)
        out = []
        for start in range(0, len(x), batch_size):
            chunk = x[start:start + batch_size]
            # Padding to a few fixed batch shapes avoids one retrace per patch count.
            n = len(chunk)
            padded = -(-n // self._pad_to) * self._pad_to
            if padded != n:
                chunk = np.concatenate([chunk, np.zeros((padded - n,) + chunk.shape[1:], np.float32)])
            out.append(np.asarray(self._stack.predict_on_batch(chunk))[:n])
        proba = np.concatenate(out) if out else np.zeros((0, self.n_models, 0), np.float32)
        self._seen.append(proba)
        return proba.mean(axis=1)

    def __call__(self, x: Any, training: bool = False) -> np.ndarray:
        """Mean class probabilities of one batch (the Keras call form; inference only)."""
        if training:
            raise ValueError("FoldEnsemble is for inference only")
        return self.predict(np.asarray(x), batch_size=max(1, len(x)))

    def pop_fold_proba(self) -> np.ndarray:
        """Per-fold probabilities `(n_patches, n_models, n_classes)` of the patches scored since the last call."""
        seen, self._seen = self._seen, []
        return np.concatenate(seen) if seen else np.zeros((0, self.n_models, 3), np.float32)


def load_fold_ensemble(folds: Sequence[Path]) -> FoldEnsemble:
    """Load the fold models (a CNN's in Keras safe mode, or VGG16 probes) as a `FoldEnsemble`."""
    from mammo_tf.classify import load_fold_model

    return FoldEnsemble([load_fold_model(f) for f in folds],
                        names=[Path(f).name for f in folds])


def best_patch(proba: np.ndarray) -> np.ndarray:
    """Class probabilities of the most abnormal patch (highest 1 - p(normal)), the rule of `classify.score_image`."""
    return proba[int(np.argmax(1.0 - proba[:, 0]))]


# --------------------------------------------------------------------------- metrics


def operating_point(y: np.ndarray, score: np.ndarray, threshold: float) -> dict:
    """Sensitivity and specificity of `score >= threshold`, with counts and Wilson 95% intervals (images independent)."""
    from scipy.stats import binomtest

    y = np.asarray(y).astype(bool)
    pred = np.asarray(score, float) >= threshold
    out: dict[str, Any] = {"threshold": float(threshold)}
    for name, mask, hit in (("sensitivity", y, pred), ("specificity", ~y, ~pred)):
        n, k = int(mask.sum()), int((hit & mask).sum())
        out[f"{name}_count"] = [k, n]
        if n and np.isfinite(threshold):
            ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
            out[name], out[f"{name}_ci"] = k / n, [float(ci.low), float(ci.high)]
        else:
            out[name], out[f"{name}_ci"] = float("nan"), [float("nan"), float("nan")]
    return out


def auc_with_ci(y: np.ndarray, score: np.ndarray, groups: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """ROC AUC with a percentile bootstrap CI over patients (NaN when a class is missing)."""
    return cm.bootstrap_auc_ci(np.asarray(y).astype(int), score, groups=groups, n_boot=n_boot, seed=seed)


def _threshold_or_nan(y: np.ndarray, score: np.ndarray, sensitivity: float) -> float:
    return cm.threshold_for_sensitivity(y, score, sensitivity) if np.any(y) else float("nan")


def _task(images: pd.DataFrame) -> tuple[str, np.ndarray]:
    """(task name, binary target): malignant vs rest when the set has malignant images, else lesion vs lesion-free."""
    labels = images["label_id"].to_numpy()
    if (labels == 2).any():
        rest = "cancer-negative" if set(images["label"]) <= {"negative", "malignant"} else "rest"
        return f"malignant vs {rest}", (labels == 2).astype(int)
    return "lesion (benign) vs lesion-free", (labels > 0).astype(int)


# --------------------------------------------------------------------------- classifier evaluation


def score_external_images(ensemble: FoldEnsemble, images: pd.DataFrame, log_every: int = 200) -> tuple[pd.DataFrame, np.ndarray]:
    """Score every image (read, `prepare_external`, `classify.score_image`); (per-image predictions, intensity features)."""
    from mammo_tf import baselines, classify, patches
    from mammo_tf.imageio import read_image

    rows, feats = [], []
    t0 = time.perf_counter()
    for i, r in enumerate(images.itertuples(index=False)):
        row: dict[str, Any] = {"image_id": r.image_id, "patient_id": r.patient_id, "label": r.label,
                               "label_id": int(r.label_id)}
        feature = np.full(len(baselines.INTENSITY_FEATURES), np.nan, np.float32)
        try:
            raw = read_image(r.path)
            row["inverted"] = bool(photometric.is_inverted(raw))
            image = prepare_external(raw, r.spacing_mm)
            mask = patches.breast_mask(image)
            proba, _ = classify.score_image(ensemble, image, mask=mask)
            per_fold = ensemble.pop_fold_proba()
            feature = baselines.intensity_features(image[None, ::4, ::4], mask[None, ::4, ::4])[0]
        except ValueError as err:  # unreadable file, constant image, no breast found
            ensemble.pop_fold_proba()
            row["error"] = f"{type(err).__name__}: {err}"
            rows.append(row)
            feats.append(feature)
            continue
        row.update({"abnormal_score": float(1.0 - proba[0]), "p_normal": float(proba[0]),
                    "p_benign": float(proba[1]), "p_malignant": float(proba[2])})
        for k, name in enumerate(ensemble.names):
            p = best_patch(per_fold[:, k, :])
            row[f"abnormal_score_{name}"] = float(1.0 - p[0])
            row[f"p_malignant_{name}"] = float(p[2])
        rows.append(row)
        feats.append(feature)
        if log_every and (i + 1) % log_every == 0:
            print(f"[mammo-tf] scored {i + 1}/{len(images)} images ({time.perf_counter() - t0:.0f} s)", flush=True)
    frame = pd.DataFrame(rows)
    if "error" not in frame:
        frame["error"] = None
    return frame, np.asarray(feats, np.float32)


def evaluate_classifier_external(model_dir: str | Path, data_root: str | Path, adapter: str, out_dir: str | Path,
                                 max_images: int | None = None, seed: int = 0, command: str | None = None,
                                 target_sensitivity: float = TARGET_SENSITIVITY, n_boot: int = 1000,
                                 n_examples: int = 6) -> dict:
    """Run a classifier experiment's fold ensemble on an external set; write predictions.csv, metrics.json, figures."""
    t0 = time.perf_counter()
    model_dir, out = Path(model_dir), Path(out_dir)
    folds = fold_dirs(model_dir)
    n_expected = expected_folds(model_dir)
    ann = external.load_external(data_root, adapter)
    source = str(ann["source"].iloc[0])
    images = select_images(external.images_table(ann), max_images, seed)
    print(f"[mammo-tf] external classifier: {model_dir.name} ({len(folds)} fold models) on {len(images)} images "
          f"of {source} -> {out}", flush=True)

    mias_films = mias_film_predictions(folds)
    op = mias_operating_point(mias_films, target_sensitivity)
    ensemble = load_fold_ensemble(folds)
    preds, features = score_external_images(ensemble, images)
    preds["half"] = patient_halves(images, seed).to_numpy()
    ok = preds["error"].isna().to_numpy()
    task, y_all = _task(images)
    preds["target"] = y_all

    scored, feats, y = preds[ok].reset_index(drop=True), features[ok], y_all[ok]
    groups = scored["patient_id"].astype(str).to_numpy()
    thr = op["threshold"]
    res: dict[str, Any] = {}
    for key in ("abnormal_score", "p_malignant"):
        res[key] = {"auc": auc_with_ci(y, scored[key].to_numpy(), groups, n_boot, seed)}
    res["abnormal_score"]["at_mias_threshold"] = operating_point(y, scored["abnormal_score"].to_numpy(), thr)
    res["per_fold"] = [{
        "fold": int(f.name[4:]),
        "auc": cm.safe_roc_auc(y, scored[f"abnormal_score_{f.name}"]),
        "p_malignant_auc": cm.safe_roc_auc(y, scored[f"p_malignant_{f.name}"]),
        **operating_point(y, scored[f"abnormal_score_{f.name}"].to_numpy(), thr),
    } for f in folds]

    # Adaptation: recalibrate the threshold on half A, test on half B (patients disjoint).
    a, b = (scored["half"] == "A").to_numpy(), (scored["half"] == "B").to_numpy()
    s = scored["abnormal_score"].to_numpy()
    thr_a = _threshold_or_nan(y[a], s[a], target_sensitivity)
    adapt: dict[str, Any] = {
        "n_images": {"A": int(a.sum()), "B": int(b.sum())}, "n_positive": {"A": int(y[a].sum()), "B": int(y[b].sum())},
        "n_patients": {"A": int(len(set(groups[a]))), "B": int(len(set(groups[b])))},
        "threshold_recalibrated_on_A": thr_a,
        "cnn_auc_B": auc_with_ci(y[b], s[b], groups[b], n_boot, seed),
        "cnn_mias_threshold_B": operating_point(y[b], s[b], thr),
        "cnn_recalibrated_B": operating_point(y[b], s[b], thr_a),
    }
    adapt["logistic"] = _logistic_baseline(feats[a], y[a], feats[b], y[b], groups[b], target_sensitivity, n_boot, seed)
    score_b = adapt["logistic"].pop("score_B")
    preds.loc[np.flatnonzero(ok)[b], "logistic_score"] = score_b
    scored.loc[b, "logistic_score"] = score_b
    adapt["chance"] = {"auc": 0.5, "sensitivity": target_sensitivity, "specificity": 1.0 - target_sensitivity,
                       "note": "a score independent of the image: at any threshold, sensitivity + specificity = 1"}
    res["adaptation"] = adapt

    # The same task on mini-MIAS (out-of-fold), for the comparison.
    if task.startswith("malignant"):
        mias_task, y_mias = "malignant vs rest (normal + benign)", (mias_films["label_id"].to_numpy() == 2).astype(int)
    else:
        mias_task, y_mias = "lesion vs lesion-free", (mias_films["label_id"].to_numpy() > 0).astype(int)
    res["mias_same_task"] = {
        "task": mias_task,
        "auc": auc_with_ci(y_mias, mias_films["abnormal_score"].to_numpy(), mias_films["patient_id"].to_numpy(), n_boot, seed),
        **operating_point(y_mias, mias_films["abnormal_score"].to_numpy(), thr),
    }

    out.mkdir(parents=True, exist_ok=True)
    preds.to_csv(out / "predictions.csv", index=False)
    prov = provenance(command)
    prov["wall_time_s"] = round(time.perf_counter() - t0, 1)
    partial = len(folds) < n_expected
    setting = {
        "model_dir": str(model_dir), "folds_used": [f.name for f in folds], "folds_expected": n_expected,
        "data_root": str(data_root), "adapter": adapter, "source": source, "task": task,
        "max_images": max_images, "seed": seed, "n_boot": n_boot, "target_sensitivity": target_sensitivity,
        "n_images": int(len(images)), "n_scored": int(ok.sum()), "n_failed": int((~ok).sum()),
        "n_patients": int(images["patient_id"].nunique()),
        "labels": {str(k): int(v) for k, v in images["label"].value_counts().items()},
        "n_inverted_fixed": int(preds.get("inverted", pd.Series(dtype=bool)).fillna(False).sum()),
        "preparation": UNKNOWN_SPACING_NOTE if images["spacing_mm"].isna().any()
        else "grey levels fixed when inverted, resampled to 0.2 mm per pixel",
        "ensemble": ENSEMBLE_NOTE.format(target=target_sensitivity) + (
            f" (PARTIAL: {len(folds)} of {n_expected} folds)" if partial else ""),
    }
    metrics = {"setting": setting, "mias_operating_point": op, "results_detail": res,
               "provenance": prov, "results": _classifier_rows(setting, op, res, prov, len(folds))}
    save_json(out / "metrics.json", metrics)
    _classifier_figures(out, scored, y, mias_films, op, res, task, source)
    if n_examples:
        _heatmap_examples(out, ensemble, images, preds, n_examples)
    print(f"[mammo-tf] {source}: AUC {res['abnormal_score']['auc']['auc']:.3f} "
          f"({format_ci(res['abnormal_score']['auc'])}); wrote {out}", flush=True)
    return metrics


def _logistic_baseline(xa: np.ndarray, ya: np.ndarray, xb: np.ndarray, yb: np.ndarray, groups_b: np.ndarray,
                       sensitivity: float, n_boot: int, seed: int) -> dict:
    """Class-balanced logistic regression on intensity features: fitted on half A, scored on half B."""
    from mammo_tf import baselines

    if len(np.unique(ya)) < 2 or not len(yb):
        nan = float("nan")
        return {"auc_B": {"auc": nan, "ci_low": nan, "ci_high": nan}, "threshold_A": nan,
                "at_threshold_B": operating_point(yb, np.zeros(len(yb)), nan), "score_B": np.full(len(yb), np.nan),
                "note": "not fitted: half A lacks a class"}
    score_a = baselines.logistic_proba(xa, ya, xa, n_classes=2, seed=seed)[:, 1]
    score_b = baselines.logistic_proba(xa, ya, xb, n_classes=2, seed=seed)[:, 1]
    thr = _threshold_or_nan(ya, score_a, sensitivity)
    return {"auc_B": auc_with_ci(yb, score_b, groups_b, n_boot, seed), "threshold_A": thr,
            "at_threshold_B": operating_point(yb, score_b, thr), "score_B": score_b,
            "features": list(baselines.INTENSITY_FEATURES)}


def _classifier_rows(setting: dict, op: dict, res: dict, prov: dict, n_folds: int) -> list[dict]:
    """Report rows (see `mammo_tf.report`): point values, CIs as text, what each row is in its note."""
    hw = prov["hardware"]
    common = {"table": f"External validation: {setting['source']} ({setting['task']})", "command": prov["command"],
              "hardware": f"{hw['cpu']} ({hw['cpu_count']} cores), GPUs: {hw['gpus']}", "date": prov["date"]}
    ens = (f"CNN ensemble of {n_folds} fold models" if n_folds > 1 else "CNN fold-0 model") + (
        f" (PARTIAL: {n_folds} of {setting['folds_expected']} folds)" if n_folds < setting["folds_expected"] else "")
    scale = "1024x1024 resize (spacing unknown)" if "unknown" in setting["preparation"] else "0.2 mm/px"
    n_all = f"{setting['n_scored']} images, {setting['n_patients']} patients"
    target = f"{setting['target_sensitivity']:.0%}"

    def vals(auc: dict, pt: dict | None) -> dict:
        v: dict[str, Any] = {"AUC": auc["auc"], "AUC 95% CI": format_ci(auc)}
        if pt is not None:
            v.update({"sensitivity": pt["sensitivity"], "specificity": pt["specificity"],
                      "pos / neg": f"{pt['sensitivity_count'][1]} / {pt['specificity_count'][1]}"})
        return v

    a, adapt = res["abnormal_score"], res["adaptation"]
    folds = res["per_fold"]

    def mean_std(key: str) -> list[float] | float:
        x = np.array([f[key] for f in folds], float)
        x = x[np.isfinite(x)]
        return [float(x.mean()), float(x.std(ddof=1))] if len(x) > 1 else (float(x[0]) if len(x) else float("nan"))

    rows = [
        {**common, "row": f"{ens}: abnormal score, threshold chosen on mini-MIAS", "values": vals(a["auc"], a["at_mias_threshold"]),
         "note": f"no adaptation; all {n_all}; threshold {op['threshold']:.4f} = {target} sensitivity (abnormal vs normal) "
                 f"on out-of-fold mini-MIAS films; AUC CI: patient bootstrap; {scale}"},
        {**common, "row": f"{ens}: p(malignant)", "values": vals(res["p_malignant"]["auc"], None),
         "note": f"no adaptation; all {n_all}; ranking only (no operating point chosen for it)"},
        {**common, "row": "CNN single fold models, threshold chosen on mini-MIAS",
         "values": {"AUC": mean_std("auc"), "sensitivity": mean_std("sensitivity"), "specificity": mean_std("specificity")},
         "note": f"mean ± std over {n_folds} fold models, each with its own score: the kind of score the mini-MIAS "
                 "threshold was chosen on (out-of-fold single-model scores)"},
        {**common, "row": f"{ens}: threshold chosen on mini-MIAS, tested on half B",
         "values": vals(adapt["cnn_auc_B"], adapt["cnn_mias_threshold_B"]),
         "note": "no adaptation; half B only, for comparison with the rows below"},
        {**common, "row": f"{ens}: threshold RECALIBRATED on half A, tested on half B",
         "values": vals(adapt["cnn_auc_B"], adapt["cnn_recalibrated_B"]),
         "note": f"adapted: threshold {adapt['threshold_recalibrated_on_A']:.4f} = {target} sensitivity on half A "
                 f"({adapt['n_patients']['A']} patients); B: {adapt['n_patients']['B']} other patients"},
        {**common, "row": "Logistic regression on intensity features, fitted on half A, tested on half B",
         "values": vals(adapt["logistic"]["auc_B"], adapt["logistic"]["at_threshold_B"]),
         "note": f"baseline trained on the external set itself (half A); threshold for {target} sensitivity on A"},
        {**common, "row": "Chance", "values": {"AUC": 0.5, "sensitivity": adapt["chance"]["sensitivity"],
                                              "specificity": adapt["chance"]["specificity"]},
         "note": f"an image-blind score at the threshold giving {target} sensitivity"},
        {**common, "row": f"Reference: CNN fold models on mini-MIAS (out-of-fold), {res['mias_same_task']['task']}",
         "values": vals(res["mias_same_task"]["auc"], res["mias_same_task"]),
         "note": "same task on mini-MIAS; the threshold was chosen on these films (in-sample for abnormal vs normal)"},
    ]
    return rows


# --------------------------------------------------------------------------- classifier figures


def _classifier_figures(out: Path, scored: pd.DataFrame, y: np.ndarray, mias_films: pd.DataFrame, op: dict,
                        res: dict, task: str, source: str) -> None:
    from mammo_tf.plots import external as xplots

    save_figure(xplots.roc_figure(scored, y, res, task, source), out / "roc.png")
    save_figure(xplots.score_histograms(scored, mias_films, op, res, source), out / "score_histograms.png")


def _heatmap_examples(out: Path, ensemble: FoldEnsemble, images: pd.DataFrame, preds: pd.DataFrame, n: int) -> None:
    """Re-score a few films for their heat maps: top-scored positives, missed positives, top-scored negatives."""
    from mammo_tf import classify
    from mammo_tf.imageio import read_image

    ok = preds[preds["error"].isna()]
    pos = ok[ok["target"] == 1].sort_values("abnormal_score", ascending=False)
    neg = ok[ok["target"] == 0].sort_values("abnormal_score", ascending=False)
    k = max(1, n // 3)
    picks = [(pos.head(k), "highest-scored positive"), (pos.tail(k).iloc[::-1], "lowest-scored positive"),
             (neg.head(n - 2 * k), "highest-scored negative")]
    panels, seen = [], set()
    paths = images.set_index("image_id")
    for frame, why in picks:
        for r in frame.itertuples(index=False):
            if r.image_id in seen:
                continue
            seen.add(r.image_id)
            image = prepare_external(read_image(paths.loc[r.image_id, "path"]), paths.loc[r.image_id, "spacing_mm"])
            _, heat = classify.score_image(ensemble, image)
            ensemble.pop_fold_proba()
            panels.append((image, heat,
                           f"{why}\n{str(r.image_id).split('_png')[0]} ({r.label})\nscore {r.abnormal_score:.3f}"))
    if panels:
        from mammo_tf.plots.classification import plot_heatmaps

        # Films are licensed derivatives: images/ is git-ignored.
        save_figure(plot_heatmaps(*zip(*panels), ncols=3), out / "images" / "heatmaps.png")


# --------------------------------------------------------------------------- detector evaluation


def random_positions(detections: Sequence[dict], masks: Sequence[np.ndarray], seed: int = 0) -> list[dict]:
    """The same boxes (sizes, labels, scores) with their centres moved to random breast pixels: chance localisation."""
    rng = np.random.default_rng(seed)
    out = []
    for det, mask in zip(detections, masks):
        boxes = np.asarray(det["boxes"], np.float64).reshape(-1, 4)
        rows, cols = np.nonzero(mask)
        if not len(rows) or not len(boxes):
            out.append({**det, "boxes": boxes.copy()})
            continue
        pick = rng.integers(0, len(rows), size=len(boxes))
        h, w = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        cy, cx = rows[pick] + 0.5, cols[pick] + 0.5
        moved = np.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], axis=1)
        H, W = mask.shape
        out.append({**det, "boxes": np.clip(moved, 0, [H, W, H, W])})
    return out


def evaluate_detector_external(model_dir: str | Path, data_root: str | Path, out_dir: str | Path,
                               adapter: str = "ddsm", max_images: int | None = None, seed: int = 0,
                               command: str | None = None, score_threshold: float | None = 0.01,
                               n_boot: int = 1000, n_examples: int = 12) -> dict:
    """Run a saved detector on an external set at 0.2 mm/px; FROC (lesion-free views included), CSVs and figures."""
    from mammo_tf import detector, patches
    from mammo_tf.imageio import read_image
    from mammo_tf.metrics.detection import DEFAULT_FROC_FPS, froc, sensitivity_at_fp
    from mammo_tf.plots import detection as dplots

    t0 = time.perf_counter()
    model_dir, out = Path(model_dir), Path(out_dir)
    model, exp, anchors = detector.load_detector(model_dir)
    if score_threshold is not None:
        exp = dataclasses.replace(exp, score_threshold=score_threshold)
    ann = external.load_external(data_root, adapter)
    source = str(ann["source"].iloc[0])
    images = select_images(external.images_table(ann), max_images, seed)
    print(f"[mammo-tf] external detector: {model_dir.name} on {len(images)} images of {source} -> {out}", flush=True)

    films, masks, gts, scales, rows = [], [], [], [], []
    for r in images.itertuples(index=False):
        raw = read_image(r.path)
        film = prepare_external(raw, r.spacing_mm)
        scale = np.array([film.shape[0] / raw.shape[0], film.shape[1] / raw.shape[1]] * 2)
        boxes, labels = external.lesion_boxes(ann, r.image_id)
        films.append(film)
        masks.append(patches.breast_mask(film))
        gts.append({"boxes": boxes.astype(np.float64) * scale, "labels": labels.astype(np.int64)})
        scales.append(scale)
        rows.append({"image_id": r.image_id, "patient_id": r.patient_id, "label": r.label, "label_id": int(r.label_id),
                     "n_lesions": int(len(boxes)), "inverted": bool(photometric.is_inverted(raw)),
                     "height_0.2mm": film.shape[0], "width_0.2mm": film.shape[1]})
    dets = detector.detect_films(model, exp, anchors, films, exp.train_config().batch_size, masks=masks)
    n_lesions = sum(len(g["boxes"]) for g in gts)

    # Per image: the best detection score is an image-level abnormality score.
    best = detector.image_scores(dets)
    for row, d, b in zip(rows, dets, best):
        row.update({"max_score": b, "n_detections": int(len(d["scores"])),
                    "n_detections_0.5": int((d["scores"] >= 0.5).sum())})
    per_image = pd.DataFrame(rows)
    task, y = _task(images)
    res: dict[str, Any] = {"image_level": {"task": task, "score": "highest detection score of the image",
                                           "auc": auc_with_ci(y, best, images["patient_id"].astype(str).to_numpy(), n_boot, seed)}}
    curves: dict[str, dict] = {}
    if n_lesions:
        curves["SSD, any class"] = froc(gts, dets)
        if (np.concatenate([g["labels"] for g in gts]) == 1).any():
            curves["SSD, benign class only"] = froc(gts, dets, class_id=1)
        curves["same boxes, random positions in the breast"] = froc(gts, random_positions(dets, masks, seed))
        res["froc"] = {name: {"n_lesions": c["n_lesions"], "n_images": c["n_images"], "criterion": c["criterion"],
                              "class_id": c["class_id"], "mean_sensitivity": c["mean_sensitivity"],
                              "grid_fps": c["grid_fps"], "grid_sensitivity": c["grid_sensitivity"],
                              **{f"sens_at_{f:g}fp": sensitivity_at_fp(c, f) for f in DEFAULT_FROC_FPS}}
                       for name, c in curves.items()}
    out.mkdir(parents=True, exist_ok=True)
    per_image.to_csv(out / "predictions.csv", index=False)
    _detections_csv(per_image, dets, gts, scales).to_csv(out / "detections.csv", index=False)
    if curves:
        save_figure(dplots.plot_froc(curves), out / "froc.png")
    if n_examples:
        order = sorted(range(len(films)), key=lambda i: (-len(gts[i]["boxes"]), i))[:n_examples]
        panels = []
        for i in order:
            top = np.argsort(-dets[i]["scores"], kind="stable")[:5]
            panels.append({"image": films[i], "gt_boxes": gts[i]["boxes"], "gt_labels": gts[i]["labels"],
                           "det_boxes": dets[i]["boxes"][top], "det_labels": dets[i]["labels"][top],
                           "det_scores": dets[i]["scores"][top],
                           "title": f"{rows[i]['image_id']}\n{len(gts[i]['boxes'])} lesion(s), top {len(top)} detections"})
        # Films are licensed derivatives: images/ is git-ignored.
        save_figure(dplots.draw_detection_grid(panels, ncols=4), out / "images" / "detections.png")

    prov = provenance(command)
    prov["wall_time_s"] = round(time.perf_counter() - t0, 1)
    setting = {"model_dir": str(model_dir), "data_root": str(data_root), "adapter": adapter, "source": source,
               "max_images": max_images, "seed": seed, "n_images": int(len(images)), "n_lesions": int(n_lesions),
               "n_lesion_free": int((per_image["n_lesions"] == 0).sum()),
               "labels": {str(k): int(v) for k, v in images["label"].value_counts().items()},
               "score_threshold": exp.score_threshold, "detector_protocol": exp.protocol, "image_size": exp.image_size,
               "preparation": "grey levels fixed when inverted, resampled to 0.2 mm per pixel, then "
                              + ("searched in full-resolution tiles as in mammo_tf.tiled (crops-trained detector)"
                                 if exp.protocol == "crops" else
                                 "prepared as in the detector's whole protocol (breast box, square, resize)")
                              + "; boxes evaluated at 0.2 mm/px",
               "hit": "a detection hits a lesion when its box centre lies inside the lesion's outline box"}
    metrics = {"setting": setting, "results_detail": res, "provenance": prov,
               "results": _detector_rows(setting, res, prov)}
    save_json(out / "metrics.json", metrics)
    print(f"[mammo-tf] {source}: {n_lesions} lesions on {len(images)} images; wrote {out}", flush=True)
    return metrics


def _detections_csv(per_image: pd.DataFrame, dets: list[dict], gts: list[dict], scales: list[np.ndarray]) -> pd.DataFrame:
    """One row per detection, boxes in the original file's pixels, and whether its centre falls in a lesion box."""
    rows = []
    for r, d, g, scale in zip(per_image.itertuples(index=False), dets, gts, scales):
        cy = (d["boxes"][:, 0] + d["boxes"][:, 2]) / 2
        cx = (d["boxes"][:, 1] + d["boxes"][:, 3]) / 2
        gb = g["boxes"]
        hit = ((cy[:, None] >= gb[None, :, 0]) & (cy[:, None] <= gb[None, :, 2])
               & (cx[:, None] >= gb[None, :, 1]) & (cx[:, None] <= gb[None, :, 3])).any(axis=1) if len(gb) else \
            np.zeros(len(cy), bool)
        for box, label, score, h in zip(d["boxes"] / scale, d["labels"], d["scores"], hit):
            rows.append({"image_id": r.image_id, "patient_id": r.patient_id, "image_label": r.label,
                         "ymin": box[0], "xmin": box[1], "ymax": box[2], "xmax": box[3],
                         "class_id": int(label), "score": float(score), "centre_in_lesion": bool(h)})
    return pd.DataFrame(rows, columns=["image_id", "patient_id", "image_label", "ymin", "xmin", "ymax", "xmax",
                                       "class_id", "score", "centre_in_lesion"])


def _detector_rows(setting: dict, res: dict, prov: dict) -> list[dict]:
    hw = prov["hardware"]
    common = {"table": f"External validation: {setting['source']} detection "
                       f"({setting['n_lesions']} lesions, {setting['n_images']} views incl. {setting['n_lesion_free']} lesion-free)",
              "command": prov["command"], "hardware": f"{hw['cpu']} ({hw['cpu_count']} cores), GPUs: {hw['gpus']}",
              "date": prov["date"]}
    auc = res["image_level"]["auc"]
    model = Path(setting["model_dir"]).name  # several detectors share the table
    rows = []
    for name, c in res.get("froc", {}).items():
        values = {f"sens@{f:g}FP": c[f"sens_at_{f:g}fp"] for f in (0.25, 0.5, 1.0, 2.0, 4.0)}
        values["mean FROC sens"] = c["mean_sensitivity"]
        note = "FP per image over all views; hit = box centre inside the lesion box; no malignant case in this set"
        if name.startswith("SSD, any"):
            values.update({"image AUC": auc["auc"], "image AUC 95% CI": format_ci(auc)})
            note += f"; image AUC: max detection score, {res['image_level']['task']}, patient bootstrap"
        if "random" in name:
            note = "baseline: the detector's own boxes and scores moved to random breast pixels (chance localisation)"
        rows.append({**common, "row": f"{model}: {name}", "values": values, "note": note})
    if not rows:
        rows.append({**common, "row": f"{model}: SSD, image level", "values": {"image AUC": auc["auc"], "image AUC 95% CI": format_ci(auc)},
                     "note": f"no lesion locations in this set: FROC undefined; {res['image_level']['task']}"})
    return rows


# --------------------------------------------------------------------------- what shifts between sources


def _sample(frame: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    return frame.sample(n=min(n, len(frame)), random_state=seed).sort_index()


def shift_figures(out_dir: str | Path, n: int = 8, seed: int = 0, rsna_root: str | Path | None = None,
                  ddsm_root: str | Path | None = None, mias_data: str | Path | None = None) -> dict[str, Path]:
    """Grey-level histograms (breast pixels, inversion fixed) and example films of mini-MIAS, rsna-640 and DDSM."""
    import matplotlib.pyplot as plt

    from mammo_tf.data import mias
    from mammo_tf.imageio import read_image
    from mammo_tf.plots import external as xplots

    out = Path(out_dir)
    rsna_root = Path(rsna_root) if rsna_root else SHARED_DATA / "rsna-640"
    ddsm_root = Path(ddsm_root) if ddsm_root else SHARED_DATA / "mini-ddsm-sample"
    films: dict[str, list[np.ndarray]] = {}
    examples: dict[str, np.ndarray] = {}
    spacings: dict[str, float | None] = {}
    stats = []

    ann = mias.images_table(mias.load_annotations(mias_data))
    picked = _sample(ann, n, seed)
    films["mini-MIAS"] = [mias.load_image(r, mias_data) for r in picked["refnum"]]
    for label in ("normal", "malignant"):
        ref = _sample(ann[ann["label"] == label], 1, seed)["refnum"].iloc[0]
        examples[f"mini-MIAS {label}\n{ref}"] = mias.load_image(ref, mias_data)
        spacings[f"mini-MIAS {label}\n{ref}"] = photometric.MIAS_SPACING_MM
    for name, root, adapter in (("rsna-640", rsna_root, "folder"), ("mini-DDSM", ddsm_root, "ddsm")):
        table = external.images_table(external.load_external(root, adapter))
        films[name] = [read_image(p) for p in _sample(table, n, seed)["path"]]
        for label in sorted(table["label"].unique(), key=lambda x: external.LABEL_IDS[x]):
            r = _sample(table[table["label"] == label], 1, seed).iloc[0]
            key = f"{name} {label}\n{str(r.image_id)[:24]}"
            examples[key] = read_image(r.path)
            spacings[key] = None if not np.isfinite(r.spacing_mm) else float(r.spacing_mm)
    for name, group in films.items():
        stats.append({"source": name, "n": len(group), "inverted": int(sum(photometric.is_inverted(f) for f in group)),
                      "shape": f"{group[0].shape[0]}x{group[0].shape[1]}",
                      "breast mean grey (fixed)": float(np.mean([xplots.breast_pixels(photometric.fix_inversion(f)).mean()
                                                                 for f in group]))})
    paths = {}
    fig = xplots.intensity_histograms(films)
    paths["intensity_histograms"] = save_figure(fig, out / "shift_intensity_histograms.png")
    plt.close(fig)
    fig = xplots.example_films(examples, spacings)
    # Films are licensed derivatives: images/ is git-ignored.
    paths["example_films"] = save_figure(fig, out / "images" / "shift_example_films.png")
    plt.close(fig)
    pd.DataFrame(stats).to_csv(out / "shift_summary.csv", index=False)
    paths["summary"] = out / "shift_summary.csv"
    return paths


# --------------------------------------------------------------------------- command line


def cmd_evaluate_external(args: argparse.Namespace) -> int:
    """Run a trained classifier or detector on an external folder (folder or DDSM layout)."""
    setting = load_setting(args.config) if args.config else ExternalSetting()
    model_dir = Path(args.model)
    try:
        kind = model_kind(model_dir)
        external.load_external(args.data, args.adapter)  # fail early, before any model is loaded
    except (FileNotFoundError, ValueError) as err:  # ExternalDataError is a ValueError
        print(f"mammo-tf: error: {err}", file=sys.stderr)
        return 2
    source = Path(args.data).name.replace("-", "")
    out = Path(args.out) if args.out else Path("runs") / "external" / f"{source}_{model_dir.name}"
    max_images = args.max_images if args.max_images is not None else (setting.max_images if args.config else None)
    seed = setting.seed if args.seed is None else args.seed
    n_boot = setting.n_boot if args.n_boot is None else args.n_boot
    command = "mammo-tf " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if kind == "classifier":
        evaluate_classifier_external(model_dir, args.data, args.adapter, out, max_images=max_images, seed=seed,
                                     command=command, target_sensitivity=setting.target_sensitivity, n_boot=n_boot,
                                     n_examples=setting.n_examples)
    else:
        evaluate_detector_external(model_dir, args.data, out, adapter=args.adapter, max_images=max_images, seed=seed,
                                   command=command, score_threshold=setting.score_threshold, n_boot=n_boot,
                                   n_examples=2 * setting.n_examples)
    return 0


def add_cli(subparsers: Any) -> None:
    """Register `evaluate-external` on the `mammo-tf` subcommand parser."""
    p = subparsers.add_parser("evaluate-external", help=cmd_evaluate_external.__doc__)
    p.add_argument("--data", required=True, help="external set: class folders (folder) or DDSM cases (ddsm)")
    p.add_argument("--adapter", choices=sorted(external.ADAPTERS), default="folder")
    p.add_argument("--model", required=True, help="a classifier experiment folder or a detector folder")
    p.add_argument("--out", default=None, help="output folder (default: runs/external/<data>_<model>)")
    p.add_argument("--max-images", type=int, default=None, help="stratified subset of whole patients (default: all)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--n-boot", type=int, default=None, help="bootstrap resamples for the AUC CIs (default 1000)")
    p.add_argument("--config", default=None, help="an external setting (configs/external_*.yaml) for the defaults")
    p.set_defaults(func=cmd_evaluate_external)
