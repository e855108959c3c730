"""SSD detector (Liu et al. 2016) on a VGG16 or on the small classifier's conv stack.

Model: backbone feature maps (VGG16: conv4_3 L2-normalised and fc7; ``cnn``: the last two
blocks of :mod:`mammo_tf.models.classifier`), then extra layers, each a 1x1 bottleneck and a
3x3 convolution (the paper's conv8_2 ... conv11_2; SSD512 adds conv12_2 with a 4x4 kernel).
Every feature map gets two 3x3 convolutional predictors, ``k * num_classes`` class logits and
``k * 4`` box offsets per location, reshaped to ``(B, H * W * k, .)`` and concatenated map by
map, which is the default-box order of :func:`mammo_tf.anchors.default_boxes`. The feature-map
sizes are read from the built model, so the anchors always fit it.

Outputs: a dict ``{"cls_logits": (B, N, num_classes), "box_offsets": (B, N, 4)}`` (raw logits;
class 0 = background). Input: ``(S, S, input_channels)`` images in ``[0, 1]``.

Sizes (``input_channels=1``, 3 classes, float32; ``N`` default boxes; multiply-accumulates
per image):

=========================  ========  ==========  ========  ================================
configuration              N         parameters  GMAC      feature maps
=========================  ========  ==========  ========  ================================
vgg16, 300 (SSD300)        8 732     ~23.9 M     ~30       38, 19, 10, 5, 3, 1
vgg16, 512 (SSD512)        24 564    ~24.5 M     ~87       64, 32, 16, 8, 4, 2, 1
cnn, 300 (CPU variant)     8 732     ~1.0 M      ~0.29     38, 19, 10, 5, 3, 1
=========================  ========  ==========  ========  ================================

The cnn variant is ~100 times cheaper than SSD300, so it trains on a CPU in minutes on
mini-MIAS. Trained models reload with
``keras.saving.load_model(path, safe_mode=True)`` once ``mammo_tf.models`` is imported.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras

from mammo_tf import anchors as anc
from mammo_tf.config import from_dict as config_from_dict
from mammo_tf.models import backbones
from mammo_tf.models import classifier as clf

# (bottleneck filters, filters, kernel, stride, padding) of each extra layer.
ExtraLayer = tuple[int, int, int, int, int]

SSD300_EXTRAS: tuple[ExtraLayer, ...] = (
    (256, 512, 3, 2, 1),
    (128, 256, 3, 2, 1),
    (128, 256, 3, 1, 0),
    (128, 256, 3, 1, 0),
)
SSD512_EXTRAS: tuple[ExtraLayer, ...] = (
    (256, 512, 3, 2, 1),
    (128, 256, 3, 2, 1),
    (128, 256, 3, 2, 1),
    (128, 256, 3, 2, 1),
    (128, 256, 4, 1, 1),
)
BACKBONES = ("vgg16", "cnn")


@dataclasses.dataclass
class SSDConfig:
    """Everything :func:`build_ssd` needs; ``None`` fields take the paper's choice for the size.

    ``weights``: ``"random"``, ``"hed"`` / ``"imagenet"`` (vgg16 only) or a path (vgg16: a Keras
    VGG16 notop weights file; cnn: a saved classifier, see
    :func:`mammo_tf.models.classifier.load_classifier`). ``classifier``: the
    :class:`~mammo_tf.models.classifier.ClassifierConfig` dict of the cnn backbone.
    ``extra_layers``: ``(bottleneck, filters, kernel, stride, padding)`` per extra layer.
    ``scales`` (one per map plus one) override ``s_min``/``s_max``/``first_scale``.
    ``freeze_through``: the last backbone layer kept frozen (e.g. ``"block5_conv3"``): that layer
    and every layer it depends on keep their loaded weights during training; ``None`` trains all.
    ``fc6_input_norm`` (vgg16): L2-normalise pool5 with a learnt scale before the random fc6.
    """

    image_size: int = 300
    input_channels: int = 1
    backbone: str = "vgg16"
    weights: str = "random"
    num_classes: int = 3
    input_norm: str = "auto"
    l2norm_init: float = 20.0
    classifier: dict[str, Any] | None = None
    extra_layers: tuple[ExtraLayer, ...] | None = None
    aspect_ratios: tuple[tuple[float, ...], ...] | None = None
    scales: tuple[float, ...] | None = None
    s_min: float | None = None
    s_max: float | None = None
    first_scale: float | None = None
    clip_anchors: bool = True
    variances: tuple[float, float, float, float] = anc.VARIANCES
    freeze_through: str | None = None
    fc6_input_norm: bool = False

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
        if self.input_channels not in (1, 3):
            raise ValueError(f"input_channels must be 1 or 3, got {self.input_channels}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, got {self.num_classes}")
        self.weights = str(self.weights)
        if self.extra_layers is not None:
            self.extra_layers = tuple(tuple(int(v) for v in e) for e in self.extra_layers)  # type: ignore[misc]
            if any(len(e) != 5 for e in self.extra_layers):
                raise ValueError("each extra layer is (bottleneck, filters, kernel, stride, padding)")
        if self.aspect_ratios is not None:
            self.aspect_ratios = tuple(tuple(float(r) for r in rs) for rs in self.aspect_ratios)
        if self.scales is not None:
            self.scales = tuple(float(s) for s in self.scales)
        self.variances = tuple(float(v) for v in self.variances)  # type: ignore[assignment]
        if len(self.variances) != 4:
            raise ValueError(f"variances needs 4 values, got {self.variances}")
        backbones.resolve_input_norm(self.input_norm, "random")  # validates the name
        if self.fc6_input_norm and self.backbone != "vgg16":
            raise ValueError("fc6_input_norm applies to the vgg16 backbone only")

    def classifier_config(self) -> clf.ClassifierConfig:
        """The cnn backbone's classifier configuration (input size set to the SSD's)."""
        base = clf.ClassifierConfig.from_dict(self.classifier) if self.classifier else clf.ClassifierConfig()
        return dataclasses.replace(base, input_size=self.image_size, input_channels=self.input_channels)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""

        def plain(v: Any) -> Any:
            return [plain(x) for x in v] if isinstance(v, (tuple, list)) else v

        return {k: plain(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SSDConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        return config_from_dict(cls, d)


def _generic_extras(size: int, wide: int, narrow: int) -> tuple[ExtraLayer, ...]:
    """SSD-like extras down to 1x1: stride-2 layers while the map exceeds 5, then valid 3x3s."""
    spec: list[ExtraLayer] = []
    while size > 5:
        spec.append((wide // 2 if not spec else narrow // 2, wide if not spec else narrow, 3, 2, 1))
        size = math.ceil(size / 2)
    while size >= 3:
        spec.append((narrow // 2, narrow, 3, 1, 0))
        size -= 2
    if size == 2:
        spec.append((narrow // 2, narrow, 2, 1, 0))
    return tuple(spec)


def default_extra_layers(cfg: SSDConfig, last_map_size: int) -> tuple[ExtraLayer, ...]:
    """The paper's extras for VGG SSD300/SSD512, else an SSD-like stack (half width for cnn)."""
    if cfg.backbone == "vgg16" and cfg.image_size == 300 and last_map_size == 19:
        return SSD300_EXTRAS
    if cfg.backbone == "vgg16" and cfg.image_size == 512 and last_map_size == 32:
        return SSD512_EXTRAS
    wide, narrow = (512, 256) if cfg.backbone == "vgg16" else (256, 128)
    return _generic_extras(last_map_size, wide, narrow)


def _scale_defaults(image_size: int) -> tuple[float, float, float]:
    """(s_min, s_max, first_scale): SSD512's for 512 and more, SSD300's below."""
    return (0.15, 0.9, 0.07) if image_size >= 512 else (0.2, 0.9, 0.1)


def anchor_config_from(cfg: SSDConfig, feature_map_sizes: Sequence[tuple[int, int]]) -> anc.AnchorConfig:
    """The default-box configuration of an SSD with the given feature maps."""
    n = len(feature_map_sizes)
    s_min, s_max, first = _scale_defaults(cfg.image_size)
    s_min = cfg.s_min if cfg.s_min is not None else s_min
    s_max = cfg.s_max if cfg.s_max is not None else s_max
    first = cfg.first_scale if cfg.first_scale is not None else first
    scales = cfg.scales if cfg.scales is not None else anc.ssd_scales(n, s_min, s_max, first)
    ratios = cfg.aspect_ratios if cfg.aspect_ratios is not None else anc.default_aspect_ratios(n)
    if len(ratios) != n or len(scales) != n + 1:
        raise ValueError(
            f"the model has {n} feature maps {list(feature_map_sizes)}: aspect_ratios needs {n} entries "
            f"(got {len(ratios)}) and scales {n + 1} (got {len(scales)})"
        )
    return anc.AnchorConfig(cfg.image_size, tuple(feature_map_sizes), scales, ratios, cfg.clip_anchors)


def _extra_layers(x: keras.KerasTensor, spec: Sequence[ExtraLayer]) -> list[keras.KerasTensor]:
    """Apply the extra layers; returns each layer's output (one feature map per layer)."""
    outs = []
    for i, (bottleneck, filters, kernel, stride, pad) in enumerate(spec):
        name = f"conv{8 + i}"
        x = keras.layers.Conv2D(bottleneck, 1, activation="relu", name=f"{name}_1")(x)
        if pad:
            x = keras.layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
        if x.shape[1] is not None and (x.shape[1] < kernel or x.shape[2] < kernel):
            raise ValueError(
                f"extra layer {name}_2 ({kernel}x{kernel}) does not fit a {x.shape[1]}x{x.shape[2]} map: "
                "use fewer extra layers or a larger image"
            )
        x = keras.layers.Conv2D(filters, kernel, strides=stride, padding="valid", activation="relu", name=f"{name}_2")(x)
        outs.append(x)
    return outs


def _heads(
    features: Sequence[keras.KerasTensor], per_location: Sequence[int], num_classes: int
) -> dict[str, keras.KerasTensor]:
    """3x3 predictors on each map, flattened to (B, H*W*k, .) and concatenated map by map."""
    cls_parts, box_parts = [], []
    for m, (feat, k) in enumerate(zip(features, per_location)):
        c = keras.layers.Conv2D(k * num_classes, 3, padding="same", name=f"cls_head_{m}")(feat)
        b = keras.layers.Conv2D(k * 4, 3, padding="same", name=f"box_head_{m}")(feat)
        cls_parts.append(keras.layers.Reshape((-1, num_classes), name=f"cls_flat_{m}")(c))
        box_parts.append(keras.layers.Reshape((-1, 4), name=f"box_flat_{m}")(b))
    if len(features) == 1:
        return {
            "cls_logits": keras.layers.Identity(name="cls_logits", dtype="float32")(cls_parts[0]),
            "box_offsets": keras.layers.Identity(name="box_offsets", dtype="float32")(box_parts[0]),
        }
    return {
        "cls_logits": keras.layers.Concatenate(axis=1, name="cls_logits", dtype="float32")(cls_parts),
        "box_offsets": keras.layers.Concatenate(axis=1, name="box_offsets", dtype="float32")(box_parts),
    }


def build_ssd(cfg: SSDConfig | None = None) -> tuple[keras.Model, anc.AnchorConfig]:
    """Build the SSD model (backbone weights loaded) and the anchor configuration that fits it."""
    cfg = cfg or SSDConfig()
    inputs = keras.Input((cfg.image_size, cfg.image_size, cfg.input_channels), name="image")
    if cfg.backbone == "vgg16":
        weights_key = cfg.weights if cfg.weights in backbones.WEIGHT_CHOICES else "path"
        norm = backbones.resolve_input_norm(cfg.input_norm, weights_key)
        features = backbones.vgg16_features(inputs, norm, cfg.l2norm_init, cfg.fc6_input_norm)
    else:
        if cfg.input_norm not in ("auto", "unit"):
            # The classifier was trained on [0, 1] input; only identity-like normalisation fits it.
            raise ValueError("the cnn backbone takes [0, 1] input: leave input_norm='auto'")
        clf_cfg = cfg.classifier_config()
        features = backbones.cnn_features(inputs, clf_cfg)
    last = int(features[-1].shape[1])
    spec = cfg.extra_layers if cfg.extra_layers is not None else default_extra_layers(cfg, last)
    features = features + _extra_layers(features[-1], spec)
    sizes = [(int(f.shape[1]), int(f.shape[2])) for f in features]
    anchor_cfg = anchor_config_from(cfg, sizes)
    outputs = _heads(features, anchor_cfg.boxes_per_location, cfg.num_classes)
    name = f"ssd{cfg.image_size}_{cfg.backbone}"
    model = keras.Model(inputs, outputs, name=name)
    n_out = outputs["cls_logits"].shape[1]
    if n_out != anchor_cfg.num_anchors:  # guards the ordering contract of the heads
        raise AssertionError(f"head outputs {n_out} boxes but the anchors number {anchor_cfg.num_anchors}")
    if cfg.backbone == "vgg16":
        backbones.load_vgg16_weights(model, cfg.weights)
    else:
        backbones.load_cnn_weights(model, cfg.weights, clf_cfg)
    if cfg.freeze_through:
        backbones.freeze_through(model, cfg.freeze_through)
    return model, anchor_cfg


def ssd_targets_fn(
    anchor_cfg: anc.AnchorConfig,
    iou_threshold: float = 0.5,
    variances: Sequence[float] = anc.VARIANCES,
    ignore_iou: float | None = None,
) -> Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tuple[tf.Tensor, dict[str, tf.Tensor]]]:
    """A ``tf.data`` map function ``(image, boxes, labels) -> (image, {"cls", "loc"})``.

    ``boxes``: ``(G, 4)`` corners normalised to ``[0, 1]`` (``G`` may be 0 for a normal film);
    ``labels``: ``(G,)`` detector ids ``>= 1``. The targets are :func:`mammo_tf.boxes.match`'s,
    the structure :class:`mammo_tf.losses.MultiBoxLoss` takes as ``y_true``.
    """
    import tensorflow as tf  # a tf.data map function: the model itself needs no TensorFlow

    from mammo_tf import boxes as bx

    anchors = tf.constant(anc.default_boxes(anchor_cfg))
    variances = tuple(float(v) for v in variances)

    def targets(image: tf.Tensor, boxes: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        loc, cls = bx.match(boxes, labels, anchors, iou_threshold, variances, ignore_iou)
        return image, {"cls": cls, "loc": loc}

    return targets


def load_ssd(path: str | Path) -> keras.Model:
    """Load a saved SSD model (``.keras``) in Keras safe mode."""
    return keras.saving.load_model(Path(path), compile=False, safe_mode=True)
