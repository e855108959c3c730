"""Recipe chosen per fold on validation patients: hand-worked choices and AUCs, refusals, the held-out patients."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mammo_tf import cli
from mammo_tf import selection as S
from mammo_tf.data import splits

LABELS = [0, 0, 1, 2]
LOGISTIC = [0.2, 0.4, 0.3, 0.5]                    # AUC 3/4 in each fold
PERFECT, INVERTED, PARTIAL = [0.1, 0.2, 0.8, 0.9], [0.9, 0.8, 0.1, 0.2], [0.1, 0.6, 0.5, 0.9]   # AUC 1, 0, 3/4
TEST = {"a": {0: PERFECT, 1: INVERTED}, "b": {0: INVERTED, 1: PERFECT}, "c": {0: PARTIAL, 1: PARTIAL}}
FILM_VALIDATION = {"a": [0.5, 0.5], "b": [0.4, 0.4], "c": [0.6, 0.6]}


def _run(root, name: str, **changes) -> str:
    run = root / name
    folds = []
    for k in (0, 1):
        (run / f"fold{k}").mkdir(parents=True)
        base = {"refnum": [f"mdb{4 * k + i + 1:03d}" for i in range(4)], "label_id": LABELS, "fold": k,
                "score_logistic": LOGISTIC}
        pd.DataFrame({**base, "score_cnn": TEST[name][k]}).to_csv(run / f"fold{k}" / "patch_predictions.csv", index=False)
        pd.DataFrame({**base, "abnormal_score": TEST[name][k]}).to_csv(run / f"fold{k}" / "film_predictions.csv",
                                                                       index=False)
        folds.append({"fold": k, "film_rule": {"validation_abnormal_auc": {"max": FILM_VALIDATION[name][k]}}})
    exp = {"name": name, "strategy": "grid_keep", "size": 128, "seed": 0, "folds": 2, "val_fraction": 0.2,
           "classifier": "cnn", "train": {"epochs": 60, "early_stopping": False}, **changes}
    (run / "metrics.json").write_text(json.dumps({"experiment": exp, "folds": folds, "results": []}))
    return str(run)


def test_choose_takes_the_best_validation_auc_the_first_on_a_tie_and_never_nan():
    validation = pd.DataFrame({"a": [0.9, np.nan], "b": [0.6, 0.7], "c": [0.9, 0.6]})
    assert S.choose(validation).tolist() == ["a", "b"]
    with pytest.raises(ValueError, match="no validation AUC"):
        S.choose(pd.DataFrame({"a": [np.nan], "b": [np.nan]}))


def test_the_chosen_runs_test_predictions_are_scored_against_their_baseline_by_hand(tmp_path):
    runs = [_run(tmp_path, n) for n in "abc"]
    patch_validation = pd.DataFrame({"a": [0.9, np.nan], "b": [0.6, 0.7], "c": [0.9, 0.6]})
    validation = {"patch": patch_validation, "film": S.validation_film_aucs([tmp_path / n for n in "abc"])}
    metrics = S.evaluate(runs, tmp_path / "out", command="pytest", validation=validation, n_boot=50)
    patch, film = metrics["summary"]["patch"], metrics["summary"]["film"]
    # Patches: fold 0 takes a (tie with c, a first), fold 1 b: both perfect on their test fold.
    assert patch["chosen"] == ["a", "b"] and patch["fold_auc"] == pytest.approx([1.0, 1.0])
    assert patch["minus_logistic"]["mean"] == pytest.approx(0.25) and patch["minus_logistic"]["ahead"] == 2
    # Films: c has the best stored validation AUC in both folds, and is level with the baseline.
    assert film["chosen"] == ["c", "c"] and film["fold_auc"] == pytest.approx([0.75, 0.75])
    assert film["minus_logistic"]["mean"] == pytest.approx(0.0) and film["minus_logistic"]["ahead"] == 0
    # The choice made on test patients, for contrast: c has the best mean test AUC (a and b average 0.5).
    assert patch["best_on_test"] == "c"
    rows = {r["row"]: r["values"] for r in metrics["results"]}
    chosen = rows["recipe chosen per fold on validation patients"]
    assert chosen["grid_keep test patches: runs chosen (fold 0, 1, ...)"] == "a, b"
    assert chosen["grid_keep test patches: folds ahead"] == "2/2"
    assert chosen["whole mammogram, max rule: abnormal AUC"] == pytest.approx([0.75, 0.0])
    assert rows["logistic, intensity (the chosen run's own baseline, same training patients)"][
        "grid_keep test patches: abnormal AUC"] == pytest.approx([0.75, 0.0])
    assert (tmp_path / "out" / "validation_vs_test.png").is_file()
    assert pd.read_csv(tmp_path / "out" / "validation_auc_film.csv", index_col="fold")["c"].tolist() == [0.6, 0.6]


@pytest.mark.parametrize("change, match", [({"seed": 1}, "seed differ"), ({"size": 256}, "size differ"),
                                           ({"strategy": "whole"}, "patch CNN runs"),
                                           ({"classifier": "vgg16_probe"}, "patch CNN runs"),
                                           ({"train": {"early_stopping": True}}, "early stopping")])
def test_candidates_not_on_the_same_folds_or_not_comparable_are_refused(tmp_path, change, match):
    runs = [_run(tmp_path, "a"), _run(tmp_path, "b", **change)]
    with pytest.raises(ValueError, match=match):
        S.evaluate(runs, tmp_path / "out", validation={})
    with pytest.raises(ValueError, match="at least two"):
        S.evaluate(runs[:1], tmp_path / "out", validation={})
    assert not (tmp_path / "out").exists()


def test_validation_patches_are_the_folds_held_out_training_patients(annotations):
    exp = {"folds": 5, "seed": 0, "val_fraction": 0.2}
    grid = annotations.drop_duplicates("refnum")[["refnum", "patient_id", "label_id"]]
    for k, (train, test) in enumerate(splits.patient_folds(annotations, 5, 0)):
        val = S.validation_records(annotations, grid, exp, k)
        patients = set(val["patient_id"])
        assert patients <= set(train) and not patients & set(test)
        assert patients == set(splits.train_val_split(annotations, train, 0.2, seed=k)[1])


def test_cli_prints_the_rows(tmp_path, capsys, monkeypatch):
    runs = [_run(tmp_path, n) for n in "abc"]
    monkeypatch.setattr(S, "validation_patch_aucs", lambda dirs: pd.DataFrame({"a": [0.9, 0.1], "b": [0.6, 0.7],
                                                                                "c": [0.5, 0.6]}))
    assert cli.main(["select-classifier", "--models", *runs, "--out", str(tmp_path / "out")]) == 0
    assert "recipe chosen per fold on validation patients" in capsys.readouterr().out


def test_validation_aucs_run_each_fold_model_on_its_held_out_patients(tmp_path):
    import dataclasses

    import keras

    from mammo_tf import classify
    from mammo_tf.models import classifier as clf

    runs = []
    for i, name in enumerate("ab"):
        exp = classify.ClassifierExperiment(name=name, folds=2, max_folds=1, max_films=60, seed=0)
        (tmp_path / name / "fold0").mkdir(parents=True)
        keras.utils.set_random_seed(i)   # untrained networks with other weights: scores, not skill, are checked
        clf.build_classifier(clf.ClassifierConfig(input_size=128)).save(tmp_path / name / "fold0" / "model.keras")
        (tmp_path / name / "metrics.json").write_text(json.dumps({"experiment": dataclasses.asdict(exp)}))
        runs.append(tmp_path / name)
    table = S.validation_patch_aucs(runs)
    assert list(table.columns) == ["a", "b"] and list(table.index) == [0]
    assert all(0.0 <= v <= 1.0 for v in table.loc[0])


def test_subgroups_compare_each_lesion_type_against_all_normal_patches_by_hand(annotations):
    films = annotations.drop_duplicates("refnum")
    calc = films[(films["abnormality"] == "CALC") & (films["label_id"] > 0)]["refnum"].tolist()[:2]
    circ = films[(films["abnormality"] == "CIRC") & (films["label_id"] > 0)]["refnum"].tolist()[:2]
    normal = films[films["label_id"] == 0]["refnum"].tolist()[:4]
    chosen = pd.DataFrame({"refnum": calc + circ + normal, "label_id": [1, 1, 1, 1, 0, 0, 0, 0],
                           "score": [0.9, 0.8, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6], "score_logistic": 0.5})
    groups = S.subgroups(chosen, annotations, n_boot=50)
    calc_row = groups["CALC (calcification) vs all normal patches"]
    circ_row = groups["CIRC (circumscribed mass) vs all normal patches"]
    assert (calc_row["n_abnormal"], calc_row["n_normal"], calc_row["auc"], calc_row["auc_logistic"]) == (2, 4, 1.0, 0.5)
    assert circ_row["auc"] == 0.0 and circ_row["difference"]["auc_difference"] == -0.5
    assert not any(name.startswith("SPIC") for name in groups)   # no spiculated patch here: no row
