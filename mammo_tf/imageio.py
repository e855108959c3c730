"""Read a mammogram from any supported file (PGM, PNG, JPEG, TIFF, DICOM) as a grey `uint8` array.

Every reader returns a 2-D ``numpy.uint8`` array ``(H, W)``, top-left origin (docs/conventions.md),
with "bright = dense tissue" for DICOM (MONOCHROME1 is inverted here). Grey levels of other
formats are returned as stored: inverted exports (white background) are corrected by
`mammo_tf.photometric`, not here, because only the image content can tell.

Deeper than 8 bits (16-bit PNG/TIFF, DICOM after its modality and VOI transforms) is scaled
linearly from the image's own minimum..maximum to 0..255: stored bit depths say nothing about
the range actually used (12-bit data in 16-bit containers is the rule in mammography).
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from mammo_tf.data.mias import PgmError, read_pgm

PGM_EXTENSIONS = (".pgm",)
RASTER_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
DICOM_EXTENSIONS = (".dcm", ".dicom")
SUPPORTED_EXTENSIONS = PGM_EXTENSIONS + RASTER_EXTENSIONS + DICOM_EXTENSIONS
_DICOM_MAGIC_OFFSET = 128  # DICOM Part 10 files: 128-byte preamble, then b"DICM"


class ImageReadError(ValueError):
    """An image file is missing, unreadable, corrupt, of an unsupported type or not grey 2-D."""


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale a 2-D numeric array linearly from its min..max to a `uint8` array (constant -> 0)."""
    if array.dtype == np.uint8:
        return array
    data = np.asarray(array, dtype=np.float64)
    if not np.isfinite(data).all():
        raise ValueError("image has non-finite values")
    lo, hi = float(data.min()), float(data.max())
    if hi <= lo:
        return np.zeros(data.shape, np.uint8)
    return np.rint((data - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _to_grey(image: np.ndarray, path: Path, rgb: bool = False) -> np.ndarray:
    """Collapse a decoded image to one channel, or say why it cannot be."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    elif image.ndim == 3 and image.shape[2] in (3, 4):
        if image.dtype not in (np.uint8, np.uint16, np.float32):
            image = image.astype(np.float32)
        code = {(3, False): cv2.COLOR_BGR2GRAY, (4, False): cv2.COLOR_BGRA2GRAY,
                (3, True): cv2.COLOR_RGB2GRAY, (4, True): cv2.COLOR_RGBA2GRAY}[(image.shape[2], rgb)]
        image = cv2.cvtColor(image, code)
    if image.ndim != 2:
        raise ImageReadError(f"{path}: cannot make a 2-D grey image from an array of shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageReadError(f"{path}: empty image {image.shape}")
    return image


def _read_raster(path: Path) -> np.ndarray:
    # imdecode on the bytes (not imread on the name) so that non-ASCII paths work everywhere
    # and a decoding failure is told apart from a missing file.
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise ImageReadError(f"{path}: empty file")
    try:
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise ImageReadError(f"{path}: OpenCV cannot decode it ({exc})") from exc
    if image is None:
        raise ImageReadError(f"{path}: corrupt, truncated or not a {path.suffix.lstrip('.').upper()} image")
    image = _to_grey(image, path)
    try:
        return to_uint8(image)
    except ValueError as exc:
        raise ImageReadError(f"{path}: {exc}") from exc


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(_DICOM_MAGIC_OFFSET)
        return fh.read(4) == b"DICM"


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError) as exc:
        raise ImageReadError(f"{path}: not a readable DICOM file ({exc})") from exc
    if "PixelData" not in ds:
        raise ImageReadError(f"{path}: DICOM file has no pixel data")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise ImageReadError(f"{path}: multi-frame DICOM ({ds.NumberOfFrames} frames), expected one image")
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for bad or undecodable pixel data
        raise ImageReadError(f"{path}: cannot decode the DICOM pixel data ({exc})") from exc
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric.startswith("MONOCHROME"):
        try:
            # Modality LUT / rescale first, then the VOI LUT or window, as PS3.4 N.2 orders them.
            pixels = apply_voi_lut(apply_modality_lut(pixels, ds), ds)
        except (ValueError, KeyError, AttributeError) as exc:
            raise ImageReadError(f"{path}: invalid modality/VOI LUT ({exc})") from exc
    else:
        if photometric == "PALETTE COLOR":
            try:
                pixels = apply_color_lut(pixels, ds)
            except (ValueError, KeyError, AttributeError) as exc:
                raise ImageReadError(f"{path}: invalid palette colour LUT ({exc})") from exc
        # pydicom converts YBR colour spaces to RGB by default.
        pixels = _to_grey(np.asarray(pixels), path, rgb=True)
    pixels = _to_grey(np.asarray(pixels), path)
    try:
        image = to_uint8(pixels)
    except ValueError as exc:
        raise ImageReadError(f"{path}: {exc}") from exc
    if photometric == "MONOCHROME1":
        image = 255 - image  # MONOCHROME1: the minimum is white; we want bright = dense
    return image


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a PGM, PNG, JPEG, TIFF or DICOM image as a 2-D `uint8` grey array."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: file not found")
    if not path.is_file():
        raise ImageReadError(f"{path}: not a regular file")
    suffix = path.suffix.lower()
    try:
        if suffix in PGM_EXTENSIONS:
            try:
                return read_pgm(path, expect_size=None)
            except PgmError as exc:
                raise ImageReadError(str(exc)) from exc
        if suffix in RASTER_EXTENSIONS:
            return _read_raster(path)
        if suffix in DICOM_EXTENSIONS or (suffix == "" and _is_dicom(path)):
            return _read_dicom(path)
    except PermissionError as exc:
        raise ImageReadError(f"{path}: permission denied") from exc
    raise ImageReadError(
        f"{path}: unsupported file type {suffix or '(no extension)'!r}; "
        f"expected one of {', '.join(SUPPORTED_EXTENSIONS)} (or an extension-less DICOM file)"
    )
