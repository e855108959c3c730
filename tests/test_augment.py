"""Augmentation: image transforms and box transforms agree, round trips, numpy vs TensorFlow."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest

from mammo_tf import augment as A

SHAPE = (60, 80)  # non-square, so that height/width mix-ups show
BOXES = np.array([[5, 10, 20, 35], [30, 50, 58, 79], [0, 0, 60, 80]], float)


def _box_image(box, shape=SHAPE):
    img = np.zeros(shape, np.uint8)
    y0, x0, y1, x1 = (int(v) for v in box)
    img[y0:y1, x0:x1] = 255
    return img


def _bbox(img):
    rows, cols = np.flatnonzero(img.any(1)), np.flatnonzero(img.any(0))
    return [rows[0], cols[0], rows[-1] + 1, cols[-1] + 1]


@pytest.mark.parametrize("k", range(4))
def test_rot90_boxes_match_image(k):
    for box in BOXES:
        out = A.rot90(_box_image(box), k)
        assert out.shape == (SHAPE if k % 2 == 0 else SHAPE[::-1])
        assert A.rot90_boxes(box[None], k, SHAPE)[0].tolist() == _bbox(out)


@pytest.mark.parametrize("horizontal", [True, False])
def test_flip_boxes_match_image(horizontal):
    for box in BOXES:
        out = A.flip(_box_image(box), horizontal)
        assert A.flip_boxes(box[None], SHAPE, horizontal)[0].tolist() == _bbox(out)


@pytest.mark.parametrize("k,h,v", list(itertools.product(range(4), [False, True], [False, True])))
def test_every_rotation_flip_round_trip(k, h, v):
    image = np.random.default_rng(k).integers(0, 255, SHAPE).astype(np.uint8)
    t = A.Transform(0.0, k, h, v)
    out, boxes = A.apply(image, BOXES, t)
    # Undo in reverse order: flips are their own inverse, then k quarter turns back.
    if v:
        boxes, out = A.flip_boxes(boxes, out.shape, False), A.flip(out, False)
    if h:
        boxes, out = A.flip_boxes(boxes, out.shape, True), A.flip(out, True)
    boxes, out = A.rot90_boxes(boxes, -k, out.shape), A.rot90(out, -k)
    assert np.array_equal(out, image)
    np.testing.assert_array_equal(boxes, BOXES)
    # The boxes followed the pixels: the transformed box images are the transforms of the box images.
    for box, tbox in zip(BOXES, A.apply(image, BOXES, t)[1]):
        assert _bbox(A.apply(_box_image(box), None, t)[0]) == tbox.tolist()


def test_rotate_by_90_equals_rot90_and_points_agree():
    image = np.random.default_rng(0).integers(0, 255, (64, 64)).astype(np.uint8)
    assert np.array_equal(A.rotate(image, 90, interpolation=cv2.INTER_NEAREST), A.rot90(image, 1))
    box = np.array([[5.0, 10.0, 25.0, 30.0]])  # a square box, i.e. a circle's box
    np.testing.assert_allclose(A.rotate_boxes(box, 90, (64, 64)), A.rot90_boxes(box, 1, (64, 64)), atol=1e-9)
    np.testing.assert_allclose(A.rotate_points([[32, 32]], 37, (64, 64)), [[32, 32]], atol=1e-9)  # the centre is fixed


@pytest.mark.parametrize("angle", [-45.0, -17.0, 30.0, 133.0])
def test_arbitrary_rotation_of_a_circle(angle):
    shape = (256, 256)
    image = np.zeros(shape, np.uint8)
    cy, cx, r = 80.0, 170.0, 25.0
    cv2.circle(image, (int(cx), int(cy)), int(r), 255, -1)
    box = np.array([[cy - r, cx - r, cy + r, cx + r]]) + 0.5  # cv2 draws around pixel centres
    rotated = A.rotate(image, angle)
    expected = A.rotate_boxes(box, angle, shape)[0]
    np.testing.assert_allclose(_bbox(rotated > 127), expected, atol=1.5)
    # Rotating back returns the circle's box (radius kept).
    back = A.rotate_boxes(A.rotate_boxes(box, angle, shape, clip=False), -angle, shape)
    np.testing.assert_allclose(back, box, atol=1e-9)


def test_rotate_keeps_size_and_reflects():
    image = np.tile(np.arange(50, dtype=np.uint8), (40, 1))
    out = A.rotate(image, 20)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert out.min() >= image.min() and (out[0, :5] > 0).all()  # no black corners: reflect fill


def test_bad_boxes_raise():
    with pytest.raises(ValueError, match="shape"):
        A.flip_boxes(np.zeros((3, 3)), SHAPE)


def test_random_transform_is_seeded():
    a = [A.random_transform(np.random.default_rng(5), max_angle=30) for _ in range(2)]
    assert a[0] == a[1] and -30 <= a[0].angle <= 30


# --------------------------------------------------------------------------- TensorFlow


def test_tf_box_transforms_match_numpy():
    import tensorflow as tf

    h, w = SHAPE
    for k in range(4):
        np.testing.assert_allclose(A.tf_rot90_boxes(BOXES, tf.constant(k), h, w).numpy(), A.rot90_boxes(BOXES, k, SHAPE))
        img = np.random.default_rng(k).random((h, w, 1)).astype(np.float32)
        np.testing.assert_array_equal(tf.image.rot90(img, k).numpy()[..., 0], A.rot90(img[..., 0], k))
    for horizontal in (True, False):
        np.testing.assert_allclose(A.tf_flip_boxes(BOXES, h, w, horizontal).numpy(), A.flip_boxes(BOXES, SHAPE, horizontal))
    sq = np.array([[10.0, 20.0, 30.0, 40.0]])
    np.testing.assert_allclose(A.tf_rotate_boxes(sq, 25.0, 64, 64).numpy(), A.rotate_boxes(sq, 25.0, (64, 64)), atol=1e-4)


def test_tf_rotate_matches_cv2():
    yy, xx = np.mgrid[:64, :64]
    image = (np.sin(yy / 7.0) + np.cos(xx / 5.0)).astype(np.float32)  # smooth, so interpolation agrees
    ours = A.tf_rotate(image[..., None], 25.0).numpy()[..., 0]
    ref = A.rotate(image, 25.0)
    np.testing.assert_allclose(ours[8:-8, 8:-8], ref[8:-8, 8:-8], atol=1e-3)  # away from the reflected border


def _one_box_image() -> tuple[np.ndarray, np.ndarray]:
    """A 48x48 (H, W, 1) float image, bright inside one box (pixel corners)."""
    box = np.array([[4.0, 10.0, 20.0, 30.0]])
    return box, _box_image(box[0], (48, 48)).astype(np.float32)[..., None] / 255.0


def test_tf_augment_with_boxes_moves_boxes_with_pixels():
    import tensorflow as tf

    box, image = _one_box_image()
    seen = set()
    for s in range(12):
        out, boxes = A.tf_augment_with_boxes(tf.constant(image), box, tf.constant([s, 7], tf.int64))
        out = out.numpy()[..., 0]
        assert _bbox(out > 0.5) == boxes.numpy()[0].tolist()
        seen.add(tuple(boxes.numpy()[0]))
    assert len(seen) >= 4  # several different transforms were drawn
    # Same seed, same result.
    a = A.tf_augment(tf.constant(image), tf.constant([3, 1], tf.int64), max_angle=20.0).numpy()
    b = A.tf_augment(tf.constant(image), tf.constant([3, 1], tf.int64), max_angle=20.0).numpy()
    assert np.array_equal(a, b) and a.shape == image.shape


def test_left_right_flips_only_mirror_the_image_and_its_box():
    import tensorflow as tf

    box, image = _one_box_image()
    seen = set()
    for s in range(12):
        out, boxes = A.tf_augment_with_boxes(tf.constant(image), box, tf.constant([s, 7], tf.int64), rot90s=False,
                                             flips_up_down=False)
        assert _bbox(out.numpy()[..., 0] > 0.5) == boxes.numpy()[0].tolist()
        seen.add(tuple(boxes.numpy()[0]))
    # The box keeps its rows; only its columns are mirrored (48 - 30 = 18, 48 - 10 = 38).
    assert seen == {(4.0, 10.0, 20.0, 30.0), (4.0, 18.0, 20.0, 38.0)}


def test_zoom_keeps_the_first_lesion_and_moves_its_box_with_the_pixels():
    import tensorflow as tf

    box, image = _one_box_image()
    boxes = np.vstack([box, [[40.0, 40.0, 46.0, 46.0]]]).astype(np.float32)  # a second box, in a corner
    labels = np.array([1, 2], np.int32)
    kept_second, sides = set(), set()
    for s in range(16):
        out, b, lab = A.tf_zoom_with_boxes(tf.constant(image), tf.constant(boxes), tf.constant(labels),
                                           tf.constant([s, 3], tf.int64), min_scale=0.5)
        out, b, lab = out.numpy()[..., 0], b.numpy(), lab.numpy()
        assert out.shape == (48, 48) and lab[0] == 1  # the first box's centre is always in the window
        # Bilinear resampling blurs the edge by up to a pixel.
        np.testing.assert_allclose(_bbox(out > 0.5), b[0], atol=1.5)
        side = b[0, 2] - b[0, 0]
        assert 16.0 - 1e-4 <= side <= 32.0 + 1e-4  # zoomed in by 1x to 2x
        sides.add(round(float(side), 1))
        kept_second.add(int(lab[1]))
        if lab[1] == 0:
            assert not b[1].any()  # a dropped box is padding
    assert kept_second == {0, 2} and len(sides) > 8  # the corner box is sometimes cut off; scales vary


def test_augmentation_layers():
    layers = A.augmentation_layers(max_angle=30, seed=0)
    out = layers(np.zeros((2, 32, 32, 1), np.float32), training=True)
    assert tuple(out.shape) == (2, 32, 32, 1)
    assert [type(l).__name__ for l in layers.layers] == ["RandomFlip", "RandomRotation"]
