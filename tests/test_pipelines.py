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
