"""mammo_tf.data.external (folder sets, mini-DDSM) and mammo_tf.plots.external."""

from __future__ import annotations

from pathlib import Path

import cv2
import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

from mammo_tf.data import external as ex  # noqa: E402
from mammo_tf.imageio import read_image  # noqa: E402

# Counted once with shell tools on ../shared/data (ls | cut -d_ -f1 | sort -u | wc -l, comm -12).
RSNA_IMAGES = {"negative": 1512, "malignant": 833}
RSNA_PATIENTS = {"negative": 342, "malignant": 350}
RSNA_ALL_PATIENTS = 680
RSNA_PATIENTS_IN_BOTH = 12
# mini-DDSM sample: 10 cases x 4 views = 40 mammograms (the README's "42" counts the two
# *_MASK2.jpg files of case 0236 as images), 20 views with an overlay, 24 outlined
# abnormalities (case 0236: three calcification clusters per right view), 22 mask files.
# Not all masses, as the README says: cases 0238 and 0239 are calcification clusters.
DDSM_CASES, DDSM_IMAGES, DDSM_LESION_VIEWS, DDSM_LESIONS, DDSM_MASKS = 10, 40, 20, 24, 22


# --------------------------------------------------------------------------- folder adapter


def _folder_set(root: Path, layout: dict[str, list[str]]) -> Path:
    for folder, names in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            (root / folder / name).write_bytes(b"")  # the adapter lists files; it never decodes them
    (root / "README.md").write_text("loose files beside the class folders are ignored\n")
    return root


def test_folder_labels_and_patients(tmp_path):
    root = _folder_set(tmp_path / "set", {
        "benign": ["12_345_png.rf.aa.jpg", "12_346_png.rf.bb.jpg", "7_1_png.rf.cc.jpg"],
        "malignant": ["12_999_png.rf.dd.jpg"],
    })
    df = ex.load_folder_dataset(root)
    assert list(df.columns) == list(ex.COLUMNS)
    assert df["image_id"].tolist() == ["12_345_png.rf.aa", "12_346_png.rf.bb", "7_1_png.rf.cc", "12_999_png.rf.dd"]
    assert df["patient_id"].tolist() == ["12", "12", "7", "12"]
    assert df["label"].tolist() == ["negative"] * 3 + ["malignant"]
    assert df["label_id"].tolist() == [0, 0, 0, 2]
    assert df["severity"].isna().tolist() == [True, True, True, False]
    assert df.loc[3, "severity"] == "M"
    assert not df["has_location"].any() and df[["ymin", "xmin", "ymax", "xmax"]].isna().all().all()
    assert (df["source"] == "set").all() and df["spacing_mm"].isna().all()


def test_label_ids_match_mias():
    from mammo_tf.data import mias

    for name, idx in ex.LABEL_IDS.items():
        assert idx == (0 if name == "negative" else mias.CLASSES.index(name))
    assert ex.RSNA_LABEL_MAP == {"benign": "negative", "malignant": "malignant"}


def test_folder_custom_map_and_named_group(tmp_path):
    root = _folder_set(tmp_path / "s", {"neg": ["P-0003_L_CC.png"], "cancer": ["P-0004_R_MLO.png"]})
    df = ex.load_folder_dataset(root, label_map={"neg": "normal", "cancer": "malignant"},
                                patient_pattern=r"^P-(?P<patient>\d+)_", source="other")
    assert df.sort_values("image_id")["patient_id"].tolist() == ["0003", "0004"]
    assert sorted(df["label"]) == ["malignant", "normal"] and (df["source"] == "other").all()


def test_folder_unknown_folder(tmp_path):
    root = _folder_set(tmp_path / "s", {"benign": ["1_2_a.jpg"], "unsure": ["3_4_b.jpg"]})
    with pytest.raises(ex.ExternalDataError, match=r"unknown class folder\(s\) \['unsure'\]"):
        ex.load_folder_dataset(root)


def test_folder_unmatched_name(tmp_path):
    root = _folder_set(tmp_path / "s", {"benign": ["1_2_a.jpg", "scan_b.jpg"]})
    with pytest.raises(ex.ExternalDataError, match=r"scan_b\.jpg: file name does not match patient_pattern"):
        ex.load_folder_dataset(root)


def test_folder_non_image_file(tmp_path):
    root = _folder_set(tmp_path / "s", {"malignant": ["1_2_a.jpg", "1_notes.txt"]})
    with pytest.raises(ex.ExternalDataError, match=r"1_notes\.txt: not an image file"):
        ex.load_folder_dataset(root)


def test_folder_hidden_files_ignored(tmp_path):
    root = _folder_set(tmp_path / "s", {"malignant": ["1_2_a.jpg", ".DS_Store"], ".cache": ["x"]})
    assert len(ex.load_folder_dataset(root)) == 1


def test_folder_bad_arguments(tmp_path):
    root = _folder_set(tmp_path / "s", {"benign": ["1_2_a.jpg"]})
    with pytest.raises(ex.ExternalDataError, match="labels must be among"):
        ex.load_folder_dataset(root, label_map={"benign": "harmless"})
    with pytest.raises(ex.ExternalDataError, match="needs a group"):
        ex.load_folder_dataset(root, patient_pattern=r"^\d+_")
    with pytest.raises(ex.ExternalDataError, match="folder not found"):
        ex.load_folder_dataset(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ex.ExternalDataError, match="no class folder"):
        ex.load_folder_dataset(empty)
    (empty / "benign").mkdir()
    with pytest.raises(ex.ExternalDataError, match="no images"):
        ex.load_folder_dataset(empty)


def test_folder_duplicate_image_id(tmp_path):
    root = _folder_set(tmp_path / "s", {"benign": ["1_2_a.jpg"], "malignant": ["1_2_a.jpg"]})
    with pytest.raises(ex.ExternalDataError, match="more than one file"):
        ex.load_folder_dataset(root)


def test_rsna_counts(shared_data):
    df = ex.load_external(shared_data / "rsna-640", adapter="folder")
    assert len(df) == sum(RSNA_IMAGES.values()) == 2345
    assert df["image_id"].is_unique
    assert df["label"].value_counts().to_dict() == RSNA_IMAGES
    assert df.groupby("label")["patient_id"].nunique().to_dict() == RSNA_PATIENTS
    assert df["patient_id"].nunique() == RSNA_ALL_PATIENTS
    both = set(df.loc[df["label"] == "negative", "patient_id"]) & set(df.loc[df["label"] == "malignant", "patient_id"])
    assert len(both) == RSNA_PATIENTS_IN_BOTH
    assert df.groupby("label")["label_id"].unique().map(list).to_dict() == {"negative": [0], "malignant": [2]}
    row = df.set_index("image_id").loc["105_1232990271_png.rf.0d15468a4bec2ad2147f0616b6821681"]
    assert row["patient_id"] == "105" and row["label"] == "negative" and row["source"] == "rsna-640"
    table = ex.images_table(df)
    assert len(table) == 2345 and table["n_located"].sum() == 0
    assert table.groupby("label")["n_lesions"].sum().to_dict() == {"malignant": 833, "negative": 0}


def test_rsna_file_is_a_640_grey_image(shared_data):
    df = ex.load_folder_dataset(shared_data / "rsna-640")
    image = read_image(df["path"].iloc[0])
    assert image.shape == (640, 640) and image.dtype == np.uint8


# --------------------------------------------------------------------------- DDSM: chain code


def test_chain_code_all_directions():
    # 0 = N (up), clockwise: N NE E SE S SW W NW walks a closed diamond-ish loop.
    points = ex.decode_chain_code(5, 5, [0, 1, 2, 3, 4, 5, 6, 7])
    expected = [(5, 5), (5, 4), (6, 3), (7, 3), (8, 4), (8, 5), (7, 6), (6, 6), (5, 5)]
    np.testing.assert_array_equal(points, expected)


def test_chain_code_square_and_box():
    points = ex.decode_chain_code(10, 20, [2, 2, 4, 4, 6, 6, 0, 0])
    np.testing.assert_array_equal(points[:, 0], [10, 11, 12, 12, 12, 11, 10, 10, 10])
    np.testing.assert_array_equal(points[:, 1], [20, 20, 20, 21, 22, 22, 22, 21, 20])
    # Pixels 10..12 x 20..22 -> end-exclusive box, then halved for the half-size JPEG.
    np.testing.assert_allclose(ex.outline_box(points), [20, 10, 23, 13])
    np.testing.assert_allclose(ex.outline_box(points, 0.5, 0.5), [10, 5, 11.5, 6.5])


@pytest.mark.parametrize("codes", [[], [8], [-1], [1.5]])
def test_chain_code_bad(codes):
    with pytest.raises(ValueError, match="chain code"):
        ex.decode_chain_code(0, 0, np.array(codes))


# --------------------------------------------------------------------------- DDSM: .OVERLAY and .ics

OVERLAY = """TOTAL_ABNORMALITIES 2
ABNORMALITY 1
LESION_TYPE MASS SHAPE OVAL MARGINS CIRCUMSCRIBED
ASSESSMENT 4
SUBTLETY 3
PATHOLOGY MALIGNANT
TOTAL_OUTLINES 2
BOUNDARY
40 60 2 2 4 4 6 6 0 0 #
CORE
41 61 4 2 0
6 #
ABNORMALITY 2
LESION_TYPE CALCIFICATION TYPE PUNCTATE DISTRIBUTION CLUSTERED
LESION_TYPE MASS SHAPE IRREGULAR MARGINS ILL_DEFINED
ASSESSMENT 3
SUBTLETY 5
PATHOLOGY BENIGN
TOTAL_OUTLINES 1
BOUNDARY
10 12 3 3 7 7#
"""


def test_parse_overlay():
    abn = ex.parse_overlay(OVERLAY, "x.OVERLAY")
    assert [a["abnormality_no"] for a in abn] == [1, 2]
    assert abn[0]["pathology"] == "MALIGNANT" and abn[0]["assessment"] == 4 and abn[0]["subtlety"] == 3
    x0, y0, codes = abn[0]["outlines"]["BOUNDARY"]
    assert (x0, y0) == (40, 60) and codes.tolist() == [2, 2, 4, 4, 6, 6, 0, 0]
    assert abn[0]["outlines"]["CORE"][2].tolist() == [4, 2, 0, 6]  # chain continued on the next line
    assert abn[1]["lesion_type"] == ["CALCIFICATION TYPE PUNCTATE DISTRIBUTION CLUSTERED",
                                     "MASS SHAPE IRREGULAR MARGINS ILL_DEFINED"]
    assert abn[1]["outlines"]["BOUNDARY"][2].tolist() == [3, 3, 7, 7]  # '#' glued to the last code


@pytest.mark.parametrize("old, new, message", [
    ("10 12 3 3 7 7#", "10 12 3 3 7 7", "not terminated by '#'"),
    ("40 60 2 2 4", "40 60 2 8 4", r"directions must be 0\.\.7, found \[8\]"),
    ("40 60 2 2 4", "40 60 2 x 4", "non-integer token"),
    ("40 60 2 2 4 4 6 6 0 0 #", "40 60 #", "needs a start column, row and at least one direction"),
    ("TOTAL_ABNORMALITIES 2", "TOTAL_ABNORMALITIES 3", "TOTAL_ABNORMALITIES 3 but 2 ABNORMALITY"),
    ("TOTAL_OUTLINES 2", "TOTAL_OUTLINES 1", "TOTAL_OUTLINES 1 but 2 outline"),
    ("ABNORMALITY 2", "ABNORMALITY 5", "ABNORMALITY 5, expected 2"),
    ("SUBTLETY 5", "SUBTLETY five", "SUBTLETY needs one integer"),
    ("PATHOLOGY BENIGN\n", "", "ABNORMALITY 2 has no PATHOLOGY"),
    ("SUBTLETY 3", "SUBTLETY 3\nSHAPE ROUND", "unknown overlay keyword 'SHAPE'"),
    ("BOUNDARY\n40 60", "CORE\n40 60", "ABNORMALITY 1 has no BOUNDARY"),
])
def test_parse_overlay_errors(old, new, message):
    assert old in OVERLAY
    with pytest.raises(ex.ExternalDataError, match=message):
        ex.parse_overlay(OVERLAY.replace(old, new, 1), "bad.OVERLAY")


def test_parse_overlay_error_names_file_and_line():
    with pytest.raises(ex.ExternalDataError, match=r"^bad\.OVERLAY:2: ABNORMALITY before TOTAL"):
        ex.parse_overlay("\nABNORMALITY 1\n", "bad.OVERLAY")
    with pytest.raises(ex.ExternalDataError, match="no TOTAL_ABNORMALITIES"):
        ex.parse_overlay("", "bad.OVERLAY")


ICS = """ 
ics_version 1.0
filename C-0001-1
DATE_OF_STUDY 2 3 1993
PATIENT_AGE 66
DENSITY 3
DIGITIZER LUMISYS LASER
SEQUENCE
LEFT_CC LINES 200 PIXELS_PER_LINE 120 BITS_PER_PIXEL 12 RESOLUTION 50 OVERLAY
RIGHT_CC LINES 200 PIXELS_PER_LINE 120 BITS_PER_PIXEL 12 RESOLUTION 50 NON_OVERLAY
"""


def test_parse_ics():
    ics = ex.parse_ics(ICS, "c.ics")
    assert ics["fields"]["FILENAME"] == "C-0001-1" and ics["fields"]["DIGITIZER"] == "LUMISYS LASER"
    assert ics["views"]["LEFT_CC"] == {"overlay": True, "lines": 200, "pixels_per_line": 120,
                                       "bits_per_pixel": 12, "resolution": 50.0}
    assert ics["views"]["RIGHT_CC"]["overlay"] is False


@pytest.mark.parametrize("old, new, message", [
    ("filename C-0001-1\n", "", "no 'filename' line"),
    ("LINES 200 PIXELS_PER_LINE 120 BITS_PER_PIXEL 12 RESOLUTION 50 OVERLAY", "LINES 200", "no positive PIXELS_PER_LINE"),
    ("RESOLUTION 50 NON_OVERLAY", "RESOLUTION fifty NON_OVERLAY", "RESOLUTION value 'fifty' is not a number"),
    ("RIGHT_CC", "LEFT_CC", "view LEFT_CC listed twice"),
])
def test_parse_ics_errors(old, new, message):
    with pytest.raises(ex.ExternalDataError, match=message):
        ex.parse_ics(ICS.replace(old, new), "c.ics")
    with pytest.raises(ex.ExternalDataError, match="no view lines"):
        ex.parse_ics("filename C-0001-1\n", "c.ics")


# --------------------------------------------------------------------------- DDSM: synthetic case

SQUARE = "40 60 " + " ".join(["2"] * 20 + ["4"] * 20 + ["6"] * 20 + ["0"] * 20) + " #"


def _ddsm_case(root: Path, overlay: str | None = None, ics: str = ICS, mask: bool = True,
               size: tuple[int, int] = (100, 60)) -> Path:
    """One case C_0001_1: two half-size views, a 20x20 (original pixels) square outline on LEFT_CC."""
    case = root / "Cancer" / "0001"
    case.mkdir(parents=True)
    (case / "C-0001-1.ics").write_text(ics)
    film = np.full(size, 30, np.uint8)
    for view in ("LEFT_CC", "RIGHT_CC"):
        cv2.imwrite(str(case / f"C_0001_1.{view}.jpg"), film)
    text = overlay if overlay is not None else OVERLAY.split("ABNORMALITY 2")[0].replace(
        "TOTAL_ABNORMALITIES 2", "TOTAL_ABNORMALITIES 1").replace("40 60 2 2 4 4 6 6 0 0 #", SQUARE)
    (case / "C_0001_1.LEFT_CC.OVERLAY").write_text(text)
    if mask:
        m = np.zeros(size, np.uint8)
        cv2.rectangle(m, (20, 30), (30, 40), 255, 1)  # the square at half resolution: cols 20..30, rows 30..40
        cv2.imwrite(str(case / "C_0001_1.LEFT_CC_Mask.jpg"), m)
    return case


def test_ddsm_synthetic_case(tmp_path):
    _ddsm_case(tmp_path)
    df = ex.load_ddsm(tmp_path, source="syn")
    assert list(df.columns) == list(ex.DDSM_COLUMNS) and len(df) == 2
    lesion, normal = df.iloc[0], df.iloc[1]
    assert lesion["image_id"] == "C_0001_1.LEFT_CC" and lesion["patient_id"] == "C_0001_1"
    assert (lesion["side"], lesion["view"]) == ("left", "CC")
    assert (lesion["label"], lesion["label_id"], lesion["severity"]) == ("malignant", 2, "M")
    assert lesion["abnormality"] == "MASS" and lesion["pathology"] == "MALIGNANT"
    # Original pixels x 40..60, y 60..80 -> box [60, 40, 81, 61] -> halved.
    np.testing.assert_allclose(lesion[["ymin", "xmin", "ymax", "xmax"]].to_numpy(float), [30, 20, 40.5, 30.5])
    assert lesion["spacing_mm"] == pytest.approx(0.1)  # 50 µm scan, JPEG at half resolution
    assert (lesion["height"], lesion["width"]) == (100, 60)
    assert lesion["outline"].shape == (81, 2) and lesion["outline"][0].tolist() == [20.0, 30.0]
    assert (normal["label"], normal["label_id"], normal["abnormality"]) == ("normal", 0, "NORM")
    assert not normal["has_location"] and pd.isna(normal["ymin"]) and pd.isna(normal["mask_path"])
    boxes, labels = ex.lesion_boxes(df, "C_0001_1.LEFT_CC")
    assert boxes.dtype == np.float32 and labels.tolist() == [2]
    assert ex.lesion_boxes(df, "C_0001_1.RIGHT_CC")[0].shape == (0, 4)
    check = ex.check_outlines(df)
    # Outline box [30, 20, 40.5, 30.5] vs mask box [30, 20, 41, 31]: IoU = 10.5^2 / 11^2.
    assert len(check) == 1 and check["iou"].iloc[0] == pytest.approx(10.5**2 / 11**2)


def test_ddsm_worst_label_per_image(tmp_path):
    # A benign and a malignant abnormality on one view: both rows carry the image label 'malignant'.
    overlay = OVERLAY.replace("10 12 3 3 7 7#", "50 70 3 3 7 7 #")
    _ddsm_case(tmp_path, overlay=overlay, mask=False)
    rows = ex.load_ddsm(tmp_path).query("has_location")
    assert rows["label"].tolist() == ["malignant", "malignant"] and rows["severity"].tolist() == ["M", "B"]
    assert rows["abnormality"].tolist() == ["MASS", "CALC+MASS"]
    assert ex.lesion_boxes(rows, "C_0001_1.LEFT_CC")[1].tolist() == [2, 1]


def test_ddsm_missing_ics(tmp_path):
    case = _ddsm_case(tmp_path)
    (case / "C-0001-1.ics").unlink()
    with pytest.raises(ex.ExternalDataError, match="no DDSM case"):
        ex.load_ddsm(tmp_path)
    _ddsm_case(tmp_path / "more")  # another, complete case beside the broken one
    with pytest.raises(ex.ExternalDataError, match=r"0001: DDSM case files but no \.ics file"):
        ex.load_ddsm(tmp_path)


def test_ddsm_missing_overlay(tmp_path):
    case = _ddsm_case(tmp_path)
    (case / "C_0001_1.LEFT_CC.OVERLAY").unlink()
    (case / "C_0001_1.LEFT_CC_Mask.jpg").unlink()
    with pytest.raises(ex.ExternalDataError, match=r"LEFT_CC\): \.ics says OVERLAY but the \.OVERLAY file is missing"):
        ex.load_ddsm(tmp_path)


def test_ddsm_missing_image(tmp_path):
    case = _ddsm_case(tmp_path)
    (case / "C_0001_1.RIGHT_CC.jpg").unlink()
    with pytest.raises(ex.ExternalDataError, match=r"C_0001_1\.RIGHT_CC\.jpg is missing"):
        ex.load_ddsm(tmp_path)


def test_ddsm_mask_without_abnormality(tmp_path):
    case = _ddsm_case(tmp_path)
    cv2.imwrite(str(case / "C_0001_1.LEFT_CC_MASK2.jpg"), np.zeros((100, 60), np.uint8))
    with pytest.raises(ex.ExternalDataError, match=r"mask number\(s\) \[2\] but only 1 abnormalities"):
        ex.load_ddsm(tmp_path)


def test_ddsm_empty_mask(tmp_path):
    case = _ddsm_case(tmp_path)
    cv2.imwrite(str(case / "C_0001_1.LEFT_CC_Mask.jpg"), np.zeros((100, 60), np.uint8))
    with pytest.raises(ex.ExternalDataError, match=r"_Mask\.jpg: mask has no pixel above 127"):
        ex.check_outlines(ex.load_ddsm(tmp_path))


def test_ddsm_unexpected_file(tmp_path):
    case = _ddsm_case(tmp_path)
    (case / "notes.txt").write_text("x")
    with pytest.raises(ex.ExternalDataError, match=r"notes\.txt: unexpected file in DDSM case C_0001_1"):
        ex.load_ddsm(tmp_path)


def test_ddsm_malformed_overlay_names_file(tmp_path):
    _ddsm_case(tmp_path, overlay=OVERLAY.replace("0 0 #", "0 9 #"))
    with pytest.raises(ex.ExternalDataError, match=r"C_0001_1\.LEFT_CC\.OVERLAY:9: chain code directions"):
        ex.load_ddsm(tmp_path)


def test_ddsm_outline_outside_image(tmp_path):
    _ddsm_case(tmp_path, overlay=OVERLAY.split("ABNORMALITY 2")[0].replace("TOTAL_ABNORMALITIES 2", "TOTAL_ABNORMALITIES 1")
               .replace("40 60 2 2", "400 60 2 2"))
    with pytest.raises(ex.ExternalDataError, match="leaves the 60x100 image"):
        ex.load_ddsm(tmp_path)


def test_ddsm_unknown_pathology(tmp_path):
    _ddsm_case(tmp_path, overlay=OVERLAY.replace("PATHOLOGY MALIGNANT", "PATHOLOGY UNPROVEN"), mask=False)
    with pytest.raises(ex.ExternalDataError, match="pathology 'UNPROVEN', not in the pathology map"):
        ex.load_ddsm(tmp_path)
    df = ex.load_ddsm(tmp_path, pathology_map={**ex.DDSM_PATHOLOGY_LABELS, "UNPROVEN": "benign"})
    assert df.query("has_location")["severity"].tolist() == ["B", "B"]


def test_ddsm_non_uniform_scale(tmp_path):
    _ddsm_case(tmp_path, size=(100, 90))
    with pytest.raises(ex.ExternalDataError, match="not a uniform rescaling"):
        ex.load_ddsm(tmp_path)


def test_ddsm_spacing_from_digitizer(tmp_path):
    ics = ICS.replace(" RESOLUTION 50", "").replace("LUMISYS LASER", "HOWTEK 960")
    _ddsm_case(tmp_path, ics=ics)
    assert ex.load_ddsm(tmp_path)["spacing_mm"].tolist() == pytest.approx([0.087, 0.087])


def test_load_external_unknown_adapter(tmp_path):
    with pytest.raises(ValueError, match="unknown adapter 'inbreast'"):
        ex.load_external(tmp_path, adapter="inbreast")


# --------------------------------------------------------------------------- DDSM: the shared sample


@pytest.fixture(scope="module")
def ddsm(shared_data):
    return ex.load_external(shared_data / "mini-ddsm-sample", adapter="ddsm")


def test_ddsm_sample_counts(ddsm):
    images = ex.images_table(ddsm)
    assert len(images) == DDSM_IMAGES and images["patient_id"].nunique() == DDSM_CASES
    assert (images.groupby("patient_id").size() == 4).all()
    assert int((images["n_lesions"] > 0).sum()) == DDSM_LESION_VIEWS
    assert int(ddsm["has_location"].sum()) == DDSM_LESIONS and len(ddsm) == DDSM_LESIONS + DDSM_IMAGES - DDSM_LESION_VIEWS
    assert int(ddsm["mask_path"].notna().sum()) == DDSM_MASKS
    assert images["label"].value_counts().to_dict() == {"benign": 20, "normal": 20}
    lesions = ddsm[ddsm["has_location"]]
    assert lesions["abnormality"].value_counts().to_dict() == {"MASS": 14, "CALC": 9, "CALC+MASS": 1}
    assert (lesions["pathology"] == "BENIGN").all() and (lesions["label_id"] == 1).all()
    assert (ddsm["spacing_mm"] == 0.1).all() and (ddsm["digitizer"] == "LUMISYS LASER").all()
    assert ddsm.loc[ddsm["image_id"] == "C_0236_1.RIGHT_CC", "abnormality_no"].tolist() == [1, 2, 3]


def test_ddsm_sample_known_box(ddsm):
    row = ddsm.set_index("image_id").loc["C_0029_1.LEFT_CC"]
    # Chain code starts at (472, 2432) in the 2672 x 4648 scan; the JPEG is 1336 x 2324.
    assert (row["height"], row["width"]) == (2324, 1336)
    np.testing.assert_allclose(row["outline"][0], [236, 1216])
    np.testing.assert_allclose(row[["ymin", "xmin", "ymax", "xmax"]].to_numpy(float), [928, 188, 1264.5, 596.5])


def test_ddsm_outlines_match_masks(ddsm):
    check = ex.check_outlines(ddsm)
    assert len(check) == DDSM_MASKS
    # Mask numbering follows the abnormality number (_Mask = 1, _MASK2 = 2).
    assert check["abnormality_no"].value_counts().to_dict() == {1: 20, 2: 2}
    assert check["iou"].min() > 0.95, check.sort_values("iou").head()


def test_ddsm_direction_convention_against_mask(ddsm):
    """Outline points fall on the drawn mask contour with 0 = N clockwise, not with Freeman's 0 = E."""
    row = ddsm.set_index("image_id").loc["C_0029_1.LEFT_CC"]
    mask = cv2.dilate((read_image(row["mask_path"]) > ex.MASK_THRESHOLD).astype(np.uint8), np.ones((3, 3), np.uint8))
    overlay = ex.parse_overlay(Path(row["path"]).with_suffix(".OVERLAY").read_text())
    x0, y0, codes = overlay[0]["outlines"]["BOUNDARY"]

    def on_mask(points: np.ndarray) -> float:
        xy = np.rint(points / 2).astype(int)
        ok = (xy[:, 0] >= 0) & (xy[:, 0] < mask.shape[1]) & (xy[:, 1] >= 0) & (xy[:, 1] < mask.shape[0])
        return float(np.mean(ok & (mask[xy[:, 1].clip(0, mask.shape[0] - 1), xy[:, 0].clip(0, mask.shape[1] - 1)] > 0)))

    assert on_mask(ex.decode_chain_code(x0, y0, codes)) > 0.95
    freeman = np.array([(1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1)])
    wrong = np.vstack([[0, 0], np.cumsum(freeman[codes], axis=0)]) + [x0, y0]
    assert on_mask(wrong) < 0.5


# --------------------------------------------------------------------------- plots


def _films() -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    film = np.zeros((240, 200), np.uint8)
    film[40:200, :120] = rng.integers(100, 200, size=(160, 120))
    return {"a": [film, film], "b": [255 - film]}


def test_intensity_histograms():
    from mammo_tf.plots import external as pe

    fig = pe.intensity_histograms(_films())
    ax_pdf, ax_cdf = fig.axes
    assert len(ax_pdf.patches) == 2 and len(ax_cdf.patches) == 2
    assert [t.get_text() for t in ax_pdf.get_legend().get_texts()] == ["a (2 films)", "b (1 films)"]
    with pytest.raises(ValueError, match="no sources"):
        pe.intensity_histograms({})
    with pytest.raises(ValueError, match="source 'x' has no images"):
        pe.intensity_histograms({"x": []})


def test_breast_pixels():
    from mammo_tf.plots.external import breast_pixels

    film = _films()["a"][0]
    pixels = breast_pixels(film)
    # The tissue block (160 x 120 = 19,200 pixels), give or take the mask's low-resolution edge.
    assert abs(pixels.size - 19200) < 0.1 * 19200
    assert (pixels >= 100).sum() >= 0.97 * 19200


def test_example_films():
    from mammo_tf.plots import external as pe

    films = _films()
    fig = pe.example_films({"mias": films["a"][0], "other": films["b"][0]}, {"mias": 0.1})
    assert len(fig.axes) == 2
    assert "120x100 px @ 0.2 mm" in fig.axes[0].get_title()
    assert "spacing unknown, inverted: fixed" in fig.axes[1].get_title()


def test_outline_overlays(ddsm):
    from mammo_tf.plots import external as pe

    fig = pe.outline_overlays(ddsm, n=2, ncols=2)
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert len(ax.lines) == 2 and len(ax.patches) == 2  # mask contour + outline, two boxes
    with pytest.raises(ValueError, match="no DDSM lesion"):
        pe.outline_overlays(ddsm[~ddsm["has_location"]])
