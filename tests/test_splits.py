"""Patient-level folds: no patient on two sides, every patient tested once, classes balanced."""

from __future__ import annotations

import numpy as np

from mammo_tf.data import splits


def test_folds_partition_patients(annotations):
    folds = splits.patient_folds(annotations, n_splits=5, seed=0)
    assert len(folds) == 5
    tested = np.concatenate([te for _, te in folds])
    assert sorted(tested.tolist()) == list(range(1, 162))
    for train, test in folds:
        assert not set(train) & set(test)
        assert len(train) + len(test) == 161


def test_films_of_a_patient_stay_together(annotations):
    for train, test in splits.patient_folds(annotations, n_splits=5, seed=0):
        train_films = set(annotations[annotations.patient_id.isin(train)].refnum)
        test_films = set(annotations[annotations.patient_id.isin(test)].refnum)
        assert not train_films & test_films
        assert len(train_films) + len(test_films) == 322


def test_class_balance(annotations):
    patients = splits.patient_table(annotations)
    overall = patients["label_id"].value_counts(normalize=True)
    for _, test in splits.patient_folds(annotations, n_splits=5, seed=0):
        share = patients[patients.patient_id.isin(test)]["label_id"].value_counts(normalize=True)
        assert (share.reindex(overall.index).fillna(0) - overall).abs().max() < 0.05


def test_seeded(annotations):
    a = splits.patient_folds(annotations, seed=3)
    b = splits.patient_folds(annotations, seed=3)
    c = splits.patient_folds(annotations, seed=4)
    assert all((x[1] == y[1]).all() for x, y in zip(a, b))
    assert any((x[1] != y[1]).any() for x, y in zip(a, c) if len(x[1]) == len(y[1]))


def test_train_val_split(annotations):
    train, _ = splits.patient_folds(annotations)[0]
    tr, va = splits.train_val_split(annotations, train, val_fraction=0.2, seed=0)
    assert not set(tr) & set(va) and sorted(np.concatenate([tr, va]).tolist()) == sorted(train.tolist())
