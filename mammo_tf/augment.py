"""Geometric augmentation of films, patches and crops, with the same transforms applied to boxes.

Transforms: rotation by multiples of 90 degrees, rotation by an arbitrary angle (reflect fill),
horizontal (left-right) and vertical (up-down) flips, and SSD's random crop (a zoom in,
`tf_zoom_with_boxes`). Angles are in degrees, counter-clockwise as the image is displayed (row 0
at the top), the convention of `numpy.rot90`, `tf.image.rot90` and `cv2.getRotationMatrix2D`.

Two implementations of the image side:

- offline, numpy / OpenCV (`rot90`, `flip`, `rotate`, `apply`), for inspection and figures;
- on the fly in `tf.data` (`tf_augment`, `tf_augment_with_boxes`), stateless ops driven by an
  explicit seed pair so that a pipeline is reproducible; plus `augmentation_layers`, the Keras
  preprocessing layers for augmenting inside a model.

Boxes are `[ymin, xmin, ymax, xmax]` in pixels, in continuous coordinates (pixel `(r, c)` covers
`[r, r + 1) x [c, c + 1)`), so a box of the whole image is `[0, 0, h, w]`. Rotations by 90 degree
multiples and flips map boxes exactly. An arbitrary rotation maps a box as the box of a circle:
mini-MIAS lesions are circles, so the centre is rotated and the radius kept (radius = half the
larger side of the box unless given), then the box is clipped to the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# cv2.BORDER_REFLECT (edge pixel repeated) is Keras's and TF's "reflect" fill mode.
_BORDER = cv2.BORDER_REFLECT


def _as_boxes(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (n, 4) [ymin, xmin, ymax, xmax], got {boxes.shape}")
    return boxes


def _shape(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) < 2 or shape[0] <= 0 or shape[1] <= 0:
        raise ValueError(f"image shape must start with (height, width), got {shape}")
    return int(shape[0]), int(shape[1])


# --------------------------------------------------------------------------- numpy / OpenCV


def rot90(image: np.ndarray, k: int = 1) -> np.ndarray:
    """Rotate an image (H, W[, C]) counter-clockwise by k * 90 degrees."""
    return np.ascontiguousarray(np.rot90(image, k % 4, axes=(0, 1)))


def flip(image: np.ndarray, horizontal: bool = True) -> np.ndarray:
    """Flip an image left-right (`horizontal`) or up-down."""
    return np.ascontiguousarray(image[:, ::-1] if horizontal else image[::-1])


def rotation_matrix(angle: float, shape: tuple[int, ...]) -> np.ndarray:
    """The 2x3 OpenCV matrix rotating pixel indices by `angle` degrees about the image centre."""
    h, w = _shape(shape)
    # Pixel indices are centred at integer positions, so the centre of the image is at (w-1)/2, (h-1)/2.
    return cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), float(angle), 1.0)


def rotate(image: np.ndarray, angle: float, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """Rotate an image by `angle` degrees about its centre, same size, reflect fill."""
    h, w = _shape(image.shape)
    return cv2.warpAffine(image, rotation_matrix(angle, image.shape), (w, h), flags=interpolation, borderMode=_BORDER)


def rot90_boxes(boxes: np.ndarray, k: int, shape: tuple[int, ...]) -> np.ndarray:
    """Boxes of an (H, W) image after `rot90(image, k)` (the new image is (W, H) for odd k)."""
    boxes = _as_boxes(boxes)
    h, w = _shape(shape)
    for _ in range(k % 4):
        ymin, xmin, ymax, xmax = boxes.T
        # One counter-clockwise quarter turn maps (y, x) to (w - x, y).
        boxes = np.stack([w - xmax, ymin, w - xmin, ymax], axis=1)
        h, w = w, h
    return boxes


def flip_boxes(boxes: np.ndarray, shape: tuple[int, ...], horizontal: bool = True) -> np.ndarray:
    """Boxes of an (H, W) image after `flip(image, horizontal)`."""
    boxes = _as_boxes(boxes)
    h, w = _shape(shape)
    ymin, xmin, ymax, xmax = boxes.T
    if horizontal:
        return np.stack([ymin, w - xmax, ymax, w - xmin], axis=1)
    return np.stack([h - ymax, xmin, h - ymin, xmax], axis=1)


def rotate_points(points_yx: np.ndarray, angle: float, shape: tuple[int, ...]) -> np.ndarray:
    """Continuous (y, x) points after `rotate(image, angle)`."""
    pts = np.asarray(points_yx, dtype=np.float64).reshape(-1, 2)
    m = rotation_matrix(angle, shape)
    # Continuous coordinates are pixel indices + 0.5.
    xy = pts[:, ::-1] - 0.5
    out = xy @ m[:, :2].T + m[:, 2]
    return out[:, ::-1] + 0.5


def rotate_boxes(boxes: np.ndarray, angle: float, shape: tuple[int, ...], radii: np.ndarray | None = None, clip: bool = True) -> np.ndarray:
    """Boxes after `rotate(image, angle)`, each treated as the box of a circle (centre rotated, radius kept)."""
    boxes = _as_boxes(boxes)
    h, w = _shape(shape)
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)
    if radii is None:
        radii = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) / 2
    radii = np.asarray(radii, dtype=np.float64).reshape(-1)
    c = rotate_points(centres, angle, shape)
    out = np.stack([c[:, 0] - radii, c[:, 1] - radii, c[:, 0] + radii, c[:, 1] + radii], axis=1)
    return clip_boxes(out, (h, w)) if clip else out


def clip_boxes(boxes: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Boxes clipped to an (H, W) image."""
    boxes = _as_boxes(boxes)
    h, w = _shape(shape)
    return np.clip(boxes, 0, [h, w, h, w])


@dataclass(frozen=True)
class Transform:
    """One geometric transform: rotate by `angle`, then `k` quarter turns, then the flips."""

    angle: float = 0.0
    k: int = 0
    hflip: bool = False
    vflip: bool = False


def random_transform(rng: np.random.Generator, max_angle: float = 0.0, rot90s: bool = True, flips: bool = True) -> Transform:
    """Draw a transform: uniform angle in [-max_angle, max_angle], uniform k, fair-coin flips."""
    angle = float(rng.uniform(-max_angle, max_angle)) if max_angle > 0 else 0.0
    k = int(rng.integers(0, 4)) if rot90s else 0
    h, v = (bool(b) for b in rng.integers(0, 2, 2)) if flips else (False, False)
    return Transform(angle, k, h, v)


def apply(image: np.ndarray, boxes: np.ndarray | None, t: Transform) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply a Transform to an image and (optionally) its boxes."""
    shape = image.shape
    if t.angle:
        image = rotate(image, t.angle)
        boxes = None if boxes is None else rotate_boxes(boxes, t.angle, shape)
    if t.k % 4:
        boxes = None if boxes is None else rot90_boxes(boxes, t.k, image.shape)
        image = rot90(image, t.k)
    if t.hflip:
        boxes = None if boxes is None else flip_boxes(boxes, image.shape, horizontal=True)
        image = flip(image, horizontal=True)
    if t.vflip:
        boxes = None if boxes is None else flip_boxes(boxes, image.shape, horizontal=False)
        image = flip(image, horizontal=False)
    return image, boxes


# --------------------------------------------------------------------------- TensorFlow, on the fly


def tf_rot90_boxes(boxes, k, height, width):
    """TF version of `rot90_boxes` for a scalar int tensor k (boxes float32 (n, 4), pixels)."""
    import tensorflow as tf

    boxes = tf.convert_to_tensor(boxes, tf.float32)
    height, width = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    ymin, xmin, ymax, xmax = tf.unstack(boxes, axis=-1)
    k = tf.math.floormod(k, 4)
    candidates = tf.stack([
        tf.stack([ymin, xmin, ymax, xmax], -1),
        tf.stack([width - xmax, ymin, width - xmin, ymax], -1),
        tf.stack([height - ymax, width - xmax, height - ymin, width - xmin], -1),
        tf.stack([xmin, height - ymax, xmax, height - ymin], -1),
    ])
    return tf.gather(candidates, k)


def tf_flip_boxes(boxes, height, width, horizontal: bool = True):
    """TF version of `flip_boxes`."""
    import tensorflow as tf

    boxes = tf.convert_to_tensor(boxes, tf.float32)
    ymin, xmin, ymax, xmax = tf.unstack(boxes, axis=-1)
    if horizontal:
        width = tf.cast(width, tf.float32)
        return tf.stack([ymin, width - xmax, ymax, width - xmin], -1)
    height = tf.cast(height, tf.float32)
    return tf.stack([height - ymax, xmin, height - ymin, xmax], -1)


def tf_rotate(image, angle_deg):
    """Rotate an (H, W, C) float image by `angle_deg` degrees about its centre, reflect fill (Keras affine_transform)."""
    import keras
    import tensorflow as tf

    image = tf.convert_to_tensor(image)
    h = tf.cast(tf.shape(image)[0], tf.float32)
    w = tf.cast(tf.shape(image)[1], tf.float32)
    theta = tf.cast(angle_deg, tf.float32) * (np.pi / 180.0)
    c, s = tf.cos(theta), tf.sin(theta)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    # affine_transform maps each output pixel to the input pixel it samples: the inverse rotation.
    transform = tf.stack([c, -s, cx - c * cx + s * cy, s, c, cy - s * cx - c * cy, 0.0, 0.0])
    out = keras.ops.image.affine_transform(image[None], transform[None], interpolation="bilinear", fill_mode="reflect", data_format="channels_last")
    return out[0]


def tf_rotate_boxes(boxes, angle_deg, height, width):
    """TF version of `rotate_boxes` (circle rule, radius = half the larger side), clipped to the image."""
    import tensorflow as tf

    boxes = tf.convert_to_tensor(boxes, tf.float32)
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    theta = tf.cast(angle_deg, tf.float32) * (np.pi / 180.0)
    c, s = tf.cos(theta), tf.sin(theta)
    ymin, xmin, ymax, xmax = tf.unstack(boxes, axis=-1)
    r = tf.maximum(ymax - ymin, xmax - xmin) / 2
    # In continuous coordinates the image centre is (h/2, w/2); CCW as displayed (y down).
    dy, dx = (ymin + ymax) / 2 - h / 2, (xmin + xmax) / 2 - w / 2
    ny, nx = h / 2 - s * dx + c * dy, w / 2 + c * dx + s * dy
    out = tf.stack([ny - r, nx - r, ny + r, nx + r], -1)
    return tf.clip_by_value(out, 0.0, tf.stack([h, w, h, w]))


def _seeds(seed, n: int):
    import tensorflow as tf

    return tf.unstack(tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), n))


def tf_augment(image, seed, max_angle: float = 0.0, rot90s: bool = True, flips: bool = True):
    """Random rotation (arbitrary angle, then 90-degree multiple) and flips of a square (H, W, C) image; seed is int (2,)."""
    import tensorflow as tf

    s_angle, s_k, s_h, s_v = _seeds(seed, 4)
    if max_angle > 0:
        angle = tf.random.stateless_uniform([], s_angle, -max_angle, max_angle)
        image = tf_rotate(image, angle)
    if rot90s:
        image = tf.image.rot90(image, tf.random.stateless_uniform([], s_k, 0, 4, dtype=tf.int32))
    if flips:
        image = tf.image.stateless_random_flip_left_right(image, s_h)
        image = tf.image.stateless_random_flip_up_down(image, s_v)
    return image


def tf_augment_with_boxes(image, boxes, seed, max_angle: float = 0.0, rot90s: bool = True, flips: bool = True,
                          flips_up_down: bool = True):
    """`tf_augment` of a square (H, W, C) image with its pixel boxes transformed the same way (``flips_up_down=False``: left-right flips only)."""
    import tensorflow as tf

    s_angle, s_k, s_h, s_v = _seeds(seed, 4)
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    if max_angle > 0:
        angle = tf.random.stateless_uniform([], s_angle, -max_angle, max_angle)
        image = tf_rotate(image, angle)
        boxes = tf_rotate_boxes(boxes, angle, h, w)
    if rot90s:
        k = tf.random.stateless_uniform([], s_k, 0, 4, dtype=tf.int32)
        image = tf.image.rot90(image, k)
        boxes = tf_rot90_boxes(boxes, k, h, w)
    if flips:
        # The same coin decides the image and the boxes.
        for s, horizontal in ((s_h, True), (s_v, False))[:2 if flips_up_down else 1]:
            do = tf.random.stateless_uniform([], s) < 0.5
            image = tf.cond(do, lambda: tf.reverse(image, [1 if horizontal else 0]), lambda: image)
            boxes = tf.cond(do, lambda: tf_flip_boxes(boxes, h, w, horizontal), lambda: boxes)
    return image, boxes


def tf_zoom_with_boxes(image, boxes, labels, seed, min_scale: float):
    """SSD's random crop: a square window of ``scale * S`` pixels (``scale`` uniform in
    ``[min_scale, 1]``) resized back to ``S``, placed so that it holds the first box's centre when
    there is a box; pixel boxes follow it, and boxes whose centre falls outside become padding."""
    import tensorflow as tf

    s_scale, s_y, s_x = _seeds(seed, 3)
    size = tf.shape(image)[0]
    sf = tf.cast(size, tf.float32)
    side = tf.cast(tf.round(sf * tf.random.stateless_uniform([], s_scale, min_scale, 1.0)), tf.int32)
    side = tf.clip_by_value(side, 1, size)
    room = tf.cast(size - side, tf.float32)
    centre = (boxes[0, :2] + boxes[0, 2:]) / 2.0
    # Offsets for which the window still holds the first box's centre (any offset without a box).
    lo = tf.where(labels[0] > 0, tf.maximum(0.0, centre - tf.cast(side, tf.float32)), 0.0)
    hi = tf.where(labels[0] > 0, tf.minimum(room, centre), room)
    u = tf.stack([tf.random.stateless_uniform([], s_y), tf.random.stateless_uniform([], s_x)])
    offset = tf.cast(tf.floor(lo + u * tf.maximum(hi - lo, 0.0)), tf.int32)
    window = tf.image.crop_to_bounding_box(image, offset[0], offset[1], side, side)
    zoomed = tf.cast(tf.image.resize(window, [size, size]), image.dtype)
    k = sf / tf.cast(side, tf.float32)
    shift = tf.cast(tf.tile(offset, [2]), tf.float32)
    moved = tf.clip_by_value((boxes - shift) * k, 0.0, sf)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2.0 - tf.cast(offset, tf.float32)
    inside = tf.reduce_all((centres >= 0.0) & (centres < tf.cast(side, tf.float32)), axis=1) & (labels > 0)
    return (zoomed, tf.where(inside[:, None], moved, 0.0), tf.where(inside, labels, tf.zeros_like(labels)))


def augmentation_layers(max_angle: float = 0.0, seed: int | None = None):
    """Keras preprocessing layers (flips, rotation with reflect fill) for augmenting inside a model."""
    import keras

    layers = [keras.layers.RandomFlip("horizontal_and_vertical", seed=seed)]
    if max_angle > 0:
        layers.append(keras.layers.RandomRotation(max_angle / 360.0, fill_mode="reflect", seed=seed))
    return keras.Sequential(layers, name="augmentation")
