"""mini-MIAS: fetch, verify, read the PGM films and parse the annotation table exactly."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

ORIGIN = "http://peipa.essex.ac.uk/pix/mias/all-mias.tar.gz"
ARCHIVE_SHA256 = "9bfc6e548d8ff9478241f19b0dfad8e0729386d4e863dca33072ea5a3c857122"
ARCHIVE_NAME = "all-mias.tar.gz"
DATA_ENV = "MAMMO_TF_DATA"
CACHE_ENV = "MAMMO_TF_CACHE"

IMAGE_SIZE = 1024
N_IMAGES = 322
REFNUMS = tuple(f"mdb{i:03d}" for i in range(1, N_IMAGES + 1))
CLASSES = ("normal", "benign", "malignant")
TISSUES = {"F": "fatty", "G": "fatty-glandular", "D": "dense-glandular"}
ABNORMALITIES = ("CALC", "CIRC", "SPIC", "MISC", "ARCH", "ASYM", "NORM")
ABNORMALITY_NAMES = {"CALC": "calcification", "CIRC": "circumscribed mass", "SPIC": "spiculated mass",
                     "MISC": "ill-defined mass", "ARCH": "architectural distortion", "ASYM": "asymmetry",
                     "NORM": "normal"}
SEVERITIES = {"B": "benign", "M": "malignant"}
MANIFEST = Path(__file__).with_name("mias_sha256.txt")
_VERIFIED_MARKER = ".mammo_tf_verified"
_VERIFIED_IN_PROCESS: dict[Path, int] = {}

COLUMNS = (
    "refnum", "patient_id", "side", "tissue", "abnormality", "severity",
    "x", "y", "radius", "has_location", "label", "label_id",
)


class MiasError(Exception):
    """Base class of every mini-MIAS data error (each names the offending file)."""


class PgmError(MiasError):
    """A PGM file is missing, truncated or not an 8-bit 1024x1024 binary PGM."""


class AnnotationError(MiasError):
    """The annotation table (Info.txt) is missing or has a row that cannot be parsed."""


class ArchiveError(MiasError):
    """The archive has the wrong checksum, unsafe members or is missing files."""


# --------------------------------------------------------------------------- PGM


def parse_pgm(data: bytes, name: str = "<bytes>", expect_size: int | None = IMAGE_SIZE) -> np.ndarray:
    """Decode a binary (P5) 8-bit PGM held in memory into a `uint8` array."""
    if not data.startswith(b"P5"):
        raise PgmError(f"{name}: not a binary PGM (magic {data[:2]!r}, expected b'P5')")
    fields: list[int] = []
    pos = 2
    n = len(data)
    # Header: magic, width, height, maxval separated by whitespace, '#' comments allowed.
    while len(fields) < 3:
        if pos >= n:
            raise PgmError(f"{name}: truncated PGM header")
        c = data[pos : pos + 1]
        if c.isspace():
            pos += 1
        elif c == b"#":
            end = data.find(b"\n", pos)
            if end < 0:
                raise PgmError(f"{name}: truncated PGM header (unterminated comment)")
            pos = end + 1
        elif c.isdigit():
            start = pos
            while pos < n and data[pos : pos + 1].isdigit():
                pos += 1
                if pos - start > 9:
                    raise PgmError(f"{name}: PGM header number too long")
            fields.append(int(data[start:pos]))
        else:
            raise PgmError(f"{name}: unexpected byte {c!r} in PGM header")
    if pos >= n or not data[pos : pos + 1].isspace():
        raise PgmError(f"{name}: truncated PGM header (no whitespace after maxval)")
    pos += 1  # exactly one whitespace byte separates the header from the raster
    width, height, maxval = fields
    if maxval != 255:
        raise PgmError(f"{name}: maxval {maxval}, expected 255 (8-bit)")
    if width <= 0 or height <= 0:
        raise PgmError(f"{name}: invalid size {width}x{height}")
    if expect_size is not None and (width, height) != (expect_size, expect_size):
        raise PgmError(f"{name}: size {width}x{height}, expected {expect_size}x{expect_size}")
    expected = width * height
    raster = data[pos:]
    if len(raster) < expected:
        raise PgmError(f"{name}: truncated raster ({len(raster)} of {expected} bytes)")
    if len(raster) > expected:
        raise PgmError(f"{name}: {len(raster) - expected} unexpected bytes after the raster")
    # Copy so that the caller can never write through to a shared buffer.
    return np.frombuffer(raster, dtype=np.uint8).reshape(height, width).copy()


def read_pgm(path: str | os.PathLike, expect_size: int | None = IMAGE_SIZE) -> np.ndarray:
    """Read a binary 8-bit PGM file into a `uint8` array, with a clear error on bad input."""
    path = Path(path)
    if not path.is_file():
        raise PgmError(f"{path}: file not found")
    return parse_pgm(path.read_bytes(), name=str(path), expect_size=expect_size)


# --------------------------------------------------------------------------- annotations

_REFNUM = re.compile(r"^mdb(\d{3})$")
_INT = re.compile(r"^\d+$")


@dataclass(frozen=True)
class _Row:
    refnum: str
    tissue: str
    abnormality: str
    severity: str | None
    x: float
    y: float
    radius: float


def _parse_row(line: str, lineno: int, source: str) -> _Row:
    where = f"{source}:{lineno}"
    text = line.strip()
    # '*NOTE 3*' stands where the coordinates would be (widely distributed calcifications).
    note = "*NOTE 3*" in text
    tokens = text.replace("*NOTE 3*", " ").split()
    if not tokens or not _REFNUM.match(tokens[0]):
        raise AnnotationError(f"{where}: malformed row {line.rstrip()!r} (expected 'mdbNNN ...')")
    refnum = tokens[0]
    if refnum not in REFNUMS:
        raise AnnotationError(f"{where}: reference number {refnum} outside mdb001..mdb{N_IMAGES:03d}")
    if len(tokens) < 3:
        raise AnnotationError(f"{where}: row {line.rstrip()!r} has {len(tokens)} fields, expected at least 3")
    tissue, abnormality = tokens[1], tokens[2]
    if tissue not in TISSUES:
        raise AnnotationError(f"{where}: unknown tissue code {tissue!r} (expected one of {sorted(TISSUES)})")
    if abnormality not in ABNORMALITIES:
        raise AnnotationError(f"{where}: unknown abnormality class {abnormality!r} (expected one of {ABNORMALITIES})")
    rest = tokens[3:]
    if abnormality == "NORM":
        if rest or note:
            raise AnnotationError(f"{where}: normal film with extra fields {rest!r}")
        return _Row(refnum, tissue, abnormality, None, np.nan, np.nan, np.nan)
    if not rest:
        raise AnnotationError(f"{where}: abnormality {abnormality} without a severity")
    severity, coords = rest[0], rest[1:]
    if severity not in SEVERITIES:
        raise AnnotationError(f"{where}: unknown severity {severity!r} (expected B or M)")
    if not coords:
        return _Row(refnum, tissue, abnormality, severity, np.nan, np.nan, np.nan)
    if note or len(coords) != 3 or not all(_INT.match(c) for c in coords):
        raise AnnotationError(f"{where}: expected 'x y radius' as integers, got {coords!r}")
    x, y_table, radius = (int(c) for c in coords)
    if not (0 <= x <= IMAGE_SIZE and 0 <= y_table <= IMAGE_SIZE and 0 < radius <= IMAGE_SIZE):
        raise AnnotationError(f"{where}: location ({x}, {y_table}, r={radius}) outside the image")
    # The table's origin is the bottom-left corner; ours is the top-left.
    return _Row(refnum, tissue, abnormality, severity, float(x), float(IMAGE_SIZE - y_table), float(radius))


def parse_info(text: str, source: str = "Info.txt") -> pd.DataFrame:
    """Parse the text of Info.txt into the lesion table (one row per lesion or normal film)."""
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        # The free-text header and footer never start with a reference number.
        if line.lstrip().lower().startswith("mdb"):
            rows.append(_parse_row(line, lineno, source))
    if not rows:
        raise AnnotationError(f"{source}: no annotation rows found")
    df = pd.DataFrame([r.__dict__ for r in rows])
    missing = sorted(set(REFNUMS) - set(df["refnum"]))
    if missing:
        raise AnnotationError(f"{source}: {len(missing)} films have no row, e.g. {missing[:5]}")
    for refnum, group in df.groupby("refnum"):
        if (group["abnormality"] == "NORM").any() and len(group) > 1:
            raise AnnotationError(f"{source}: {refnum} is listed both as normal and with a lesion")
        if group["tissue"].nunique() > 1:
            raise AnnotationError(f"{source}: {refnum} has conflicting tissue codes")
    num = df["refnum"].str[3:].astype(int)
    df.insert(1, "patient_id", (num + 1) // 2)
    df.insert(2, "side", np.where(num % 2 == 0, "left", "right"))
    df["has_location"] = df["x"].notna()
    # An image holding both a benign and a malignant lesion takes the worse label.
    sev_rank = df["severity"].map({"B": 1, "M": 2}).fillna(0).astype(int)
    image_rank = sev_rank.groupby(df["refnum"]).transform("max")
    df["label"] = image_rank.map(dict(enumerate(CLASSES)))
    df["label_id"] = image_rank
    return df[list(COLUMNS)].reset_index(drop=True)


def images_table(annotations: pd.DataFrame) -> pd.DataFrame:
    """One row per film: refnum, patient_id, side, tissue, label, label_id, n_lesions."""
    lesions = annotations["abnormality"] != "NORM"
    grouped = annotations.groupby("refnum", sort=True)
    table = grouped[["patient_id", "side", "tissue", "label", "label_id"]].first()
    table["n_lesions"] = lesions.groupby(annotations["refnum"]).sum()
    table["n_located"] = annotations["has_location"].groupby(annotations["refnum"]).sum()
    return table.reset_index()


def lesion_boxes(annotations: pd.DataFrame, refnum: str) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth boxes `[ymin, xmin, ymax, xmax]` (pixels) and labels of a film's located lesions."""
    rows = annotations[(annotations["refnum"] == refnum) & annotations["has_location"]]
    if rows.empty:
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.int32)
    x, y, r = rows["x"].to_numpy(), rows["y"].to_numpy(), rows["radius"].to_numpy()
    boxes = np.stack([y - r, x - r, y + r, x + r], axis=1).clip(0, IMAGE_SIZE).astype(np.float32)
    labels = rows["severity"].map({"B": 1, "M": 2}).to_numpy(np.int32)
    return boxes, labels


# --------------------------------------------------------------------------- fetch and verify


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest() -> dict[str, str]:
    """The shipped per-file sha256 manifest of the 322 films (hashes only, no image data)."""
    manifest = {}
    for line in MANIFEST.read_text().splitlines():
        digest, name = line.split()
        manifest[name] = digest
    return manifest


def verify_folder(folder: str | os.PathLike, check_hashes: bool = True) -> Path:
    """Check that a folder holds Info.txt and the 322 valid films (and, by default, their sha256)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArchiveError(f"{folder}: not a folder")
    if not (folder / "Info.txt").is_file():
        raise AnnotationError(f"{folder / 'Info.txt'}: file not found")
    missing = [r for r in REFNUMS if not (folder / f"{r}.pgm").is_file()]
    if missing:
        raise ArchiveError(f"{folder}: {len(missing)} films missing, e.g. {missing[:5]}")
    manifest = load_manifest() if check_hashes else {}
    for refnum in REFNUMS:
        path = folder / f"{refnum}.pgm"
        if check_hashes:
            if _sha256(path) != manifest[path.name]:
                # Decode first: a decoding error says more than a hash mismatch.
                read_pgm(path)
                raise ArchiveError(f"{path}: sha256 differs from the shipped manifest")
        elif path.stat().st_size != IMAGE_SIZE * IMAGE_SIZE + 15:
            read_pgm(path)
    return folder


def safe_extract(archive: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Extract a tar archive into `target`, refusing members that could escape it or are not plain files."""
    archive, target = Path(archive), Path(target)
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for m in members:
                name = m.name
                parts = Path(name).parts
                if name.startswith(("/", "\\")) or ".." in parts or Path(name).is_absolute():
                    raise ArchiveError(f"{archive}: unsafe member path {name!r}")
                if not (m.isfile() or m.isdir()):
                    raise ArchiveError(f"{archive}: member {name!r} is a link or special file")
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
            try:
                # The 'data' filter is a second line of defence behind the checks above.
                tar.extractall(tmp, members=members, filter="data")
                if target.exists():
                    shutil.rmtree(target)
                os.replace(tmp, target)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ArchiveError(f"{archive}: cannot be read as a tar archive ({err})") from err
    return target


def cache_dir() -> Path:
    """Where the archive and the extracted films are cached (`$MAMMO_TF_CACHE` or Keras's datasets folder)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import keras

    return Path(keras.config.keras_home() if hasattr(keras.config, "keras_home") else "~/.keras").expanduser() / "datasets"


def _origin(data: str | os.PathLike | None) -> str:
    source = data if data is not None else os.environ.get(DATA_ENV) or ORIGIN
    source = str(source)
    if "://" in source:
        return source
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise ArchiveError(f"{path}: data source not found (set --data or ${DATA_ENV} to the archive or folder)")
    return path.as_uri()


def fetch(data: str | os.PathLike | None = None, verify_hashes: bool = False) -> Path:
    """Fetch, check and extract mini-MIAS once; return the folder holding Info.txt and the films."""
    source = data if data is not None else (os.environ.get(DATA_ENV) or None)
    if source is not None and Path(str(source)).expanduser().is_dir():
        return verify_folder(Path(str(source)).expanduser(), check_hashes=verify_hashes)
    root = cache_dir() / "mini-mias"
    folder = root / "all-mias"
    marker = folder / _VERIFIED_MARKER
    if marker.is_file() and marker.read_text().strip() == ARCHIVE_SHA256:
        # Checked once per process: a per-film call must not re-stat 322 files.
        if not verify_hashes and _VERIFIED_IN_PROCESS.get(folder) == marker.stat().st_mtime_ns:
            return folder
        try:
            verify_folder(folder, check_hashes=verify_hashes)
            _VERIFIED_IN_PROCESS[folder] = marker.stat().st_mtime_ns
            return folder
        except MiasError:
            _VERIFIED_IN_PROCESS.pop(folder, None)  # a damaged cache is rebuilt from the archive below
    import keras

    root.mkdir(parents=True, exist_ok=True)
    try:
        archive = keras.utils.get_file(
            fname=ARCHIVE_NAME, origin=_origin(data), file_hash=ARCHIVE_SHA256,
            hash_algorithm="sha256", cache_dir=str(root), cache_subdir=".",
        )
    except ValueError as err:
        raise ArchiveError(f"{source or ORIGIN}: sha256 differs from {ARCHIVE_SHA256} ({err})") from err
    except Exception as err:  # urllib raises several types; the user needs one message
        raise ArchiveError(f"cannot fetch mini-MIAS from {source or ORIGIN}: {err}") from err
    safe_extract(archive, folder)
    verify_folder(folder, check_hashes=True)
    (folder / _VERIFIED_MARKER).write_text(ARCHIVE_SHA256 + "\n")
    _VERIFIED_IN_PROCESS[folder] = marker.stat().st_mtime_ns
    return folder


# --------------------------------------------------------------------------- public entry points


@lru_cache(maxsize=4)
def _annotations_cached(folder: str) -> pd.DataFrame:
    info = Path(folder) / "Info.txt"
    if not info.is_file():
        raise AnnotationError(f"{info}: file not found")
    return parse_info(info.read_text(errors="replace"), source=str(info))


def load_annotations(data: str | os.PathLike | None = None) -> pd.DataFrame:
    """The annotation table, one row per lesion (normal films one row), x/y top-left."""
    return _annotations_cached(str(fetch(data))).copy()


def load_image(refnum: str, data: str | os.PathLike | None = None) -> np.ndarray:
    """One mini-MIAS film as a 1024x1024 `uint8` array."""
    if refnum not in REFNUMS:
        raise MiasError(f"unknown reference number {refnum!r} (expected mdb001..mdb{N_IMAGES:03d})")
    return read_pgm(fetch(data) / f"{refnum}.pgm")


def summary(annotations: pd.DataFrame) -> dict:
    """Counts that describe the parsed database (images, patients, rows, labels, locations)."""
    images = images_table(annotations)
    lesions = annotations[annotations["abnormality"] != "NORM"]
    return {
        "images": int(len(images)),
        "patients": int(images["patient_id"].nunique()),
        "table_rows": int(len(annotations)),
        "image_labels": {c: int((images["label"] == c).sum()) for c in CLASSES},
        "lesion_rows": int(len(lesions)),
        "lesions_with_location": int(lesions["has_location"].sum()),
        "lesions_without_location": sorted(lesions.loc[~lesions["has_location"], "refnum"].tolist()),
        "images_with_several_lesions": sorted(images.loc[images["n_lesions"] > 1, "refnum"].tolist()),
        "abnormality": {k: int(v) for k, v in lesions["abnormality"].value_counts().sort_index().items()},
        "severity_rows": {SEVERITIES[k]: int(v) for k, v in lesions["severity"].value_counts().sort_index().items()},
        "tissue": {TISSUES[k]: int(v) for k, v in images["tissue"].value_counts().sort_index().items()},
    }
