"""Detector folds as arrays: export matches the tf.data pipeline, training from arrays, evaluation of its outputs."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from mammo_tf import detector as D
from mammo_tf import detector_arrays as X

TINY = dict(name="tiny_arrays", protocol="crops", image_size=96, ssd={"backbone": "cnn"},
            train={"epochs": 1, "batch_size": 4, "early_stopping": False, "tensorboard": False},
            folds=2, max_patients=8, val_fraction=0.3, n_examples=2, seed=0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    exp = D.DetectorExperiment(**TINY)
    path = X.export(exp, tmp_path_factory.mktemp("arrays") / "tiny.npz")
    return exp, path, X.load(path)


def test_export_matches_the_tf_data_pipeline(exported):
    exp, _, arrays = exported
    samples = D.make_samples(exp)
    folds = D.make_folds(exp, samples)
    n = len(samples.records)
    assert arrays.images.shape == (n, 96, 96) and arrays.images.dtype == np.uint8
    assert arrays.cls.shape[:2] == (n, 8) and arrays.meta["allowed"] == list(range(8))
    assert [f["index"] for f in arrays.meta["folds"]] == [0, 1]
    for fold, meta in zip(folds, arrays.meta["folds"]):
        rows = {s: np.asarray(meta[s]) for s in ("train", "val", "test")}
        assert sum(map(len, rows.values())) == n and len(set().union(*map(set, rows.values()))) == n
        for split in rows:
            assert list(np.asarray(arrays.meta["refnums"])[rows[split]]) == list(getattr(fold, split)["refnum"])
    fold = folds[0]
    anchors = D.anchor_config(exp.ssd_config())
    ds = D.detection_dataset(fold.test, samples.films, anchors, training=False, batch_size=len(fold.test))
    x, y = next(iter(ds))
    test_rows = arrays.meta["folds"][0]["test"]
    np.testing.assert_allclose(D.model_input([arrays.images[r] for r in test_rows]), x.numpy())
    for i, r in enumerate(test_rows):
        cls, loc = arrays.targets(r, 0)
        np.testing.assert_array_equal(cls, y["cls"][i].numpy())
        np.testing.assert_allclose(loc, y["loc"][i].numpy(), atol=1e-6)
    # A lesion keeps matched default boxes under every quarter turn and mirror image.
    lesions = [i for i, b in enumerate(samples.records["boxes"]) if len(b)]
    assert lesions and all((arrays.cls[i, v] > 0).any() for i in lesions for v in range(8))
    assert not (arrays.cls[[i for i in range(n) if i not in lesions]] > 0).any()


def test_training_batches_draw_transforms_and_keep_shapes(exported):
    _, _, arrays = exported
    batches = X._batches_class()
    rows = np.asarray(arrays.meta["folds"][0]["train"])
    train = batches(arrays, rows, 4, 1, tuple(range(8)), seed=3)
    assert len(train) == len(rows) // 4  # full batches only: one compiled step
    x, y = train[0]
    assert x.shape == (4, 96, 96, 1) and y["cls"].shape == (4, arrays.cls.shape[2]) and y["loc"].shape[-1] == 4
    first = train.choice.copy()
    train.on_epoch_end()
    assert not np.array_equal(first, train.choice) and set(train.choice) <= set(range(8))
    again = batches(arrays, rows, 4, 1, tuple(range(8)), seed=3)
    np.testing.assert_array_equal(again.choice, first)  # seeded
    ev = batches(arrays, rows, 4, 3)
    assert len(ev) == -(-len(rows) // 4) and ev[0][0].shape[-1] == 3 and not ev.choice.any()
    with pytest.raises(ValueError, match="quarter turns and mirrors only"):
        X.transforms_of(D.DetectorExperiment(max_angle=10.0))
    with pytest.raises(ValueError, match="quarter turns and mirrors only"):
        X.transforms_of(D.DetectorExperiment(zoom_min_scale=0.5))
    assert X.transforms_of(D.DetectorExperiment(augment_ops="left_right")) == (0, 4)
    assert X.transforms_of(D.DetectorExperiment(augment=False)) == (0,)


def test_top_outputs_decode_as_the_full_outputs():
    rng = np.random.default_rng(0)
    n = 60
    anchors = np.sort(rng.uniform(0, 1, (n, 2, 2)), axis=1).reshape(n, 4)[:, [0, 2, 1, 3]]
    pred = {"cls_logits": rng.normal(0, 2, (2, n, 3)).astype(np.float32),
            "box_offsets": rng.normal(0, 0.5, (2, n, 4)).astype(np.float32)}
    exp = D.DetectorExperiment(score_threshold=0.05)
    top = X.top_outputs(pred, n)
    rounded = {k: v.astype(np.float16).astype(np.float32) for k, v in pred.items()}
    full = D.decode_batch(rounded, anchors, exp)
    back = D.decode_batch(X.dense_outputs(top, n), anchors, exp)
    for a, b in zip(full, back):
        for key in ("boxes", "labels", "scores"):
            np.testing.assert_allclose(a[key], b[key], atol=1e-6)
    few = X.top_outputs(pred, 5)
    z = np.exp(pred["cls_logits"])
    fg = (z / z.sum(-1, keepdims=True))[..., 1:].max(-1)
    for i in range(2):
        assert set(few["index"][i]) == set(np.argsort(-fg[i])[:5])
    dense = X.dense_outputs(few, n)
    kept = np.zeros((2, n), bool)
    kept[np.arange(2)[:, None], few["index"]] = True
    dropped = dense["cls_logits"][~kept]
    assert (dropped[:, 0] - dropped[:, 1:].max(-1) >= 50).all()  # certain background


def test_train_from_arrays_then_evaluate_like_a_saved_model(exported, tmp_path):
    exp, path, _ = exported
    first = X.train(path, tmp_path / "fold0.npz", folds=[0], verbose=0, command="pytest-train", keep_weights=[0],
                    chunk_bytes=700_000)
    parts = sorted(tmp_path.glob("fold0_fold0_weights_part*.npz"))
    assert len(parts) > 1 and all(p.stat().st_size < 710_000 for p in parts)
    assert set(first["folds"]) == {"0"} and first["folds"]["0"]["training"]["epochs"] == 1
    second = X.train(path, tmp_path / "fold1.npz", folds=[1], verbose=0, command="pytest-train-1")
    info, saved = X.merge_results([tmp_path / "fold0.npz", tmp_path / "fold1.npz"])
    assert set(info["folds"]) == {"0", "1"} and set(saved) == {"fold0_test", "fold0_train", "fold1_test", "fold1_train"}
    assert saved["fold0_test"]["cls_logits"].dtype == np.float16
    assert saved["fold0_test"]["index"].shape[1] == min(X.TOP_TEST, X.load(path).cls.shape[2])
    with pytest.raises(ValueError, match="trained in another"):
        X.merge_results([tmp_path / "fold0.npz", tmp_path / "fold0.npz"])
    out = tmp_path / "model"
    metrics = X.evaluate([tmp_path / "fold0.npz", tmp_path / "fold1.npz"], out, command="pytest-eval")
    assert [f["fold"] for f in metrics["folds"]] == [0, 1]
    assert metrics["provenance"]["trained_by"]["command"] == "pytest-train; pytest-train-1"
    assert metrics["provenance"]["trained_by"]["versions"]["backend"] == "tensorflow"
    assert metrics["folds"][1]["training"] == second["folds"]["1"]["training"]
    row = metrics["results"][0]
    assert row["row"] == "SSD96 cnn (random, 1 epochs, flips/rot90)" and row["command"] == "pytest-eval"
    assert 0 <= row["values"]["mAP"][0] <= 1 and 0 <= row["values"]["train mAP (fit check)"][0] <= 1
    for name in ("metrics.json", "pr_curves.png", "froc.png", "folds/fold0/training_log.csv", "folds/fold1/training.json"):
        assert (out / name).is_file(), name
    # Fold 0's weights came back: it is a detector folder again (fold 1's did not: no model there).
    model, _, anchors = D.load_detector(out / "folds" / "fold0")
    assert (out / "model.keras").is_file() and not (out / "folds" / "fold1" / "model.keras").exists()
    arrays = X.load(path)
    test_rows = arrays.meta["folds"][0]["test"]
    n = anchors.num_anchors
    again = X.top_outputs(model.predict_on_batch(D.model_input([arrays.images[r] for r in test_rows])), X.TOP_TEST)
    both = np.zeros((len(test_rows), n), bool)
    for top in (again, saved["fold0_test"]):
        kept = np.zeros_like(both)
        kept[np.arange(len(test_rows))[:, None], top["index"]] = True
        both = kept if top is again else both & kept
    assert both.sum() > 0.9 * both.shape[0] * min(n, X.TOP_TEST)
    np.testing.assert_allclose(X.dense_outputs(again, n)["cls_logits"][both],
                               X.dense_outputs(saved["fold0_test"], n)["cls_logits"][both], atol=0.05)  # float16
    # Outputs of folds that are not this checkout's folds are refused, not scored.
    info0, saved0 = X.load_results(tmp_path / "fold0.npz")
    info0["folds"]["0"]["refnums"]["test"] = info0["folds"]["0"]["refnums"]["test"][::-1]
    X._write_results(tmp_path / "bad.npz", info0, saved0)
    with pytest.raises(ValueError, match="differ from this checkout"):
        X.evaluate([tmp_path / "bad.npz"], tmp_path / "bad_model")
    # A deadline already past trains nothing, and nothing is evaluated.
    none = X.train(path, tmp_path / "none.npz", deadline_s=0.0, verbose=0)
    assert none["folds"] == {} and not (tmp_path / "none.npz").exists()
    with pytest.raises(ValueError, match="vgg16_weights given"):
        X.train(path, tmp_path / "x.npz", vgg16_weights=tmp_path / "w.weights.h5")



def test_snapshots_select_the_epoch_on_validation_patients(tmp_path, monkeypatch):
    snap = dict(TINY, name="tiny_snap", train=dict(TINY["train"], epochs=3), select_on="val_mAP", snapshot_every=2,
                max_patients=24, val_fraction=0.4)
    exp = D.DetectorExperiment(**snap)
    path = X.export(exp, tmp_path / "snap.npz")
    X.train(path, tmp_path / "r.npz", folds=[0], verbose=0, command="pytest-snap")
    snaps = X.load_snapshots([tmp_path / "r.npz"], 0)
    assert sorted(snaps) == [2, 3]                               # every 2nd epoch, and the last
    fold = X.load(path).meta["folds"][0]
    assert {s: len(snaps[2][s]["index"]) for s in ("val", "test", "train")} == {s: len(fold[s]) for s in ("val", "test", "train")}
    # The last snapshot is the last epoch's model: the same top default boxes as the final outputs.
    _, saved = X.load_results(tmp_path / "r.npz")
    np.testing.assert_array_equal(snaps[3]["test"]["index"], saved["fold0_test"]["index"][:, :X.TOP_SNAPSHOT])
    info, _ = X.merge_results([tmp_path / "r.npz"])
    samples = D.make_samples(dataclasses.replace(exp, max_folds=1))
    picked, chosen = X.select_snapshots([tmp_path / "r.npz"], info, dataclasses.replace(exp, max_folds=1), samples)
    np.testing.assert_array_equal(chosen[0]["test"]["index"], snaps[picked[0]["epoch"]]["test"]["index"])
    rows = picked[0]["snapshots"]
    assert [r["epoch"] for r in rows] == [2, 3] and picked[0]["epoch"] == max(rows, key=lambda r: (r["val_mAP"], -r["epoch"]))["epoch"]
    # The tiny model's mAPs may all be 0, which any rule would pass: with scripted mAPs (per epoch, validation then
    # test) the later snapshot is best on validation and worse on test, so only a choice on validation picks it; a tie
    # keeps the earlier epoch.
    for script, want in (([0.1, 0.9, 0.4, 0.2], 3), ([0.3, 0.9, 0.3, 0.2], 2)):
        values = iter(script)
        monkeypatch.setattr(D, "detection_metrics", lambda *a, **k: ({"map": next(values)},))
        scripted = X.select_snapshots([tmp_path / "r.npz"], info, dataclasses.replace(exp, max_folds=1), samples)[0][0]
        assert scripted["epoch"] == want
        assert [(r["val_mAP"], r["test_mAP"]) for r in scripted["snapshots"]] == list(zip(script[0::2], script[1::2]))
    monkeypatch.undo()
    metrics = X.evaluate([tmp_path / "r.npz"], tmp_path / "model", command="pytest-eval")
    assert metrics["folds"][0]["training"]["selection"]["epoch"] == picked[0]["epoch"]
    assert metrics["results"][0]["row"].startswith("SSD96 cnn (random, 3 epochs, the best val mAP of every 2 kept")
    assert (tmp_path / "model" / "snapshot_selection.png").stat().st_size > 0
    (tmp_path / "r_fold0_snapshots.npz").unlink()
    with pytest.raises(ValueError, match="no r_fold0_snapshots.npz"):
        X.evaluate([tmp_path / "r.npz"], tmp_path / "again")
    assert not (tmp_path / "again").exists()                      # refused before anything is written
    with pytest.raises(D.ConfigError, match="early_stopping: false"):
        D.DetectorExperiment(**dict(snap, train=dict(snap["train"], early_stopping=True)))
    with pytest.raises(D.ConfigError, match="select_on: val_mAP only"):
        D.DetectorExperiment(**dict(snap, select_on="val_loss"))

def test_hed_trunk_exported_as_a_keras_vgg16_weights_file(tmp_path):
    from mammo_tf.models import backbones

    path = X.export_vgg16_weights(tmp_path / "hed.weights.h5")
    source, back = backbones._hed_vgg_weights(), backbones._keras_vgg_weights(str(path))
    for name in backbones.VGG_CONV_NAMES:
        for a, b in zip(source[name], back[name]):
            assert b.dtype == np.float32
            np.testing.assert_allclose(b, a.astype(np.float16).astype(np.float32), rtol=0, atol=0)
    with pytest.raises(ValueError, match="weights.h5"):
        X.export_vgg16_weights(tmp_path / "hed.h5")


def test_weight_parts_round_trip_and_refuse_a_mismatch(tmp_path):
    import keras

    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Dense(64)(inputs)))
    paths = X.save_weight_parts(model, tmp_path / "m", chunk_bytes=1100)
    assert [p.name for p in paths] == ["m_part0.npz", "m_part1.npz"]  # 1024-byte kernel, then the rest
    fresh = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Dense(64)(inputs)))
    X.load_weight_parts(fresh, tmp_path / "m")
    for a, b in zip(model.get_weights(), fresh.get_weights()):
        np.testing.assert_array_equal(b, a.astype(np.float16).astype(np.float32))
    other = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    with pytest.raises(ValueError, match="the model has 2"):
        X.load_weight_parts(other, tmp_path / "m")
    with pytest.raises(ValueError, match="larger"):
        X.save_weight_parts(model, tmp_path / "n", chunk_bytes=100)


def test_results_info_is_json(tmp_path):
    X._write_results(tmp_path / "r.npz", {"folds": {}, "x": [1, 2]}, {})
    info, saved = X.load_results(tmp_path / "r.npz")
    assert info == json.loads(json.dumps({"folds": {}, "x": [1, 2]})) and saved == {}


def test_command_line_export_train_evaluate(tmp_path, capsys):
    import yaml

    from mammo_tf import cli

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "name": "tiny_cli", "max_folds": 1}))
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**TINY, "name": "tiny_cli", "max_folds": 1, "seed": 1}))
    arrays, results = tmp_path / "a.npz", tmp_path / "r.npz"
    assert cli.main(["export-detector-arrays", "--config", str(config), "--out", str(arrays)]) == 0
    assert cli.main(["train-detector-arrays", str(arrays), "--out", str(results), "--folds", "0"]) == 0
    assert cli.main(["evaluate-detector-arrays", str(results), "--config", str(other), "--out", str(tmp_path)]) == 2
    assert "was not trained from" in capsys.readouterr().err
    assert cli.main(["evaluate-detector-arrays", str(results), "--config", str(config), "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "tiny_cli" / "metrics.json").read_text())
    command = metrics["results"][0]["command"]
    assert command.startswith("mammo-tf train-detector-arrays") and f"--config {config}" in command
