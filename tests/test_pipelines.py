"""Pipelines: patient-level splitting, class balance, tf.data patch and crop datasets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mammo_tf import patches as P
from mammo_tf import pipelines as PL
from mammo_tf.data import mias, splits

REFNUMS = ["mdb001", "mdb002", "mdb003", "mdb004", "mdb005", "mdb006", "mdb023", "mdb024", "mdb028"]


@pytest.fixture(scope="module")
def films():
    return P.FilmCache()


@pytest.fixture(scope="module")
def records(annotations, films):
    return P.cut_patches(annotations, "lesion_centred", 128, refnums=REFNUMS, n_normal=12, films=films, seed=0)


def _frame(patients):
    return pd.DataFrame({"patient_id": patients})


def test_split_records_and_leak_check(records):
    train, test = PL.split_records(records, [1, 2, 3], [12, 14])
    assert set(train["patient_id"]) == {1, 2, 3} and set(test["patient_id"]) == {12, 14}
    PL.assert_no_patient_leak(train, test)
    with pytest.raises(ValueError, match="both the train and test"):
        PL.split_records(records, [1, 2], [2, 3])
    with pytest.raises(AssertionError, match=r"frame 0 and frame 2.*\[3\]"):
        PL.assert_no_patient_leak(_frame([1, 3]), _frame([2]), _frame([3, 4]))


def test_patient_folds_do_not_leak(annotations):
    images = mias.images_table(annotations)
    folds = splits.patient_folds(annotations, n_splits=5, seed=0)
    tested = []
    for train, test in folds:
        tr, te = PL.split_records(images, train, test)
        PL.assert_no_patient_leak(tr, te)
        assert len(tr) + len(te) == len(images)
        # Both films of a patient land on the same side.
        assert (te.groupby("patient_id").size() == 2).all()
        tested.extend(test)
    assert sorted(tested) == sorted(images["patient_id"].unique())


def test_class_weights_hand_worked():
    recs = pd.DataFrame({"label_id": [0, 0, 0, 1]})
    assert PL.class_weights(recs) == {0: pytest.approx(4 / 6), 1: pytest.approx(2.0), 2: 0.0}
    with pytest.raises(ValueError, match="-1"):
        PL.class_weights(pd.DataFrame({"label_id": [0, -1]}))


def test_eval_pipeline_yields_the_records_in_order(records, films):
    ds = PL.patch_dataset(records, batch_size=4, films=films)
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    x, y = np.concatenate(xs), np.concatenate(ys)
    assert x.shape == (len(records), 128, 128, 1) and x.dtype == np.float32
    assert y.dtype == np.int32 and y.tolist() == records["label_id"].tolist()
    for i in (0, len(records) - 1):
        rec = records.iloc[i]
        expected = P.cut(films.image(rec["refnum"]), rec).astype(np.float32) / 255.0
        np.testing.assert_allclose(x[i, ..., 0], expected)
    assert 0.0 <= x.min() and x.max() <= 1.0


def _first_epoch(ds):
    return [(x.numpy(), y.numpy()) for x, y in ds]


def test_training_pipeline_is_seeded(records, films):
    make = lambda seed: PL.patch_dataset(records, training=True, batch_size=8, seed=seed, max_angle=15.0, films=films)  # noqa: E731
    a, b, c = _first_epoch(make(1)), _first_epoch(make(1)), _first_epoch(make(2))
    assert all(np.array_equal(xa, xb) and np.array_equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not np.array_equal(a[0][0], c[0][0])
    ds = make(1)
    e1, e2 = _first_epoch(ds), _first_epoch(ds)
    assert not np.array_equal(e1[0][0], e2[0][0])  # a new shuffle and new transforms each epoch
    labels = np.concatenate([y for _, y in e1])
    assert sorted(labels.tolist()) == sorted(records["label_id"].tolist())  # an epoch is a permutation


def test_resampling_balances_classes(records, films):
    counts = records["label_id"].value_counts()
    assert counts.max() >= 2 * counts.min()  # the records are imbalanced
    ds = PL.patch_dataset(records, training=True, balance="resample", batch_size=32, augment_train=False, films=films)
    labels = np.concatenate([y.numpy() for _ in range(6) for _, y in ds])
    assert len(labels) == 6 * len(records)
    share = np.bincount(labels, minlength=3) / len(labels)
    assert np.all(np.abs(share - 1 / 3) < 0.1)
    with pytest.raises(ValueError, match="training"):
        PL.patch_dataset(records, balance="resample", films=films)


def test_pipeline_rejects_bad_records(records, films):
    bad = records.copy()
    bad.loc[0, "label_id"] = -1
    with pytest.raises(ValueError, match="ambiguous"):
        PL.patch_dataset(bad, films=films)
    mixed = pd.concat([records.head(2), records.head(2).assign(size=256)])
    with pytest.raises(ValueError, match="one size"):
        PL.patch_dataset(mixed, films=films)


def test_fold_datasets(records, films):
    patients = sorted(records["patient_id"].unique())
    sets = patients[:-3], patients[-3:-2], patients[-2:]
    out = PL.fold_datasets(records, *sets, films=films, batch_size=16)
    n = {k: sum(len(y) for _, y in ds) for k, ds in out.items()}
    expected = {k: int(records["patient_id"].isin(s).sum()) for k, s in zip(("train", "val", "test"), sets)}
    assert n == expected
    with pytest.raises(ValueError, match="both"):
        PL.fold_datasets(records, patients, sets[1], sets[2], films=films)


def test_crop_dataset(annotations, films):
    crops = P.detection_crops(annotations, 300, refnums=REFNUMS, films=films)
    ds = PL.crop_dataset(crops, batch_size=len(crops), films=films)
    x, target = next(iter(ds))
    assert tuple(x.shape) == (len(crops), 300, 300, 1)
    assert tuple(target["boxes"].shape) == (len(crops), 4, 4) and tuple(target["labels"].shape) == (len(crops), 4)
    for i, rec in enumerate(crops.itertuples()):
        n = len(rec.boxes)
        np.testing.assert_allclose(target["boxes"].numpy()[i, :n], np.asarray(rec.boxes, np.float32).reshape(-1, 4) / 300, atol=1e-6)
        assert target["labels"].numpy()[i].tolist() == list(rec.box_labels) + [0] * (4 - n)
    train = PL.crop_dataset(crops, training=True, batch_size=4, films=films, max_angle=10)
    for x, target in train:
        b = target["boxes"].numpy()
        assert ((b >= 0) & (b <= 1)).all()
        assert (b[target["labels"].numpy() == 0] == 0).all()
    # Re-cut crops (no other augmentation, no shuffle effect on the check): boxes move whole, sizes unchanged.
    shifted = PL.crop_dataset(crops, training=True, batch_size=len(crops), films=films, max_shift=100, flips=False,
                              rot90s=False, flips_up_down=False)
    _, target = next(iter(shifted))
    b, lab = target["boxes"].numpy() * 300, target["labels"].numpy()
    assert ((b >= 0) & (b <= 300)).all() and (b[lab == 0] == 0).all()
    sides = sorted(np.round(np.concatenate([bb[ll > 0, 2:] - bb[ll > 0, :2] for bb, ll in zip(b, lab)]), 2).tolist())
    expected = sorted(np.round(np.concatenate([np.asarray(r, np.float32).reshape(-1, 4)[:, 2:]
                                               - np.asarray(r, np.float32).reshape(-1, 4)[:, :2]
                                               for r in crops["boxes"] if len(r)]), 2).tolist())
    assert sides == expected


def test_shift_ranges_keep_the_crop_in_its_film_and_its_boxes_whole():
    crops = pd.DataFrame({
        "refnum": ["a", "a", "a", "a"], "top": [10, 500, 500, 0], "left": [500, 900, 500, 0], "size": [100] * 4,
        "boxes": [[[20.0, 30.0, 60.0, 70.0]], [], [[0.0, 40.0, 50.0, 60.0]], [[10.0, 10.0, 90.0, 99.0], [5.0, 5.0, 20.0, 20.0]]],
        "box_labels": [[1], [], [2], [1, 2]],
    })
    got = PL.shift_ranges(crops, 50, (1024, 1024))
    # Crop 0: y from -10 (film top) to 20 (box top edge); x from -30 (box right edge 70 -> 100) to 30 (box left).
    assert got[0].tolist() == [-10, 20, -30, 30]
    # Crop 1, no box: +-50 clipped by the film (left 900 + 100 leaves 24 px to the right).
    assert got[1].tolist() == [-50, 50, -50, 24]
    # Crop 2: the box touches the top edge (clipped): no move along y; x between 60 - 100 and 40.
    assert got[2].tolist() == [0, 0, -40, 40]
    # Crop 3: the film corner and two boxes: y in [max(-0, 90 - 100), min(10, 5)] = [0, 5]; x touches 99 < 100.
    assert got[3].tolist() == [0, 5, 0, 5]


def test_crop_dataset_shift_recuts_each_epoch_and_moves_the_box_with_the_lesion():
    film = np.zeros((400, 400), np.uint8)
    film[180:220, 150:210] = 255  # the "lesion": its box is (180, 150, 220, 210) in film pixels
    films = P.FilmCache(load_image={"f": film}.__getitem__)
    top, left = 120, 100
    crops = pd.DataFrame({"refnum": ["f"], "patient_id": [1], "top": [top], "left": [left], "size": [128],
                          "boxes": [[[60.0, 50.0, 100.0, 110.0]]], "box_labels": [[1]]})
    ds = PL.crop_dataset(crops, training=True, batch_size=1, films=films, flips=False, rot90s=False,
                         flips_up_down=False, max_shift=40, seed=3)
    boxes = []
    for _ in range(6):  # six epochs
        x, target = next(iter(ds))
        img, b = x.numpy()[0, ..., 0], target["boxes"].numpy()[0, 0] * 128
        ys, xs = np.nonzero(img > 0.5)
        # The box is exactly where the bright square went.
        np.testing.assert_allclose(b, [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1], atol=1e-4)
        boxes.append(tuple(b))
    assert len(set(boxes)) > 1
    # Without training (or with max_shift 0) the crop stays where the record put it.
    x, target = next(iter(PL.crop_dataset(crops, batch_size=1, films=films, max_shift=40)))
    np.testing.assert_allclose(target["boxes"].numpy()[0, 0] * 128, [60, 50, 100, 110], atol=1e-4)


def test_zoom_out_limits_hold_back_crops_whose_boxes_touch_the_edge():
    crops = pd.DataFrame({"refnum": ["a"] * 3, "top": [0] * 3, "left": [0] * 3, "size": [100] * 3,
                          "boxes": [[[20.0, 30.0, 60.0, 70.0]], [], [[0.0, 40.0, 50.0, 60.0]]], "box_labels": [[1], [], [2]]})
    assert PL.zoom_out_limits(crops, 2.0).tolist() == [2.0, 2.0, 1.0]
    with pytest.raises(ValueError, match="max_zoom_out"):
        PL.zoom_out_limits(crops, 0.5)


def test_crop_dataset_zoom_out_shrinks_the_lesion_and_its_box_alike():
    film = np.zeros((400, 400), np.uint8)
    film[180:220, 150:210] = 255  # the "lesion": its box is (180, 150, 220, 210) in film pixels
    films = P.FilmCache(load_image={"f": film}.__getitem__)
    crops = pd.DataFrame({"refnum": ["f"], "patient_id": [1], "top": [120], "left": [100], "size": [128],
                          "boxes": [[[60.0, 50.0, 100.0, 110.0]]], "box_labels": [[1]]})
    ds = PL.crop_dataset(crops, training=True, batch_size=1, films=films, flips=False, rot90s=False,
                         flips_up_down=False, max_zoom_out=2.5, seed=1)
    sides = []
    for _ in range(8):  # eight epochs, one window drawn in each
        x, target = next(iter(ds))
        img, b = x.numpy()[0, ..., 0], target["boxes"].numpy()[0, 0] * 128
        ys, xs = np.nonzero(img > 0.5)
        # The box follows the bright square to within a pixel (the resampling blurs each edge).
        np.testing.assert_allclose(b, [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1], atol=1.0)
        assert ((b >= 0) & (b <= 128)).all()
        sides.append(b[2] - b[0])
        # The square keeps its 40:60 aspect, whatever the scale.
        np.testing.assert_allclose((b[3] - b[1]) / (b[2] - b[0]), 1.5, rtol=1e-4)
    assert min(sides) < 40 - 5 and max(sides) <= 40 + 1e-4 and min(sides) >= 40 / 2.5 - 1e-4
    # Evaluation crops are never zoomed.
    _, target = next(iter(PL.crop_dataset(crops, batch_size=1, films=films, max_zoom_out=2.5)))
    np.testing.assert_allclose(target["boxes"].numpy()[0, 0] * 128, [60, 50, 100, 110], atol=1e-4)
