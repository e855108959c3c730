"""The mini-MIAS data layer: exact parser counts, quirks, orientation, readers and bad input."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mammo_tf.data import mias

# --------------------------------------------------------------------------- exact facts


def test_exact_counts(annotations):
    s = mias.summary(annotations)
    assert s["images"] == 322
    assert s["patients"] == 161
    assert s["table_rows"] == 330
    assert s["image_labels"] == {"normal": 207, "benign": 63, "malignant": 52}
    assert s["lesion_rows"] == 123
    assert s["lesions_with_location"] == 119
    assert s["lesions_without_location"] == ["mdb059", "mdb216", "mdb233", "mdb245"]
    assert s["images_with_several_lesions"] == ["mdb005", "mdb132", "mdb144", "mdb223", "mdb226", "mdb239", "mdb249"]
    assert s["severity_rows"] == {"benign": 69, "malignant": 54}


def test_columns_and_patients(annotations):
    assert list(annotations.columns) == list(mias.COLUMNS)
    row1 = annotations[annotations.refnum == "mdb001"].iloc[0]
    row2 = annotations[annotations.refnum == "mdb002"].iloc[0]
    assert (row1.patient_id, row1.side) == (1, "right")
    assert (row2.patient_id, row2.side) == (1, "left")
    assert annotations.groupby("patient_id")["refnum"].nunique().eq(2).all()


def test_quirk_rows(annotations):
    note3 = annotations[annotations.refnum.isin(["mdb216", "mdb233", "mdb245"])]
    assert (note3.abnormality == "CALC").all() and (note3.severity == "M").all()
    assert not note3.has_location.any() and note3.x.isna().all()
    mdb059 = annotations[annotations.refnum == "mdb059"].iloc[0]
    assert (mdb059.abnormality, mdb059.severity, mdb059.has_location) == ("CIRC", "B", False)
    assert len(annotations[annotations.refnum == "mdb005"]) == 2
    normal = annotations[annotations.refnum == "mdb003"].iloc[0]
    assert normal.label == "normal" and pd.isna(normal.severity) and not normal.has_location


def test_bottom_left_origin_is_flipped(annotations):
    # Info.txt: "mdb028 F CIRC M 338 314 56" and "mdb184 F SPIC M 352 624 114".
    r028 = annotations[annotations.refnum == "mdb028"].iloc[0]
    r184 = annotations[annotations.refnum == "mdb184"].iloc[0]
    assert (r028.x, r028.y, r028.radius) == (338, 1024 - 314, 56)
    assert (r184.x, r184.y, r184.radius) == (352, 1024 - 624, 114)
    yy, xx = np.mgrid[:1024, :1024]
    for row in (r028, r184):
        image = mias.load_image(row.refnum).astype(float)

        def contrast(cy: float) -> float:
            d2 = (xx - row.x) ** 2 + (yy - cy) ** 2
            return image[d2 <= row.radius**2].mean() - image[(d2 > row.radius**2) & (d2 <= 4 * row.radius**2)].mean()

        # The masses are brighter than their surroundings at the flipped centre, not at the raw one.
        assert contrast(row.y) > 30
        assert contrast(1024 - row.y) < contrast(row.y) - 20


def test_worse_label_wins():
    text = "mdb001 G CIRC B 10 10 5\nmdb001 G SPIC M 20 20 5\n" + "".join(
        f"mdb{i:03d} G NORM\n" for i in range(2, 323)
    )
    df = mias.parse_info(text)
    assert set(df[df.refnum == "mdb001"].label) == {"malignant"}
    assert mias.images_table(df).set_index("refnum").loc["mdb001", "n_lesions"] == 2


def test_lesion_boxes(annotations):
    boxes, labels = mias.lesion_boxes(annotations, "mdb028")
    np.testing.assert_allclose(boxes, [[710 - 56, 338 - 56, 710 + 56, 338 + 56]])
    assert labels.tolist() == [2]
    boxes, labels = mias.lesion_boxes(annotations, "mdb059")
    assert boxes.shape == (0, 4) and labels.shape == (0,)


def test_reader_matches_opencv():
    folder = mias.fetch()
    ours = mias.read_pgm(folder / "mdb001.pgm")
    ref = cv2.imread(str(folder / "mdb001.pgm"), cv2.IMREAD_UNCHANGED)
    assert ours.dtype == np.uint8 and ours.shape == (1024, 1024)
    np.testing.assert_array_equal(ours, ref)


def test_manifest_covers_every_film():
    manifest = mias.load_manifest()
    assert sorted(manifest) == [f"{r}.pgm" for r in mias.REFNUMS]
    assert all(len(h) == 64 for h in manifest.values())


# --------------------------------------------------------------------------- bad input


def _pgm(width: int = 1024, height: int = 1024, maxval: int = 255, magic: bytes = b"P5", raster: bytes | None = None) -> bytes:
    raster = bytes(width * height) if raster is None else raster
    return magic + f"\n{width} {height}\n{maxval}\n".encode() + raster


@pytest.mark.parametrize(
    "data, message",
    [
        (_pgm()[:-10], "truncated raster"),
        (_pgm(magic=b"P2"), "not a binary PGM"),
        (_pgm(512, 512), "size 512x512"),
        (_pgm(maxval=65535), "maxval 65535"),
        (b"P5\n1024", "truncated PGM header"),
        (_pgm() + b"xx", "unexpected bytes"),
    ],
)
def test_bad_pgm_is_a_clear_error(tmp_path, data, message):
    path = tmp_path / "bad.pgm"
    path.write_bytes(data)
    with pytest.raises(mias.PgmError, match=message) as err:
        mias.read_pgm(path)
    assert "bad.pgm" in str(err.value)
    assert path.read_bytes() == data  # the input is never modified


def test_missing_pgm(tmp_path):
    with pytest.raises(mias.PgmError, match="file not found"):
        mias.read_pgm(tmp_path / "mdb999.pgm")


def test_pgm_with_comment_parses():
    image = mias.parse_pgm(b"P5\n# made by hand\n2 2\n255\n\x00\x01\x02\x03", expect_size=None)
    np.testing.assert_array_equal(image, [[0, 1], [2, 3]])


@pytest.mark.parametrize(
    "row, message",
    [
        ("mdb001 X CIRC B 1 2 3", "unknown tissue code"),
        ("mdb001 G BLOB B 1 2 3", "unknown abnormality class"),
        ("mdb001 G CIRC Q 1 2 3", "unknown severity"),
        ("mdb001 G CIRC B 1 2", "expected 'x y radius'"),
        ("mdb001 G CIRC B 1 two 3", "expected 'x y radius'"),
        ("mdb001 G CIRC", "without a severity"),
        ("mdb999 G NORM", "outside mdb001"),
        ("mdbXYZ G NORM", "malformed row"),
        ("mdb001 G NORM B", "extra fields"),
    ],
)
def test_malformed_rows(row, message):
    text = "header\n" + row + "\n" + "".join(f"mdb{i:03d} G NORM\n" for i in range(2, 323))
    with pytest.raises(mias.AnnotationError, match=message) as err:
        mias.parse_info(text, source="Info.txt")
    assert "Info.txt:2" in str(err.value)


def test_missing_film_rows():
    with pytest.raises(mias.AnnotationError, match="have no row"):
        mias.parse_info("mdb001 G NORM\n")


def test_missing_info_in_folder(tmp_path):
    with pytest.raises(mias.AnnotationError, match="Info.txt: file not found"):
        mias.verify_folder(tmp_path)


def _tar(path: Path, members: list[tarfile.TarInfo], payload: bytes = b"x") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for m in members:
            tar.addfile(m, io.BytesIO(payload) if m.isfile() else None)
    return path


def _file(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 1
    return info


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize(
    "member, message",
    [
        (_file("../escape.txt"), "unsafe member path"),
        (_file("/etc/evil.txt"), "unsafe member path"),
        (_file("ok/../../escape.txt"), "unsafe member path"),
        (_link("link", "/etc/passwd"), "link or special file"),
        (_link("hard", "mdb001.pgm", tarfile.LNKTYPE), "link or special file"),
    ],
)
def test_unsafe_archive_is_refused(tmp_path, member, message):
    archive = _tar(tmp_path / "crafted.tar.gz", [_file("Info.txt"), member])
    target = tmp_path / "out" / "all-mias"
    target.parent.mkdir()
    with pytest.raises(mias.ArchiveError, match=message):
        mias.safe_extract(archive, target)
    assert not target.exists() and list(target.parent.iterdir()) == []
    assert not (tmp_path / "escape.txt").exists()


def test_not_an_archive(tmp_path):
    bogus = tmp_path / "bogus.tar.gz"
    bogus.write_bytes(b"this is not a tar file")
    with pytest.raises(mias.ArchiveError, match="cannot be read as a tar archive"):
        mias.safe_extract(bogus, tmp_path / "x")


def test_wrong_checksum(tmp_path, monkeypatch):
    archive = _tar(tmp_path / "all-mias.tar.gz", [_file("Info.txt")])
    monkeypatch.setenv(mias.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(mias.ArchiveError, match="sha256"):
        mias.fetch(archive)
    assert not (tmp_path / "cache" / "mini-mias" / "all-mias").exists()
    assert archive.is_file()


def test_missing_source(tmp_path, monkeypatch):
    monkeypatch.setenv(mias.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(mias.ArchiveError, match="data source not found"):
        mias.fetch(tmp_path / "nowhere.tar.gz")


def test_unknown_refnum():
    with pytest.raises(mias.MiasError, match="unknown reference number"):
        mias.load_image("mdb400")


def test_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv(mias.CACHE_ENV, str(tmp_path / "cache"))
    folder = mias.fetch()
    film = folder / "mdb007.pgm"
    original = film.read_bytes()
    film.write_bytes(original[:1000])  # a killed copy or a disk error
    mias._VERIFIED_IN_PROCESS.clear()  # the next run is a new process
    assert mias.fetch() == folder
    assert film.read_bytes() == original


def test_interrupted_download_is_fetched_again(tmp_path, monkeypatch):
    """A download killed half-way leaves a partial archive in the cache: the next fetch replaces it."""
    import hashlib

    source = Path(mias._origin(None).removeprefix("file://"))
    monkeypatch.setenv(mias.CACHE_ENV, str(tmp_path / "cache"))
    root = tmp_path / "cache" / "mini-mias"
    root.mkdir(parents=True)
    partial = root / mias.ARCHIVE_NAME
    partial.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    folder = mias.fetch(source)
    assert hashlib.sha256(partial.read_bytes()).hexdigest() == mias.ARCHIVE_SHA256
    assert (folder / "mdb322.pgm").is_file() and len(list(folder.glob("mdb*.pgm"))) == 322


# --------------------------------------------------------------------------- fuzzing


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=64), st.binary(max_size=64).map(lambda b: b"P5" + b)))
def test_fuzz_pgm_never_crashes(data):
    try:
        out = mias.parse_pgm(data, expect_size=None)
    except mias.PgmError:
        return
    assert out.dtype == np.uint8 and out.ndim == 2


_row_tokens = st.lists(
    st.one_of(st.sampled_from(["mdb001", "mdb322", "G", "F", "D", "CIRC", "NORM", "CALC", "B", "M", "*NOTE 3*", "12", "-4"]),
              st.text(max_size=6)),
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_row_tokens.map(" ".join), max_size=6))
def test_fuzz_info_never_crashes(lines):
    text = "\n".join(lines) + "\n" + "".join(f"mdb{i:03d} G NORM\n" for i in range(2, 323))
    try:
        df = mias.parse_info(text)
    except mias.AnnotationError:
        return
    assert df["refnum"].nunique() == 322
