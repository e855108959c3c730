"""The cascade: gate thresholds from training patients only, gating, timings, CLI output, benchmark ratios."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from mammo_tf import cascade as C
from mammo_tf import detect
from mammo_tf import detector as D
from mammo_tf.data import mias

TINY_DET = dict(name="tiny_cascade", protocol="whole", image_size=96, ssd={"backbone": "cnn"},
                train={"epochs": 1, "batch_size": 4, "tensorboard": False},
                folds=2, max_folds=1, max_patients=8, val_fraction=0.25, score_threshold=0.01, seed=0)


# --------------------------------------------------------------------------- gate thresholds (no model)


def test_choose_gate_threshold_hand_worked():
    scores = [0.1, 0.4, 0.35, 0.8, 0.6]
    labels = [0, 1, 2, 0, 1]  # abnormal films score 0.4, 0.35, 0.6
    assert C.choose_gate_threshold(scores, labels, 1.0) == 0.35
    assert C.choose_gate_threshold(scores, labels, 0.6) == 0.4   # 2 of 3 abnormal films pass
    assert C.choose_gate_threshold(scores, labels, 0.3) == 0.6
    with pytest.raises(ValueError, match="no abnormal film"):
        C.choose_gate_threshold([0.2, 0.3], [0, 0])
    with pytest.raises(ValueError, match="differ in length"):
        C.choose_gate_threshold([0.2, 0.3], [0, 1, 1])


def test_gate_threshold_never_uses_test_patients():
    films = pd.DataFrame({
        "refnum": [f"mdb{i:03d}" for i in range(1, 11)],
        "patient_id": [1, 1, 2, 2, 3, 3, 4, 4, 5, 5],
        "label_id": [1, 0, 2, 0, 0, 0, 1, 0, 2, 2],
        "gate_score": [0.8, 0.1, 0.9, 0.2, 0.3, 0.15, np.nan, 0.05, 0.3, 0.25],
    })
    # Training patients 1-3: abnormal scores 0.8 and 0.9 (patient 4's film has no honest score).
    gates = C.fold_gate_thresholds(films, test_patients=[5], train_patients=[1, 2, 3, 4], sensitivities=[1.0, 0.5])
    assert gates[1.0] == {"threshold": 0.8, "n_films": 7, "n_abnormal": 2}
    assert gates[0.5]["threshold"] == 0.9
    # With the test patient in the pool the threshold would fall to 0.25: it must not.
    leaky = C.choose_gate_threshold(films.loc[films.patient_id != 4, "gate_score"], films.loc[films.patient_id != 4, "label_id"], 1.0)
    assert leaky == 0.25
    # Whatever the test patient's scores and labels, the threshold does not move.
    moved = films.assign(gate_score=np.where(films.patient_id == 5, 0.01, films.gate_score),
                         label_id=np.where(films.patient_id == 5, 0, films.label_id))
    assert C.fold_gate_thresholds(moved, [5], [1, 2, 3, 4], [1.0])[1.0]["threshold"] == 0.8
    with pytest.raises(ValueError, match="both sides"):
        C.fold_gate_thresholds(films, [4, 5], [1, 2, 3, 4], [1.0])


def test_gate_detections_empties_rejected_films():
    det = {"boxes": np.array([[1.0, 2, 3, 4]]), "labels": np.array([1]), "scores": np.array([0.7])}
    out = C.gate_detections([det, det, det], [0.2, 0.5, 0.9], 0.5)
    assert [len(d["boxes"]) for d in out] == [0, 1, 1] and out[1] is det
    assert out[0]["boxes"].shape == (0, 4) and out[0]["labels"].shape == (0,)
    assert all(d is det for d in C.gate_detections([det, det], [0.0, -5.0], -math.inf))


def test_timing_table_ratios_on_synthetic_timings():
    rows = []
    # Reference: films a, b take 2 s and 4 s (repeats 2 and 2, then 4 and 6 -> medians 2 and 5); median 3.5.
    for film, totals in (("a", [2.0, 2.0]), ("b", [4.0, 6.0])):
        for r, t in enumerate(totals):
            rows.append({"variant": "vgg", "film": film, "repeat": r, "load": 0.0, "preprocess": 0.0,
                         "classifier": 0.0, "detector": t, "nms": 0.0, "total": t, "passed": True})
    # Cascade: film a gated (0.5 s), film b passes (1.5 s); median 1.0 s.
    for film, t, passed in (("a", 0.5, False), ("b", 1.5, True)):
        for r in range(2):
            rows.append({"variant": "cascade", "film": film, "repeat": r, "load": 0.1, "preprocess": 0.1,
                         "classifier": 0.3, "detector": t - 0.5, "nms": 0.0, "total": t, "passed": passed})
    table = C.timing_table(pd.DataFrame(rows), reference="vgg")
    assert list(table.index) == ["vgg", "cascade"]
    assert table.loc["vgg", "total_s"] == 3.5 and table.loc["cascade", "total_s"] == 1.0
    assert table.loc["vgg", "ratio"] == 1.0 and table.loc["cascade", "ratio"] == pytest.approx(1.0 / 3.5)
    assert table.loc["cascade", "pass_rate"] == 0.5 and table.loc["cascade", "classifier_s"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="reference"):
        C.timing_table(pd.DataFrame(rows), reference="ssd")
    with pytest.raises(ValueError, match="lack columns"):
        C.timing_table(pd.DataFrame(rows).drop(columns="nms"), reference="vgg")


def test_estimated_time_and_tradeoff_plot():
    from mammo_tf.plots.cascade import plot_tradeoff

    timings = [{"load": 0.01, "preprocess": 0.01, "classifier": 0.1, "detector": 1.0, "nms": 0.02}] * 3
    assert C.estimated_time(timings, None) == pytest.approx(1.04)
    assert C.estimated_time(timings, 0.5) == pytest.approx(0.12 + 0.51)
    points = pd.DataFrame({"variant": ["every film", C.variant_name(0.95)], "time_s": [1.04, 0.63],
                           "map": [0.3, 0.28], "sens_at_1fp": [0.5, np.nan], "pass_rate": [1.0, 0.5]})
    fig = plot_tradeoff(points)
    assert len(fig.axes) == 2 and fig.axes[0].get_xlabel() == "time per film (s)"
    with pytest.raises(ValueError, match="lack columns"):
        plot_tradeoff(points.drop(columns="map"))


# --------------------------------------------------------------------------- with (untrained) models


@pytest.fixture(scope="module")
def folders(tmp_path_factory, annotations):
    """A detector folder (tiny random SSD, fold 0) and a classifier folder (random CNN, fold 0, out-of-fold csv)."""
    import keras

    from mammo_tf import classify
    from mammo_tf.config import save_config
    from mammo_tf.data import splits
    from mammo_tf.models import classifier as clf
    from mammo_tf.models.ssd import build_ssd

    keras.utils.set_random_seed(0)
    root = tmp_path_factory.mktemp("cascade")
    exp = D.DetectorExperiment(**TINY_DET)
    model, anchors = build_ssd(exp.ssd_config())
    D.save_detector(model, exp, anchors, root / "det" / "folds" / "fold0")
    D.save_detector(model, exp, anchors, root / "det")
    cexp = classify.ClassifierExperiment(name="tiny_gate", folds=2, max_folds=1, max_films=120, seed=0)
    cdir = root / "clf"
    save_config(cexp, cdir / "config.yaml")
    (cdir / "fold0").mkdir(parents=True)
    classifier = clf.build_classifier(clf.ClassifierConfig(input_size=128))
    classifier.save(cdir / "fold0" / "model.keras")
    sub = annotations[annotations["refnum"].isin(classify.films_subset(annotations, cexp))]
    _, test = splits.patient_folds(sub, cexp.folds, cexp.seed)[0]
    films = mias.images_table(sub)
    films = films[films["patient_id"].isin(test)]
    rng = np.random.default_rng(0)
    score = rng.uniform(0, 1, len(films))
    pd.DataFrame({"refnum": films["refnum"], "normal": 1 - score, "benign": score / 2, "malignant": score / 2,
                  "abnormal_score": score, "label_id": films["label_id"], "fold": 0}).to_csv(
        cdir / "fold0" / "film_predictions.csv", index=False)
    return root / "det", cdir


def test_rejected_film_gets_no_detections_and_gated(folders, tmp_path, film_and_broken_png):
    det_dir, clf_dir = folders
    film, _ = film_and_broken_png
    out = C.detect_cascade([film], clf_dir, det_dir, tmp_path / "gated", gate_threshold=1.5, score_threshold=0.01)
    assert len(out) == 1 and out[0]["gated"] is True and out[0]["boxes"] == [] and out[0]["scores"] == []
    assert 0.0 <= out[0]["gate_score"] <= 1.0 and out[0]["timings"]["detector"] == 0.0
    on_disk = json.loads((tmp_path / "gated" / "film.detections.json").read_text())
    assert on_disk["gated"] is True and on_disk["boxes"] == [] and on_disk["gate_threshold"] == 1.5
    assert (tmp_path / "gated" / "film.detections.png").stat().st_size > 0
    assert "gated" in C.format_results(out)
    # The gate file of evaluate_cascade sets the default threshold; without one there is no default.
    (tmp_path / "gate.json").write_text(json.dumps({"threshold": -1.0, "sensitivity": 0.95}))
    open_gate = C.detect_cascade([film], clf_dir, det_dir, tmp_path / "open", gate_file=tmp_path, score_threshold=0.01)
    assert open_gate[0]["gated"] is False and open_gate[0]["gate_threshold"] == -1.0 and len(open_gate[0]["boxes"]) > 0
    with pytest.raises(ValueError, match="needs a gate threshold"):
        C.detect_cascade([film], clf_dir, det_dir, tmp_path / "none")


def test_open_gate_equals_detector_alone_and_timings(folders, tmp_path, film_and_broken_png):
    det_dir, clf_dir = folders
    film, bad = film_and_broken_png
    gated = C.Cascade.load(det_dir, clf_dir, threshold=-math.inf, score_threshold=0.01)
    alone = C.Cascade.load(det_dir, score_threshold=0.01)
    image = mias.load_image("mdb005")
    a, b, broken = C.run_cascade([film, image, bad], gated)
    solo = C.run_cascade_on_image(film, alone)
    assert a["passed"] and not a["gated"] and solo["gate_score"] is None and solo["timings"]["classifier"] == 0.0
    assert len(a["boxes"]) > 0
    # Batches of 1 and 3 round differently in the last float bits (oneDNN, more so with AVX-512
    # kernels on Intel CPUs): boxes agree to 0.01 px, scores to 1e-4.
    for key, tol in (("boxes", 1e-2), ("labels", 0), ("scores", 1e-4)):
        np.testing.assert_allclose(a[key], solo[key], atol=tol)
        np.testing.assert_allclose(a[key], b[key], atol=tol)  # a file and its array: same detections
    # The same detections as the detector's own CLI path (rounded as it writes them).
    ref = detect.detect_images([film], det_dir, tmp_path / "ref", score_threshold=0.01)[0]
    np.testing.assert_allclose(np.round(a["boxes"], 1), np.asarray(ref["boxes"]).reshape(-1, 4), atol=0.11)
    np.testing.assert_allclose(np.round(a["scores"], 4), ref["scores"], atol=2e-4)
    for res in (a, b, solo):
        assert set(res["timings"]) == {*C.STAGES, "total"} and all(v >= 0 for v in res["timings"].values())
        assert res["timings"]["total"] == pytest.approx(sum(res["timings"][s] for s in C.STAGES))
    assert a["timings"]["classifier"] > 0 and a["timings"]["detector"] > 0 and b["timings"]["load"] == 0.0
    assert "error" in broken and "broken.png" in broken["error"]


def test_evaluate_cascade_scores_honestly_and_tunes_on_training_patients(folders, tmp_path, annotations):
    det_dir, clf_dir = folders
    metrics = C.evaluate_cascade(clf_dir, det_dir, tmp_path / "casc", sensitivities=(1.0,), n_timing=1,
                                 annotations=annotations, command="pytest")
    exp = D.DetectorExperiment(**TINY_DET)
    samples = D.make_samples(exp, annotations)
    fold = D.make_folds(exp, samples)[0]
    films = pd.DataFrame(metrics["films"]).astype({"gate_score": float})
    assert len(films) == len(samples.records)
    # Sources: the csv for the classifier's test films; films of patients it trained on cannot be scored.
    cfold = C.classifier_folds(clf_dir, annotations)[0]
    oof = set(pd.read_csv(clf_dir / "fold0" / "film_predictions.csv")["refnum"])
    for r in films.itertuples():
        expected = ("out_of_fold" if r.refnum in oof else "none" if r.patient_id in cfold.seen else "unseen_fold")
        assert r.gate_source == expected, r.refnum
    test_sources = set(films.loc[films["refnum"].isin(fold.test["refnum"]), "gate_source"])
    assert test_sources == {"out_of_fold", "unseen_fold", "none"}  # this setting exercises every rule
    row = metrics["folds"][0]
    assert not set(row["gate_pool_patients"]) & set(row["test_patients"])
    pool = films[films["patient_id"].isin(row["gate_pool_patients"]) & films["gate_score"].notna()]
    gate = row["variants"][C.variant_name(1.0)]["gate"]
    assert gate["threshold"] == C.choose_gate_threshold(pool["gate_score"], pool["label_id"], 1.0)
    assert gate["n_films"] == len(pool)
    # Every variant is scored on the same test films: those with an honest gate score.
    test = films[films["refnum"].isin(fold.test["refnum"])]
    assert row["n_evaluated"] == int(test["gate_score"].notna().sum()) == metrics["pooled"]["every film"]["n_images"]
    assert sorted(row["left_out_no_honest_score"]) == sorted(test.loc[test["gate_score"].isna(), "refnum"])
    for name in ("metrics.json", "gate.json", "tradeoff.png", "froc.png", "gate_scores.png"):
        assert (tmp_path / "casc" / name).is_file(), name
    rows = {r["row"]: r for r in metrics["results"]}
    assert len(rows) == 3 and all(r["table"] == C.TABLE and r["command"] == "pytest" for r in rows.values())
    every = rows["SSD96 cnn, every film"]["values"]
    assert every["films to detector"] == 1.0 and every["time vs every film"] == 1.0
    assert json.loads((tmp_path / "casc" / "gate.json").read_text())["sensitivity"] == 0.95


def test_compact_froc_curve_reads_the_same():
    from mammo_tf.metrics.detection import froc, sensitivity_at_fp

    rng = np.random.default_rng(0)
    gts = [{"boxes": np.array([[10.0, 10, 50, 50]]), "labels": np.array([1])} for _ in range(6)]
    dets = [{"boxes": np.concatenate([[[12.0, 12, 48, 48]], rng.uniform(100, 200, (20, 4))]).clip(0)[:, [0, 1, 0, 1]]
             + np.array([0, 0, 30, 30]), "labels": np.ones(21, np.int64), "scores": rng.uniform(0, 1, 21)}
            for _ in range(6)]
    full = froc(gts, dets)
    small = C._curve(full)
    assert len(small["fps"]) < len(full["fps"]) and small["fps"][-1] == full["fps"][-1]
    for fp in np.linspace(0, 25, 101):
        assert sensitivity_at_fp(small, fp) == sensitivity_at_fp(full, fp)


def test_detector_trained_on_a_test_patient_is_refused(tmp_path):
    records = pd.DataFrame({"refnum": ["mdb005", "mdb006", "mdb010"]})
    (tmp_path / "config.json").write_text(json.dumps({"experiment": {}}))
    assert C.check_detector_unseen(tmp_path, records) is False  # nothing recorded: cannot be checked
    (tmp_path / "config.json").write_text(json.dumps({"train_refnums": ["mdb001", "mdb002", "mdb011"]}))
    assert C.check_detector_unseen(tmp_path, records) is True
    # mdb009 and mdb010 are the two films of patient 5: training on one film is seeing the patient.
    (tmp_path / "config.json").write_text(json.dumps({"train_refnums": ["mdb001", "mdb009"]}))
    with pytest.raises(ValueError, match=r"trained on 1 patients .*\[5\]"):
        C.check_detector_unseen(tmp_path, records)


def test_cli_arguments_parse():
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    C.add_cli(sub)
    detect = sub.add_parser("detect")
    C.add_cli_arguments(detect)
    args = parser.parse_args(["evaluate-cascade", "--classifier", "c", "--detector", "d", "--out", "o",
                              "--sensitivities", "0.9", "0.95"])
    assert args.func is C.cmd_evaluate_cascade and args.sensitivities == [0.9, 0.95] and args.n_timing == 8
    args = parser.parse_args(["detect", "--cascade", "--classifier", "c", "--gate-threshold", "0.7"])
    assert args.cascade and args.classifier == "c" and args.gate_threshold == 0.7 and args.gate is None
    assert args.classifier_fold == 0


def test_evaluate_cascade_from_stored_detector_outputs(folders, tmp_path, annotations):
    from mammo_tf import detector_arrays as X

    _, clf_dir = folders
    exp = D.DetectorExperiment(**TINY_DET)
    arrays = X.export(exp, tmp_path / "arrays.npz")
    X.train(arrays, tmp_path / "outputs.npz", verbose=0, command="pytest-train")
    metrics = C.evaluate_cascade(clf_dir, tmp_path / "no_weights_here", tmp_path / "casc", sensitivities=(1.0,),
                                 n_timing=1, annotations=annotations, command="pytest",
                                 detector_outputs=[tmp_path / "outputs.npz"])
    _, _, stored = X.load_detections([tmp_path / "outputs.npz"])
    samples = D.make_samples(exp, annotations)
    fold = D.make_folds(exp, samples)[0]
    # "every film": exactly the stored detections of the evaluated test films.
    evaluated = [r for r in fold.test["refnum"] if r not in metrics["folds"][0]["left_out_no_honest_score"]]
    keep = fold.test["refnum"].isin(evaluated).to_numpy()
    records = fold.test[keep].reset_index(drop=True)
    dets = [d for d, k in zip(stored(fold)["test"], keep) if k]
    flat, _, _ = D.detection_metrics(D._ground_truth(exp, records, samples.annotations),
                                     D._to_eval_pixels(exp, samples, records, dets), exp.iou_threshold)
    assert metrics["folds"][0]["variants"]["every film"]["map"] == flat["map"]
    assert metrics["folds"][0]["n_evaluated"] == len(records) and metrics["timing"]["n_films"] == 1
    assert all("stored test outputs" in r["note"] for r in metrics["results"])
