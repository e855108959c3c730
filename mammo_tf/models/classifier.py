"""The poster's small CNN: 4 convolutional layers (2 depthwise-separable), 1 pooling, 1 dense.

Design (defaults for a 128 x 128 or 256 x 256 single-channel patch scaled to ``[0, 1]``)::

    conv1  Conv2D           32, 5x5, stride 2  + BatchNorm + ReLU   -> S/2
    conv2  Conv2D           64, 3x3, stride 2  + BatchNorm + ReLU   -> S/4
    conv3  SeparableConv2D 128, 3x3, stride 2  + BatchNorm + ReLU   -> S/8
    conv4  SeparableConv2D 256, 3x3, stride 2  + BatchNorm + ReLU   -> S/16
    pool   GlobalAveragePooling2D                                   -> 256
    drop   Dropout
    fc     Dense(3, softmax)

Why this layout:

* With a single pooling layer the spatial reduction has to come from somewhere else, so every
  convolution has stride 2 (a learnt downsampling, as in all-convolutional nets).
* The one pooling layer is the global average pooling before the dense layer. It makes the
  dense layer tiny (``filters[-1] * 3`` weights) and the network independent of the input size,
  so that the same weights serve 128 and 256 patches and the conv stack can be reused as an SSD
  backbone (:func:`build_feature_extractor`). ``pooling="max"`` gives global max pooling instead.
* The depthwise-separable layers are the last two: on the first layers, with 1 and 32 input
  channels, a separable convolution saves almost nothing (a depthwise filter over one grey
  channel is a single 2-D filter), whereas on the wide layers it divides the weights by ~8.
* Normalisation after each convolution (the convolution then has no bias) keeps the
  un-normalised ``[0, 1]`` input and the strided stack trainable from scratch. The default is
  ``norm="group"`` (GroupNormalization, 8 groups): on mini-MIAS patches, with a few hundred
  training patches, BatchNorm's moving statistics lagged the batch statistics so much that a
  network that had fitted its training set (loss 0.23) scored 0.67 accuracy on that same set in
  inference mode; GroupNorm computes the same thing in training and inference (0.96, measured on
  fold 0). ``norm="batch"`` and ``"none"`` remain available.

The network expects inputs in ``[0, 1]`` (the data pipeline divides uint8 pixels by 255).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import keras

from mammo_tf.config import from_dict as config_from_dict

CONV_NAMES = ("conv1", "conv2", "conv3", "conv4")


@dataclasses.dataclass
class ClassifierConfig:
    """Hyper-parameters of :func:`build_classifier` (defaults: the poster's network)."""

    input_size: int = 128
    input_channels: int = 1
    num_classes: int = 3
    filters: tuple[int, ...] = (32, 64, 128, 256)
    kernel_sizes: tuple[int, ...] = (5, 3, 3, 3)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    separable: bool = True
    separable_layers: tuple[int, ...] = (2, 3)
    norm: str = "group"        # group | batch | none (see the module docstring)
    norm_groups: int = 8
    dropout: float = 0.3
    pooling: str = "avg"
    l2: float = 0.0

    def __post_init__(self) -> None:
        self.filters = tuple(int(f) for f in self.filters)
        self.kernel_sizes = tuple(int(k) for k in self.kernel_sizes)
        self.strides = tuple(int(s) for s in self.strides)
        self.separable_layers = tuple(int(i) for i in self.separable_layers)
        n = len(self.filters)
        if n == 0 or len(self.kernel_sizes) != n or len(self.strides) != n:
            raise ValueError(
                "filters, kernel_sizes and strides must be non-empty and of equal length, got "
                f"{self.filters}, {self.kernel_sizes}, {self.strides}"
            )
        if min(self.filters + self.kernel_sizes + self.strides) <= 0:
            raise ValueError("filters, kernel sizes and strides must be positive")
        if any(not 0 <= i < n for i in self.separable_layers):
            raise ValueError(f"separable_layers {self.separable_layers} out of range for {n} layers")
        if self.input_size <= 0 or self.input_channels <= 0 or self.num_classes < 2:
            raise ValueError(
                f"need input_size > 0, input_channels > 0, num_classes >= 2; got {self.input_size}, "
                f"{self.input_channels}, {self.num_classes}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.norm not in ("batch", "group", "none"):
            raise ValueError(f"norm must be 'batch', 'group' or 'none', got {self.norm!r}")
        if self.norm == "group" and any(f % self.norm_groups for f in self.filters):
            raise ValueError(f"norm_groups {self.norm_groups} must divide every filter count {self.filters}")
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"pooling must be 'avg' or 'max', got {self.pooling!r}")
        if self.l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {self.l2}")

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Names of the convolution layers, ``conv1`` ... ``convN``."""
        return tuple(f"conv{i + 1}" for i in range(len(self.filters)))

    def is_separable(self, index: int) -> bool:
        """Whether convolution ``index`` (0-based) is depthwise-separable."""
        return self.separable and index in self.separable_layers

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClassifierConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        return config_from_dict(cls, d)


def _conv_layers(config: ClassifierConfig, index: int) -> list[keras.layers.Layer]:
    """Convolution (+ BatchNorm) + ReLU layers of block ``index``, named ``conv{i}/bn{i}/relu{i}``."""
    i = index + 1
    reg = keras.regularizers.L2(config.l2) if config.l2 > 0 else None
    common = dict(
        filters=config.filters[index],
        kernel_size=config.kernel_sizes[index],
        strides=config.strides[index],
        padding="same",
        use_bias=config.norm == "none",
        name=f"conv{i}",
    )
    if config.is_separable(index):
        conv = keras.layers.SeparableConv2D(
            depthwise_regularizer=reg, pointwise_regularizer=reg, **common
        )
    else:
        conv = keras.layers.Conv2D(kernel_regularizer=reg, **common)
    out: list[keras.layers.Layer] = [conv]
    if config.norm == "batch":
        out.append(keras.layers.BatchNormalization(name=f"bn{i}"))
    elif config.norm == "group":
        out.append(keras.layers.GroupNormalization(groups=config.norm_groups, name=f"bn{i}"))
    out.append(keras.layers.ReLU(name=f"relu{i}"))
    return out


def conv_stack(config: ClassifierConfig, inputs: keras.KerasTensor) -> list[keras.KerasTensor]:
    """Apply the convolution blocks to ``inputs``; returns each block's activation."""
    x, outs = inputs, []
    for index in range(len(config.filters)):
        for layer in _conv_layers(config, index):
            x = layer(x)
        outs.append(x)
    return outs


def build_classifier(config: ClassifierConfig | None = None) -> keras.Model:
    """The classifier as a functional Keras model (softmax probabilities over ``num_classes``)."""
    config = config or ClassifierConfig()
    inputs = keras.Input((config.input_size, config.input_size, config.input_channels), name="image")
    x = conv_stack(config, inputs)[-1]
    pool_cls = keras.layers.GlobalAveragePooling2D if config.pooling == "avg" else keras.layers.GlobalMaxPooling2D
    x = pool_cls(name="pool")(x)
    if config.dropout > 0:
        x = keras.layers.Dropout(config.dropout, name="dropout")(x)
    reg = keras.regularizers.L2(config.l2) if config.l2 > 0 else None
    outputs = keras.layers.Dense(config.num_classes, activation="softmax", kernel_regularizer=reg, name="fc")(x)
    return keras.Model(inputs, outputs, name="mammo_cnn")


def _stack_layer_names(config: ClassifierConfig) -> list[str]:
    """Names of the weighted layers of the convolution stack."""
    names = []
    for i in range(1, len(config.filters) + 1):
        names.append(f"conv{i}")
        if config.norm != "none":
            names.append(f"bn{i}")
    return names


def copy_stack_weights(source: keras.Model, target: keras.Model, config: ClassifierConfig) -> None:
    """Copy the convolution-stack weights from one model to another, by layer name."""
    for name in _stack_layer_names(config):
        try:
            src, dst = source.get_layer(name), target.get_layer(name)
        except ValueError as err:
            raise ValueError(f"layer {name!r} of the conv stack missing: {err}") from err
        src_w, dst_w = src.get_weights(), dst.get_weights()
        shapes_src, shapes_dst = [w.shape for w in src_w], [w.shape for w in dst_w]
        if shapes_src != shapes_dst:
            raise ValueError(f"layer {name!r}: weight shapes {shapes_src} do not fit {shapes_dst}")
        dst.set_weights(src_w)


def build_feature_extractor(
    source: ClassifierConfig | keras.Model | str | Path | None = None,
    input_shape: tuple[int | None, int | None, int] | None = None,
    n_maps: int = 2,
    config: ClassifierConfig | None = None,
) -> keras.Model:
    """The conv stack as a model whose outputs are the last ``n_maps`` block activations.

    ``source`` is a :class:`ClassifierConfig` (new random weights), a built classifier, or the
    path of a saved classifier (``.keras`` file, or ``.weights.h5`` together with ``config``);
    the weights of a model are copied, not shared. ``input_shape`` defaults to the config's
    square input; ``(None, None, c)`` accepts any size.
    """
    model: keras.Model | None = None
    if source is None or isinstance(source, ClassifierConfig):
        config = source or config or ClassifierConfig()
    elif isinstance(source, keras.Model):
        model = source
    else:
        model, config = load_classifier(source, config)
    if model is not None and config is None:
        config = infer_config(model)
    assert config is not None
    if not 1 <= n_maps <= len(config.filters):
        raise ValueError(f"n_maps must be in 1..{len(config.filters)}, got {n_maps}")
    shape = input_shape or (config.input_size, config.input_size, config.input_channels)
    inputs = keras.Input(shape, name="image")
    outputs = conv_stack(config, inputs)[-n_maps:]
    extractor = keras.Model(inputs, outputs, name="mammo_cnn_features")
    if model is not None:
        copy_stack_weights(model, extractor, config)
    return extractor


def load_classifier(path: str | Path, config: ClassifierConfig | None = None) -> tuple[keras.Model, ClassifierConfig]:
    """A saved classifier (``.keras``, or ``.weights.h5`` with its config) and its config."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights not found: {path}")
    if path.suffix == ".keras":
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
        return model, config or infer_config(model)
    if config is None:
        raise ValueError(f"loading {path.name} (weights only) needs the ClassifierConfig it was built with")
    model = build_classifier(config)
    model.load_weights(path)
    return model, config


def infer_config(model: keras.Model) -> ClassifierConfig:
    """Recover the :class:`ClassifierConfig` of a model made by :func:`build_classifier`."""
    convs, separable = [], []
    i = 1
    while True:
        try:
            layer = model.get_layer(f"conv{i}")
        except ValueError:
            break
        convs.append(layer)
        if isinstance(layer, keras.layers.SeparableConv2D):
            separable.append(i - 1)
        i += 1
    if not convs:
        raise ValueError(f"model {model.name!r} has no conv1..convN layers: not a mammo_tf classifier")
    names = {layer.name for layer in model.layers}
    input_shape = model.input_shape
    fc = model.get_layer("fc") if "fc" in names else None
    pool = model.get_layer("pool") if "pool" in names else None
    reg = getattr(convs[0], "kernel_regularizer", None) or getattr(convs[0], "depthwise_regularizer", None)
    return ClassifierConfig(
        input_size=int(input_shape[1] or 128),
        input_channels=int(input_shape[-1]),
        num_classes=int(fc.units) if fc is not None else 3,
        filters=tuple(c.filters for c in convs),
        kernel_sizes=tuple(int(c.kernel_size[0]) for c in convs),
        strides=tuple(int(c.strides[0]) for c in convs),
        separable=bool(separable),
        separable_layers=tuple(separable) if separable else (2, 3),
        norm=("none" if "bn1" not in names else
              "group" if isinstance(model.get_layer("bn1"), keras.layers.GroupNormalization) else "batch"),
        norm_groups=int(getattr(model.get_layer("bn1"), "groups", 8)) if "bn1" in names else 8,
        dropout=float(model.get_layer("dropout").rate) if "dropout" in names else 0.0,
        pooling="max" if isinstance(pool, keras.layers.GlobalMaxPooling2D) else "avg",
        l2=float(reg.l2) if reg is not None else 0.0,
    )


def count_params_pair(config: ClassifierConfig | None = None) -> dict[str, int | float]:
    """Parameter counts of the network with its separable layers and with ordinary Conv2D instead."""
    config = config or ClassifierConfig()
    with_sep = build_classifier(dataclasses.replace(config, separable=True)).count_params()
    ordinary = build_classifier(dataclasses.replace(config, separable=False)).count_params()
    return {"separable": int(with_sep), "ordinary": int(ordinary), "ratio": with_sep / ordinary}
