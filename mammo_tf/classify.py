"""The classifier experiment: patient-level cross-validation at patch and whole-mammogram level.

Per fold: patches of the training patients under one cutting strategy train the small CNN
(validation patients held out of the fold's training patients for early stopping); the test
patients are scored three ways:

- *patch level, same strategy*: for ``lesion_centred`` the test patches are centred on the
  lesions, so the protocol **leaks where the lesion is** (reported, and labelled so);
- *patch level, grid*: ``grid_keep`` patches of the test films, labelled by the same rule, the
  reference that knows nothing of the lesion position;
- *whole mammogram*: every ``grid_keep`` patch over the breast of a test film is classified; the
  film takes the probabilities of its most abnormal patch (highest ``1 - p(normal)``), so its
  abnormality score is ``max(1 - p(normal))`` over the breast. This is the classifier that gates
  the detector in the cascade. Beside it, each fold picks a film rule (`FILM_RULES`: max, top-3
  mean, peak minus the film's median patch, mean) on its validation patients and reports that too.

Baselines on the same folds: the majority class (training prior) and a class-balanced logistic
regression on simple intensity features (of the patch, or of the film's breast region).

With ``classifier: vgg16_probe`` the trained CNN is replaced by a linear probe
(:mod:`mammo_tf.models.probe`): a frozen pretrained VGG16's pooled features of each patch under a
logistic regression, scored by exactly the same protocol; a film-level probe (the features pooled
over the film, logistic regression on film labels) is reported beside it.
With ``strategy: whole`` there are no patches: the same CNN is trained on whole films, each cropped
to its breast box and resized (:class:`mammo_tf.patches.WholeFilms`), one sample per film; it is
scored at film level only, beside the same film-level baselines as the patch models. With
``pretrain`` its convolution stack is first trained on the films of another labelled set
(:mod:`mammo_tf.pretrain`, rsna-640), once per run, then copied into every fold's model.
The leakage audit trains the same network on a naive random split of the (jittered, repeated)
patches, ignoring patients, and is reported beside the patient-level numbers as leaky.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from mammo_tf import baselines, bilateral, patches, pipelines, pretrain, training
from mammo_tf.config import ConfigError, from_dict, keep_training_provenance, load_config, provenance, save_config
from mammo_tf.data import mias, splits
from mammo_tf.io import atomic_path, load_json, save_figure, save_json
from mammo_tf.metrics import classification as cm

# Where each kind of classifier's results live in metrics.json ("cnn" for the small CNN, as ever).
MODEL_KEYS = {"cnn": "cnn", "vgg16_probe": "probe"}
PATCH_KEY = ["refnum", "top", "left", "size"]
SHORT_NAMES = {"cnn": "small CNN", "probe": "VGG16 probe, patches", "probe_film": "VGG16 probe, film features",
               "probe_intensity": "VGG16 probe + intensity",
               "logistic": "logistic, intensity", "majority": "majority class"}
METRIC_KEYS = {"accuracy": "accuracy", "balanced acc": "balanced_accuracy", "macro AUC": "macro_roc_auc",
               "abnormal AUC": "abnormal_vs_normal_auc"}


@dataclass
class ClassifierExperiment:
    """One cross-validated classifier run (saved as config.yaml beside its results)."""

    name: str = "cnn128_lesion_centred"
    strategy: str = "lesion_centred"
    size: int = 128
    folds: int = 5
    max_folds: int | None = None          # small setting: only the first folds
    val_fraction: float = 0.2
    seed: int = 0
    replicate: int = 0                        # another training of the same folds: only init and batch order change
    patch_options: dict = field(default_factory=lambda: {"jitter": 16})
    normal_per_abnormal: float | None = 3.0   # subsample normal training (and validation) patches to this ratio
    balance: str = "class_weight"             # class_weight | resample | none
    augment: bool = True                      # random flips / 90-degree rotations of training patches
    max_angle: float = 0.0
    epoch_repeats: int = 1                    # passes over the (augmented) training patches per epoch
    lesion_copies: int = 0                    # extra training patches per located lesion (training patients only)
    lesion_jitter: int = 48                   # ... each with the lesion centre moved up to this many px per axis
    max_films: int | None = None              # small setting: a subset of patients
    leakage_audit: bool = False
    classifier: str = "cnn"                   # cnn (the small CNN, trained) | vgg16_probe (frozen VGG16 + logistic)
    model: dict = field(default_factory=dict)  # mammo_tf.models.classifier.ClassifierConfig
    probe: dict = field(default_factory=dict)  # mammo_tf.models.probe.ProbeConfig (classifier: vgg16_probe)
    train: dict = field(default_factory=dict)  # mammo_tf.training.TrainConfig
    pretrain: dict = field(default_factory=dict)  # mammo_tf.pretrain.PretrainConfig (strategy whole): conv stack init
    init_from: str | None = None              # a patch-CNN run folder: fold k goes on training from its fold k model
    hard_negatives: int = 0                   # with init_from: the lesion-free training patches it scores highest, added


# What a run that goes on from another (``init_from``) may change: the rest fixes its folds and training patches.
INIT_MAY_DIFFER = frozenset({"name", "train", "init_from", "hard_negatives", "leakage_audit"})


def _subsample_normals(records: pd.DataFrame, ratio: float | None, seed: int) -> pd.DataFrame:
    """Keep every abnormal patch and at most `ratio` times as many normal ones (seeded)."""
    if ratio is None:
        return records
    abnormal = records[records["label_id"] > 0]
    normal = records[records["label_id"] == 0]
    n = min(len(normal), max(1, int(round(ratio * max(1, len(abnormal))))))
    return pd.concat([abnormal, normal.sample(n=n, random_state=seed)]).sort_index().reset_index(drop=True)


def predict_patches(model: Any, records: pd.DataFrame, films: patches.FilmCache, batch_size: int) -> np.ndarray:
    """Class probabilities of a trained classifier for these patch records (unaugmented, in order)."""
    ds = pipelines.patch_dataset(records.assign(label_id=records["label_id"].clip(lower=0)), training=False,
                                 batch_size=batch_size, films=films, cache=False)
    return model.predict(ds.map(lambda x, y: x), verbose=0)


def check_init_from(exp: ClassifierExperiment) -> None:
    """Refuse ``hard_negatives`` without ``init_from``, and an ``init_from`` run on other folds or training patches."""
    if exp.hard_negatives < 0 or (exp.hard_negatives and not exp.init_from):
        raise ConfigError("hard_negatives (>= 0) are mined by the fold models of an init_from run: set init_from")
    if not exp.init_from:
        return
    if exp.classifier != "cnn" or exp.strategy == patches.WHOLE or exp.pretrain:
        raise ConfigError("init_from goes on from a patch CNN run's fold models: it needs classifier cnn, "
                          "a patch strategy and no pretrain")
    source = Path(exp.init_from) / "config.yaml"
    if not source.is_file():
        raise ConfigError(f"init_from: {source.parent} holds no classifier run ({source.name})")
    theirs = dataclasses.asdict(from_dict(ClassifierExperiment, load_config(source)))
    differ = sorted(k for k, v in dataclasses.asdict(exp).items() if k not in INIT_MAY_DIFFER and theirs[k] != v)
    if differ:
        raise ConfigError(f"init_from: {source.parent} differs in {differ}; a run goes on from one with the same "
                          "folds and training patches (only name, train, init_from, hard_negatives may differ)")


def init_fold_dir(exp: ClassifierExperiment, k: int, test_patients: Sequence[int]) -> Path:
    """The ``init_from`` run's fold ``k``, after checking that the patients it was tested on are this fold's."""
    fold_dir = Path(exp.init_from) / f"fold{k}"
    if not (fold_dir / "model.keras").is_file() or not (fold_dir / "patch_predictions.csv").is_file():
        raise ConfigError(f"init_from: {fold_dir} holds no trained CNN fold (model.keras, patch_predictions.csv)")
    tested = set(pd.read_csv(fold_dir / "patch_predictions.csv", usecols=["patient_id"])["patient_id"])
    if not tested <= set(test_patients):
        raise ConfigError(f"init_from: {fold_dir} was tested on patients {sorted(tested - set(test_patients))[:5]} "
                          f"outside fold {k}'s test set, so it may have trained on this fold's test patients")
    return fold_dir


def mine_hard_negatives(score: Callable[[pd.DataFrame], np.ndarray], whole: pd.DataFrame, train: pd.DataFrame,
                        train_patients: Sequence[int], n: int,
                        normal_films: Sequence[str] = ()) -> tuple[pd.DataFrame, dict]:
    """The ``n`` lesion-free breast patches of ``train_patients`` (not already in ``train``) that ``score`` (a model's
    abnormal score per patch record) ranks most abnormal, and what the mining found (``normal_films``: counted apart)."""
    pool = whole[whole["patient_id"].isin(train_patients) & (whole["label_id"] == 0)]
    pool = pool[~pd.MultiIndex.from_frame(pool[PATCH_KEY]).isin(pd.MultiIndex.from_frame(train[PATCH_KEY]))]
    scores = np.asarray(score(pool), np.float64) if len(pool) else np.zeros(0)
    order = np.argsort(-scores, kind="stable")[:n]
    mined = pool.iloc[order].reset_index(drop=True)
    return mined, {"n_candidates": int(len(pool)), "n_mined": int(len(mined)), "n_films": int(mined["refnum"].nunique()),
                   "share_from_normal_films": float(mined["refnum"].isin(list(normal_films)).mean()) if len(mined) else 0.0,
                   "lowest_score_mined": float(scores[order].min()) if len(order) else None,
                   "median_score_candidates": float(np.median(scores)) if len(scores) else None}


def _patch_pixels(records: pd.DataFrame, films: patches.FilmCache) -> np.ndarray:
    return np.stack([patches.cut(films.image(r.refnum), r) for r in records.itertuples()])


# How a film's patch abnormality scores `1 - p(normal)` become one film score. Fixed candidates,
# chosen per fold on validation patients (never on test patients): the standard multiple-instance
# max, a top-3 mean less sensitive to one stray patch, the peak relative to the film's own median
# patch (dense breasts raise every patch), and the mean (a global density measure).
FILM_RULES: dict[str, Any] = {
    "max": np.max,
    "top3_mean": lambda s: float(np.sort(s)[-3:].mean()),
    "max_minus_median": lambda s: float(np.max(s) - np.median(s)),
    "mean": np.mean,
}


def film_scores(records: pd.DataFrame, proba: np.ndarray, rule: str = "max") -> pd.DataFrame:
    """Whole-mammogram probabilities: film abnormal score by `rule`, split benign/malignant like its most abnormal patch.

    With ``rule="max"`` the film takes exactly the probabilities of its most abnormal patch.
    """
    if rule not in FILM_RULES:
        raise ValueError(f"unknown film rule {rule!r} (expected one of {sorted(FILM_RULES)})")
    abnormal = 1.0 - proba[:, 0]
    frame = records[["refnum"]].assign(_score=abnormal, _row=np.arange(len(records)))
    best = frame.loc[frame.groupby("refnum")["_score"].idxmax()].set_index("refnum")
    score = frame.groupby("refnum")["_score"].agg(FILM_RULES[rule]).loc[best.index].to_numpy(np.float64)
    lesion = proba[best["_row"].to_numpy(), 1:].astype(np.float64)
    share = lesion / np.maximum(lesion.sum(axis=1, keepdims=True), 1e-12)
    out = pd.DataFrame(np.column_stack([1.0 - score, score[:, None] * share]), columns=list(mias.CLASSES),
                       index=best.index.to_numpy())
    out["abnormal_score"] = score
    return out.sort_index()


def choose_film_rule(records: pd.DataFrame, proba: np.ndarray, labels: pd.Series) -> tuple[str, dict[str, float]]:
    """The film rule with the best abnormal-vs-normal AUC on these (validation) films; 'max' when undefined."""
    from sklearn.metrics import roc_auc_score

    aucs: dict[str, float] = {}
    for rule in FILM_RULES:
        scores = film_scores(records, proba, rule)
        y = (labels.loc[scores.index].to_numpy() > 0).astype(int)
        aucs[rule] = float(roc_auc_score(y, scores["abnormal_score"])) if 0 < y.sum() < len(y) else float("nan")
    finite = {r: a for r, a in aucs.items() if np.isfinite(a)}
    # Ties keep the order of FILM_RULES (max first).
    return (max(finite, key=lambda r: (finite[r], -list(FILM_RULES).index(r))) if finite else "max"), aucs


def score_image(model: Any, image: np.ndarray, size: int | None = None, mask: np.ndarray | None = None,
                batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Whole-mammogram call on any grey film: (class probabilities of its most abnormal breast patch, heat map).

    The heat map holds, per pixel, the highest abnormality score `1 - p(normal)` of the grid patches
    covering it (NaN outside every scored patch). Same rule as `film_scores` for mini-MIAS folds.
    """
    image = np.asarray(image)
    size = size or int(model.input_shape[1])
    mask = patches.breast_mask(image) if mask is None else mask
    tops, lefts = patches.grid_positions(image.shape, size, keep_edge=True)
    keep = patches.window_fraction(mask, tops, lefts, size) > 0
    tops, lefts = tops[keep], lefts[keep]
    if not len(tops):
        raise ValueError("score_image: no grid patch touches the breast mask")
    batch = np.stack([image[t:t + size, l:l + size] for t, l in zip(tops, lefts)])[..., None].astype(np.float32) / 255.0
    # A direct call per chunk: model.predict rebuilds its data pipeline on every film (3x slower here).
    proba = np.concatenate([np.asarray(model(batch[i:i + batch_size], training=False))
                            for i in range(0, len(batch), batch_size)])
    abnormal = 1.0 - proba[:, 0]
    heat = np.full(image.shape, np.nan, dtype=np.float32)
    for t, l, a in zip(tops, lefts, abnormal):
        window = heat[t:t + size, l:l + size]
        np.fmax(window, a, out=window)
    return proba[int(np.argmax(abnormal))], heat


def is_trained_fold(fold_dir: str | Path) -> bool:
    """Whether a classifier fold folder holds a trained model (a CNN's model.keras or a probe's probe.npz)."""
    return any((Path(fold_dir) / name).is_file() for name in ("model.keras", "probe.npz"))


def load_fold_model(fold_dir: str | Path) -> Any:
    """One trained fold as a Keras model taking [0, 1] patches: the CNN's ``model.keras`` (safe mode),
    or a probe rebuilt from its experiment's config and ``probe.npz`` (the frozen trunk is not saved twice)."""
    import keras

    import mammo_tf.models  # noqa: F401  (registers the custom layers for safe loading)

    fold_dir = Path(fold_dir)
    if (fold_dir / "model.keras").is_file():
        return keras.saving.load_model(fold_dir / "model.keras", safe_mode=True)
    if (fold_dir / "probe.npz").is_file():
        from mammo_tf.models import probe

        exp = from_dict(ClassifierExperiment, load_config(fold_dir.parent / "config.yaml"))
        extractor = probe.build_extractor(exp.size, probe.ProbeConfig.from_dict(exp.probe))
        return probe.as_keras(extractor, probe.load_probe(fold_dir / "probe.npz"))
    raise FileNotFoundError(f"{fold_dir}: no model.keras or probe.npz (not a trained classifier fold)")


def example_calls(exp_dir: str | Path, fold: int = 0, n_correct: int = 2, n_wrong: int = 2,
                  seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """Correct and wrong whole-mammogram calls of one fold's test films, with their heat maps."""
    exp_dir = Path(exp_dir)
    preds = pd.read_csv(exp_dir / f"fold{fold}" / "film_predictions.csv")
    preds["predicted"] = preds[list(mias.CLASSES)].to_numpy().argmax(axis=1)
    right = preds[preds["predicted"] == preds["label_id"]]
    wrong = preds[preds["predicted"] != preds["label_id"]]
    # Prefer abnormal films among the examples: they show what the heat map finds.
    pick = pd.concat([
        right.sort_values("label_id", ascending=False, kind="stable").head(n_correct),
        wrong.sort_values("label_id", ascending=False, kind="stable").head(n_wrong),
    ])
    model = load_fold_model(exp_dir / f"fold{fold}")
    images, heats, titles = [], [], []
    for row in pick.itertuples():
        image = mias.load_image(row.refnum)
        _, heat = score_image(model, image)
        verdict = "correct" if row.predicted == row.label_id else "WRONG"
        images.append(image)
        heats.append(heat)
        titles.append(f"{row.refnum}: {mias.CLASSES[row.label_id]} -> {mias.CLASSES[row.predicted]} ({verdict})")
    return images, heats, titles


def _film_features(refnums: list[str], films: patches.FilmCache) -> np.ndarray:
    # Always the original films: a whole-film experiment's baseline is then every experiment's.
    films = films.raw if isinstance(films, patches.WholeFilms) else films
    images = np.stack([films.image(r)[::4, ::4] for r in refnums])
    masks = np.stack([films.mask(r)[::4, ::4] for r in refnums])
    return baselines.intensity_features(images, masks)


def _report(y: np.ndarray, proba: np.ndarray) -> dict:
    return cm.classification_report_dict(y, proba, class_names=mias.CLASSES)


class FeatureBank:
    """Probe features of every patch an experiment scores, extracted once: the frozen trunk does not depend on the fold.

    They are kept in the data cache (``mias.cache_dir()/probe_features``, beside the films and never in
    the repository: they derive from the licensed images), one file per trunk setting, so that other
    experiments reuse the patches already described.
    """

    def __init__(self, frames: list[pd.DataFrame], films: patches.FilmCache, size: int, config: Any,
                 verbose: bool = True) -> None:
        from mammo_tf.models import probe

        keys = pd.concat([f[PATCH_KEY] for f in frames]).drop_duplicates().reset_index(drop=True)
        setting = f"{config.weights}|{','.join(config.layers)}|{','.join(config.pooling)}|{size}"
        path = mias.cache_dir() / "probe_features" / f"{hashlib.sha256(setting.encode()).hexdigest()[:16]}.npz"
        known, known_x = self._read(path)
        index = pd.MultiIndex.from_frame(keys)
        missing = keys[~index.isin(known)] if len(known) else keys
        print(f"[mammo-tf] VGG16 ({config.weights}) probe features of {len(keys)} patches "
              f"({len(keys) - len(missing)} from {path})", flush=True)
        if len(missing):
            new_x = probe.extract_features(probe.build_extractor(size, config), _patch_pixels(missing, films),
                                           config.batch_size, verbose=verbose)
            known = known.append(pd.MultiIndex.from_frame(missing)) if len(known) else pd.MultiIndex.from_frame(missing)
            known_x = np.concatenate([known_x, new_x]) if len(known_x) else new_x
            self._write(path, known, known_x)
        self.index, self.features = known, known_x

    @staticmethod
    def _read(path: Path) -> tuple[pd.MultiIndex, np.ndarray]:
        empty = pd.MultiIndex.from_arrays([[], [], [], []], names=PATCH_KEY), np.zeros((0, 0), np.float32)
        if not path.is_file():
            return empty
        try:
            with np.load(path, allow_pickle=False) as z:
                frame = pd.DataFrame({"refnum": z["refnum"].astype(str), "top": z["top"], "left": z["left"],
                                      "size": z["size"]})
                return pd.MultiIndex.from_frame(frame), z["features"]
        except (OSError, ValueError, KeyError) as err:  # a damaged cache is rebuilt, never trusted
            print(f"[mammo-tf] ignoring unreadable feature cache {path}: {err}", flush=True)
            return empty

    @staticmethod
    def _write(path: Path, index: pd.MultiIndex, features: np.ndarray) -> None:
        frame = index.to_frame(index=False)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, refnum=frame["refnum"].to_numpy(str), top=frame["top"].to_numpy(np.int64),
                         left=frame["left"].to_numpy(np.int64), size=frame["size"].to_numpy(np.int64),
                         features=features)

    def __call__(self, records: pd.DataFrame) -> np.ndarray:
        """The features of these patch records, in their order."""
        rows = self.index.get_indexer(pd.MultiIndex.from_frame(records[PATCH_KEY]))
        if (rows < 0).any():
            raise KeyError(f"{int((rows < 0).sum())} patches have no extracted features")
        return self.features[rows]

    def films(self, records: pd.DataFrame) -> pd.DataFrame:
        """One row per film: the mean and the maximum of its patches' features (a film-level representation)."""
        x = self(records)
        groups = pd.DataFrame(x).groupby(records["refnum"].to_numpy())
        return pd.concat([groups.mean(), groups.max()], axis=1)


def _fit_cnn(exp: ClassifierExperiment, k: int, train: pd.DataFrame, val: pd.DataFrame, films: patches.FilmCache,
             fold_dir: Path, init_dir: Path | None = None) -> tuple[Any, dict]:
    """Train (from scratch, or on from ``init_dir``'s model; a finished fold is loaded) the small CNN; returns its
    predictor and what to record."""
    import keras

    from mammo_tf.models import classifier as clf

    # The replicate moves only the training seed (weights, batch order): folds, validation patients and
    # the sampled patches stay those of `seed`, so replicates differ by training randomness alone.
    train_seed = exp.seed + k + 1000 * exp.replicate
    tcfg = from_dict(training.TrainConfig, {"seed": train_seed, **exp.train})
    mcfg = clf.ClassifierConfig.from_dict({**exp.model, "input_size": exp.size})
    model_path = fold_dir / "model.keras"
    trained_here = not model_path.is_file()
    if not trained_here:
        # A finished fold is evaluated, not retrained (resume, and `evaluate-classifier`).
        model = keras.saving.load_model(model_path, safe_mode=True)
        history = pd.read_csv(fold_dir / "history.csv")
    else:
        kw = dict(batch_size=tcfg.batch_size, films=films)
        train_ds = pipelines.patch_dataset(train, training=True, seed=train_seed, augment_train=exp.augment,
                                           max_angle=exp.max_angle,
                                           balance="resample" if exp.balance == "resample" else None, **kw)
        train_ds = train_ds.repeat(exp.epoch_repeats)
        val_ds = pipelines.patch_dataset(val, training=False, **kw)
        weights = pipelines.class_weights(train) if exp.balance == "class_weight" else None

        def build() -> Any:
            if init_dir is not None:
                return load_fold_model(init_dir)
            model = clf.build_classifier(mcfg)
            if exp.pretrain:
                # The dense head starts afresh: the pretraining set has no benign class.
                clf.copy_stack_weights(clf.load_classifier(fold_dir.parent / "pretrain" / "model.keras")[0], model, mcfg)
            return model

        model, history = training.fit(build, lambda: {
            "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]},
            train_ds, val_ds, tcfg, fold_dir, class_weight=weights, verbose=2)
        history.to_csv(fold_dir / "history.csv", index=False)
        with atomic_path(model_path) as tmp:
            model.save(tmp)
    return (lambda frame: predict_patches(model, frame, films, tcfg.batch_size)), {
        "trained_here": trained_here, "epochs_run": int(len(history))}


def _probe_choice(model: Any, aucs: dict[float, float]) -> dict:
    """What a fitted probe records: its chosen C and the validation AUC of every candidate."""
    return {"C": float(model.named_steps["logisticregression"].C),
            "validation_abnormal_auc": {str(c): a for c, a in aucs.items()}}


def _fit_probe(exp: ClassifierExperiment, k: int, train: pd.DataFrame, val: pd.DataFrame, bank: FeatureBank,
               fold_dir: Path) -> tuple[Any, dict]:
    """Fit the logistic regression on the frozen VGG16 features of the fold's training patches; C on validation."""
    from mammo_tf.models import probe

    cfg = probe.ProbeConfig.from_dict(exp.probe)
    model, aucs = probe.fit_probe(bank(train), train["label_id"].to_numpy(), bank(val), val["label_id"].to_numpy(),
                                  cfg.c_grid, seed=exp.seed + k)
    probe.save_probe(model, fold_dir / "probe.npz")
    return (lambda frame: probe.full_proba(model, bank(frame))), {"trained_here": True, "probe": _probe_choice(model, aucs)}


def _fit_combined_probe(exp: ClassifierExperiment, k: int, train: pd.DataFrame, val: pd.DataFrame,
                        x_train_intensity: np.ndarray, bank: FeatureBank, films: patches.FilmCache) -> tuple[Any, dict]:
    """The probe's features and the intensity baseline's, side by side in one logistic regression; C on validation.

    Asks whether the frozen VGG16 adds anything to what eight intensity statistics already carry.
    """
    from mammo_tf.models import probe

    cfg = probe.ProbeConfig.from_dict(exp.probe)

    def both(frame: pd.DataFrame, intensity: np.ndarray | None = None) -> np.ndarray:
        if intensity is None:
            intensity = baselines.intensity_features(_patch_pixels(frame, films))
        return np.hstack([bank(frame), intensity])

    model, aucs = probe.fit_probe(both(train, x_train_intensity), train["label_id"].to_numpy(), both(val),
                                  val["label_id"].to_numpy(), cfg.c_grid, seed=exp.seed + k)
    return (lambda frame: probe.full_proba(model, both(frame))), _probe_choice(model, aucs)


def _fit_film_probe(exp: ClassifierExperiment, k: int, bank: FeatureBank, whole: pd.DataFrame,
                    film_labels: pd.Series, tr_pat: list, va_pat: list, test_films: list[str]) -> tuple[np.ndarray, dict]:
    """A film-level model on film labels: logistic regression on each film's pooled patch features."""
    from mammo_tf.models import probe

    cfg = probe.ProbeConfig.from_dict(exp.probe)
    feats = bank.films(whole)
    tr = sorted(whole[whole["patient_id"].isin(tr_pat)]["refnum"].unique())
    va = sorted(whole[whole["patient_id"].isin(va_pat)]["refnum"].unique())
    model, aucs = probe.fit_probe(feats.loc[tr].to_numpy(), film_labels.loc[tr].to_numpy(),
                                  feats.loc[va].to_numpy(), film_labels.loc[va].to_numpy(), cfg.c_grid, seed=exp.seed + k)
    return probe.full_proba(model, feats.loc[test_films].to_numpy()), _probe_choice(model, aucs)


def run_fold(exp: ClassifierExperiment, k: int, ann: pd.DataFrame, records: dict[str, pd.DataFrame],
             folds: list, films: patches.FilmCache, out: Path, bank: FeatureBank | None = None) -> dict:
    """Train and evaluate one fold; returns its metrics and predictions."""
    key = MODEL_KEYS[exp.classifier]
    train_pat, test_pat = folds[k]
    tr_pat, va_pat = splits.train_val_split(ann, train_pat, exp.val_fraction, seed=exp.seed + k)
    own = records["own"]
    train, test = pipelines.split_records(own, tr_pat, test_pat)
    val, _ = pipelines.split_records(own, va_pat, test_pat)
    if "lesion_copies" in records:
        train = pd.concat([train, pipelines.split_records(records["lesion_copies"], tr_pat, test_pat)[0]],
                          ignore_index=True)
    pipelines.assert_no_patient_leak(train, val, test)
    train = _subsample_normals(train, exp.normal_per_abnormal, exp.seed + k)
    # The validation patches get the training class mix: their loss is then comparable to the training
    # loss, and an epoch does not spend most of its time scoring thousands of normal grid patches.
    val = _subsample_normals(val, exp.normal_per_abnormal, exp.seed + k)
    fold_dir = out / f"fold{k}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    init_dir, mined = (init_fold_dir(exp, k, test_pat), None) if exp.init_from else (None, None)
    if exp.hard_negatives and not (fold_dir / "model.keras").is_file():
        # Mined after the normal subsample, so that all of them train; from training patients only.
        model, batch = load_fold_model(init_dir), from_dict(training.TrainConfig, exp.train).batch_size
        hard, mined = mine_hard_negatives(lambda frame: 1.0 - predict_patches(model, frame, films, batch)[:, 0],
                                          records["whole"], train, tr_pat, exp.hard_negatives,
                                          mias.images_table(ann).query("label_id == 0")["refnum"].tolist())
        train = pd.concat([train, hard], ignore_index=True)
    if exp.classifier == "cnn":
        predict, fitted = _fit_cnn(exp, k, train, val, films, fold_dir, init_dir)
    else:
        predict, fitted = _fit_probe(exp, k, train, val, bank, fold_dir)

    result: dict[str, Any] = {"fold": k, "n_train": int(len(train)), "n_val": int(len(val)), "n_test": int(len(test)),
                              **fitted, **({"hard_negatives": mined} if mined else {})}
    # Does the model fit its own training set? (Evaluated without augmentation.)
    result["train_own"] = _report(train["label_id"].to_numpy(), predict(train))
    x_train = baselines.intensity_features(_patch_pixels(train, films))
    combined = None
    if bank is not None:
        combined, result["probe_intensity"] = _fit_combined_probe(exp, k, train, val, x_train, bank, films)
    for name, frame in (("own", test), ("grid", pipelines.split_records(records["grid"], tr_pat, test_pat)[1])):
        frame = frame[frame["label_id"] >= 0]
        y = frame["label_id"].to_numpy()
        probas = {key: predict(frame), "logistic": baselines.logistic_proba(
            x_train, train["label_id"].to_numpy(), baselines.intensity_features(_patch_pixels(frame, films)))}
        if combined is not None:
            probas["probe_intensity"] = combined(frame)
        result[f"patch_{name}"] = {
            key: _report(y, probas[key]),
            "majority": _report(y, baselines.majority_proba(train["label_id"].to_numpy(), len(y))),
            **{model: _report(y, proba) for model, proba in probas.items() if model != key}}
        if name == "grid":
            # Kept per patch for the patient bootstrap of the model-minus-baseline AUC (`paired_bootstrap`).
            with atomic_path(fold_dir / "patch_predictions.csv") as tmp:
                frame[["refnum", "patient_id", "label_id"]].assign(
                    **{f"score_{model}": 1.0 - proba[:, 0] for model, proba in probas.items()}, fold=k).to_csv(
                    tmp, index=False)
    # Whole mammogram: every grid patch over the breast, labelled or not.
    whole = records["whole"]
    test_whole = whole[whole["patient_id"].isin(test_pat)]
    test_proba = predict(test_whole)
    scores = film_scores(test_whole, test_proba)
    film_labels = mias.images_table(ann).set_index("refnum")["label_id"]
    y_film = film_labels.loc[scores.index].to_numpy()
    train_films = sorted(ann[ann["patient_id"].isin(train_pat)]["refnum"].unique())
    # The film rule is chosen on the validation patients, whose films the model never trained on.
    val_whole = whole[whole["patient_id"].isin(va_pat)]
    rule, val_aucs = choose_film_rule(val_whole, predict(val_whole), film_labels)
    chosen = film_scores(test_whole, test_proba, rule)
    result["film_rule"] = {"chosen": rule, "validation_abnormal_auc": val_aucs, "n_validation_films": int(val_whole["refnum"].nunique())}
    film_logistic = baselines.logistic_proba(_film_features(train_films, films), film_labels.loc[train_films].to_numpy(),
                                             _film_features(list(scores.index), films))
    result["image"] = {
        key: _report(y_film, scores[list(mias.CLASSES)].to_numpy()),
        f"{key}_film_rule": _report(y_film, chosen[list(mias.CLASSES)].to_numpy()),
        "majority": _report(y_film, baselines.majority_proba(film_labels.loc[train_films].to_numpy(), len(y_film))),
        "logistic": _report(y_film, film_logistic),
    }
    extra = {"score_logistic": 1.0 - film_logistic[:, 0]}
    if combined is not None:
        combined_films = film_scores(test_whole, combined(test_whole))
        result["image"]["probe_intensity"] = _report(y_film, combined_films[list(mias.CLASSES)].to_numpy())
        extra["score_probe_intensity"] = combined_films.loc[scores.index, "abnormal_score"].to_numpy()
    if bank is not None and exp.strategy == "grid_keep":
        # The film-level probe sees only the film's grid_keep patches, whatever the patch strategy: the
        # grid_keep experiment of each size reports it (other strategies would repeat the same numbers).
        film_proba, result["film_probe"] = _fit_film_probe(exp, k, bank, whole, film_labels, tr_pat, va_pat,
                                                           list(scores.index))
        result["image"]["probe_film"] = _report(y_film, film_proba)
        extra["score_probe_film"] = 1.0 - film_proba[:, 0]
    per_rule = {f"score_{r}": film_scores(test_whole, test_proba, r)["abnormal_score"] for r in FILM_RULES}
    with atomic_path(fold_dir / "film_predictions.csv") as tmp:
        scores.assign(**per_rule, **extra, chosen_rule=rule, label_id=y_film, fold=k).to_csv(tmp, index_label="refnum")
    return result


def _naive_split_audit(exp: ClassifierExperiment, ann: pd.DataFrame, films: patches.FilmCache, out: Path) -> dict:
    """The leaky protocol: repeated jittered patches of all films, split at random ignoring patients."""
    from sklearn.model_selection import train_test_split

    from mammo_tf.models import classifier as clf

    stored = out / "naive_split" / "audit.json"
    if stored.is_file():
        # Its model is not kept: re-evaluating the run reports the audit it trained, not a retrained one.
        return load_json(stored)
    copies = [patches.cut_patches(ann, exp.strategy, exp.size, seed=exp.seed + c, films=films,
                                  refnums=films_subset(ann, exp), **{**exp.patch_options, "jitter": 24})
              for c in range(4)]
    pool = pd.concat(copies, ignore_index=True)
    train, test = train_test_split(pool, test_size=0.2, random_state=exp.seed, stratify=pool["label_id"])
    train, val = train_test_split(train, test_size=0.2, random_state=exp.seed, stratify=train["label_id"])
    train = _subsample_normals(train.reset_index(drop=True), exp.normal_per_abnormal, exp.seed)
    tcfg = from_dict(training.TrainConfig, {"seed": exp.seed, **exp.train})
    mcfg = clf.ClassifierConfig.from_dict({**exp.model, "input_size": exp.size})
    kw = dict(batch_size=tcfg.batch_size, films=films)
    model, _ = training.fit(lambda: clf.build_classifier(mcfg), lambda: {
        "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]},
        pipelines.patch_dataset(train, training=True, seed=exp.seed, augment_train=exp.augment, max_angle=exp.max_angle,
                                **kw),
        pipelines.patch_dataset(val.reset_index(drop=True), training=False, **kw), tcfg, out / "naive_split",
        class_weight=pipelines.class_weights(train), verbose=2)
    shared = len(set(train["patient_id"]) & set(test["patient_id"]))
    audit = {"cnn": _report(test["label_id"].to_numpy(), predict_patches(model, test.reset_index(drop=True), films, tcfg.batch_size)),
             "patients_on_both_sides": shared, "n_test": int(len(test))}
    save_json(stored, audit)
    return audit


def lesion_copies(ann: pd.DataFrame, exp: ClassifierExperiment, films: patches.FilmCache) -> pd.DataFrame:
    """`exp.lesion_copies` abnormal patches per located lesion, each moved up to `exp.lesion_jitter` px off centre.

    A grid patch holds its lesion anywhere, so these copies train on lesions off centre as well, and
    give the few abnormal grid patches of a fold (about one per lesion) more company. Only patches
    the label rule calls abnormal are kept; `run_fold` adds those of the training patients.
    """
    if exp.lesion_copies < 0:
        raise ConfigError(f"lesion_copies must be >= 0, got {exp.lesion_copies}")
    if exp.lesion_jitter < 0 or exp.lesion_jitter >= exp.size // 2:
        raise ConfigError(f"lesion_jitter must be in 0..{exp.size // 2 - 1} (the lesion centre stays in the patch), "
                          f"got {exp.lesion_jitter}")
    # Seeds apart from the patch cuts' own (exp.seed + c), so no copy repeats a lesion_centred patch.
    copies = [patches.cut_patches(ann, "lesion_centred", exp.size, jitter=exp.lesion_jitter, n_normal=0,
                                  seed=exp.seed + 1000 + c, films=films) for c in range(exp.lesion_copies)]
    pool = pd.concat(copies, ignore_index=True)
    return pool[pool["label_id"] > 0].drop_duplicates(PATCH_KEY).reset_index(drop=True)


def films_subset(ann: pd.DataFrame, exp: ClassifierExperiment) -> list[str] | None:
    """The films of the experiment's ``max_films`` subset (whole patients, every class), or None for all."""
    if exp.max_films is None:
        return None
    # Whole patients, stratified by label, so the small setting keeps every class.
    patients = splits.patient_table(ann)
    per_class = max(1, exp.max_films // 6)
    chosen = patients.groupby("label_id", group_keys=False).apply(
        lambda g: g.sample(n=min(len(g), per_class), random_state=exp.seed))["patient_id"]
    return sorted(ann[ann["patient_id"].isin(chosen)]["refnum"].unique())


def model_label(exp: ClassifierExperiment) -> str:
    """How report rows name the experiment's model: what it is, what it was fitted on, and the recipe."""
    if exp.classifier == "vgg16_probe":
        from mammo_tf.models import probe

        cfg = probe.ProbeConfig.from_dict(exp.probe)
        layers = "+".join(name.replace("block", "").replace("_conv", "_") for name in cfg.layers)
        return (f"VGG16 ({cfg.weights}, frozen) conv{layers} {'/'.join(cfg.pooling)}-pooled + logistic regression, fitted on "
                f"{exp.strategy} {exp.size} (C chosen on validation patients)")
    if exp.strategy == patches.WHOLE:
        return f"CNN trained on whole films, breast-cropped to {exp.size} px ({_cnn_recipe(exp)})"
    return f"CNN trained on {exp.strategy} {exp.size} ({_cnn_recipe(exp)})"


def _cnn_recipe(exp: ClassifierExperiment) -> str:
    copies = (f", +{exp.lesion_copies} off-centre lesion patches per lesion (up to {exp.lesion_jitter} px)"
              if exp.lesion_copies else "")
    pooling = exp.model.get("pooling", "avg")
    return training.schedule_label(from_dict(training.TrainConfig, exp.train)) + ", " + (
        "flips/rot90" if exp.augment else "no augmentation") + copies + (
        f", global {pooling} pooling" if pooling != "avg" else "") + (
        f", conv stack pretrained on {pretrain.source_name(from_dict(pretrain.PretrainConfig, exp.pretrain))}"
        if exp.pretrain else "") + (f", on from {Path(exp.init_from).name}'s fold models" if exp.init_from else "") + (
        f" with its {exp.hard_negatives} highest-scoring lesion-free training patches added" if exp.hard_negatives else "")


def combined_probe_label(exp: ClassifierExperiment) -> str:
    """How report rows name the logistic regression on the probe's and the intensity baseline's features together."""
    return (f"VGG16 probe + intensity features, logistic regression fitted on {exp.strategy} {exp.size} "
            "(C chosen on validation patients)")


def film_probe_label(exp: ClassifierExperiment) -> str:
    """How report rows name the film-level probe of a probe experiment."""
    return (f"VGG16 features of the film's {exp.size} px patches pooled (mean, max) + logistic regression "
            "on film labels")


def _rows(summary: dict, exp: ClassifierExperiment, prov: dict, folds: list[dict] | None = None,
          bootstrap: dict | None = None, pretrained: dict | None = None) -> list[dict]:
    leak = exp.strategy == "lesion_centred"
    key = MODEL_KEYS[exp.classifier]
    hardware = f"{prov['hardware']['cpu']} ({prov['hardware']['cpu_count']} cores), GPUs: {prov['hardware']['gpus']}"
    common = {"command": prov["command"], "hardware": hardware, "date": prov["date"]}
    tables = [
        ("patch_own", f"Classification, patch level ({exp.size} px, test patches cut like training: {exp.strategy})",
         "leaks the lesion position (tumour-centred test patches)" if leak else ""),
        ("patch_grid", f"Classification, patch level ({exp.size} px, grid_keep test patches)", ""),
        ("image", "Classification, whole mammogram (max over breast patches)", ""),
    ]
    if exp.strategy == "grid_keep":
        tables = tables[1:]  # its own test patches are the grid_keep ones: the same table twice otherwise
    if exp.strategy == patches.WHOLE:
        # Its "patches" are the test films: one table, beside the patch models' film-level one.
        tables = [("image", WHOLE_FILM_TABLE, "")]
    fitted_on = f" (fitted on {exp.strategy} {exp.size} training patches)"
    label = model_label(exp)
    fit = summary.get("train_own.balanced_accuracy")

    def values_of(level: str, model: str) -> dict:
        return {col: [summary[f"{level}.{model}.{m}"]["mean"], summary[f"{level}.{model}.{m}"]["std"]]
                for col, m in METRIC_KEYS.items() if f"{level}.{model}.{m}" in summary}

    rows = []
    for level, title, note in tables:
        combined = ("probe_intensity",) if f"{level}.probe_intensity.macro_roc_auc" in summary else ()
        for model in (key, "majority", "logistic") + combined:
            # Patch-level baselines are fitted on each experiment's own training patches; film-level ones
            # on the films, the same for every experiment.
            suffix = fitted_on if level != "image" else ""
            row = {key: label, "majority": "majority class" + suffix,
                   "logistic": "logistic regression, intensity features" + suffix,
                   "probe_intensity": combined_probe_label(exp)}[model]
            values = {col: values_of(level, model).get(col, float("nan")) for col in METRIC_KEYS}
            if model == key and (level != "image" or exp.strategy == patches.WHOLE) and fit:
                # Does the model fit its own (unaugmented) training patches (or films)? Underfitting shows here.
                values["train bal. acc (fit check)"] = [fit["mean"], fit["std"]]
            notes = [note] if note and model == key else []
            notes.append(f"n_folds={summary.get('n_folds', '?')}")
            rows.append({"table": title, "row": row, "values": values, "note": "; ".join(notes), **common})
    chosen = [f["film_rule"]["chosen"] for f in folds or [] if "film_rule" in f]
    if chosen and exp.strategy != patches.WHOLE and f"image.{key}_film_rule.macro_roc_auc" in summary:
        title = "Classification, whole mammogram (film rule chosen on validation patients)"
        for model, row, note in (
                (f"{key}_film_rule", label,
                 f"rule per fold: {', '.join(chosen)} (best validation AUC among {', '.join(FILM_RULES)}); "),
                ("majority", "majority class", ""), ("logistic", "logistic regression, intensity features", "")):
            rows.append({"table": title, "row": row, "values": values_of("image", model),
                         "note": f"{note}n_folds={summary.get('n_folds', '?')}", **common})
    if "image.probe_film.macro_roc_auc" in summary:
        c_values = [f["film_probe"]["C"] for f in folds or [] if "film_probe" in f]
        rows.append({"table": "Classification, whole mammogram (max over breast patches)", "row": film_probe_label(exp),
                     "values": values_of("image", "probe_film"),
                     "note": f"trained on training patients' films, C per fold {c_values} chosen on validation patients; "
                             f"n_folds={summary.get('n_folds', '?')}", **common})
    rows += _paired_rows(exp, label, folds or [], common, bootstrap or {})
    if pretrained:
        rows += pretrain.rows(pretrained, common)
    from mammo_tf.models import classifier as clf

    if exp.classifier == "cnn":
        counts = clf.count_params_pair(clf.ClassifierConfig.from_dict({**exp.model, "input_size": exp.size}))
        rows.append({"table": "Classifier network size (parameters)", "row": f"{exp.size} px input",
                     "values": {"depthwise-separable (ours)": counts["separable"], "ordinary convolutions": counts["ordinary"],
                                "ratio": round(counts["ratio"], 3)}, "note": "4 conv (2 separable), 1 pooling, 1 dense", **common})
    if "naive.cnn.macro_roc_auc" in summary:
        # One random split, copied into every fold's results: its spread over folds is not a spread.
        values = {col: [summary[f"naive.cnn.{m}"]["mean"], float("nan")] for col, m in METRIC_KEYS.items()}
        rows.append({"table": tables[0][1], "row": f"CNN, naive random patch split (LEAKY) ({_cnn_recipe(exp)})",
                     "values": values,
                     "note": "one random split of the patches; patients on both sides of the split: not a valid estimate",
                     **common})
    return rows


PAIRED_TABLE = "Classification: model minus the logistic baseline, paired by patient fold"
WHOLE_FILM_TABLE = "Classification, whole mammogram (one CNN on the whole breast-cropped film)"
PAIRED_CI = "Δ abnormal AUC, 95 % CI (test patients resampled)"
BOOTSTRAP_DRAWS = 2000


def paired_bootstrap(exp_dir: str | Path, n_folds: int, key: str = "cnn", n_boot: int = BOOTSTRAP_DRAWS,
                     seed: int = 0) -> dict:
    """Model minus logistic abnormal AUC over folds, with a CI from resampling test patients within each fold."""
    out: dict[str, dict] = {}
    # The stored per-fold predictions: each level's file, and the column of each model's abnormal score in it.
    files = {"patch_grid": ("patch_predictions.csv", {key: f"score_{key}", "probe_intensity": "score_probe_intensity"}),
             "image": ("film_predictions.csv", {key: "abnormal_score", "probe_film": "score_probe_film",
                                                "probe_intensity": "score_probe_intensity"})}
    for level, (name, columns) in files.items():
        paths = [Path(exp_dir) / f"fold{k}" / name for k in range(n_folds)]
        if not all(p.is_file() for p in paths):
            continue
        frame = pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
        if "score_logistic" not in frame:
            continue
        patients = frame["patient_id"] if "patient_id" in frame else frame["refnum"].map(bilateral.patient_of)
        for model, column in columns.items():
            if column in frame:
                out.setdefault(level, {})[model] = cm.bootstrap_auc_ci(
                    frame["label_id"].to_numpy() != 0, frame[column], groups=patients.to_numpy(), n_boot=n_boot,
                    seed=seed, baseline=frame["score_logistic"], strata=frame["fold"].to_numpy())
    return out


def _paired_rows(exp: ClassifierExperiment, label: str, folds: list[dict], common: dict,
                 bootstrap: dict) -> list[dict]:
    """Model minus logistic regression fold by fold: the spread of a difference on shared folds, not of two means."""
    key = MODEL_KEYS[exp.classifier]
    rows = []
    whole = exp.strategy == patches.WHOLE
    for level, model, row in (("patch_grid", key, f"{label}, grid_keep test patches"),
                              ("image", key, f"{label}, whole mammogram{'' if whole else ', max rule'}"),
                              ("image", "probe_film", f"{film_probe_label(exp)}, whole mammogram"),
                              ("patch_grid", "probe_intensity", f"{combined_probe_label(exp)}, grid_keep test patches"),
                              ("image", "probe_intensity", f"{combined_probe_label(exp)}, whole mammogram, max rule")):
        pairs = [f[level] for f in folds if level in f and model in f[level] and "logistic" in f[level]]
        if not pairs or (whole and level != "image"):
            continue
        diffs = {col: cm.paired_differences([p[model][m] for p in pairs], [p["logistic"][m] for p in pairs])
                 for col, m in (("Δ abnormal AUC", "abnormal_vs_normal_auc"), ("Δ macro AUC", "macro_roc_auc"),
                                ("Δ balanced acc", "balanced_accuracy"))}
        values: dict[str, Any] = {col: [d["mean"], d["std"]] if d["n"] > 1 else d["mean"] for col, d in diffs.items()}
        abnormal = diffs["Δ abnormal AUC"]
        values["folds model ahead (abnormal AUC)"] = f"{abnormal['ahead']}/{abnormal['n']}"
        note = "mean ± std over folds of the per-fold difference; > 0: model ahead"
        ci = bootstrap.get(level, {}).get(model)
        if ci:
            values[PAIRED_CI] = f"[{ci['ci_low']:.3f}, {ci['ci_high']:.3f}]"
            note += (f"; CI: {ci['n_valid']} resamples of the {ci['n_units']} test patients, each fold's "
                     "resampled within it, mean over folds of the difference")
        rows.append({"table": PAIRED_TABLE, "row": row, "values": values, "note": note, **common})
    return rows


def refresh_rows(exp_dir: str | Path) -> list[dict]:
    """Rebuild the report rows of a finished run from its stored summary (labels change, numbers cannot)."""
    path = Path(exp_dir) / "metrics.json"
    metrics = load_json(path)
    exp = from_dict(ClassifierExperiment, metrics["experiment"])
    metrics["results"] = _rows(metrics["summary"], exp, metrics["provenance"], metrics.get("folds"),
                               metrics.get("paired_bootstrap"), metrics.get("pretrain"))
    save_json(path, metrics)
    return metrics["results"]


def run_experiment(exp: ClassifierExperiment, out_dir: str | Path, command: str | None = None) -> dict:
    """Cross-validate the classifier; write config, per-fold and summary metrics, figures and models."""
    from mammo_tf.plots import classification as cplots

    if exp.classifier not in MODEL_KEYS:
        raise ConfigError(f"classifier must be one of {sorted(MODEL_KEYS)}, got {exp.classifier!r}")
    if exp.classifier != "cnn" and exp.leakage_audit:
        raise ConfigError("the leakage audit trains the CNN: set leakage_audit false for a vgg16_probe experiment")
    if exp.classifier == "cnn" and exp.probe:
        raise ConfigError("probe options are for classifier: vgg16_probe")
    if exp.classifier != "cnn" and exp.replicate:
        raise ConfigError("replicate retrains the CNN with another seed: a vgg16_probe run has no training seed")
    whole = exp.strategy == patches.WHOLE
    if whole and (exp.classifier != "cnn" or exp.lesion_copies or exp.leakage_audit or exp.patch_options):
        raise ConfigError("strategy whole trains the CNN on whole films: it takes no probe, lesion_copies, "
                          "leakage_audit or patch_options")
    check_init_from(exp)
    if exp.pretrain:
        pretrain.check(exp.strategy, exp.classifier)
        try:
            pretrain_cfg = from_dict(pretrain.PretrainConfig, exp.pretrain)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"pretrain: {err}") from err
    try:
        from mammo_tf.models import probe

        probe_cfg = probe.ProbeConfig.from_dict(exp.probe)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"probe: {err}") from err
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "config.yaml"
    if previous.is_file() and from_dict(ClassifierExperiment, load_config(previous)) != exp:
        # Another configuration's models live here: refuse rather than mix or overwrite them.
        raise ConfigError(f"{out} holds a run with a different configuration ({previous}); "
                          "give this experiment another name or remove that folder")
    save_config(exp, previous)
    print(f"[mammo-tf] classifier {exp.name}: {exp.strategy} {exp.size} px -> {out}", flush=True)
    t0 = time.perf_counter()
    ann = mias.load_annotations()
    films = patches.WholeFilms(exp.size) if whole else patches.FilmCache()
    refnums = films_subset(ann, exp)
    if refnums is not None:
        ann = ann[ann["refnum"].isin(refnums)].reset_index(drop=True)
    if whole:
        # One sample per film: its patch-level test sets are the films themselves.
        own = patches.whole_film_records(ann, exp.size)
        records = {"own": own, "grid": own, "whole": own}
    else:
        records = {
            "own": patches.cut_patches(ann, exp.strategy, exp.size, seed=exp.seed, films=films, **exp.patch_options),
            "grid": patches.cut_patches(ann, "grid_keep", exp.size, seed=exp.seed, films=films),
            # Whole-film scoring uses every breast patch, including those the label rule excludes.
            "whole": patches.cut_patches(ann, "grid_keep", exp.size, seed=exp.seed, films=films, drop_excluded=False),
        }
    if exp.lesion_copies:
        records["lesion_copies"] = lesion_copies(ann, exp, films)
    folds = splits.patient_folds(ann, n_splits=exp.folds, seed=exp.seed)
    n_run = min(exp.folds, exp.max_folds or exp.folds)
    pretrained = None
    if exp.pretrain:
        from mammo_tf.models import classifier as clf

        pretrained = pretrain.run(pretrain_cfg, clf.ClassifierConfig.from_dict({**exp.model, "input_size": exp.size}),
                                  out / "pretrain", command)
    bank = None
    if exp.classifier == "vgg16_probe":
        bank = FeatureBank([records["own"], records["grid"], records["whole"]], films, exp.size, probe_cfg)
    fold_results = [run_fold(exp, k, ann, records, folds, films, out, bank) for k in range(n_run)]
    _keep_training_counts(fold_results, out / "metrics.json")
    flat = [{k: v for k, v in r.items() if k not in ("fold",)} for r in fold_results]
    if exp.leakage_audit:
        audit = _naive_split_audit(exp, ann, films, out)
        for r in flat:
            r["naive"] = audit
    summary = cm.summarise_folds(flat)
    summary["n_folds"] = n_run
    prov = provenance(command)
    prov["wall_time_s"] = round(time.perf_counter() - t0, 1)
    if not any(r["trained_here"] for r in fold_results):
        keep_training_provenance(prov, out / "metrics.json")
    bootstrap = paired_bootstrap(out, n_run, MODEL_KEYS[exp.classifier], seed=exp.seed)
    metrics = {"experiment": dataclasses.asdict(exp), "summary": summary, "folds": fold_results,
               "paired_bootstrap": bootstrap, "provenance": prov,
               "results": _rows(summary, exp, prov, fold_results, bootstrap, pretrained)}
    if pretrained:
        metrics["pretrain"] = pretrained
    save_json(out / "metrics.json", metrics)
    _figures(out, fold_results, cplots, MODEL_KEYS[exp.classifier], ("image",) if whole else ("patch_grid", "image"))
    return metrics


def _keep_training_counts(fold_results: list[dict], earlier_metrics: Path) -> None:
    """A reloaded fold reports the patch counts its training used (from the earlier metrics.json), not today's."""
    # The validation subsample has changed since some runs were trained: n_val must say what training saw.
    if not earlier_metrics.is_file():
        return
    stored = {f.get("fold"): f for f in load_json(earlier_metrics).get("folds", [])}
    for result in fold_results:
        old = stored.get(result["fold"], {})
        if not result.get("trained_here", True):
            result.update({k: old[k] for k in ("n_train", "n_val", "hard_negatives") if k in old})


def _figures(out: Path, fold_results: list[dict], cplots: Any, model: str = "cnn",
             levels: Sequence[str] = ("patch_grid", "image")) -> None:
    """Training curves (fold 0), summed confusion matrices and pooled ROC curves, as PNG."""
    if (out / "fold0" / "history.csv").is_file():  # a probe has no epochs
        hist = pd.read_csv(out / "fold0" / "history.csv")
        save_figure(cplots.plot_training_curves(hist), out / "training_curves.png")
    for level in levels:
        total = np.sum([r[level][model]["confusion_matrix"] for r in fold_results], axis=0)
        save_figure(cplots.plot_confusion_matrix(total, mias.CLASSES), out / f"confusion_{level}.png")
    for level, where in (("patch_grid", "grid_keep test patches"), ("image", "whole mammogram")):
        if level not in levels:
            continue
        models = [m for m in (model, "probe_intensity", "probe_film", "logistic", "majority") if m in fold_results[0][level]]
        per_fold = {SHORT_NAMES[m]: [r[level][m]["abnormal_vs_normal_auc"] for r in fold_results] for m in models}
        save_figure(cplots.plot_paired_folds(per_fold, title=f"{where}: abnormal-vs-normal AUC per patient fold"),
                    out / f"folds_{level}.png")
    films = pd.concat([pd.read_csv(out / f"fold{r['fold']}" / "film_predictions.csv") for r in fold_results])
    save_figure(cplots.plot_roc_curves(films["label_id"].to_numpy(), films[list(mias.CLASSES)].to_numpy(), mias.CLASSES),
                out / "roc_image_level.png")
