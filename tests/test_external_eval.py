"""External validation (mammo_tf.external_eval): preparation, mini-MIAS operating point, halves, end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from mammo_tf import external_eval as X
from mammo_tf.plots import external as xplots

RSNA = "rsna-640"
DDSM = "mini-ddsm-sample"


# --------------------------------------------------------------------------- preparation


def _film(h: int, w: int, inverted: bool) -> np.ndarray:
    """A dark background with a bright half-disc of 'tissue' on the left; flipped when `inverted`."""
    yy, xx = np.mgrid[:h, :w]
    image = np.full((h, w), 10, np.uint8)
    image[(yy - h / 2) ** 2 + xx ** 2 < (0.4 * h) ** 2] = 120
    image[(yy - h / 2) ** 2 + xx ** 2 < (0.2 * h) ** 2] = 200
    return 255 - image if inverted else image


def test_prepare_external_fixes_inversion_and_rescales_known_spacing():
    film = _film(200, 120, inverted=True)
    out = X.prepare_external(film, 0.1)
    # 0.1 mm -> 0.2 mm halves both sides; the background (right edge) is dark again.
    assert out.shape == (100, 60) and out.dtype == np.uint8
    assert out[:, -1].max() < 30 and out[50, 0] > 150
    same = X.prepare_external(_film(200, 120, inverted=False), 0.2)
    np.testing.assert_array_equal(same, _film(200, 120, inverted=False))


def test_prepare_external_unknown_spacing_is_a_mias_sized_film():
    for spacing in (None, float("nan")):
        out = X.prepare_external(_film(640, 640, inverted=True), spacing)
        assert out.shape == (1024, 1024) and out[512, 1023] < 30 and out[512, 0] > 150
    assert X.prepare_external(_film(64, 64, False), None, size_if_unknown=32).shape == (32, 32)
    with pytest.raises(ValueError, match="2-D uint8"):
        X.prepare_external(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="size_if_unknown"):
        X.prepare_external(_film(64, 64, False), None, size_if_unknown=0)


# --------------------------------------------------------------------------- subsets and halves


def _images(n_patients: int = 30, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        worst = 2 if p % 3 == 0 else 0
        for i in range(int(rng.integers(1, 5))):
            label_id = worst if i == 0 else int(rng.choice([0, worst]))
            rows.append({"image_id": f"{p}_{i}", "patient_id": str(p), "label_id": label_id,
                         "label": "malignant" if label_id else "negative"})
    return pd.DataFrame(rows)


def test_patient_halves_are_disjoint_stratified_and_seeded():
    images = _images()
    half = X.patient_halves(images, seed=0)
    assert set(half) == {"A", "B"} and len(half) == len(images)
    # Every patient lies wholly in one half.
    assert (images.assign(half=half).groupby("patient_id")["half"].nunique() == 1).all()
    worst = images.groupby("patient_id")["label_id"].max()
    per_patient = images.assign(half=half).groupby("patient_id")["half"].first()
    for label in (0, 2):  # 20 cancer-free and 10 cancer patients: split 10/10 and 5/5
        counts = per_patient[worst == label].value_counts()
        assert abs(counts["A"] - counts["B"]) <= 1
    assert half.equals(X.patient_halves(images, seed=0))
    assert not half.equals(X.patient_halves(images, seed=1))


def test_select_images_keeps_whole_patients_and_both_strata():
    images = _images()
    sub = X.select_images(images, 20, seed=0)
    assert 0 < len(sub) <= 22
    assert set(sub["label_id"]) == {0, 2}
    for pid, group in sub.groupby("patient_id"):
        assert len(group) == (images["patient_id"] == pid).sum()  # no patient cut in two
    assert X.select_images(images, None).equals(images)
    assert X.select_images(images, 10 ** 6).equals(images)
    with pytest.raises(ValueError, match="max_images"):
        X.select_images(images, 0)


# --------------------------------------------------------------------------- operating points


def test_operating_point_counts_by_hand():
    y = np.array([1, 1, 1, 1, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.4, 0.7, 0.75, 0.3, 0.1])
    pt = X.operating_point(y, s, 0.7)
    assert pt["sensitivity_count"] == [3, 4] and pt["specificity_count"] == [2, 3]
    assert pt["sensitivity"] == 0.75 and pt["specificity"] == pytest.approx(2 / 3)
    assert pt["sensitivity_ci"][0] < 0.75 < pt["sensitivity_ci"][1]
    nan = X.operating_point(y, s, float("nan"))
    assert math.isnan(nan["sensitivity"]) and math.isnan(nan["specificity"])


def _mias_predictions(seed: int = 0) -> pd.DataFrame:
    """Synthetic out-of-fold mini-MIAS film predictions: 20 abnormal films scoring 0.50..0.69, 20 normal."""
    rng = np.random.default_rng(seed)
    abnormal = np.linspace(0.69, 0.50, 20)
    rows = [{"refnum": f"mdb{i + 1:03d}", "label_id": 1 + i % 2, "abnormal_score": s} for i, s in enumerate(abnormal)]
    rows += [{"refnum": f"mdb{i + 21:03d}", "label_id": 0, "abnormal_score": s} for i, s in enumerate(rng.uniform(0, 0.6, 20))]
    films = pd.DataFrame(rows)
    films["normal"] = 1 - films["abnormal_score"]
    films["benign"] = films["abnormal_score"] / 2
    films["malignant"] = films["abnormal_score"] / 2
    return films


def test_mias_operating_point_is_chosen_on_mini_mias_films_only():
    films = _mias_predictions()
    op = X.mias_operating_point(films, 0.95)
    # 95% of 20 abnormal films = 19: the 19th highest abnormal score, 0.51.
    assert op["threshold"] == pytest.approx(0.51)
    assert op["sensitivity_count"] == [19, 20] and op["n_films"] == 40
    # Only mini-MIAS scores enter: changing the normal films' scores moves nothing here.
    other = _mias_predictions(seed=5)
    assert X.mias_operating_point(other, 0.95)["threshold"] == op["threshold"]


def test_mias_film_predictions_pools_folds_and_derives_patients(tmp_path):
    films = _mias_predictions()
    for k, part in enumerate((films.iloc[:25], films.iloc[25:])):
        (tmp_path / f"fold{k}").mkdir()
        part.assign(fold=k).to_csv(tmp_path / f"fold{k}" / "film_predictions.csv", index=False)
    pooled = X.mias_film_predictions([tmp_path / "fold0", tmp_path / "fold1"])
    assert len(pooled) == 40
    assert pooled.set_index("refnum").loc[["mdb001", "mdb002", "mdb003", "mdb040"], "patient_id"].tolist() == [1, 1, 2, 20]
    with pytest.raises(ValueError, match="more than one fold"):
        X.mias_film_predictions([tmp_path / "fold0", tmp_path / "fold0"])


# --------------------------------------------------------------------------- models


def _tiny_classifier(seed: int):
    import keras

    from mammo_tf.models.classifier import ClassifierConfig, build_classifier

    keras.utils.set_random_seed(seed)
    return build_classifier(ClassifierConfig(filters=(8, 16), kernel_sizes=(3, 3), strides=(4, 4), separable_layers=()))


def test_fold_ensemble_averages_and_keeps_each_fold():
    from mammo_tf import classify

    models = [_tiny_classifier(0), _tiny_classifier(1)]
    x = np.random.default_rng(0).uniform(size=(5, 128, 128, 1)).astype(np.float32)
    singles = [m.predict(x, verbose=0) for m in models]
    ens = X.FoldEnsemble(models)
    np.testing.assert_allclose(ens.predict(x, batch_size=3), (singles[0] + singles[1]) / 2, rtol=1e-5, atol=1e-6)
    per_fold = ens.pop_fold_proba()
    assert per_fold.shape == (5, 2, 3)
    np.testing.assert_allclose(per_fold[:, 1], singles[1], rtol=1e-5, atol=1e-6)
    assert ens.pop_fold_proba().shape == (0, 2, 3)
    np.testing.assert_allclose(ens(x[:2], training=False), (singles[0][:2] + singles[1][:2]) / 2, rtol=1e-5, atol=1e-6)
    assert ens.pop_fold_proba().shape == (2, 2, 3)
    # Through the whole-mammogram rule: each fold's best patch among the same patches.
    image = np.zeros((256, 256), np.uint8)
    image[40:220, :150] = 140
    proba, heat = classify.score_image(ens, image)
    fold_proba = ens.pop_fold_proba()
    assert proba.shape == (3,) and heat.shape == image.shape and fold_proba.shape[1:] == (2, 3)
    np.testing.assert_allclose(X.best_patch(fold_proba.mean(axis=1)), proba, rtol=1e-5, atol=1e-6)


def _classifier_dir(root, n_folds: int = 2):
    """A classifier experiment folder with untrained fold models and synthetic out-of-fold predictions."""
    from mammo_tf.io import atomic_path

    root.mkdir(parents=True)
    (root / "config.yaml").write_text(f"name: tiny\nstrategy: lesion_centred\nsize: 128\nfolds: {n_folds}\n")
    films = _mias_predictions()
    for k in range(n_folds):
        fold = root / f"fold{k}"
        fold.mkdir()
        with atomic_path(fold / "model.keras") as tmp:
            _tiny_classifier(k).save(tmp)
        films.iloc[k::n_folds].assign(fold=k).to_csv(fold / "film_predictions.csv", index=False)
    return root


def test_model_kind_tells_classifier_and_detector_folders(tmp_path):
    clf = _classifier_dir(tmp_path / "clf", n_folds=1)
    assert X.model_kind(clf) == "classifier"
    det = tmp_path / "det"
    det.mkdir()
    (det / "model.keras").write_bytes(b"")
    (det / "config.json").write_text(json.dumps({"ssd": {}, "experiment": {}}))
    assert X.model_kind(det) == "detector"
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="neither a classifier"):
        X.model_kind(tmp_path / "other")
    with pytest.raises(FileNotFoundError):
        X.model_kind(tmp_path / "missing")


def test_cli_registers_evaluate_external():
    from mammo_tf import cli

    args = cli.build_parser().parse_args(["evaluate-external", "--data", "d", "--adapter", "ddsm", "--model", "m",
                                          "--max-images", "8"])
    assert args.func is X.cmd_evaluate_external and args.adapter == "ddsm" and args.max_images == 8


def test_cli_bad_model_folder_is_a_clear_error(tmp_path, capsys):
    from mammo_tf import cli

    (tmp_path / "set" / "benign").mkdir(parents=True)
    assert cli.main(["evaluate-external", "--data", str(tmp_path / "set"), "--model", str(tmp_path / "nope")]) == 2
    assert "nope: model folder not found" in capsys.readouterr().err


def test_settings_load():
    small, full = X.load_setting("configs/external_small.yaml"), X.load_setting("configs/external_full.yaml")
    assert small.max_images and full.max_images is None
    assert small.path(small.rsna).name == RSNA and small.path(small.ddsm).name == DDSM


# --------------------------------------------------------------------------- end to end


def test_evaluate_classifier_external_end_to_end(tmp_path, shared_data):
    model_dir = _classifier_dir(tmp_path / "clf", n_folds=2)
    out = tmp_path / "out"
    metrics = X.evaluate_classifier_external(model_dir, shared_data / RSNA, "folder", out, max_images=16, seed=0,
                                             command="pytest", n_boot=50, n_examples=2)
    preds = pd.read_csv(out / "predictions.csv")
    setting = metrics["setting"]
    assert len(preds) == setting["n_images"] and 10 <= len(preds) <= 16
    assert set(preds["label"]) == {"negative", "malignant"} and preds["error"].isna().all()
    for col in ("image_id", "patient_id", "label_id", "abnormal_score", "p_malignant", "abnormal_score_fold1", "half"):
        assert col in preds
    assert preds[["abnormal_score", "p_normal", "p_benign", "p_malignant"]].apply(lambda c: c.between(0, 1)).all().all()
    np.testing.assert_allclose(preds["p_normal"] + preds["p_benign"] + preds["p_malignant"], 1, atol=1e-5)
    # Halves: whole patients, both classes in each (seed 0), and the baseline scores exactly the B images.
    assert (preds.groupby("patient_id")["half"].nunique() == 1).all()
    assert pd.crosstab(preds["half"], preds["label"]).to_numpy().min() > 0
    assert preds["logistic_score"].notna().tolist() == (preds["half"] == "B").tolist()
    # The operating point comes from the mini-MIAS predictions alone.
    expected = X.mias_operating_point(X.mias_film_predictions(X.fold_dirs(model_dir)))["threshold"]
    assert metrics["mias_operating_point"]["threshold"] == pytest.approx(expected)
    detail = metrics["results_detail"]
    auc = detail["abnormal_score"]["auc"]["auc"]
    assert 0.0 <= auc <= 1.0
    assert setting["folds_used"] == ["fold0", "fold1"] and setting["task"] == "malignant vs cancer-negative"
    for key in ("sensitivity", "specificity"):
        v = detail["abnormal_score"]["at_mias_threshold"][key]
        assert 0.0 <= v <= 1.0
    # Rows follow mammo_tf.report's format; values are numbers (or NaN where a half lacks a class) or text.
    rows = metrics["results"]
    assert rows and all(r["table"] == "External validation: rsna-640 (malignant vs cancer-negative)" for r in rows)
    assert {"row", "values", "note", "command", "hardware", "date"} <= set(rows[0])
    assert any("RECALIBRATED" in r["row"] for r in rows) and any(r["row"] == "Chance" for r in rows)
    on_disk = json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: float(c))
    assert on_disk["provenance"]["command"] == "pytest"
    for name in ("roc.png", "score_histograms.png", "images/heatmaps.png"):
        assert (out / name).stat().st_size > 0
    # The half-B ROC panel draws the baseline beside the CNN.
    scored = preds[preds["error"].isna()].reset_index(drop=True)
    fig = xplots.roc_figure(scored, scored["target"].to_numpy(), detail, setting["task"], setting["source"])
    legend = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert any(t.startswith("logistic") for t in legend) and any(t.startswith("recalibrated") for t in legend)


def _tiny_detector(root):
    from mammo_tf import detector as D
    from mammo_tf.models.ssd import build_ssd

    exp = D.DetectorExperiment(name="tiny", protocol="whole", image_size=96, ssd={"backbone": "cnn"},
                               train={"batch_size": 4, "tensorboard": False})
    model, anchors = build_ssd(exp.ssd_config())
    return D.save_detector(model, exp, anchors, root)


def test_random_positions_keep_boxes_inside_the_breast():
    mask = np.zeros((100, 80), bool)
    mask[20:60, 10:30] = True
    det = {"boxes": np.array([[0, 0, 10, 6], [50, 50, 70, 54]], float), "labels": np.array([1, 2]),
           "scores": np.array([0.9, 0.2])}
    moved = X.random_positions([det], [mask], seed=0)[0]
    np.testing.assert_array_equal(moved["scores"], det["scores"])
    cy, cx = (moved["boxes"][:, 0] + moved["boxes"][:, 2]) / 2, (moved["boxes"][:, 1] + moved["boxes"][:, 3]) / 2
    assert ((cy >= 20) & (cy <= 60) & (cx >= 10) & (cx <= 30)).all()
    np.testing.assert_allclose(moved["boxes"][:, 2] - moved["boxes"][:, 0], [10, 20])


def test_evaluate_detector_external_end_to_end(tmp_path, shared_data):
    model_dir = _tiny_detector(tmp_path / "det")
    assert X.model_kind(model_dir) == "detector"
    out = tmp_path / "out"
    metrics = X.evaluate_detector_external(model_dir, shared_data / DDSM, out, max_images=8, n_boot=20, n_examples=2,
                                           command="pytest")
    setting = metrics["setting"]
    per_image = pd.read_csv(out / "predictions.csv")
    # Two whole cases of four views; their lesions counted at 0.2 mm.
    assert setting["n_images"] == len(per_image) == 8 and per_image["patient_id"].nunique() == 2
    assert setting["n_lesions"] == per_image["n_lesions"].sum() > 0 and setting["n_lesion_free"] > 0
    froc = metrics["results_detail"]["froc"]["SSD, any class"]
    assert froc["n_images"] == 8 and froc["n_lesions"] == setting["n_lesions"]
    assert all(0.0 <= froc[f"sens_at_{f:g}fp"] <= 1.0 for f in (0.5, 1, 2))
    # Several detectors share the table: each row names its model.
    assert metrics["results"][0]["row"] == f"{model_dir.name}: SSD, any class"
    dets = pd.read_csv(out / "detections.csv")
    assert set(dets["image_id"]) <= set(per_image["image_id"])
    assert len(dets) == per_image["n_detections"].sum()
    for name in ("froc.png", "images/detections.png", "metrics.json"):
        assert (out / name).stat().st_size > 0
