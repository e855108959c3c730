"""Patient-level, stratified k-fold splits: the two films of a patient never straddle a split."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold, train_test_split


def patient_table(annotations: pd.DataFrame) -> pd.DataFrame:
    """One row per patient with the worse label of their two films (the stratification label)."""
    per_patient = annotations.groupby("patient_id")["label_id"].max()
    return per_patient.rename("label_id").reset_index()


def patient_folds(annotations: pd.DataFrame, n_splits: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k-fold over patients: a list of (train_patient_ids, test_patient_ids)."""
    patients = patient_table(annotations)
    skf = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    ids = patients["patient_id"].to_numpy()
    return [(np.sort(ids[tr]), np.sort(ids[te])) for tr, te in skf.split(ids, patients["label_id"])]


def train_val_split(
    annotations: pd.DataFrame, train_patients: np.ndarray, val_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split a fold's training patients into train and validation patients, stratified."""
    patients = patient_table(annotations).set_index("patient_id").loc[np.asarray(train_patients)]
    tr, va = train_test_split(
        patients.index.to_numpy(), test_size=val_fraction, random_state=seed, stratify=patients["label_id"]
    )
    return np.sort(tr), np.sort(va)


def fold_table(annotations: pd.DataFrame, n_splits: int = 5, seed: int = 0) -> pd.DataFrame:
    """Images per class in each test fold (for the notebook's fold table)."""
    rows = []
    images = annotations.drop_duplicates("refnum")
    for k, (_, test) in enumerate(patient_folds(annotations, n_splits, seed)):
        sel = images[images["patient_id"].isin(test)]
        row = {"fold": k, "patients": len(test), "images": len(sel)}
        row.update(sel["label"].value_counts().to_dict())
        rows.append(row)
    return pd.DataFrame(rows).fillna(0).set_index("fold")
