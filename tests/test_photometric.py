"""mammo_tf.photometric: inversion detection (synthetic and verified real films) and spacing."""

from __future__ import annotations

import numpy as np
import pytest

from mammo_tf import photometric
from mammo_tf.imageio import read_image

# rsna-640 films whose grey levels were checked by eye (contact sheets of the whole set).
RSNA_INVERTED = [
    "benign/3229_108261501_png.rf.d4eb7b20b781b2d8f7d6d6f771251711.jpg",
    "malignant/32801_100791157_png.rf.a12c25a4e853a247da41ff07ed6d7ad9.jpg",
]
RSNA_NORMAL = [
    # The breast fills the frame and touches the border: a "border brighter than centre" rule
    # calls these two inverted; they are not.
    "malignant/28747_2075658562_png.rf.75c96ab77790b0b187ccde37b5a18236.jpg",
    "benign/2086_1450443663_png.rf.1527d8460cc833ea63d8831f09aea717.jpg",
    # A saturated white implant: a large bright region that is not background.
    "benign/1939_841837846_png.rf.731548fe8111121eb16b4b40ae19b3d4.jpg",
]


def _film(h: int = 120, w: int = 100, breast_fraction: float = 0.45, seed: int = 0) -> np.ndarray:
    """Black background, a textured half-ellipse 'breast' on the left edge (the chest wall)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = breast_fraction * w * 2  # semi-axis along x
    inside = ((x / a) ** 2 + ((y - h / 2) / (0.55 * h)) ** 2) <= 1
    image = np.zeros((h, w), np.uint8)
    # Tissue grey levels bunch around a mid value (as in real films), not spread to the maximum.
    image[inside] = np.clip(rng.normal(140, 20, size=int(inside.sum())), 60, 250).astype(np.uint8)
    return image


def test_synthetic_normal_and_inverted():
    film = _film()
    assert not photometric.is_inverted(film)
    assert photometric.is_inverted(255 - film)


def test_breast_filling_most_of_the_frame():
    film = _film(breast_fraction=0.9)
    assert (film > 0).mean() > 0.7
    assert not photometric.is_inverted(film)
    assert photometric.is_inverted(255 - film)


def test_low_contrast_range():
    # Background at 30, tissue 60..100: the rule looks at the image's own range, not 0..255.
    film = _film()
    scaled = np.where(film > 0, 60 + (film.astype(int) - 60) * 40 // 190, 30).astype(np.uint8)
    assert not photometric.is_inverted(scaled)
    assert photometric.is_inverted((130 - scaled).astype(np.uint8))


def test_constant_image_is_not_inverted():
    assert not photometric.is_inverted(np.zeros((5, 5), np.uint8))
    assert not photometric.is_inverted(np.full((5, 5), 255, np.uint8))


def test_fix_inversion():
    film = _film()
    np.testing.assert_array_equal(photometric.fix_inversion(255 - film), film)
    assert photometric.fix_inversion(film) is film


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.float32), np.zeros((4, 4, 3), np.uint8), np.zeros((0, 3), np.uint8)])
def test_bad_image(bad):
    with pytest.raises(ValueError, match="2-D uint8|empty"):
        photometric.is_inverted(bad)


def test_bad_margin():
    with pytest.raises(ValueError, match="margin"):
        photometric.is_inverted(_film(), margin=0.7)


@pytest.mark.parametrize("name", RSNA_INVERTED)
def test_real_inverted_rsna(shared_data, name):
    image = read_image(shared_data / "rsna-640" / name)
    assert photometric.is_inverted(image)
    assert not photometric.is_inverted(photometric.fix_inversion(image))


@pytest.mark.parametrize("name", RSNA_NORMAL)
def test_real_normal_rsna(shared_data, name):
    assert not photometric.is_inverted(read_image(shared_data / "rsna-640" / name))


@pytest.mark.parametrize("refnum", ["mdb001", "mdb151"])  # mdb151: the breast fills the film
def test_mias_films_not_inverted(shared_data, refnum):
    from mammo_tf.data import mias

    assert not photometric.is_inverted(mias.load_image(refnum))


def test_mias_spacing_constant():
    assert photometric.MIAS_SPACING_MM == 0.2


# --------------------------------------------------------------------------- spacing


def test_rescale_halves_by_block_mean():
    blocks = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    image = np.kron(blocks, np.ones((2, 2), np.uint8))  # 6x8, each value a 2x2 block
    out = photometric.rescale_spacing(image, 0.1, target_mm=0.2)
    np.testing.assert_array_equal(out, blocks)


def test_rescale_area_average():
    image = np.array([[0, 100], [200, 100]], np.uint8)
    np.testing.assert_array_equal(photometric.rescale_spacing(image, 0.1, 0.2), [[100]])


def test_rescale_anisotropic_and_enlarging():
    image = np.zeros((100, 60), np.uint8)
    assert photometric.rescale_spacing(image, (0.1, 0.4)).shape == (50, 120)
    assert photometric.rescale_spacing(image, 0.4).shape == (200, 120)
    assert photometric.rescale_spacing(image, 0.05).shape == (25, 15)


def test_rescale_same_spacing_copies():
    image = _film()
    out = photometric.rescale_spacing(image, 0.2)
    np.testing.assert_array_equal(out, image)
    assert out is not image


@pytest.mark.parametrize("spacing", [0, -0.1, np.nan, np.inf, (0.1, 0.2, 0.3)])
def test_rescale_bad_spacing(spacing):
    with pytest.raises(ValueError, match="spacing_mm"):
        photometric.rescale_spacing(_film(), spacing)


def test_rescale_bad_target():
    with pytest.raises(ValueError, match="target_mm"):
        photometric.rescale_spacing(_film(), 0.1, target_mm=0)


def test_normalise_fixes_then_rescales():
    film = _film(120, 100)
    out = photometric.normalise(255 - film, spacing_mm=0.1)
    assert out.shape == (60, 50)
    np.testing.assert_array_equal(out, photometric.rescale_spacing(film, 0.1))


def test_normalise_unknown_spacing_keeps_size():
    film = _film()
    np.testing.assert_array_equal(photometric.normalise(255 - film), film)
    np.testing.assert_array_equal(photometric.normalise(255 - film, np.nan), film)
