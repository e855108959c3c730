"""External data sets in the mini-MIAS annotation schema: class-per-folder sets and mini-DDSM.

Each adapter returns one row per lesion (or one row per lesion-free image), like
`mammo_tf.data.mias.load_annotations`, with the columns of `COLUMNS`:

- ``image_id`` (unique within the set), ``path``, ``patient_id`` (a string: external ids are not
  integers in general, e.g. DDSM's ``C_0029_1``), ``side`` ('left'/'right') and ``view``
  ('CC'/'MLO') where known (else None);
- ``label`` / ``label_id``: the *image's* label (its worst lesion), ids as in mini-MIAS
  (`LABEL_IDS`): ``normal`` 0, ``benign`` 1, ``malignant`` 2, plus ``negative`` 0 for
  "cancer-negative" images whose benign findings were not separated from normal ones (RSNA);
- ``abnormality`` (DDSM: 'MASS', 'CALC', ...; 'NORM' for a lesion-free film; None when unknown)
  and ``severity`` ('B'/'M'/None) per lesion, as mini-MIAS's columns;
- the lesion box ``ymin, xmin, ymax, xmax`` in the image file's pixel coordinates (top-left
  origin; NaN when the set has no location) and ``has_location``;
- ``spacing_mm`` (pixel size of the image file, NaN when unknown) and ``source``.

rsna-640 (folder adapter, `RSNA_LABEL_MAP`): ``benign/`` holds RSNA's cancer = 0 images, i.e.
cancer-NEGATIVE screening films (normal or benign findings), so it maps to ``negative``
(label_id 0, like a mini-MIAS normal film), never to mini-MIAS's ``benign`` (1, a proven benign
lesion); ``malignant/`` maps to ``malignant`` (2). Compare on "malignant vs the rest" there.

mini-DDSM (`load_ddsm`): lesion outlines are DDSM chain codes at the original scan resolution,
scaled to the distributed JPEG by the image size ratio (exactly 1/2 in the shared sample);
views without an overlay are lesion-free ('normal'). `check_outlines` compares every outline's
box with the box of its mask image.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mammo_tf.imageio import SUPPORTED_EXTENSIONS, read_image
from mammo_tf.metrics.detection import iou_matrix

LABEL_IDS = {"normal": 0, "negative": 0, "benign": 1, "malignant": 2}
LABEL_SEVERITY = {"normal": None, "negative": None, "benign": "B", "malignant": "M"}
SEVERITY_IDS = {"B": 1, "M": 2}
RSNA_LABEL_MAP = {"benign": "negative", "malignant": "malignant"}
RSNA_PATIENT_PATTERN = r"^(\d+)_"

COLUMNS = (
    "image_id", "path", "patient_id", "side", "view", "label", "label_id", "abnormality", "severity",
    "ymin", "xmin", "ymax", "xmax", "has_location", "spacing_mm", "source",
)
DDSM_COLUMNS = COLUMNS + (
    "height", "width", "abnormality_no", "lesion_type", "assessment", "subtlety", "pathology",
    "outline", "mask_path", "digitizer",
)

# DDSM chain code: 0 = north (up), then clockwise in 45 degree steps; (dx, dy) with y downwards.
# Verified on the shared sample: outline boxes match the mask boxes with IoU > 0.97.
CHAIN_DIRECTIONS = np.array([(0, -1), (1, -1), (1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1)], np.int64)
# Scanner pixel size (µm) per DDSM digitiser, used when the .ics line has no RESOLUTION.
DIGITIZER_MICRONS = {"DBA": 42.0, "HOWTEK": 43.5, "LUMISYS": 50.0}
DDSM_PATHOLOGY_LABELS = {"BENIGN": "benign", "BENIGN_WITHOUT_CALLBACK": "benign", "MALIGNANT": "malignant"}
DDSM_LESION_TYPES = {"CALCIFICATION": "CALC", "MASS": "MASS"}
MASK_THRESHOLD = 127  # the masks are JPEG-compressed 0/255 images

_OVERLAY_KEYS = ("TOTAL_ABNORMALITIES", "ABNORMALITY", "LESION_TYPE", "ASSESSMENT", "SUBTLETY",
                 "PATHOLOGY", "TOTAL_OUTLINES", "BOUNDARY", "CORE")
_VIEW = re.compile(r"^(LEFT|RIGHT)_([A-Z]+)$")
_CASE_FILE = re.compile(
    r"^(?P<case>[A-Z]_\d+_\d+)\.(?P<view>(?:LEFT|RIGHT)_[A-Z]+)"
    r"(?:(?P<overlay>\.OVERLAY)|(?P<mask>_(?:MASK(?P<mask_no>\d*)))?\.(?:jpe?g|png))$",
    re.IGNORECASE,
)


class ExternalDataError(ValueError):
    """An external data set has an unexpected layout, file name or annotation (names the file)."""


# --------------------------------------------------------------------------- common


def _frame(rows: list[dict], columns: Sequence[str]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(columns))
    df["label_id"] = df["label_id"].astype(int)
    df["has_location"] = df["has_location"].astype(bool)
    for col in ("ymin", "xmin", "ymax", "xmax", "spacing_mm"):
        df[col] = df[col].astype(float)
    return df


def images_table(annotations: pd.DataFrame) -> pd.DataFrame:
    """One row per image: id, path, patient, side, view, label, spacing, source, lesion counts."""
    keys = ["image_id", "path", "patient_id", "side", "view", "label", "label_id", "spacing_mm", "source"]
    grouped = annotations.groupby("image_id", sort=False)
    table = grouped[keys[1:]].first()
    lesion = annotations["abnormality"].fillna("") != "NORM"
    lesion &= annotations["label"].isin(["benign", "malignant"])
    table["n_lesions"] = lesion.groupby(annotations["image_id"], sort=False).sum()
    table["n_located"] = annotations["has_location"].groupby(annotations["image_id"], sort=False).sum()
    return table.reset_index()


def lesion_boxes(annotations: pd.DataFrame, image_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Boxes `[ymin, xmin, ymax, xmax]` (pixels, float32) and labels (1 benign, 2 malignant) of an image."""
    rows = annotations[(annotations["image_id"] == image_id) & annotations["has_location"]]
    if rows.empty:
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.int32)
    boxes = rows[["ymin", "xmin", "ymax", "xmax"]].to_numpy(np.float32)
    labels = rows["severity"].map(SEVERITY_IDS).to_numpy(np.int32)
    return boxes, labels


# --------------------------------------------------------------------------- class-per-folder sets


def load_folder_dataset(
    root: str | os.PathLike,
    label_map: Mapping[str, str] | None = None,
    patient_pattern: str = RSNA_PATIENT_PATTERN,
    source: str | None = None,
) -> pd.DataFrame:
    """Images in `root/<class folder>/`: label from the folder (via `label_map`), patient from the name."""
    root = Path(root)
    if not root.is_dir():
        raise ExternalDataError(f"{root}: folder not found")
    label_map = dict(RSNA_LABEL_MAP if label_map is None else label_map)
    bad = {k: v for k, v in label_map.items() if v not in LABEL_IDS}
    if bad:
        raise ExternalDataError(f"label_map {bad}: labels must be among {sorted(LABEL_IDS)}")
    pattern = re.compile(patient_pattern)
    if pattern.groups < 1:
        raise ExternalDataError(f"patient_pattern {patient_pattern!r} needs a group capturing the patient id")
    group: int | str = "patient" if "patient" in pattern.groupindex else 1
    source = source or root.name

    rows = []
    # Loose files beside the class folders (a README) are not images of any class.
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in folders if p.name not in label_map]
    if unknown:
        raise ExternalDataError(f"{root}: unknown class folder(s) {unknown}; label_map declares {sorted(label_map)}")
    if not folders:
        raise ExternalDataError(f"{root}: no class folder found (expected {sorted(label_map)})")
    for folder in folders:
        label = label_map[folder.name]
        for path in sorted(folder.iterdir()):
            if path.name.startswith("."):
                continue
            if not path.is_file() or path.suffix.lower() not in SUPPORTED_EXTENSIONS:
                raise ExternalDataError(f"{path}: not an image file (expected one of {', '.join(SUPPORTED_EXTENSIONS)})")
            match = pattern.search(path.name)
            if match is None or not match.group(group):
                raise ExternalDataError(f"{path}: file name does not match patient_pattern {patient_pattern!r}")
            rows.append({
                "image_id": path.stem, "path": str(path), "patient_id": match.group(group),
                "side": None, "view": None, "label": label, "label_id": LABEL_IDS[label],
                "abnormality": None, "severity": LABEL_SEVERITY[label],
                "ymin": np.nan, "xmin": np.nan, "ymax": np.nan, "xmax": np.nan,
                "has_location": False, "spacing_mm": np.nan, "source": source,
            })
    if not rows:
        raise ExternalDataError(f"{root}: no images in {[p.name for p in folders]}")
    df = _frame(rows, COLUMNS)
    dup = df.loc[df["image_id"].duplicated(), "image_id"].tolist()
    if dup:
        raise ExternalDataError(f"{root}: image ids found in more than one file: {dup[:5]}")
    return df


# --------------------------------------------------------------------------- DDSM: .ics and .OVERLAY


def parse_ics(text: str, source: str = "<ics>") -> dict:
    """Parse a DDSM case .ics file: header fields (upper-case keys) and per-view scan geometry."""
    fields: dict[str, str] = {}
    views: dict[str, dict] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        key = tokens[0]
        if _VIEW.match(key):
            where = f"{source}:{lineno}"
            rest = tokens[1:]
            info: dict = {"overlay": False}
            i = 0
            while i < len(rest):
                tok = rest[i]
                if tok in ("OVERLAY", "NON_OVERLAY"):
                    info["overlay"] = tok == "OVERLAY"
                    i += 1
                    continue
                if i + 1 >= len(rest):
                    raise ExternalDataError(f"{where}: {tok} has no value in {line.strip()!r}")
                try:
                    info[tok.lower()] = float(rest[i + 1]) if tok == "RESOLUTION" else int(rest[i + 1])
                except ValueError as exc:
                    raise ExternalDataError(f"{where}: {tok} value {rest[i + 1]!r} is not a number") from exc
                i += 2
            for need in ("lines", "pixels_per_line"):
                if info.get(need, 0) <= 0:
                    raise ExternalDataError(f"{where}: view {key} has no positive {need.upper()}")
            if key in views:
                raise ExternalDataError(f"{where}: view {key} listed twice")
            views[key] = info
        else:
            fields[key.upper()] = " ".join(tokens[1:])
    if "FILENAME" not in fields:
        raise ExternalDataError(f"{source}: no 'filename' line (not a DDSM .ics file?)")
    if not views:
        raise ExternalDataError(f"{source}: no view lines (LEFT_CC LINES ... PIXELS_PER_LINE ...)")
    return {"fields": fields, "views": views}


def decode_chain_code(start_x: int, start_y: int, codes: Sequence[int] | np.ndarray) -> np.ndarray:
    """Outline points `(x, y)` (column, row), shape (n+1, 2), from a start pixel and DDSM chain code."""
    codes = np.asarray(codes)
    if codes.ndim != 1 or codes.size == 0:
        raise ValueError("a chain code needs at least one direction")
    if not np.issubdtype(codes.dtype, np.integer) or codes.min() < 0 or codes.max() > 7:
        raise ValueError(f"chain code directions must be integers 0..7, got {np.unique(codes)[:10]}")
    steps = CHAIN_DIRECTIONS[codes]
    points = np.vstack([[0, 0], np.cumsum(steps, axis=0)]) + np.array([start_x, start_y])
    return points


def _parse_chain(tokens: list[str], where: str) -> tuple[int, int, np.ndarray]:
    if "#" not in tokens:
        raise ExternalDataError(f"{where}: chain code not terminated by '#'")
    end = tokens.index("#")
    if tokens[end + 1:]:
        raise ExternalDataError(f"{where}: unexpected text after the chain code's '#': {tokens[end + 1:end + 4]}")
    body = tokens[:end]
    if len(body) < 3:
        raise ExternalDataError(f"{where}: chain code needs a start column, row and at least one direction")
    try:
        values = [int(t) for t in body]
    except ValueError as exc:
        raise ExternalDataError(f"{where}: non-integer token in chain code ({exc})") from exc
    start_x, start_y, codes = values[0], values[1], np.array(values[2:], np.int64)
    if start_x < 0 or start_y < 0:
        raise ExternalDataError(f"{where}: negative chain code start ({start_x}, {start_y})")
    bad = sorted(set(codes[(codes < 0) | (codes > 7)].tolist()))
    if bad:
        raise ExternalDataError(f"{where}: chain code directions must be 0..7, found {bad[:5]}")
    return start_x, start_y, codes


def parse_overlay(text: str, source: str = "<overlay>") -> list[dict]:
    """Parse a DDSM .OVERLAY file into one dict per abnormality (outlines as (x0, y0, codes))."""
    lines = text.replace("#", " # ").splitlines()
    total: int | None = None
    abnormalities: list[dict] = []
    current: dict | None = None
    i = 0

    def as_int(value: list[str], key: str, where: str) -> int:
        if len(value) != 1 or not re.fullmatch(r"-?\d+", value[0]):
            raise ExternalDataError(f"{where}: {key} needs one integer, got {' '.join(value)!r}")
        return int(value[0])

    while i < len(lines):
        tokens = lines[i].split()
        where = f"{source}:{i + 1}"
        i += 1
        if not tokens:
            continue
        key, value = tokens[0].upper(), tokens[1:]
        if key not in _OVERLAY_KEYS:
            raise ExternalDataError(f"{where}: unknown overlay keyword {tokens[0]!r}")
        if key == "TOTAL_ABNORMALITIES":
            if total is not None:
                raise ExternalDataError(f"{where}: TOTAL_ABNORMALITIES given twice")
            total = as_int(value, key, where)
            continue
        if total is None:
            raise ExternalDataError(f"{where}: {key} before TOTAL_ABNORMALITIES")
        if key == "ABNORMALITY":
            number = as_int(value, key, where)
            if number != len(abnormalities) + 1:
                raise ExternalDataError(f"{where}: ABNORMALITY {number}, expected {len(abnormalities) + 1}")
            current = {"abnormality_no": number, "lesion_type": [], "outlines": {}, "source": source}
            abnormalities.append(current)
            continue
        if current is None:
            raise ExternalDataError(f"{where}: {key} before the first ABNORMALITY")
        if key == "LESION_TYPE":
            if not value:
                raise ExternalDataError(f"{where}: empty LESION_TYPE")
            current["lesion_type"].append(" ".join(value))
        elif key in ("ASSESSMENT", "SUBTLETY", "TOTAL_OUTLINES"):
            current[key.lower()] = as_int(value, key, where)
        elif key == "PATHOLOGY":
            if len(value) != 1:
                raise ExternalDataError(f"{where}: PATHOLOGY needs one word, got {' '.join(value)!r}")
            current["pathology"] = value[0].upper()
        else:  # BOUNDARY / CORE: the chain code follows, possibly over several lines, up to '#'
            chain = list(value)
            if not chain:
                where = f"{source}:{i + 1}"  # errors point at the chain's first line
            while "#" not in chain and i < len(lines):
                chain.extend(lines[i].split())
                i += 1
            current["outlines"][key] = _parse_chain(chain, where)
    if total is None:
        raise ExternalDataError(f"{source}: no TOTAL_ABNORMALITIES line")
    if len(abnormalities) != total:
        raise ExternalDataError(f"{source}: TOTAL_ABNORMALITIES {total} but {len(abnormalities)} ABNORMALITY blocks")
    for ab in abnormalities:
        where = f"{source}: ABNORMALITY {ab['abnormality_no']}"
        for need in ("lesion_type", "assessment", "subtlety", "pathology", "total_outlines"):
            if ab.get(need) in (None, []):
                raise ExternalDataError(f"{where} has no {need.upper()}")
        if "BOUNDARY" not in ab["outlines"]:
            raise ExternalDataError(f"{where} has no BOUNDARY outline")
        if len(ab["outlines"]) != ab["total_outlines"]:
            raise ExternalDataError(
                f"{where}: TOTAL_OUTLINES {ab['total_outlines']} but {len(ab['outlines'])} outline(s)")
    return abnormalities


def outline_box(points: np.ndarray, scale_x: float = 1.0, scale_y: float = 1.0) -> np.ndarray:
    """Box `[ymin, xmin, ymax, xmax]` covering outline pixels `(x, y)`, scaled to another resolution."""
    points = np.asarray(points, np.float64)
    # Pixel (x, y) covers [x, x+1) x [y, y+1): the box ends one pixel past the last index.
    return np.array([points[:, 1].min() * scale_y, points[:, 0].min() * scale_x,
                     (points[:, 1].max() + 1) * scale_y, (points[:, 0].max() + 1) * scale_x])


def _ddsm_spacing_mm(ics: dict, view: str, where: str) -> float:
    resolution = ics["views"][view].get("resolution")
    if resolution is None:
        digitizer = ics["fields"].get("DIGITIZER", "").upper()
        matches = [um for name, um in DIGITIZER_MICRONS.items() if digitizer.startswith(name)]
        if not matches:
            raise ExternalDataError(f"{where}: no RESOLUTION and unknown DIGITIZER {digitizer!r}")
        resolution = matches[0]
    if not resolution > 0:
        raise ExternalDataError(f"{where}: invalid RESOLUTION {resolution}")
    return float(resolution) / 1000.0


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            width, height = im.size
    except (UnidentifiedImageError, OSError) as exc:
        raise ExternalDataError(f"{path}: cannot read the image size ({exc})") from exc
    return height, width


def _ddsm_case(ics_path: Path, source: str, pathology_map: Mapping[str, str]) -> list[dict]:
    ics = parse_ics(ics_path.read_text(errors="replace"), str(ics_path))
    # The .ics names the case 'C-0029-1'; its image files are 'C_0029_1.<VIEW>.jpg'.
    case = ics["fields"]["FILENAME"].strip().replace("-", "_")
    if not re.fullmatch(r"[A-Z]_\d+_\d+", case, re.IGNORECASE):
        raise ExternalDataError(f"{ics_path}: unexpected case name {ics['fields']['FILENAME']!r}")
    images: dict[str, Path] = {}
    overlays: dict[str, Path] = {}
    masks: dict[tuple[str, int], Path] = {}
    for path in sorted(ics_path.parent.iterdir()):
        if path == ics_path or path.name.startswith("."):
            continue
        m = _CASE_FILE.match(path.name)
        if m is None or m.group("case").upper() != case.upper():
            raise ExternalDataError(f"{path}: unexpected file in DDSM case {case} "
                                    f"(expected {case}.<VIEW>.jpg, _Mask.jpg, _MASK<n>.jpg or .OVERLAY)")
        view = m.group("view").upper()
        if m.group("overlay"):
            overlays[view] = path
        elif m.group("mask"):
            masks[(view, int(m.group("mask_no") or 1))] = path
        else:
            if view in images:
                raise ExternalDataError(f"{path}: second image for view {view} ({images[view].name})")
            images[view] = path
    for view in sorted(set(images) | set(overlays) | {v for v, _ in masks}):
        if view not in ics["views"]:
            raise ExternalDataError(f"{ics_path}: files for view {view} but the .ics does not list it")
    rows = []
    for view, geometry in ics["views"].items():
        where = f"{ics_path} ({view})"
        if view not in images:
            raise ExternalDataError(f"{where}: the .ics lists the view but {case}.{view}.jpg is missing")
        if geometry["overlay"] != (view in overlays):
            state = "OVERLAY" if geometry["overlay"] else "NON_OVERLAY"
            raise ExternalDataError(f"{where}: .ics says {state} but the .OVERLAY file is "
                                    f"{'missing' if geometry['overlay'] else 'present'}")
        path = images[view]
        height, width = _image_size(path)
        scale_y, scale_x = height / geometry["lines"], width / geometry["pixels_per_line"]
        if abs(scale_x - scale_y) > 0.01 * max(scale_x, scale_y):
            raise ExternalDataError(f"{path}: image {width}x{height} is not a uniform rescaling of the "
                                    f"{geometry['pixels_per_line']}x{geometry['lines']} scan in the .ics")
        scale = (scale_x + scale_y) / 2
        side, short_view = _VIEW.match(view).groups()
        base = {
            "image_id": f"{case}.{view}", "path": str(path), "patient_id": case,
            "side": side.lower(), "view": short_view, "spacing_mm": _ddsm_spacing_mm(ics, view, where) / scale,
            "source": source, "height": height, "width": width,
            "digitizer": ics["fields"].get("DIGITIZER") or None,
        }
        if view not in overlays:
            rows.append({**base, "label": "normal", "label_id": 0, "abnormality": "NORM", "severity": None,
                         "ymin": np.nan, "xmin": np.nan, "ymax": np.nan, "xmax": np.nan, "has_location": False,
                         "abnormality_no": pd.NA, "lesion_type": None, "assessment": pd.NA, "subtlety": pd.NA,
                         "pathology": None, "outline": None, "mask_path": None})
            continue
        abnormalities = parse_overlay(overlays[view].read_text(errors="replace"), str(overlays[view]))
        extra = sorted(n for v, n in masks if v == view and not 1 <= n <= len(abnormalities))
        if extra:
            raise ExternalDataError(f"{where}: mask number(s) {extra} but only {len(abnormalities)} abnormalities")
        for ab in abnormalities:
            pathology = ab["pathology"]
            if pathology not in pathology_map:
                raise ExternalDataError(f"{overlays[view]}: ABNORMALITY {ab['abnormality_no']} has pathology "
                                        f"{pathology!r}, not in the pathology map {sorted(pathology_map)}")
            label = pathology_map[pathology]
            x0, y0, codes = ab["outlines"]["BOUNDARY"]
            points = decode_chain_code(x0, y0, codes)
            box = outline_box(points, scale_x, scale_y)
            if box[0] < 0 or box[1] < 0 or box[2] > height + 1 or box[3] > width + 1:
                raise ExternalDataError(f"{overlays[view]}: ABNORMALITY {ab['abnormality_no']} outline box "
                                        f"{np.round(box, 1).tolist()} leaves the {width}x{height} image")
            box = np.clip(box, 0, [height, width, height, width])
            kinds = list(dict.fromkeys(DDSM_LESION_TYPES.get(t.split()[0].upper(), t.split()[0].upper())
                                       for t in ab["lesion_type"]))
            mask = masks.get((view, ab["abnormality_no"]))
            rows.append({**base, "label": label, "label_id": LABEL_IDS[label], "abnormality": "+".join(kinds),
                         "severity": LABEL_SEVERITY[label],
                         "ymin": box[0], "xmin": box[1], "ymax": box[2], "xmax": box[3], "has_location": True,
                         "abnormality_no": ab["abnormality_no"], "lesion_type": " | ".join(ab["lesion_type"]),
                         "assessment": ab["assessment"], "subtlety": ab["subtlety"], "pathology": pathology,
                         "outline": points * np.array([scale_x, scale_y]),
                         "mask_path": str(mask) if mask else None})
    return rows


def load_ddsm(
    root: str | os.PathLike,
    pathology_map: Mapping[str, str] | None = None,
    source: str | None = None,
) -> pd.DataFrame:
    """mini-DDSM cases under `root` (any depth): one row per outlined lesion or lesion-free view."""
    root = Path(root)
    if not root.is_dir():
        raise ExternalDataError(f"{root}: folder not found")
    pathology_map = dict(DDSM_PATHOLOGY_LABELS if pathology_map is None else pathology_map)
    bad = {k: v for k, v in pathology_map.items() if v not in ("benign", "malignant")}
    if bad:
        raise ExternalDataError(f"pathology_map {bad}: lesion labels must be 'benign' or 'malignant'")
    source = source or root.name
    ics_files = sorted(root.rglob("*.ics"))
    if not ics_files:
        raise ExternalDataError(f"{root}: no DDSM case (.ics file) found")
    folders = [p.parent for p in ics_files]
    doubled = sorted({str(f) for f in folders if folders.count(f) > 1})
    if doubled:
        raise ExternalDataError(f"{doubled[0]}: more than one .ics file in a case folder")
    # Every folder holding DDSM files must have its .ics: a case without one cannot be scaled.
    orphan = sorted({p.parent for p in root.rglob("*") if p.is_file() and _CASE_FILE.match(p.name)} - set(folders))
    if orphan:
        raise ExternalDataError(f"{orphan[0]}: DDSM case files but no .ics file")
    rows = [row for ics in ics_files for row in _ddsm_case(ics, source, pathology_map)]
    df = _frame(rows, DDSM_COLUMNS)
    # As in mini-MIAS, every row of an image carries the image's label: its worst lesion.
    worst = df.groupby("image_id", sort=False)["label_id"].transform("max")
    df["label_id"] = worst.astype(int)
    df["label"] = worst.map({0: "normal", 1: "benign", 2: "malignant"})
    for col in ("abnormality_no", "assessment", "subtlety"):
        df[col] = df[col].astype("Int64")
    return df


def mask_box(path: str | os.PathLike) -> np.ndarray:
    """Box `[ymin, xmin, ymax, xmax]` (pixels, end exclusive) of the bright pixels of a mask image."""
    mask = read_image(path) > MASK_THRESHOLD
    if not mask.any():
        raise ExternalDataError(f"{path}: mask has no pixel above {MASK_THRESHOLD}")
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return np.array([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1], np.float64)


def check_outlines(ddsm: pd.DataFrame) -> pd.DataFrame:
    """For each outlined lesion with a mask: the outline box, the mask box and their IoU."""
    rows = []
    for row in ddsm[ddsm["mask_path"].notna()].itertuples(index=False):
        outline = np.array([row.ymin, row.xmin, row.ymax, row.xmax])
        mask = mask_box(row.mask_path)
        rows.append({"image_id": row.image_id, "abnormality_no": row.abnormality_no, "mask_path": row.mask_path,
                     **{f"outline_{k}": v for k, v in zip(("ymin", "xmin", "ymax", "xmax"), outline)},
                     **{f"mask_{k}": v for k, v in zip(("ymin", "xmin", "ymax", "xmax"), mask)},
                     "iou": float(iou_matrix(outline[None], mask[None])[0, 0])})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- dispatcher

ADAPTERS: dict[str, Callable[..., pd.DataFrame]] = {"folder": load_folder_dataset, "ddsm": load_ddsm}


def load_external(root: str | os.PathLike, adapter: str = "folder", **kwargs) -> pd.DataFrame:
    """Load an external data set with the named adapter ('folder' or 'ddsm')."""
    if adapter not in ADAPTERS:
        raise ValueError(f"unknown adapter {adapter!r}; expected one of {sorted(ADAPTERS)}")
    return ADAPTERS[adapter](root, **kwargs)
