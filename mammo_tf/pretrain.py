"""Pretraining the small CNN's convolution stack on whole films of another labelled set (rsna-640).

A fold of mini-MIAS offers about 205 training films, and the film-level CNN (``strategy: whole``)
memorises them. rsna-640 (``../shared/data/rsna-640``, see its README) holds 2,345 films of 680
other patients, labelled malignant or cancer-negative (no benign class, no lesion locations).
The same network, on films prepared the same way (`external_eval.prepare_external`, then
`patches.prepare_whole`), is trained on them once, with held-out patients for early stopping and
for the AUC reported here; the classifier experiment then copies the convolution stack into every
fold's model before training it on mini-MIAS (the dense head starts afresh: rsna-640 has no benign
class). No mini-MIAS film is seen here, so the folds' test films stay unseen.

The labels map onto the classifier's: cancer-negative -> normal (0), malignant -> malignant (2);
the benign output gets class weight 0. The film's score is ``1 - p(normal)``, as for mini-MIAS.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from mammo_tf import baselines, patches, pipelines, training
from mammo_tf.config import ConfigError, from_dict, provenance, save_config
from mammo_tf.io import atomic_path, load_json, save_figure, save_json
from mammo_tf.metrics import classification as cm

if TYPE_CHECKING:
    from mammo_tf.models.classifier import ClassifierConfig

# The report table of a run pretrained on folder X is f"{TABLE_PREFIX} (X): ...".
TABLE_PREFIX = "Pretraining on another dataset"


@dataclass
class PretrainConfig:
    """Where the pretraining films come from and how the network is trained on them."""

    data: str = "../shared/data/rsna-640"   # relative paths: to the repository root
    adapter: str = "folder"
    val_fraction: float = 0.2                # held-out patients: early stopping and the reported AUC
    max_images: int | None = None            # small setting: whole patients, stratified
    seed: int = 0
    n_boot: int = 1000
    train: dict = field(default_factory=dict)  # mammo_tf.training.TrainConfig


def data_root(cfg: PretrainConfig) -> Path:
    """The data folder, resolved against the repository root when relative."""
    from mammo_tf.external_eval import REPO_ROOT

    p = Path(cfg.data)
    return p if p.is_absolute() else (REPO_ROOT / p).resolve()


def source_name(cfg: PretrainConfig) -> str:
    """How report rows name the pretraining set: its folder's name."""
    return Path(cfg.data).name


def load_films(cfg: PretrainConfig, size: int) -> tuple[pd.DataFrame, patches.FilmCache, list[dict]]:
    """Records (one per film, `patches.film_records`), their prepared films, and the films skipped."""
    import keras

    from mammo_tf.data import external
    from mammo_tf.external_eval import prepare_external, select_images
    from mammo_tf.imageio import read_image

    images = select_images(external.load_external(data_root(cfg), cfg.adapter), cfg.max_images, cfg.seed)
    prepared: dict[str, np.ndarray] = {}
    skipped = []
    bar = keras.utils.Progbar(len(images), unit_name="film")
    for r in images.itertuples(index=False):
        try:
            film = prepare_external(read_image(r.path), r.spacing_mm)
            prepared[r.image_id] = patches.prepare_whole(film, size=size)[0]
        except ValueError as err:  # unreadable file, constant image, no breast found: reported, not fatal
            skipped.append({"image_id": r.image_id, "error": f"{type(err).__name__}: {err}"})
        bar.add(1)
    kept = images[images["image_id"].isin(prepared)].reset_index(drop=True)
    if kept["label_id"].nunique() < 2:
        raise ConfigError(f"{cfg.data}: pretraining needs films of two classes, got {sorted(kept['label'].unique())}")
    records = patches.film_records(kept.set_index("image_id"), size)
    films = patches.FilmCache(prepared.__getitem__, mask_scale=1)
    return records, films, skipped


def split_patients(records: pd.DataFrame, val_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Training and held-out films, whole patients on one side, stratified by label."""
    from sklearn.model_selection import StratifiedGroupKFold

    if not 0.0 < val_fraction < 0.5:
        raise ConfigError(f"pretrain val_fraction must be in (0, 0.5), got {val_fraction}")
    splitter = StratifiedGroupKFold(n_splits=int(round(1.0 / val_fraction)), shuffle=True, random_state=seed)
    train_idx, val_idx = next(splitter.split(records, records["label_id"], groups=records["patient_id"]))
    return records.iloc[train_idx].reset_index(drop=True), records.iloc[val_idx].reset_index(drop=True)


def _features(records: pd.DataFrame, films: patches.FilmCache) -> np.ndarray:
    stack = np.stack([films.image(r) for r in records["refnum"]])
    return baselines.intensity_features(stack, np.stack([films.mask(r) for r in records["refnum"]]))


def _scores(y: np.ndarray, score: np.ndarray, patients: np.ndarray, n_boot: int, seed: int,
            baseline: np.ndarray | None = None) -> dict:
    """AUC of malignant vs cancer-negative with its patient-bootstrap CI (or the CI of the difference)."""
    ci = cm.bootstrap_auc_ci(y, score, groups=patients, n_boot=n_boot, seed=seed, baseline=baseline)
    return {"auc": ci["auc" if baseline is None else "auc_difference"], "ci_low": ci["ci_low"], "ci_high": ci["ci_high"]}


def run(cfg: PretrainConfig, model_config: ClassifierConfig, out_dir: str | Path, command: str | None = None) -> dict:
    """Train the classifier network on the external films (or reload a finished run); its metrics."""
    from mammo_tf.models import classifier as clf
    from mammo_tf.plots import classification as cplots

    out = Path(out_dir)
    model_path, metrics_path = out / "model.keras", out / "metrics.json"
    if model_path.is_file() and metrics_path.is_file():
        return load_json(metrics_path)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    t0 = time.perf_counter()
    size = model_config.input_size
    print(f"[mammo-tf] pretraining on {data_root(cfg)} at {size} px -> {out}", flush=True)
    records, films, skipped = load_films(cfg, size)
    train, val = split_patients(records, cfg.val_fraction, cfg.seed)
    pipelines.assert_no_patient_leak(train, val)
    tcfg = from_dict(training.TrainConfig, {"seed": cfg.seed, **cfg.train})
    if model_path.is_file():
        # Killed after the model was saved and before its metrics: evaluate it, do not train again.
        model, _ = clf.load_classifier(model_path)
        history = pd.read_csv(out / "history.csv")
    else:
        kw = dict(batch_size=tcfg.batch_size, films=films)
        train_ds = pipelines.patch_dataset(train, training=True, seed=tcfg.seed, augment_train=False, **kw)
        val_ds = pipelines.patch_dataset(val, training=False, **kw)
        model, history = training.fit(lambda: clf.build_classifier(model_config), lambda: {
            "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]},
            train_ds, val_ds, tcfg, out, class_weight=pipelines.class_weights(train), verbose=2)
        history.to_csv(out / "history.csv", index=False)
        with atomic_path(model_path) as tmp:
            model.save(tmp)
    results, curves = evaluate(model, train, val, films, cfg, tcfg.batch_size)
    save_figure(cplots.plot_training_curves(history, title=f"pretraining on {source_name(cfg)}"),
                out / "training_curves.png")
    save_figure(roc_figure(curves, source_name(cfg)), out / "roc_validation.png")
    prov = provenance(command)
    prov["wall_time_s"] = round(time.perf_counter() - t0, 1)
    metrics = {"config": dataclasses.asdict(cfg), "model": model_config.to_dict(), "epochs_run": int(len(history)),
               "skipped": skipped, "results": results, "provenance": prov}
    save_json(metrics_path, metrics)
    return metrics


def evaluate(model: Any, train: pd.DataFrame, val: pd.DataFrame, films: patches.FilmCache, cfg: PretrainConfig,
             batch_size: int = 16) -> tuple[dict, list]:
    """AUCs (patient-bootstrap CIs) of the CNN and the intensity baseline on training and held-out films; ROC curves."""
    from mammo_tf import classify  # classify imports this module at its top

    results: dict[str, Any] = {}
    x_train = _features(train, films)
    curves = []
    for name, frame in (("train", train), ("validation", val)):
        y = (frame["label_id"].to_numpy() != 0)
        cnn = 1.0 - classify.predict_patches(model, frame, films, batch_size)[:, 0]
        logistic = 1.0 - baselines.logistic_proba(x_train, train["label_id"].to_numpy(), _features(frame, films))[:, 0]
        patients = frame["patient_id"].to_numpy()
        results[name] = {
            "n_films": int(len(frame)), "n_patients": int(frame["patient_id"].nunique()),
            "n_malignant": int(y.sum()),
            "cnn": _scores(y, cnn, patients, cfg.n_boot, cfg.seed),
            "logistic": _scores(y, logistic, patients, cfg.n_boot, cfg.seed),
            "cnn_minus_logistic": _scores(y, cnn, patients, cfg.n_boot, cfg.seed, baseline=logistic),
        }
        if name == "validation":
            r = results[name]
            # RocCurveDisplay adds the AUC to each name; the name carries its patient-bootstrap interval.
            curves = [(f"CNN (CI {r['cnn']['ci_low']:.3f}-{r['cnn']['ci_high']:.3f})", y, cnn, "black", "-"),
                      (f"logistic, intensity (CI {r['logistic']['ci_low']:.3f}-{r['logistic']['ci_high']:.3f})", y,
                       logistic, "tab:green", "-.")]
    return results, curves


def roc_figure(curves: list, source: str) -> Any:
    """ROC curves on the held-out patients' films."""
    from matplotlib.figure import Figure

    from mammo_tf.plots.external import roc_axes

    fig = Figure(figsize=(5.5, 5))
    roc_axes(fig.subplots(), curves, [], f"{source} held-out patients: malignant vs cancer-negative")
    return fig


def rows(metrics: dict, common: dict) -> list[dict]:
    """Report rows of a pretraining run: the CNN and the intensity baseline on the held-out and training patients."""
    cfg = from_dict(PretrainConfig, metrics["config"])
    tcfg = from_dict(training.TrainConfig, cfg.train)
    source = source_name(cfg)
    table = f"{TABLE_PREFIX} ({source}): malignant vs cancer-negative films, held-out patients"
    out = []
    for model, label in (("cnn", f"CNN pretrained on {source} ({training.schedule_label(tcfg)}, no augmentation)"),
                         ("logistic", "logistic regression, intensity features"),
                         ("cnn_minus_logistic", "CNN minus logistic regression")):
        values = {}
        for split in ("validation", "train"):
            r = metrics["results"][split][model]
            values[f"{split} AUC"] = round(r["auc"], 3)
            values[f"{split} 95 % CI"] = f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
        v, t = metrics["results"]["validation"], metrics["results"]["train"]
        note = (f"{v['n_films']} held-out films of {v['n_patients']} patients ({v['n_malignant']} malignant), "
                f"{t['n_films']} training films of {t['n_patients']} patients; CI: patients resampled; "
                f"{len(metrics['skipped'])} films skipped")
        out.append({"table": table, "row": label, "values": values, "note": note, **common})
    return out


def check(exp_strategy: str, classifier: str) -> None:
    """Refuse pretraining where it does not apply: it prepares whole films for the trained CNN."""
    if classifier != "cnn" or exp_strategy != patches.WHOLE:
        raise ConfigError("pretrain trains the CNN on whole external films: use it with classifier cnn and "
                          "strategy whole")
