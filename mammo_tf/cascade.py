"""The cascade: the whole-mammogram classifier gates the SSD detector, film by film.

Every film is read, its breast mask computed once, and the classifier scores it
(:func:`mammo_tf.classify.score_image`: abnormality ``1 - p(normal)`` of its most abnormal breast
patch). Only films whose score reaches the gate threshold go on to the detector (breast crop,
:func:`mammo_tf.patches.prepare_whole`, SSD forward pass, NMS); a film the gate rejects gets no
detections. With no classifier (or a threshold of ``-inf``) the same code path is the detector on
every film. Timings are taken per stage with :func:`time.perf_counter`: ``load`` (reading the
file), ``preprocess`` (breast mask, and the detector's breast crop and resize for a film that
passes), ``classifier``, ``detector`` (the SSD forward pass) and ``nms`` (decoding and NMS).

**Honest evaluation** (:func:`evaluate_cascade`), for each fold of the detector experiment that has
a trained model, on that fold's test films:

* *Gate score of a film*: from a classifier model that never saw its patient: the classifier's
  out-of-fold ``film_predictions.csv`` when one of its folds tested that patient, else
  :func:`~mammo_tf.classify.score_image` with a classifier fold whose training patients (train +
  validation) exclude the patient (patients outside the classifier's subset, in the small setting).
  A film no trained classifier fold can score honestly is left out of every variant, and counted.
* *Gate threshold* (:data:`GATE_RULE`): chosen for each detector fold ``k`` and target
  sensitivity on the films of fold ``k``'s **training patients** (its train and validation
  patients), with those films' out-of-fold gate scores and labels: the highest threshold with
  which at least that share of the abnormal films pass (:func:`choose_gate_threshold`). No score
  or label of a test patient of fold ``k`` enters it.
* *Detections*: fold ``k``'s detector on every test film; the cascade keeps them on the films
  that pass and drops them on the others; both are scored with
  :func:`mammo_tf.detector.detection_metrics` (VOC AP per class, mAP, FROC) on the same films.
* *Time per film*: stage medians measured on a few test films in the same run, combined as
  ``load + preprocess + classifier + pass rate x (detector + nms)`` (the breast crop of the
  detector is counted on every film: slightly pessimistic for the cascade).

The classifier and detector experiments need not share their folds: each film is scored by
models that never saw its patient either way (``metrics.json`` records whether they do).

The gate works per film. Gating regions (the detector on the flagged patches only) is not done:
the whole-film detector sees the breast resized to its input size, so a patch would be a different
input scale from the one it was trained on.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from mammo_tf import detect
from mammo_tf import detector as D
from mammo_tf import patches as P
from mammo_tf.config import hardware_label
from mammo_tf.data import mias
from mammo_tf.io import load_json, save_figure, save_json

STAGES = ("load", "preprocess", "classifier", "detector", "nms")
GATE_FILE = "gate.json"
DEFAULT_SENSITIVITY = 0.95
GATE_RULE = (
    "gate threshold of detector fold k: chosen on the films of fold k's training patients (train + validation), "
    "with their out-of-fold classifier scores: the highest threshold that passes the target share of abnormal "
    "films; never on fold k's test patients"
)
TABLE = "Cascade: detection quality vs time (mini-MIAS whole films, no prior location)"
TIME_NOTE = "time/film: stage medians x pass rate, measured in this run"
STORED_NOTE = ("detections: the detector run's stored test outputs (trained on another machine); its time per "
               "film measured here with random weights of the same network")


# --------------------------------------------------------------------------- the gate threshold


def choose_gate_threshold(val_scores: Sequence[float], val_labels: Sequence[int],
                          sensitivity: float = DEFAULT_SENSITIVITY) -> float:
    """Highest gate threshold (pass: ``score >= t``) with which at least `sensitivity` of the abnormal films pass.

    ``val_labels``: film labels, ``0`` normal and ``1``/``2`` (or any positive value) abnormal.
    """
    from mammo_tf.metrics.classification import threshold_for_sensitivity

    labels = np.asarray(val_labels).reshape(-1)
    scores = np.asarray(val_scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"val_scores and val_labels differ in length: {scores.shape[0]} and {labels.shape[0]}")
    if not (labels > 0).any():
        raise ValueError("choose_gate_threshold: the validation films hold no abnormal film")
    return threshold_for_sensitivity((labels > 0).astype(np.int64), scores, sensitivity)


def fold_gate_thresholds(films: pd.DataFrame, test_patients: Iterable[int], train_patients: Iterable[int],
                         sensitivities: Sequence[float]) -> dict[float, dict]:
    """Per target sensitivity: the gate threshold from the films of `train_patients` (never `test_patients`).

    ``films``: one row per film with ``patient_id``, ``label_id`` and ``gate_score`` (NaN: no honest
    score, left out). Returns ``{sensitivity: {"threshold", "n_films", "n_abnormal"}}``.
    """
    test, train = set(map(int, test_patients)), set(map(int, train_patients))
    if test & train:
        raise ValueError(f"patients on both sides of the fold: {sorted(test & train)[:5]}")
    pool = films[films["patient_id"].isin(train) & np.isfinite(films["gate_score"].to_numpy(float))]
    out = {}
    for s in sensitivities:
        t = choose_gate_threshold(pool["gate_score"], pool["label_id"], s)
        out[float(s)] = {"threshold": t, "n_films": int(len(pool)), "n_abnormal": int((pool["label_id"] > 0).sum())}
    return out


# --------------------------------------------------------------------------- running the cascade


@dataclasses.dataclass
class Cascade:
    """A detector, optionally gated by a whole-mammogram classifier (``classifier=None``: every film)."""

    detector: Any
    exp: D.DetectorExperiment
    anchor_cfg: Any
    classifier: Any = None
    threshold: float = -math.inf
    name: str = ""

    def __post_init__(self) -> None:
        from mammo_tf.anchors import default_boxes

        if self.exp.protocol != "whole":
            raise ValueError(f"the cascade runs a whole-film detector; {self.exp.name} uses protocol {self.exp.protocol!r}")
        if math.isnan(self.threshold):
            raise ValueError("the gate threshold is NaN")
        self.anchors = default_boxes(self.anchor_cfg)
        self.channels = self.exp.ssd_config().input_channels

    @classmethod
    def load(cls, detector_dir: str | Path, classifier_dir: str | Path | None = None, threshold: float | None = None,
             classifier_fold: int = 0, score_threshold: float | None = None) -> "Cascade":
        """A cascade from a detector folder and, optionally, fold `classifier_fold` of a classifier experiment."""
        model, exp, anchors = D.load_detector(detector_dir)
        if score_threshold is not None:
            exp = dataclasses.replace(exp, score_threshold=score_threshold)
        classifier = None
        if classifier_dir is not None:
            if threshold is None:
                raise ValueError("a gated cascade needs a gate threshold")
            classifier = load_classifier_fold(classifier_dir, classifier_fold)
        return cls(model, exp, anchors, classifier, -math.inf if threshold is None else float(threshold),
                   name=Path(detector_dir).name)


def load_classifier_fold(classifier_dir: str | Path, fold: int) -> Any:
    """The Keras model of one fold of a classifier experiment (a CNN, or a VGG16 probe)."""
    from mammo_tf.classify import load_fold_model

    return load_fold_model(Path(classifier_dir) / f"fold{fold}")


def _read(item: str | Path | np.ndarray) -> np.ndarray:
    from mammo_tf.imageio import read_image

    if isinstance(item, np.ndarray):
        if item.ndim != 2 or item.dtype != np.uint8:
            raise ValueError(f"an image array must be 2-D uint8, got {item.dtype} {item.shape}")
        return item
    return read_image(item)


def run_cascade(images: Sequence[str | Path | np.ndarray], cascade: Cascade, batch_size: int = 8,
                keep_images: bool = False) -> list[dict]:
    """Run the cascade on image files or 2-D uint8 arrays; one dict per image, in order.

    Each dict: ``gate_score`` (None without a classifier), ``passed``, ``gated``, ``boxes`` (pixels
    of the input image, ``[ymin, xmin, ymax, xmax]``), ``labels`` (1 benign, 2 malignant),
    ``scores``, ``image_shape`` and ``timings`` (seconds per stage of :data:`STAGES`, and
    ``total``); ``image`` too with `keep_images`. The films that pass go through the detector
    `batch_size` at a time; a batched stage's time is shared equally by the films of its batch.
    A file that cannot be read or prepared gets an ``error`` entry instead.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: list[dict] = []
    for start in range(0, len(images), batch_size):
        out += _run_chunk(images[start:start + batch_size], cascade, keep_images)
    return out


def run_cascade_on_image(image_or_path: str | Path | np.ndarray, cascade: Cascade) -> dict:
    """The cascade on one image (same code path as :func:`run_cascade`, a batch of one)."""
    return run_cascade([image_or_path], cascade)[0]


def _run_chunk(items: Sequence[Any], cascade: Cascade, keep_images: bool) -> list[dict]:
    from mammo_tf.classify import score_image

    clock = time.perf_counter
    entries: list[dict] = []
    ready: list[tuple[dict, np.ndarray, np.ndarray, P.WholeTransform]] = []
    for item in items:
        timings = dict.fromkeys(STAGES, 0.0)
        entry: dict[str, Any] = {"gate_score": None, "passed": False, "gated": False, "timings": timings}
        entries.append(entry)
        try:
            t0 = clock()
            image = _read(item)
            t1 = clock()
            mask = P.breast_mask(image)
            t2 = clock()
            timings["load"], timings["preprocess"] = (t1 - t0 if not isinstance(item, np.ndarray) else 0.0), t2 - t1
            if cascade.classifier is not None:
                proba, _ = score_image(cascade.classifier, image, mask=mask)
                timings["classifier"] = clock() - t2
                entry["gate_score"] = float(1.0 - proba[0])
            entry["passed"] = cascade.classifier is None or entry["gate_score"] >= cascade.threshold
            entry["gated"] = not entry["passed"]
            entry["image_shape"] = list(image.shape)
            if keep_images:
                entry["image"] = image
            if entry["passed"]:
                t3 = clock()
                prepared, _, transform = P.prepare_whole(image, None, size=cascade.exp.image_size, mask=mask)
                timings["preprocess"] += clock() - t3
                ready.append((entry, image, prepared, transform))
            else:
                entry.update(boxes=np.zeros((0, 4)), labels=np.zeros(0, np.int64), scores=np.zeros(0))
        except (ValueError, OSError) as err:  # ImageReadError is a ValueError; so is an empty breast mask
            entry["error"] = f"{type(err).__name__}: {err}"
    if ready:
        t0 = clock()
        batch = D.model_input([p for _, _, p, _ in ready], cascade.channels)
        pred = cascade.detector(batch, training=False)
        pred = {k: np.asarray(v) for k, v in pred.items()}  # waits for the forward pass to finish
        t1 = clock()
        dets = D.decode_batch(pred, cascade.anchors, cascade.exp)
        t2 = clock()
        for entry, image, _, transform in ready:
            entry["timings"]["detector"] = (t1 - t0) / len(ready)
            entry["timings"]["nms"] = (t2 - t1) / len(ready)
        for (entry, image, _, transform), det in zip(ready, dets):
            entry.update(boxes=D.to_original_pixels(det["boxes"], transform, image.shape), labels=det["labels"],
                         scores=det["scores"])
    for entry in entries:
        entry["timings"]["total"] = float(sum(entry["timings"][s] for s in STAGES))
    return entries


# --------------------------------------------------------------------------- inference with files (CLI)


def load_gate(gate_file: str | Path) -> dict:
    """The gate saved by :func:`evaluate_cascade` (``threshold``, ``sensitivity``, the rule, ...)."""
    path = Path(gate_file)
    if path.is_dir():
        path = path / GATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no gate file (written by evaluate_cascade)")
    gate = load_json(path)
    if "threshold" not in gate:
        raise ValueError(f"{path}: no 'threshold' key")
    return gate


def detect_cascade(paths: Sequence[str | Path], classifier_dir: str | Path, detector_dir: str | Path,
                   out_dir: str | Path, gate_threshold: float | None = None, score_threshold: float = 0.5,
                   gate_file: str | Path | None = None, classifier_fold: int = 0, batch_size: int = 8) -> list[dict]:
    """`detect.detect_images` behind the gate: per image the same JSON and overlay PNG, plus ``gate_score`` and ``gated``.

    The gate threshold is `gate_threshold`, else the ``threshold`` of `gate_file` (``gate.json``
    written by :func:`evaluate_cascade`, or its folder). A film the gate rejects gets an empty
    detection list and ``"gated": true``. Returns one dict per path (also in ``out_dir/results.json``).
    """
    if not 0.0 <= score_threshold < 1.0:
        raise ValueError(f"score_threshold must be in [0, 1), got {score_threshold}")
    gate: dict[str, Any] = {}
    if gate_threshold is None:
        if gate_file is None:
            raise ValueError("detect_cascade needs a gate threshold: pass gate_threshold or gate_file (gate.json)")
        gate = load_gate(gate_file)
        gate_threshold = float(gate["threshold"])
    cascade = Cascade.load(detector_dir, classifier_dir, gate_threshold, classifier_fold, score_threshold)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in paths]
    names = detect.unique_names(paths)
    results: list[dict] = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        for path, name, res in zip(chunk, names[start:start + batch_size], run_cascade(chunk, cascade, batch_size, True)):
            entry: dict[str, Any] = {"path": str(path), "name": name}
            if "error" in res:
                entry["error"] = res["error"]
            else:
                entry.update(gate_score=res["gate_score"], gate_threshold=gate_threshold, gated=res["gated"],
                             timings={k: round(v, 5) for k, v in res["timings"].items()})
                note = f"; gated (score {res['gate_score']:.3f} < {gate_threshold:.3f}): detector not run" if res["gated"] else ""
                detect.write_detections(entry, res["image"], res["boxes"], res["labels"], res["scores"], score_threshold, out, note)
            results.append(entry)
    summary = {"model": str(detector_dir), "classifier": str(classifier_dir), "classifier_fold": classifier_fold,
               "protocol": cascade.exp.protocol, "score_threshold": score_threshold, "gate_threshold": gate_threshold,
               "gate": {k: v for k, v in gate.items() if k in ("sensitivity", "rule", "source")}}
    save_json(out / "results.json", {**summary, "results": results})
    return results


def format_results(results: Sequence[dict]) -> str:
    """One line per image (for the CLI): gated, detections, or the error."""
    lines = []
    for r, line in zip(results, detect.format_results(results).splitlines()):
        if r.get("gated"):
            line = f"{r['path']}: gated (score {r['gate_score']:.3f} < {r['gate_threshold']:.3f}) -> {r['overlay']}"
        lines.append(line)
    return "\n".join(lines)


def add_cli_arguments(parser: Any) -> None:
    """The ``detect`` subcommand's cascade options: --cascade, --classifier, --gate, --gate-threshold, --classifier-fold."""
    parser.add_argument("--cascade", action="store_true",
                        help="gate the detector with the whole-mammogram classifier (needs --classifier)")
    parser.add_argument("--classifier", default=None, help="a classifier experiment folder (trained fold<k>/)")
    parser.add_argument("--classifier-fold", type=int, default=0, help="which fold's classifier model gates")
    parser.add_argument("--gate", default=None, help="gate.json written by evaluate_cascade (or its folder)")
    parser.add_argument("--gate-threshold", type=float, default=None,
                        help="gate threshold on the abnormality score (overrides --gate)")


def cli_detect(args: Any) -> int:
    """``mammo-tf detect --cascade``: run :func:`detect_cascade` from parsed arguments, print one line per image."""
    import sys

    if not args.classifier:
        print("mammo-tf: error: --cascade needs --classifier DIR", file=sys.stderr)
        return 2
    try:
        results = detect_cascade(args.images, args.classifier, args.model, args.out, gate_threshold=args.gate_threshold,
                                 score_threshold=args.score_threshold, gate_file=args.gate,
                                 classifier_fold=args.classifier_fold)
    except (ValueError, FileNotFoundError) as err:
        print(f"mammo-tf: error: {err}", file=sys.stderr)
        return 2
    print(format_results(results))
    return 1 if any("error" in r for r in results) else 0


def cmd_evaluate_cascade(args: Any) -> int:
    """Evaluate the cascade (classifier gate + detector) against the detector on every film; metrics, figures, gate.json."""
    import shlex
    import sys

    command = "mammo-tf " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    evaluate_cascade(args.classifier, args.detector, args.out, sensitivities=args.sensitivities, command=command,
                     n_timing=args.n_timing, detector_outputs=args.detector_outputs)
    print(f"[mammo-tf] cascade evaluation in {args.out}")
    return 0


def add_cli(subparsers: Any) -> None:
    """Register `evaluate-cascade` on the `mammo-tf` subcommand parser."""
    p = subparsers.add_parser("evaluate-cascade", help=cmd_evaluate_cascade.__doc__)
    p.add_argument("--classifier", required=True, help="a classifier experiment folder (the gate)")
    p.add_argument("--detector", required=True, help="a whole-film detector experiment folder")
    p.add_argument("--out", required=True, help="output folder (metrics.json, gate.json, figures)")
    p.add_argument("--sensitivities", type=float, nargs="+", default=[0.9, 0.95, 0.99],
                   help="gate targets: share of abnormal films that must pass")
    p.add_argument("--n-timing", type=int, default=8, help="films timed for the time per film")
    p.add_argument("--detector-outputs", nargs="+",
                   help="the detector's stored outputs (train-detector-arrays) in place of saved fold models")
    p.set_defaults(func=cmd_evaluate_cascade)


# --------------------------------------------------------------------------- honest gate scores


@dataclasses.dataclass
class ClassifierFold:
    """One trained fold of a classifier experiment: its folder and the patients it saw or tested."""

    index: int
    fold_dir: Path
    seen: frozenset        # training patients (train + validation): the model saw them
    test: frozenset        # its test patients (film_predictions.csv)


def classifier_folds(classifier_dir: str | Path, annotations: pd.DataFrame | None = None) -> list[ClassifierFold]:
    """The trained folds of a classifier experiment, with their patients (rebuilt as `classify.run_experiment` split them).

    The rebuilt test patients are checked against each fold's ``film_predictions.csv``.
    """
    from mammo_tf import classify
    from mammo_tf.config import from_dict, load_config
    from mammo_tf.data import splits

    cdir = Path(classifier_dir)
    exp = from_dict(classify.ClassifierExperiment, load_config(cdir / "config.yaml"))
    ann = annotations if annotations is not None else mias.load_annotations()
    refnums = classify.films_subset(ann, exp)
    if refnums is not None:
        ann = ann[ann["refnum"].isin(refnums)].reset_index(drop=True)
    patient_of = mias.images_table(ann).set_index("refnum")["patient_id"]
    out = []
    for k, (train, test) in enumerate(splits.patient_folds(ann, n_splits=exp.folds, seed=exp.seed)):
        path, preds = cdir / f"fold{k}", cdir / f"fold{k}" / "film_predictions.csv"
        if not (classify.is_trained_fold(path) and preds.is_file()):
            continue
        tested = set(patient_of.loc[pd.read_csv(preds)["refnum"]].astype(int))
        if tested != set(map(int, test)):
            raise ValueError(f"{preds}: its patients differ from the rebuilt fold {k} of {cdir.name}")
        out.append(ClassifierFold(k, path, frozenset(map(int, train)), frozenset(map(int, test))))
    if not out:
        raise FileNotFoundError(f"{cdir}: no trained fold (fold<k>/ with a model + film_predictions.csv)")
    return out


def gate_scores(classifier_dir: str | Path, films: pd.DataFrame, annotations: pd.DataFrame | None = None,
                load_image: Callable[[str], np.ndarray] | None = None) -> pd.DataFrame:
    """Per film of `films` (refnum, patient_id): an abnormality score from a classifier fold that never saw its patient.

    Columns added: ``gate_score`` (NaN when no trained fold qualifies), ``gate_fold`` (-1 then) and
    ``gate_source`` (``"out_of_fold"``: its ``film_predictions.csv``; ``"unseen_fold"``: scored now
    by :func:`~mammo_tf.classify.score_image` with a fold that did not train on the patient; ``"none"``).
    """
    from mammo_tf.classify import score_image

    folds = classifier_folds(classifier_dir, annotations)
    oof = pd.concat([pd.read_csv(Path(classifier_dir) / f"fold{f.index}" / "film_predictions.csv") for f in folds])
    oof = oof.set_index("refnum")
    load = load_image or P.film_loader()
    models: dict[int, Any] = {}
    rows = []
    for refnum, patient in zip(films["refnum"], films["patient_id"]):
        if refnum in oof.index:
            rows.append((float(oof.loc[refnum, "abnormal_score"]), int(oof.loc[refnum, "fold"]), "out_of_fold"))
            continue
        fold = next((f for f in folds if int(patient) not in f.seen and int(patient) not in f.test), None)
        if fold is None:
            rows.append((float("nan"), -1, "none"))
            continue
        if fold.index not in models:
            models[fold.index] = load_classifier_fold(classifier_dir, fold.index)
        proba, _ = score_image(models[fold.index], load(refnum))
        rows.append((float(1.0 - proba[0]), fold.index, "unseen_fold"))
    scored = pd.DataFrame(rows, columns=["gate_score", "gate_fold", "gate_source"], index=films.index)
    return pd.concat([films, scored], axis=1)


# --------------------------------------------------------------------------- evaluation


def gate_detections(detections: Sequence[dict], scores: Sequence[float], threshold: float) -> list[dict]:
    """The cascade's detections: unchanged on films with ``score >= threshold``, empty on the others."""
    out = []
    for det, s in zip(detections, scores):
        if s >= threshold:
            out.append(det)
        else:
            out.append({"boxes": np.zeros((0, 4)), "labels": np.zeros(0, np.int64), "scores": np.zeros(0)})
    return out


def check_detector_unseen(fold_dir: str | Path, records: pd.DataFrame) -> bool:
    """Raise if the detector saved in `fold_dir` trained on a patient of `records`; False when it cannot be checked.

    The check reads the ``train_refnums`` of the fold's ``config.json`` (written by `train_fold`): a
    model trained under other folds than the ones rebuilt now is refused.
    """
    trained = load_json(Path(fold_dir) / D.CONFIG_FILE).get("train_refnums")
    if trained is None:
        return False
    patient = lambda refnums: {(int(r[3:]) + 1) // 2 for r in refnums}  # noqa: E731  (mdb(2k-1), mdb(2k): patient k)
    seen = patient(trained) & patient(records["refnum"])
    if seen:
        raise ValueError(f"{fold_dir}: this detector trained on {len(seen)} patients of its test films (e.g. "
                         f"{sorted(seen)[:5]}): it was trained under other folds than the experiment's now; retrain it")
    return True


def fold_detections(exp: D.DetectorExperiment, samples: D.Samples, records: pd.DataFrame,
                    fold_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(ground truths, detections) in film pixels of one fold's saved detector on `records` (as `evaluate_experiment`)."""
    check_detector_unseen(fold_dir, records)
    model, _, anchors = D.load_detector(fold_dir)
    images = D.image_dataset(records, samples.films, exp.train_config().batch_size, exp.ssd_config().input_channels)
    dets = D._to_eval_pixels(exp, samples, records, D.predict_batches(model, images, anchors, exp))
    return D._ground_truth(exp, records, samples.annotations), dets


def variant_name(sensitivity: float | None) -> str:
    """Report label of a variant: the detector on every film, or the cascade at a gate sensitivity."""
    return "every film" if sensitivity is None else f"cascade, gate sens >= {sensitivity:g}"


def stage_medians(timings: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Median seconds per stage (and of the total) over films."""
    frame = pd.DataFrame(list(timings))
    return {k: float(frame[k].median()) for k in (*STAGES, "total") if k in frame}


def estimated_time(timings: Sequence[Mapping[str, float]], pass_rate: float | None) -> float:
    """Seconds per film: detector on every film (`pass_rate` None), or gated at `pass_rate` (see the module doc)."""
    frame = pd.DataFrame(list(timings))
    det = float((frame["detector"] + frame["nms"]).median())
    if pass_rate is None:
        return float((frame["load"] + frame["preprocess"]).median()) + det
    return float((frame["load"] + frame["preprocess"] + frame["classifier"]).median()) + pass_rate * det


def _film_table(samples: D.Samples) -> pd.DataFrame:
    labels = mias.images_table(samples.annotations).set_index("refnum")["label_id"]
    films = samples.records[["refnum", "patient_id"]].copy()
    films["label_id"] = labels.loc[films["refnum"]].to_numpy()
    return films.reset_index(drop=True)


def _gate_stats(films: pd.DataFrame, threshold: float) -> dict:
    passed = films["gate_score"].to_numpy(float) >= threshold
    abnormal = films["label_id"].to_numpy() > 0
    return {"pass_rate": float(passed.mean()) if len(films) else float("nan"),
            "abnormal_pass_rate": float(passed[abnormal].mean()) if abnormal.any() else float("nan"),
            "normal_pass_rate": float(passed[~abnormal].mean()) if (~abnormal).any() else float("nan"),
            "n_passed": int(passed.sum())}


def evaluate_cascade(classifier_dir: str | Path, detector_dir: str | Path, out_dir: str | Path,
                     sensitivities: Sequence[float] = (0.9, 0.95, 0.99), command: str | None = None,
                     n_timing: int = 8, annotations: pd.DataFrame | None = None,
                     default_sensitivity: float = DEFAULT_SENSITIVITY,
                     detector_outputs: Sequence[str | Path] | None = None) -> dict:
    """Cascade vs detector on every film, on each trained detector fold's test films; metrics, figures, gate.json.

    See the module docstring for the rules (honest gate scores, thresholds from training patients
    only). Writes ``metrics.json`` (per fold, mean ± std, pooled, ``results`` rows of :data:`TABLE`),
    ``gate.json`` (the deployable threshold at `default_sensitivity`), ``tradeoff.png``,
    ``froc.png`` and ``gate_scores.png`` into `out_dir`. ``detector_outputs``: the detector's
    stored test outputs (:mod:`mammo_tf.detector_arrays`, a run trained elsewhere whose weights
    are not here) in place of its saved fold models; its time per film is then measured with
    random weights of the same network.
    """
    from mammo_tf.config import from_dict, provenance
    from mammo_tf.metrics.classification import summarise_folds
    from mammo_tf.plots import cascade as cplots
    from mammo_tf.plots import detection as dplots

    sens = sorted({float(s) for s in sensitivities} | {float(default_sensitivity)})
    if any(not 0.0 < s <= 1.0 for s in sens):
        raise ValueError(f"sensitivities must be in (0, 1], got {sens}")
    ddir, out = Path(detector_dir), Path(out_dir)
    stored = None
    if detector_outputs:
        from mammo_tf import detector_arrays

        info, exp, stored = detector_arrays.load_detections(detector_outputs)
        trained = {int(k) for k in info["folds"]}
    else:
        exp = from_dict(D.DetectorExperiment, load_json(ddir / D.CONFIG_FILE)["experiment"])
    if exp.protocol != "whole" or exp.naive_split:
        raise ValueError(f"{ddir}: the cascade is evaluated on a whole-film, patient-split detector "
                         f"(protocol {exp.protocol!r}, naive_split {exp.naive_split})")
    ann = annotations if annotations is not None else mias.load_annotations(exp.data)
    samples = D.make_samples(exp, ann)
    if stored is not None:
        folds = [f for f in D.make_folds(dataclasses.replace(exp, max_folds=None), samples) if f.index in trained]
    else:
        folds = [f for f in D.make_folds(exp, samples) if (ddir / "folds" / f"fold{f.index}" / D.MODEL_FILE).is_file()]
    if not folds:
        raise FileNotFoundError(f"{ddir}: no trained fold (folds/fold<k>/model.keras)")
    films = gate_scores(classifier_dir, _film_table(samples), ann)
    clf_folds = classifier_folds(classifier_dir, ann)
    by_index = {c.index: c for c in clf_folds}
    aligned = all(f.index in by_index and set(f.test["patient_id"]) == set(by_index[f.index].test) & set(films["patient_id"])
                  for f in folds)
    variants: list[float | None] = [None, *sens]
    per_variant: dict[Any, list[dict]] = {v: [] for v in variants}
    pooled_gt: list[dict] = []
    pooled_det: dict[Any, list[dict]] = {v: [] for v in variants}
    fold_rows, timings = [], []
    for fold in folds:
        fold_dir = ddir / "folds" / f"fold{fold.index}"
        test = films[films["refnum"].isin(fold.test["refnum"])]
        usable = np.isfinite(test["gate_score"].to_numpy(float))
        records = fold.test[fold.test["refnum"].isin(test.loc[usable, "refnum"])].reset_index(drop=True)
        test = test.set_index("refnum").loc[records["refnum"]].reset_index()
        train_patients = set(fold.train["patient_id"]) | set(fold.val["patient_id"])
        gates = fold_gate_thresholds(films, fold.test["patient_id"], train_patients, sens)
        if stored is None:
            gts, dets = fold_detections(exp, samples, records, fold_dir)
        else:  # stored outputs of the fold's test films (their folds are checked to be these)
            found = dict(zip(fold.test["refnum"], stored(fold)["test"]))
            dets = D._to_eval_pixels(exp, samples, records, [found[r] for r in records["refnum"]])
            gts = D._ground_truth(exp, records, samples.annotations)
        row: dict[str, Any] = {"fold": fold.index, "n_test_films": int(len(fold.test)), "n_evaluated": int(len(records)),
                               "detector_unseen_checked": (True if stored is not None
                                                           else check_detector_unseen(fold_dir, fold.test)),
                               "left_out_no_honest_score": sorted(set(fold.test["refnum"]) - set(records["refnum"])),
                               "test_patients": sorted(int(p) for p in set(fold.test["patient_id"])),
                               "gate_pool_patients": sorted(int(p) for p in train_patients),
                               "gate_sources": test["gate_source"].value_counts().to_dict(), "variants": {}}
        pooled_gt += gts
        for v in variants:
            threshold = -math.inf if v is None else gates[v]["threshold"]
            vdets = gate_detections(dets, test["gate_score"], threshold)
            flat, _, _ = D.detection_metrics(gts, vdets, exp.iou_threshold, exp.nms_iou_threshold)
            flat.update(_gate_stats(test, threshold))
            flat["lesions_on_passed_films"] = _lesions_passed(gts, test["gate_score"], threshold)
            per_variant[v].append(flat)
            pooled_det[v] += vdets
            row["variants"][variant_name(v)] = {**flat, **({} if v is None else {"gate": gates[v]})}
        fold_rows.append(row)
        if len(timings) < n_timing:
            timings += _time_films(_timing_cascade(fold_dir, exp, classifier_dir, clf_folds[0].index, stored is None),
                                   records, n_timing - len(timings), exp.data)
    summary, pooled, frocs = {}, {}, {}
    for v in variants:
        summary[variant_name(v)] = summarise_folds(per_variant[v])
        flat, _, fr = D.detection_metrics(pooled_gt, pooled_det[v], exp.iou_threshold, exp.nms_iou_threshold)
        pooled[variant_name(v)] = flat
        frocs[variant_name(v)] = fr
    pool_all = pd.concat([films[films["refnum"].isin(f.test["refnum"])] for f in folds])
    pool_all = pool_all[np.isfinite(pool_all["gate_score"].to_numpy(float))]
    for v in variants:
        p = None if v is None else float(np.mean([m["pass_rate"] for m in per_variant[v]]))
        pooled[variant_name(v)]["time_per_film_s"] = estimated_time(timings, p)
    base_time = pooled[variant_name(None)]["time_per_film_s"]
    points = pd.DataFrame([{
        "variant": variant_name(v), "sensitivity": v, "time_s": pooled[variant_name(v)]["time_per_film_s"],
        "map": summary[variant_name(v)]["map"]["mean"], "sens_at_1fp": summary[variant_name(v)]["sens_at_1fp"]["mean"],
        "pass_rate": summary[variant_name(v)]["pass_rate"]["mean"], "detector": ddir.name} for v in variants])
    prov = provenance(command)
    # The deployable gate: every evaluated film's honest score (no test metric uses it).
    deploy = choose_gate_threshold(pool_all["gate_score"], pool_all["label_id"], default_sensitivity)
    gate = {"threshold": deploy, "sensitivity": default_sensitivity, "classifier_dir": str(classifier_dir),
            "classifier_fold": 0, "detector_dir": str(ddir), "source": "evaluate_cascade",
            "rule": ("deployable threshold: all evaluated films' out-of-fold gate scores; the reported test metrics "
                     "use per-fold thresholds: " + GATE_RULE),
            "thresholds": {str(s): choose_gate_threshold(pool_all["gate_score"], pool_all["label_id"], s) for s in sens},
            "test_pass_rate": summary[variant_name(default_sensitivity)]["pass_rate"]["mean"]}
    metrics = {
        "classifier_dir": str(classifier_dir), "detector_dir": str(ddir), "detector_experiment": exp.to_dict(),
        "gate_rule": GATE_RULE, "folds_aligned": aligned,
        "folds_note": ("detector and classifier share their patient folds" if aligned else
                       "detector and classifier folds differ: each film is still scored by models that never saw its patient"),
        "sensitivities": sens, "folds": fold_rows, "summary": summary, "pooled": pooled,
        "films": _film_records(films, folds),
        "froc_curves": {name: _curve(fr) for name, fr in frocs.items()},
        "timing": {"n_films": len(timings), "stage_medians_s": stage_medians(timings), "note": TIME_NOTE},
        "points": points.to_dict("records"), "gate": gate,
        "results": _result_rows(exp, summary, pooled, base_time, len(folds), prov, Path(classifier_dir).name,
                                TIME_NOTE if stored is None else f"{STORED_NOTE}; {TIME_NOTE}"),
        "provenance": prov,
    }
    save_json(out / GATE_FILE, gate)
    save_json(out / "metrics.json", metrics)
    save_figure(cplots.plot_tradeoff(points), out / "tradeoff.png")
    save_figure(dplots.plot_froc(frocs), out / "froc.png")
    thresholds = {f"sens >= {s:g}": gate["thresholds"][str(s)] for s in sens}
    save_figure(cplots.plot_gate_scores(pool_all["gate_score"], pool_all["label_id"], thresholds), out / "gate_scores.png")
    return metrics


def _film_records(films: pd.DataFrame, folds: Sequence[D.Fold]) -> list[dict]:
    """Every sample film's gate score and source, and the detector fold that tests it (JSON-ready, NaN -> None)."""
    test_fold = {r: f.index for f in folds for r in f.test["refnum"]}
    frame = films.assign(test_fold=films["refnum"].map(test_fold).fillna(-1).astype(int))
    frame["gate_score"] = frame["gate_score"].astype(object).where(frame["gate_score"].notna(), None)
    return frame.to_dict("records")


def _curve(fr: dict) -> dict:
    """What `plot_froc` draws of a FROC result, compact: the points where the sensitivity steps, and the last one.

    Drawn as steps, the curve is unchanged; the thresholds (with their infinity) are left out.
    """
    fps, sens = np.asarray(fr["fps"], np.float64), np.asarray(fr["sensitivity"], np.float64)
    keep = np.ones(len(sens), bool)
    keep[1:] = ~np.isclose(sens[1:], sens[:-1], equal_nan=True)
    keep[-1] = True
    keys = ("criterion", "iou_threshold", "n_images", "n_lesions", "grid_fps", "grid_sensitivity", "mean_sensitivity")
    return {**{k: fr[k] for k in keys}, "fps": fps[keep], "sensitivity": sens[keep]}


def _lesions_passed(gts: Sequence[dict], scores: Sequence[float], threshold: float) -> float:
    n = sum(len(g["labels"]) for g in gts)
    kept = sum(len(g["labels"]) for g, s in zip(gts, scores) if s >= threshold)
    return kept / n if n else float("nan")


def _timing_cascade(fold_dir: Path, exp: D.DetectorExperiment, classifier_dir: str | Path, classifier_fold: int,
                    saved: bool) -> Cascade:
    """The full cascade (gate open) to time: the fold's saved detector, or the same network with random weights."""
    if saved:
        return Cascade.load(fold_dir, classifier_dir, -math.inf, classifier_fold)
    from mammo_tf.models.ssd import build_ssd

    model, anchors = build_ssd(dataclasses.replace(exp.ssd_config(), weights="random"))  # speed needs no weights
    return Cascade(model, exp, anchors, load_classifier_fold(classifier_dir, classifier_fold), -math.inf, name=exp.name)


def _time_films(cascade: Cascade, records: pd.DataFrame, n: int, data: str | None) -> list[dict]:
    """Per-stage timings of a cascade on up to `n` films of `records` from their files, warm."""
    if n <= 0 or records.empty:
        return []
    folder = mias.fetch(data)
    paths = [folder / f"{r}.pgm" for r in records["refnum"][:n]]
    run_cascade_on_image(paths[0], cascade)  # warm-up: traces the models
    return [run_cascade_on_image(p, cascade)["timings"] for p in paths]


def _cell(summary: dict, key: str) -> Any:
    s = summary.get(key, {"mean": float("nan"), "n": 0})
    return [s["mean"], s["std"]] if s["n"] > 1 else s["mean"]


def _result_rows(exp: D.DetectorExperiment, summary: dict, pooled: dict, base_time: float, n_folds: int, prov: dict,
                 classifier: str, time_note: str = TIME_NOTE) -> list[dict]:
    cfg = exp.ssd_config()
    common = {"table": TABLE, "command": prov["command"], "hardware": hardware_label(prov), "date": prov["date"]}
    rows = []
    for name, s in summary.items():
        t = pooled[name]["time_per_film_s"]
        values = {"benign AP": _cell(s, "benign_ap"), "malignant AP": _cell(s, "malignant_ap"), "mAP": _cell(s, "map"),
                  "sens@1FP": _cell(s, "sens_at_1fp"), "films to detector": _cell(s, "pass_rate"),
                  "abnormal films passed": _cell(s, "abnormal_pass_rate"), "time/film (s)": t,
                  "time vs every film": t / base_time}
        detector = f"SSD{exp.image_size} {cfg.backbone}"
        label = f"{detector}, every film" if name == variant_name(None) else f"{classifier} gate + {detector}, {name[9:]}"
        rows.append({**common, "row": label, "values": values,
                     "note": f"{n_folds} of {exp.folds} patient folds, same test films; gate: thresholds from "
                             f"training patients only; {time_note}"})
    return rows


# --------------------------------------------------------------------------- benchmark helpers


def count_flops(model: Any, input_shape: Sequence[int] | None = None) -> int:
    """Floating-point operations of one forward pass on a batch of one (TensorFlow's graph profiler).

    The model is traced into a concrete function, its variables frozen into constants, and
    ``tf.compat.v1.profiler`` sums the registered FLOP statistics of every op (a multiply-add
    counts 2).
    """
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    shape = tuple(input_shape or model.input_shape[1:])
    fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(tf.TensorSpec((1, *shape), tf.float32))
    graph = convert_variables_to_constants_v2(fn).graph
    opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    opts["output"] = "none"
    logger, level = tf.get_logger(), tf.get_logger().level
    logger.setLevel("ERROR")  # the v1 profiler logs a deprecation notice per call
    try:
        info = tf.compat.v1.profiler.profile(graph=graph, run_meta=tf.compat.v1.RunMetadata(), cmd="op", options=opts)
    finally:
        logger.setLevel(level)
    return int(info.total_float_ops)


def timing_table(timings: pd.DataFrame, reference: str) -> pd.DataFrame:
    """Per variant: median seconds per film (median over repeats, then over films), stage medians, ratio to `reference`.

    ``timings``: one row per (variant, film, repeat) with the :data:`STAGES` columns, ``total``
    and ``passed``. The ratio is ``median time / median time of the reference variant``.
    """
    missing = {"variant", "film", *STAGES, "total"} - set(timings.columns)
    if missing:
        raise ValueError(f"timings lack columns {sorted(missing)}")
    per_film = timings.groupby(["variant", "film"], sort=False)[[*STAGES, "total"]].median()
    table = per_film.groupby(level="variant", sort=False).median()
    table.columns = [f"{c}_s" for c in table.columns]
    if "passed" in timings:
        table["pass_rate"] = timings.groupby(["variant", "film"], sort=False)["passed"].first().groupby(
            level="variant", sort=False).mean()
    if reference not in table.index:
        raise ValueError(f"reference variant {reference!r} not among {list(table.index)}")
    table["ratio"] = table["total_s"] / table.loc[reference, "total_s"]
    return table


def benchmark_variants(variants: Mapping[str, Cascade], paths: Sequence[str | Path], repeats: int = 3,
                       warmup: int = 1) -> pd.DataFrame:
    """Per-stage seconds of each variant on each film, end to end from the file, warm: one row per (variant, film, repeat).

    Every variant first runs on `warmup` films (tracing, caches); then each repeat runs every
    variant on every film, variants interleaved so that a change in the machine's load touches
    them alike. Columns: ``variant``, ``film``, ``repeat``, the :data:`STAGES`, ``total``,
    ``passed`` and ``gate_score``.
    """
    if repeats < 1 or not paths:
        raise ValueError(f"need repeats >= 1 and at least one film, got {repeats} and {len(paths)} films")
    for cascade in variants.values():
        for path in list(paths)[:warmup]:
            run_cascade_on_image(path, cascade)
    rows = []
    for r in range(repeats):
        for name, cascade in variants.items():
            for path in paths:
                res = run_cascade_on_image(path, cascade)
                if "error" in res:
                    raise ValueError(f"{path}: {res['error']}")
                rows.append({"variant": name, "film": Path(path).stem, "repeat": r, **res["timings"],
                             "passed": res["passed"], "gate_score": res["gate_score"]})
    return pd.DataFrame(rows)
