"""The classifier experiment's report rows: recipe in the label, fit check, rebuilt from a stored summary."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mammo_tf import classify
from mammo_tf.config import ConfigError
from mammo_tf.io import save_json


def _summary() -> dict:
    summary = {"n_folds": 5, "train_own.balanced_accuracy": {"mean": 0.86, "std": 0.02}}
    for key in ("patch_own", "patch_grid", "image"):
        for model in ("cnn", "majority", "logistic"):
            for metric in classify.METRIC_KEYS.values():
                summary[f"{key}.{model}.{metric}"] = {"mean": 0.7, "std": 0.05}
    return summary


def test_rows_name_the_recipe_and_carry_the_fit_check_on_patch_tables_only():
    exp = classify.ClassifierExperiment(strategy="grid_keep", augment=False, train={"epochs": 60, "early_stopping": False})
    prov = {"command": "c", "date": "d", "hardware": {"cpu": "x", "cpu_count": 2, "gpus": "none"}}
    rows = classify._rows(_summary(), exp, prov)
    cnn = [r for r in rows if r["row"].startswith("CNN")]
    assert cnn and all("(60 epochs, no augmentation)" in r["row"] for r in cnn)
    for r in cnn:
        has_fit = "train bal. acc (fit check)" in r["values"]
        assert has_fit == (not r["table"].startswith("Classification, whole mammogram"))
        if has_fit:
            assert r["values"]["train bal. acc (fit check)"] == [0.86, 0.02]
    assert not any("fit check" in c for r in rows if not r["row"].startswith("CNN") for c in r["values"])


def test_refresh_rows_rebuilds_labels_without_touching_numbers(tmp_path):
    exp = classify.ClassifierExperiment(name="old", strategy="lesion_centred")
    prov = {"command": "c", "date": "d", "hardware": {"cpu": "x", "cpu_count": 2, "gpus": "none"}}
    stored = {"experiment": {k: v for k, v in vars(exp).items() if k != "augment"},  # written before the field existed
              "summary": _summary(), "provenance": prov, "results": [{"row": "stale label"}]}
    (tmp_path / "metrics.json").write_text(json.dumps(stored))
    rows = classify.refresh_rows(tmp_path)
    again = json.loads((tmp_path / "metrics.json").read_text())
    assert again["summary"] == stored["summary"] and again["provenance"] == prov
    assert again["results"] == rows and all(r["row"] != "stale label" for r in rows)
    # TrainConfig's defaults: early stopping on, 10 epochs at most.
    assert any("(best val loss of max 10 epochs, patience 8, flips/rot90)" in r["row"] for r in rows)


def test_film_scores_max_rule_is_the_most_abnormal_patch_and_other_rules_differ():
    import numpy as np
    import pandas as pd

    records = pd.DataFrame({"refnum": ["a", "a", "a", "b", "b"]})
    proba = np.array([[0.9, 0.05, 0.05], [0.2, 0.6, 0.2], [0.5, 0.1, 0.4], [0.7, 0.1, 0.2], [0.6, 0.3, 0.1]])
    top = classify.film_scores(records, proba, "max")
    np.testing.assert_allclose(top.loc["a", ["normal", "benign", "malignant"]], [0.2, 0.6, 0.2])
    np.testing.assert_allclose(top.loc["b", "abnormal_score"], 0.4)
    med = classify.film_scores(records, proba, "max_minus_median")
    np.testing.assert_allclose(med["abnormal_score"], [0.8 - 0.5, 0.4 - 0.35])
    # The lesion share follows the most abnormal patch; probabilities still sum to one.
    np.testing.assert_allclose(med.loc["a", "benign"] / med.loc["a", "malignant"], 3.0)
    np.testing.assert_allclose(med[["normal", "benign", "malignant"]].sum(axis=1), 1.0)
    np.testing.assert_allclose(classify.film_scores(records, proba, "top3_mean").loc["b", "abnormal_score"], 0.35)


def test_choose_film_rule_picks_the_best_validation_auc_and_falls_back_to_max():
    import numpy as np
    import pandas as pd

    # Film c is abnormal with one stray high patch on normal film n1; only the film-relative rule separates them.
    records = pd.DataFrame({"refnum": ["c"] * 3 + ["n1"] * 3 + ["n2"] * 3})
    abnormal = np.array([0.9, 0.1, 0.1, 0.95, 0.9, 0.9, 0.5, 0.5, 0.5])
    proba = np.column_stack([1 - abnormal, abnormal / 2, abnormal / 2])
    labels = pd.Series({"c": 2, "n1": 0, "n2": 0})
    rule, aucs = classify.choose_film_rule(records, proba, labels)
    assert rule == "max_minus_median" and aucs["max_minus_median"] == 1.0 and aucs["max"] == 0.5
    assert classify.choose_film_rule(records, proba, pd.Series({"c": 0, "n1": 0, "n2": 0}))[0] == "max"


def test_film_rule_table_names_each_folds_rule_and_keeps_the_baselines_beside_it():
    summary = _summary()
    for metric in classify.METRIC_KEYS.values():
        summary[f"image.cnn_film_rule.{metric}"] = {"mean": 0.66, "std": 0.01}
    prov = {"command": "c", "date": "d", "hardware": {"cpu": "x", "cpu_count": 2, "gpus": "none"}}
    folds = [{"film_rule": {"chosen": "max"}}, {"film_rule": {"chosen": "max_minus_median"}}]
    rows = [r for r in classify._rows(summary, classify.ClassifierExperiment(), prov, folds)
            if r["table"].endswith("(film rule chosen on validation patients)")]
    assert [r["row"].split(" (")[0] for r in rows] == ["CNN trained on lesion_centred 128", "majority class",
                                                       "logistic regression, intensity features"]
    assert rows[0]["values"]["macro AUC"] == [0.66, 0.01] and "rule per fold: max, max_minus_median" in rows[0]["note"]
    assert not [r for r in classify._rows(summary, classify.ClassifierExperiment(), prov) if "film rule" in r["table"]]


def test_naive_split_row_has_no_spread_and_names_its_recipe():
    summary = _summary()
    for metric in classify.METRIC_KEYS.values():
        summary[f"naive.cnn.{metric}"] = {"mean": 0.8, "std": 0.0}
    prov = {"command": "c", "date": "d", "hardware": {"cpu": "x", "cpu_count": 2, "gpus": "none"}}
    rows = classify._rows(summary, classify.ClassifierExperiment(augment=False, train={"epochs": 60, "early_stopping": False}), prov)
    (leaky,) = [r for r in rows if "LEAKY" in r["row"]]
    assert leaky["row"].endswith("(60 epochs, no augmentation)")
    from mammo_tf.report import format_value

    assert format_value(leaky["values"]["macro AUC"]) == "0.800"


def test_paired_rows_are_fold_by_fold_differences_against_the_logistic_baseline():
    exp = classify.ClassifierExperiment(name="p", strategy="grid_keep")
    prov = {"command": "c", "date": "d", "hardware": {"cpu": "x", "cpu_count": 2, "gpus": "none"}}
    report = lambda auc, bal: {"abnormal_vs_normal_auc": auc, "macro_roc_auc": auc, "balanced_accuracy": bal}  # noqa: E731
    folds = [{"patch_grid": {"cnn": report(0.80, 0.5), "logistic": report(0.70, 0.5)}},
             {"patch_grid": {"cnn": report(0.60, 0.4), "logistic": report(0.70, 0.5)}}]
    rows = [r for r in classify._rows(_summary(), exp, prov, folds) if r["table"] == classify.PAIRED_TABLE]
    assert len(rows) == 1 and rows[0]["row"].endswith("grid_keep test patches")  # no film-level folds given
    v = rows[0]["values"]
    assert v["folds model ahead (abnormal AUC)"] == "1/2"
    assert v["Δ abnormal AUC"][0] == pytest.approx(0.0) and v["Δ abnormal AUC"][1] == pytest.approx(0.02 ** 0.5)  # differences +0.1 and -0.1
    assert v["Δ balanced acc"][0] == pytest.approx(-0.05)


def test_lesion_copies_are_abnormal_off_centre_patches_within_the_jitter(annotations):
    from mammo_tf import patches
    from mammo_tf.config import ConfigError

    refnums = ["mdb001", "mdb005", "mdb023", "mdb003"]
    ann = annotations[annotations["refnum"].isin(refnums)].reset_index(drop=True)
    exp = classify.ClassifierExperiment(strategy="grid_keep", lesion_copies=3, lesion_jitter=40)
    films = patches.FilmCache()
    copies = classify.lesion_copies(ann, exp, films)
    # mdb001 one lesion, mdb005 two, mdb023 one; mdb003 is normal: at most 3 copies of each of 4 lesions.
    assert set(copies["refnum"]) == {"mdb001", "mdb005", "mdb023"} and 8 <= len(copies) <= 12
    assert (copies["label_id"] > 0).all() and copies["centre_inside"].all()
    assert not copies.duplicated(classify.PATCH_KEY).any()
    lesion = ann[ann["refnum"] == "mdb001"].iloc[0]
    own = copies[copies["refnum"] == "mdb001"]
    # The patch centre is within the jitter of the lesion centre on each axis (patches stay inside the film).
    assert (abs(own["top"] + 64 - lesion["y"]) <= 41).all() and (abs(own["left"] + 64 - lesion["x"]) <= 41).all()
    assert own[["top", "left"]].drop_duplicates().shape[0] > 1
    with pytest.raises(ConfigError, match="lesion_jitter"):
        classify.lesion_copies(ann, classify.ClassifierExperiment(lesion_copies=2, lesion_jitter=64), films)


def test_the_naive_split_audit_is_reported_as_trained_not_retrained(tmp_path):

    stored = {"cnn": {"macro_roc_auc": 0.81}, "patients_on_both_sides": 40, "n_test": 261}
    save_json(tmp_path / "naive_split" / "audit.json", stored)
    # No annotations and no films: a re-evaluation must not cut patches or train.
    assert classify._naive_split_audit(classify.ClassifierExperiment(), None, None, tmp_path) == stored


def test_a_reloaded_fold_keeps_the_patch_counts_its_training_used(tmp_path):
    earlier = tmp_path / "metrics.json"
    save_json(earlier, {"folds": [{"fold": 0, "n_train": 292, "n_val": 1705},
                                  {"fold": 1, "n_train": 296, "n_val": 1708}]})
    folds = [{"fold": 0, "trained_here": False, "n_train": 292, "n_val": 76, "n_test": 9},
             {"fold": 1, "trained_here": True, "n_train": 300, "n_val": 80, "n_test": 9}]
    classify._keep_training_counts(folds, earlier)
    assert (folds[0]["n_val"], folds[0]["n_test"]) == (1705, 9)  # what its training saw; the test set is today's
    assert (folds[1]["n_train"], folds[1]["n_val"]) == (300, 80)  # trained now: today's counts
    classify._keep_training_counts(folds, tmp_path / "absent.json")  # a first run has nothing to keep
    assert folds[0]["n_val"] == 1705


def test_whole_film_records_are_one_per_film_with_the_film_label(annotations):
    from mammo_tf import patches
    from mammo_tf.data import mias

    records = patches.whole_film_records(annotations, 256)
    films = mias.images_table(annotations)
    assert len(records) == 322 == records["refnum"].nunique()
    assert (records[["top", "left"]] == 0).all().all() and (records["size"] == 256).all()
    assert records.set_index("refnum")["label_id"].to_dict() == films.set_index("refnum")["label_id"].to_dict()
    assert records["label_id"].value_counts().sort_index().tolist() == [207, 63, 52]  # as the parser test counts films


def test_whole_films_are_the_prepared_breast_box_and_keep_the_originals(annotations):
    from mammo_tf import patches

    raw = patches.FilmCache()
    whole = patches.WholeFilms(128, raw=raw)
    image = whole.image("mdb001")
    expected, _, transform = patches.prepare_whole(raw.image("mdb001"), size=128)
    assert image.shape == (128, 128) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, expected)
    assert transform.side > 128 and whole.raw is raw
    # The intensity baseline of a whole-film run reads the original films, as every other run's does.
    np.testing.assert_array_equal(classify._film_features(["mdb001"], whole), classify._film_features(["mdb001"], raw))


def test_whole_film_rows_are_one_film_table_and_a_paired_row_without_a_patch_rule():
    exp = classify.ClassifierExperiment(name="w", strategy="whole", size=256, patch_options={}, model={"pooling": "max"})
    prov = {"command": "c", "date": "d", "hardware": {"cpu": "x", "cpu_count": 2, "gpus": "none"}}
    report = lambda auc: {"abnormal_vs_normal_auc": auc, "macro_roc_auc": auc, "balanced_accuracy": 0.5}  # noqa: E731
    folds = [{"film_rule": {"chosen": "max"}, "patch_grid": {"cnn": report(0.9), "logistic": report(0.5)},
              "image": {"cnn": report(0.6), "logistic": report(0.5)}}] * 2
    summary = _summary()
    for metric in classify.METRIC_KEYS.values():
        summary[f"image.cnn_film_rule.{metric}"] = {"mean": 0.66, "std": 0.01}
    rows = classify._rows(summary, exp, prov, folds)
    tables = {r["table"] for r in rows}
    assert tables == {classify.WHOLE_FILM_TABLE, classify.PAIRED_TABLE, "Classifier network size (parameters)"}
    (paired,) = [r for r in rows if r["table"] == classify.PAIRED_TABLE]
    assert paired["row"].endswith("flips/rot90, global max pooling), whole mammogram") and "whole films" in paired["row"]
    assert paired["values"]["Δ abnormal AUC"] == pytest.approx([0.1, 0.0])  # the film level, not the patch_grid one
    # Its training samples are films: the fit check belongs in its film table.
    assert [r["row"] for r in rows if "train bal. acc (fit check)" in r["values"]] == [classify.model_label(exp)]


@pytest.mark.parametrize("bad", [{"lesion_copies": 2}, {"leakage_audit": True}, {"patch_options": {"jitter": 16}},
                                 {"classifier": "vgg16_probe"}])
def test_whole_film_experiment_refuses_patch_options(tmp_path, bad):
    from mammo_tf.config import ConfigError

    exp = classify.ClassifierExperiment(**{"name": "w", "strategy": "whole", "patch_options": {}, **bad})
    with pytest.raises(ConfigError, match="strategy whole"):
        classify.run_experiment(exp, tmp_path / "w")


TINY_GRID = dict(strategy="grid_keep", size=128, patch_options={}, max_films=30, max_folds=1, augment=False,
                 train={"epochs": 1, "batch_size": 32, "early_stopping": False, "tensorboard": False})


def test_a_run_goes_on_from_the_fold_models_with_mined_lesion_free_patches(tmp_path):
    from mammo_tf.models import classifier as clf

    first = tmp_path / "first"
    first_run = classify.run_experiment(classify.ClassifierExperiment(name="first", **TINY_GRID), first, command="pytest")
    # Learning rate 0: the fold model keeps the weights it went on from; it trains on the first run's patches
    # and the mined ones.
    still = {**TINY_GRID, "train": {**TINY_GRID["train"], "learning_rate": 0.0}, "init_from": str(first)}
    mined = classify.run_experiment(classify.ClassifierExperiment(name="mined", hard_negatives=7, **still),
                                    tmp_path / "mined")
    before, _ = clf.load_classifier(first / "fold0" / "model.keras")
    after, _ = clf.load_classifier(tmp_path / "mined" / "fold0" / "model.keras")
    for a, b in zip(before.get_weights(), after.get_weights()):
        np.testing.assert_array_equal(a, b)
    info = mined["folds"][0]["hard_negatives"]
    assert info["n_mined"] == 7 and info["n_candidates"] > 7
    assert mined["folds"][0]["n_train"] == first_run["folds"][0]["n_train"] + 7
    assert "on from first's fold models with its 7 highest-scoring" in mined["results"][0]["row"]
    # Re-evaluated without retraining, the fold keeps what it trained on.
    again = classify.run_experiment(classify.ClassifierExperiment(name="mined", hard_negatives=7, **still),
                                    tmp_path / "mined")
    assert again["folds"][0]["hard_negatives"] == info and again["folds"][0]["n_train"] == mined["folds"][0]["n_train"]


def test_mined_patches_are_the_highest_scoring_lesion_free_ones_of_training_patients():
    whole = pd.DataFrame({"refnum": ["a", "a", "a", "b", "b", "c"], "patient_id": [1, 1, 1, 1, 1, 2],
                          "top": 0, "left": [100, 900, 500, 800, 300, 990], "size": 128,
                          "label_id": [0, 1, 0, 0, -1, 0]})
    mined, info = classify.mine_hard_negatives(lambda frame: frame["left"].to_numpy() / 1000, whole,
                                               train=whole.iloc[[0]], train_patients=[1], n=2, normal_films=["b"])
    # Patient 2 is not a training patient, label 1 holds a lesion, -1 is ambiguous, left 100 trains already.
    assert mined["left"].tolist() == [800, 500] and info["n_candidates"] == 2
    assert info["share_from_normal_films"] == 0.5 and info["lowest_score_mined"] == pytest.approx(0.5)
    assert info["median_score_candidates"] == pytest.approx(0.65)


@pytest.mark.parametrize("bad, message", [
    ({"hard_negatives": 5}, "set init_from"),
    ({"init_from": "MISSING"}, "holds no classifier run"),
    ({"init_from": "RUN", "size": 256}, r"differs in \['size'\]"),
    ({"init_from": "RUN", "strategy": "whole", "patch_options": {}}, "patch CNN"),
])
def test_init_from_settings_are_refused_before_anything_trains(tmp_path, bad, message):
    from mammo_tf.config import save_config

    run = tmp_path / "run"
    run.mkdir()
    save_config(classify.ClassifierExperiment(name="run", **TINY_GRID), run / "config.yaml")
    settings = {**TINY_GRID, **{k: str(run) if v == "RUN" else str(tmp_path / v) if v == "MISSING" else v
                                for k, v in bad.items()}}
    with pytest.raises(ConfigError, match=message):
        classify.run_experiment(classify.ClassifierExperiment(name="w", **settings), tmp_path / "w")
    assert not (tmp_path / "w" / "fold0").exists()


def test_an_init_fold_tested_on_other_patients_is_refused(tmp_path):
    fold = tmp_path / "run" / "fold0"
    fold.mkdir(parents=True)
    (fold / "model.keras").write_bytes(b"")
    pd.DataFrame({"patient_id": [3, 8]}).to_csv(fold / "patch_predictions.csv", index=False)
    exp = classify.ClassifierExperiment(name="w", init_from=str(tmp_path / "run"))
    assert classify.init_fold_dir(exp, 0, test_patients=[3, 8, 9]) == fold
    with pytest.raises(ConfigError, match=r"tested on patients \[8\] outside fold 0's test set"):
        classify.init_fold_dir(exp, 0, test_patients=[3, 9])
    with pytest.raises(ConfigError, match="holds no trained CNN fold"):
        classify.init_fold_dir(exp, 1, test_patients=[3])
