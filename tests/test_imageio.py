"""mammo_tf.imageio: every format round trip on synthetic files, and a clear error for bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mammo_tf.imageio import SUPPORTED_EXTENSIONS, ImageReadError, read_image, to_uint8

MAMMOGRAPHY_SOP = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography X-Ray Image Storage - For Presentation


def _image(h: int = 24, w: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(h, w), dtype=np.uint8)


def _smooth(h: int = 48, w: int = 64) -> np.ndarray:
    """A gradient: JPEG reproduces it within a few grey levels."""
    y, x = np.mgrid[0:h, 0:w]
    return (40 + 2 * x + y).astype(np.uint8)


def _write(path: Path, image: np.ndarray) -> Path:
    ok, buf = cv2.imencode(path.suffix, image)
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def _dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 12,
           **elements) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MAMMOGRAPHY_SOP
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = MAMMOGRAPHY_SOP
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "MG"
    ds.set_pixel_data(pixels, photometric, bits)
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------- round trips


def test_pgm_round_trip_any_size(tmp_path):
    image = _image(24, 32)
    path = tmp_path / "film.pgm"
    path.write_bytes(b"P5\n32 24\n255\n" + image.tobytes())
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (24, 32)
    np.testing.assert_array_equal(out, image)


@pytest.mark.parametrize("suffix", [".png", ".tif", ".tiff"])
def test_lossless_round_trip(tmp_path, suffix):
    image = _image()
    out = read_image(_write(tmp_path / f"film{suffix}", image))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, image)


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".JPG"])
def test_jpeg_round_trip_within_compression_error(tmp_path, suffix):
    image = _smooth()
    out = read_image(_write(tmp_path / f"film{suffix}", image))
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - image).max() <= 4


def test_three_identical_channels_read_as_that_grey(tmp_path):
    image = _image()
    out = read_image(_write(tmp_path / "rgb.png", np.dstack([image] * 3)))
    np.testing.assert_array_equal(out, image)


def test_alpha_channel_dropped(tmp_path):
    image = _image()
    rgba = np.dstack([image] * 3 + [np.full_like(image, 255)])
    np.testing.assert_array_equal(read_image(_write(tmp_path / "rgba.png", rgba)), image)


def test_16_bit_png_scaled_from_its_range(tmp_path):
    image = np.array([[0, 1000], [2048, 4095]], np.uint16)  # 12-bit data in a 16-bit PNG
    out = read_image(_write(tmp_path / "deep.png", image))
    # 255 * v / 4095, rounded: 1000 -> 62.27, 2048 -> 127.53
    np.testing.assert_array_equal(out, [[0, 62], [128, 255]])


def test_16_bit_png_offset_range(tmp_path):
    image = np.array([[500, 600], [700, 755]], np.uint16)
    np.testing.assert_array_equal(read_image(_write(tmp_path / "d.png", image)), [[0, 100], [200, 255]])


def test_constant_deep_image_is_zero(tmp_path):
    image = np.full((4, 5), 3000, np.uint16)
    np.testing.assert_array_equal(read_image(_write(tmp_path / "c.png", image)), np.zeros((4, 5), np.uint8))


def test_to_uint8():
    np.testing.assert_array_equal(to_uint8(np.array([[-1.0, 0.0], [1.0, 3.0]])), [[0, 64], [128, 255]])
    same = np.array([[1, 2]], np.uint8)
    assert to_uint8(same) is same
    with pytest.raises(ValueError, match="non-finite"):
        to_uint8(np.array([[0.0, np.nan]]))


# --------------------------------------------------------------------------- DICOM


def test_dicom_monochrome2(tmp_path):
    pixels = np.array([[0, 1365], [2730, 4095]], np.uint16)
    out = read_image(_dicom(tmp_path / "a.dcm", pixels))
    np.testing.assert_array_equal(out, [[0, 85], [170, 255]])


def test_dicom_monochrome1_inverted(tmp_path):
    pixels = np.array([[0, 1365], [2730, 4095]], np.uint16)
    out = read_image(_dicom(tmp_path / "a.dcm", pixels, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(out, [[255, 170], [85, 0]])


def test_dicom_window_applied_in_rescaled_units(tmp_path):
    # Stored 0..4095, rescaled x2 to 0..8190; the window [1536, 2560] is in rescaled units, so
    # stored 1024 (-> 2048, the centre) comes out mid-grey. Without the rescale it would be black.
    pixels = np.array([[0, 700, 1024], [1300, 2000, 4095]], np.uint16)
    path = _dicom(tmp_path / "w.dcm", pixels, RescaleSlope=2, RescaleIntercept=0,
                  WindowCenter=2048, WindowWidth=1024)
    out = read_image(path)
    assert out[0, 0] == 0 and out[0, 1] == 0          # 0, 1400: below the window
    assert 120 <= out[0, 2] <= 135                     # 2048: window centre
    assert out[1, 0] == 255 and out[1, 2] == 255       # 2600, 8190: above the window


def test_dicom_without_extension_is_detected(tmp_path):
    pixels = np.array([[0, 4095]], np.uint16)
    path = _dicom(tmp_path / "a.dcm", pixels)
    bare = tmp_path / "IMG0001"
    shutil.copy(path, bare)
    np.testing.assert_array_equal(read_image(bare), [[0, 255]])


def test_dicom_multiframe_rejected(tmp_path):
    pixels = np.zeros((2, 4, 4), np.uint16)
    path = _dicom(tmp_path / "m.dcm", pixels)
    with pytest.raises(ImageReadError, match=r"m\.dcm: multi-frame"):
        read_image(path)


def test_dicom_without_pixels_rejected(tmp_path):
    path = _dicom(tmp_path / "n.dcm", np.zeros((4, 4), np.uint16))
    import pydicom

    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(ImageReadError, match=r"n\.dcm: DICOM file has no pixel data"):
        read_image(path)


def test_not_a_dicom_file(tmp_path):
    path = tmp_path / "x.dcm"
    path.write_bytes(b"hello, not DICOM at all" * 20)
    with pytest.raises(ImageReadError, match=r"x\.dcm"):
        read_image(path)


def test_truncated_dicom_rejected(tmp_path):
    path = _dicom(tmp_path / "t.dcm", np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 3000])
    with pytest.raises(ImageReadError, match=r"t\.dcm"):
        read_image(path)


# --------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match=r"nope\.png: file not found"):
        read_image(tmp_path / "nope.png")


def test_directory(tmp_path):
    (tmp_path / "d.png").mkdir()
    with pytest.raises(ImageReadError, match="not a regular file"):
        read_image(tmp_path / "d.png")


@pytest.mark.parametrize("name", ["a.gif", "a.txt", "a.npy", "noext"])
def test_unsupported_extension(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"GIF89a" + bytes(200))
    with pytest.raises(ImageReadError, match="unsupported file type"):
        read_image(path)


def test_supported_extensions_listed():
    assert set(SUPPORTED_EXTENSIONS) == {".pgm", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom"}


def test_empty_file(tmp_path):
    path = tmp_path / "e.png"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"e\.png: empty file"):
        read_image(path)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_raster(tmp_path, suffix):
    path = _write(tmp_path / f"t{suffix}", _image(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=rf"t\{suffix}: corrupt, truncated"):
        read_image(path)


def test_garbage_with_image_extension(tmp_path):
    path = tmp_path / "g.jpg"
    path.write_bytes(b"\x00\x01garbage" * 50)
    with pytest.raises(ImageReadError, match=r"g\.jpg: corrupt"):
        read_image(path)


def test_bad_pgm(tmp_path):
    path = tmp_path / "b.pgm"
    path.write_bytes(b"P2\n2 2\n255\n1 2 3 4\n")
    with pytest.raises(ImageReadError, match=r"b\.pgm: not a binary PGM"):
        read_image(path)
    path.write_bytes(b"P5\n4 4\n255\n" + bytes(10))
    with pytest.raises(ImageReadError, match="truncated raster"):
        read_image(path)


def test_dicom_rgb_to_grey(tmp_path):
    grey = _image(8, 6)
    path = _dicom(tmp_path / "rgb.dcm", np.dstack([grey] * 3), photometric="RGB", bits=8)
    np.testing.assert_array_equal(read_image(path), to_uint8(grey))
