"""Patches: breast mask, grid geometry, the label rule, strategies on real films, detection crops."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mammo_tf import patches as P
from mammo_tf.data import mias

# Film-label blobs found on the films (bright, rectangular, separate from the breast): (top, bottom, left, right).
LABEL_BLOBS = {"mdb002": (93, 234, 722, 807), "mdb150": (0, 35, 762, 850), "mdb300": (0, 88, 709, 806)}


@pytest.fixture(scope="module")
def films():
    return P.FilmCache()


def _ann(rows: list[dict]) -> pd.DataFrame:
    """A small annotation table in the data layer's format."""
    out = []
    for r in rows:
        num = int(r["refnum"][3:])
        loc = r.get("x") is not None
        sev = r.get("severity")
        out.append({
            "refnum": r["refnum"], "patient_id": (num + 1) // 2, "side": "right", "tissue": "F",
            "abnormality": r.get("abnormality", "CIRC" if sev else "NORM"), "severity": sev,
            "x": r.get("x", np.nan), "y": r.get("y", np.nan), "radius": r.get("radius", np.nan),
            "has_location": loc,
        })
    df = pd.DataFrame(out)
    rank = df["severity"].map({"B": 1, "M": 2}).fillna(0).astype(int).groupby(df["refnum"]).transform("max")
    df["label_id"] = rank
    df["label"] = rank.map(dict(enumerate(mias.CLASSES)))
    return df


class _Synthetic(P.FilmCache):
    """A film cache serving fixed masks (a synthetic geometry), no real films."""

    def __init__(self, masks):
        super().__init__()
        self._masks = dict(masks)


# --------------------------------------------------------------------------- breast mask


def test_breast_mask_synthetic_excludes_label_and_strip():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 6, (512, 512)).astype(np.uint8)
    yy, xx = np.mgrid[:512, :512]
    breast = ((yy - 256) / 220.0) ** 2 + (xx / 300.0) ** 2 <= 1  # half-ellipse against the left edge
    image[breast] = 60 + rng.integers(0, 120, breast.sum())
    image[20:60, 420:470] = 250  # film label
    image[:, 505:509] = 230  # film-edge strip
    mask = P.breast_mask(image)
    assert mask.dtype == bool and mask.shape == image.shape
    iou = (mask & breast).sum() / (mask | breast).sum()
    assert iou > 0.95
    assert not mask[20:60, 420:470].any()
    assert not mask[:, 505:509].any()


def test_breast_mask_rejects_bad_input():
    with pytest.raises(ValueError, match="constant"):
        P.breast_mask(np.full((64, 64), 7, np.uint8))
    with pytest.raises(ValueError, match="2-D uint8"):
        P.breast_mask(np.zeros((64, 64), np.float32))


@pytest.mark.parametrize("refnum", sorted(LABEL_BLOBS))
def test_breast_mask_real_films(films, refnum):
    image, mask = films.image(refnum), films.mask(refnum)
    assert 0.15 < mask.mean() < 0.7
    t, b, l, r = LABEL_BLOBS[refnum]
    assert image[t:b, l:r].mean() > 120  # the label is there ...
    assert not mask[t:b, l:r].any()  # ... and not in the breast
    # One region without holes: every background region reaches the image border.
    import cv2

    assert cv2.connectedComponents(mask.astype(np.uint8))[0] == 2
    n, background = cv2.connectedComponents((~mask).astype(np.uint8))
    border = np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])
    assert set(range(1, n)) <= set(border.tolist())


# --------------------------------------------------------------------------- geometry


def test_grid_positions_counts():
    tops, lefts = P.grid_positions((1024, 1024), 128)
    assert len(tops) == 64 and tops.max() == 896 and lefts.max() == 896
    assert len(P.grid_positions((1024, 1024), 128, stride=64)[0]) == 15 * 15
    assert len(P.grid_positions((1000, 1000), 128)[0]) == 7 * 7
    tops, lefts = P.grid_positions((1000, 900), 128, keep_edge=True)
    assert sorted(set(tops)) == [0, 128, 256, 384, 512, 640, 768, 872]
    assert sorted(set(lefts)) == [0, 128, 256, 384, 512, 640, 768, 772]
    with pytest.raises(ValueError, match="exceeds"):
        P.grid_positions((100, 100), 128)


def test_grid_drop_full_breast_gives_64_patches():
    frame = P.film_patches(np.ones((1024, 1024), bool), np.zeros((0, 4)), "grid_drop", 128)
    assert len(frame) == 64
    assert (frame["label_id"] == 0).all() and (frame["breast_fraction"] == 1).all()


def test_grid_drop_threshold_and_grid_keep_coverage():
    yy, xx = np.mgrid[:1000, :1000]
    mask = ((yy - 500) / 430.0) ** 2 + (xx / 600.0) ** 2 <= 1
    drop = P.film_patches(mask, np.zeros((0, 4)), "grid_drop", 128)
    keep = P.film_patches(mask, np.zeros((0, 4)), "grid_keep", 128)
    assert (drop["breast_fraction"] >= 0.5).all()
    assert len(drop) < len(keep) <= 64
    assert keep["top"].max() == 872  # the last row ends at the image edge
    covered = np.zeros_like(mask)
    for t, l in zip(keep["top"], keep["left"]):
        covered[t : t + 128, l : l + 128] = True
    assert covered[mask].all()
    # Same counts as a direct computation of the breast fraction of every grid window.
    tops, lefts = P.grid_positions(mask.shape, 128)
    frac = P.window_fraction(mask, tops, lefts, 128)
    assert len(drop) == int((frac >= 0.5).sum())


def test_circle_overlap_hand_worked():
    shape = (1024, 1024)
    f = lambda y, x, r, t, l: float(P.circle_overlap(y, x, r, [t], [l], 128, shape)[0])  # noqa: E731
    assert f(300, 300, 20, 236, 236) == 1.0  # centred
    assert f(256, 256, 20, 256, 256) == 0.25  # centre on the patch corner
    assert f(300, 256, 20, 236, 256) == 0.5  # centre on the left edge
    assert f(300, 300, 20, 500, 500) == 0.0  # disjoint
    assert f(0, 0, 10, 0, 0) == 1.0  # the denominator is the circle's part inside the image
    # Pixel counting approximates the area: a large circle half inside a patch covers ~pi r^2 / 2.
    big = P.circle_overlap(500, 500, 60, [440, 0], [500, 0], 128, shape)
    assert big[0] == pytest.approx(0.5, abs=0.01) and big[1] == 0.0


def test_label_rule_hand_worked():
    shape = (1024, 1024)
    benign = np.array([[300.0, 300.0, 20.0, 1]])
    tops = [236, 250, 310, 600, 0]
    lefts = [236, 310, 236, 600, 0]
    label, overlap, centre = P.label_patches(tops, lefts, 128, benign, shape)
    # 0: wholly inside -> benign; 1: touches (x from 310) without centre, overlap < 0.5 -> ambiguous;
    # 2: touches (y from 310) -> ambiguous; 3, 4: clear -> normal.
    assert label.tolist() == [1, -1, -1, 0, 0]
    assert centre.tolist() == [True, False, False, False, False]
    assert 0 < overlap[1] < 0.5 and overlap[3] == 0
    # The centre rule alone qualifies a lesion: centre inside the patch, overlap ~1/4.
    label, overlap, _ = P.label_patches([173], [173], 128, benign, shape)
    assert label.tolist() == [1] and overlap[0] < 0.5
    # A lower min_overlap makes the partial patch qualify.
    assert P.label_patches([250], [310], 128, benign, shape, min_overlap=0.05)[0].tolist() == [1]
    # Two lesions: the worse qualifying one wins; a worse partial one makes the patch ambiguous.
    two = np.array([[300.0, 300.0, 20.0, 1], [300.0, 370.0, 20.0, 2]])
    label, _, _ = P.label_patches([236, 236], [236, 310], 128, two, shape)
    assert label.tolist() == [-1, 2]  # benign inside + malignant partial; malignant inside + benign partial


def test_cut_returns_the_window_and_checks_bounds():
    image = np.arange(64 * 64, dtype=np.int64).reshape(64, 64)
    rec = {"refnum": "mdb001", "top": 8, "left": 16, "size": 32}
    assert np.array_equal(P.cut(image, rec), image[8:40, 16:48])
    with pytest.raises(ValueError, match="mdb001"):
        P.cut(image, {**rec, "top": 40})


# --------------------------------------------------------------------------- strategies on annotation tables


def test_cut_patches_synthetic_geometry():
    ann = _ann([
        {"refnum": "mdb001", "severity": "B", "x": 300, "y": 300, "radius": 20},
        {"refnum": "mdb002"},
        {"refnum": "mdb003", "severity": "M"},  # a lesion without location
    ])
    full = np.ones((1024, 1024), bool)
    cache = _Synthetic({"mdb001": full, "mdb002": full, "mdb003": full})
    recs = P.cut_patches(ann, "grid_drop", 128, films=cache)
    assert tuple(recs.columns) == P.RECORD_COLUMNS
    # mdb001: 64 grid patches, the lesion (wholly inside [256, 384)) makes one benign, none ambiguous.
    assert (recs["refnum"] == "mdb001").sum() == 64 and (recs["refnum"] == "mdb002").sum() == 64
    assert recs.loc[recs["label"] == "benign", ["top", "left"]].values.tolist() == [[256, 256]]
    assert recs.attrs["excluded"] == {"ambiguous_patches": 0, "unlocated_patches": 64, "unlocated_films": ["mdb003"]}
    assert set(recs["patient_id"]) == {1}
    kept = P.cut_patches(ann, "grid_drop", 128, films=cache, drop_excluded=False)
    assert len(kept) == 192 and (kept["label"] == "unlocated").sum() == 64

    centred = P.cut_patches(ann, "lesion_centred", 128, films=cache, n_normal=3, seed=1)
    assert centred["label"].tolist().count("benign") == 1 and centred["label"].tolist().count("normal") == 3
    les = centred[centred["label"] == "benign"].iloc[0]
    assert (les["top"], les["left"], les["overlap"], les["centre_inside"]) == (236, 236, 1.0, True)


def test_lesion_centred_real_films(annotations, films):
    refnums = ["mdb001", "mdb005", "mdb023", "mdb028", "mdb003", "mdb004"]
    recs = P.cut_patches(annotations, "lesion_centred", 256, refnums=refnums, films=films, jitter=20, seed=3)
    lesions = annotations[annotations["refnum"].isin(refnums) & annotations["has_location"]]
    lesion_recs = recs[recs["refnum"].isin(lesions["refnum"])]
    assert len(lesion_recs) == len(lesions) == 5  # mdb005 holds two lesions
    assert lesion_recs["centre_inside"].all()
    assert set(recs.loc[recs["refnum"].isin(["mdb003", "mdb004"]), "label"]) == {"normal"}
    # Lesion labels: mdb001/mdb005 benign, mdb023/mdb028 malignant.
    assert dict(zip(lesion_recs["refnum"], lesion_recs["label"])) == {
        "mdb001": "benign", "mdb005": "benign", "mdb023": "malignant", "mdb028": "malignant"}
    assert ((recs["top"] >= 0) & (recs["top"] + 256 <= 1024)).all()
    again = P.cut_patches(annotations, "lesion_centred", 256, refnums=refnums, films=films, jitter=20, seed=3)
    pd.testing.assert_frame_equal(recs, again)
    other = P.cut_patches(annotations, "lesion_centred", 256, refnums=refnums, films=films, jitter=20, seed=4)
    assert not recs[["top", "left"]].equals(other[["top", "left"]])


def test_unlocated_films_are_excluded(annotations, films):
    recs = P.cut_patches(annotations, "grid_drop", 256, refnums=["mdb059", "mdb060"], films=films)
    assert "mdb059" not in set(recs["refnum"]) and (recs["refnum"] == "mdb060").any()
    assert recs.attrs["excluded"]["unlocated_films"] == ["mdb059"]
    assert recs.attrs["excluded"]["unlocated_patches"] > 0


def test_patch_table_and_lesion_coverage(annotations, films):
    refnums = ["mdb001", "mdb002", "mdb003", "mdb005", "mdb059"]
    table = P.patch_table(annotations, sizes=(256,), refnums=refnums, films=films)
    assert list(table.index) == [(s, 256) for s in P.STRATEGIES]
    assert (table["lesions"] == 4).all() and (table["unlocated_films"] == 1).all()
    # mdb001's lesion (radius 197) is larger than a 256 patch: broken under every strategy.
    assert table.loc[("lesion_centred", 256), "broken_share"] == 0.25
    recs = P.cut_patches(annotations, "grid_keep", 256, refnums=refnums, films=films, drop_excluded=False)
    row = table.loc[("grid_keep", 256)]
    counts = recs["label"].value_counts()
    assert row["normal"] == counts.get("normal", 0) and row["ambiguous"] == counts.get("ambiguous", 0)
    cov = P.lesion_coverage(annotations, recs[recs["refnum"] != "mdb059"])
    assert len(cov) == 4 and cov["broken"].mean() == row["broken_share"]


# --------------------------------------------------------------------------- detection crops and whole films


def test_crop_boxes_clip_and_drop():
    boxes = np.array([[10, 10, 30, 30], [90, 90, 130, 130], [0, 0, 5, 5]], float)
    out, vis, keep = P.crop_boxes(boxes, 20, 20, 100, min_visible=0.2)
    assert keep.tolist() == [True, True, False]
    assert out.tolist() == [[0, 0, 10, 10], [70, 70, 100, 100]]
    assert vis.tolist() == [0.25, 0.5625]


def test_detection_crops_real(annotations, films):
    refnums = ["mdb001", "mdb002", "mdb005", "mdb003", "mdb004", "mdb059"]
    crops = P.detection_crops(annotations, 300, refnums=refnums, films=films, seed=2)
    assert tuple(crops.columns) == P.CROP_COLUMNS
    assert "mdb059" not in set(crops["refnum"])
    assert crops["kind"].value_counts().to_dict() == {"lesion": 4, "normal": 2}
    assert ((crops["top"] >= 0) & (crops["top"] + 300 <= 1024) & (crops["left"] + 300 <= 1024)).all()
    for rec in crops[crops["kind"] == "lesion"].itertuples():
        own = annotations.loc[rec.lesion_row]
        film_boxes, _ = mias.lesion_boxes(annotations, rec.refnum)
        box = np.array([own.y - own.radius, own.x - own.radius, own.y + own.radius, own.x + own.radius]).clip(0, 1024)
        if own.radius * 2 <= 300:  # a small lesion lies wholly inside its crop
            shifted = (box - [rec.top, rec.left, rec.top, rec.left]).tolist()
            assert shifted in rec.boxes and 1.0 in rec.visible
        b = np.asarray(rec.boxes)
        assert ((b >= 0) & (b <= 300)).all() and len(rec.box_labels) == len(rec.boxes) >= 1
    assert crops.loc[crops["kind"] == "normal", "boxes"].map(len).eq(0).all()
    again = P.detection_crops(annotations, 300, refnums=refnums, films=films, seed=2)
    pd.testing.assert_frame_equal(crops, again)


def test_prepare_whole_synthetic_round_trip():
    image = np.zeros((1024, 1024), np.uint8)
    image[100:900, 600:1024] = 150  # breast box: rows 100..900, cols 600..1024 -> side 800
    boxes = np.array([[200, 700, 300, 800], [500, 900, 700, 1024]], float)
    out, pboxes, t = P.prepare_whole(image, boxes, size=400, mask=image > 0)
    assert out.shape == (400, 400) and out.dtype == np.uint8
    assert (t.top, t.left, t.side, t.size, t.scale) == (100, 600, 800, 400, 0.5)
    assert pboxes.tolist() == [[50, 50, 100, 100], [200, 150, 300, 212]]
    np.testing.assert_allclose(t.to_original(pboxes), boxes)
    assert out[:, 212:].max() == 0 and out[:, :210].min() == 150  # padded on the right


def test_prepare_whole_real(films, annotations):
    image = films.image("mdb001")
    boxes, _ = mias.lesion_boxes(annotations, "mdb001")
    out, pboxes, t = P.prepare_whole(image, boxes, size=512)
    assert out.shape == (512, 512)
    assert ((pboxes >= 0) & (pboxes <= 512)).all()
    mask = films.mask("mdb001")
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    assert (t.top, t.left) == (rows[0], cols[0])


# --------------------------------------------------------------------------- figures


def test_figures_draw_every_record():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mammo_tf.plots import patches as PP

    image = np.zeros((256, 256), np.uint8)
    image[:, :160] = 120
    mask = image > 0
    lesions = np.array([[100.0, 80.0, 15.0, 2]])
    recs = {s: P.film_patches(mask, lesions, s, 64, n_normal=2) for s in P.STRATEGIES}
    fig = PP.strategies(image, recs, lesions, mask)
    assert len(fig.axes) == 3
    assert [len(ax.patches) for ax in fig.axes] == [len(r) + 1 for r in recs.values()]  # rectangles + lesion circle
    fig2 = PP.augmented_patches([image[:64, :64], image[64:128, 100:164]], n_augment=3)
    assert len(fig2.axes) == 8
    fig3 = PP.augmented_crops([image[:128, :128]], [np.array([[10, 20, 40, 50]])], [[1]], n_augment=2)
    assert [len(ax.patches) for ax in fig3.axes] == [1, 1, 1]
    fig4 = PP.breast_masks({"a": image}, {"a": mask})
    assert "breast 62%" in fig4.axes[0].get_title()
    # Two epochs of two crops; the padding row (label 0) draws no box.
    served = (np.zeros((2, 64, 64, 1)), {"boxes": np.array([[[0.1, 0.1, 0.5, 0.5], [0, 0, 0, 0]]] * 2),
                                         "labels": np.array([[1, 0], [2, 0]])})
    fig5 = PP.served_crops([served, served], titles=["epoch 1", "epoch 2"])
    assert [len(ax.patches) for ax in fig5.axes] == [1, 1, 1, 1]
    assert fig5.axes[1].get_title() == "epoch 2" and fig5.axes[2].get_title() == ""
    plt.close("all")


def test_bad_arguments_raise(annotations):
    with pytest.raises(ValueError, match="unknown strategy"):
        P.cut_patches(annotations, "random", films=_Synthetic({}))
    with pytest.raises(ValueError, match="mdb999"):
        P.cut_patches(annotations, "grid_drop", refnums=["mdb999"], films=_Synthetic({}))
    with pytest.raises(ValueError, match="min_overlap"):
        P.label_patches([0], [0], 128, np.zeros((0, 4)), (1024, 1024), min_overlap=0.0)
    with pytest.raises(ValueError, match="outside"):
        P.window_fraction(np.ones((100, 100), bool), [0], [50], 64)


def test_clahe_film_cache_equalises_the_film_but_keeps_the_raw_films_mask(films):
    equalised = P.FilmCache(P.film_loader(), clahe_clip=2.0)
    raw = films.image("mdb028")
    image = equalised.image("mdb028")
    assert image.shape == raw.shape and image.dtype == np.uint8
    assert np.array_equal(image, P.clahe(raw, 2.0)) and not np.array_equal(image, raw)
    # The mask comes from the raw film, whichever of image() and mask() is asked first.
    assert np.array_equal(equalised.mask("mdb028"), films.mask("mdb028"))
    fresh = P.FilmCache(P.film_loader(), clahe_clip=2.0)
    assert np.array_equal(fresh.mask("mdb028"), films.mask("mdb028"))
    # Equalisation spreads a narrow histogram: a ramp over 40 grey levels comes out wider.
    ramp = np.tile(np.linspace(100, 140, 256).astype(np.uint8), (256, 1))
    assert np.ptp(P.clahe(ramp, 4.0)) > np.ptp(ramp)
    with pytest.raises(ValueError, match="2-D uint8"):
        P.clahe(ramp.astype(np.float32), 2.0)
