"""Training machinery: strategies (two logical CPU devices), resume after a kill, bad config."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from mammo_tf import training

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, tensorflow as tf, keras
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from mammo_tf import training

    def run(name):
        keras.utils.set_random_seed(0)
        x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
        y = (x.sum(1) > 0).astype("int32")
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
        strategy = training.make_strategy(name)
        per_replica = []
        batch = next(iter(strategy.experimental_distribute_dataset(ds)))
        per_replica = [int(t.shape[0]) for t in strategy.experimental_local_results(batch[0])]
        with strategy.scope():
            model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
            model.compile(optimizer=keras.optimizers.SGD(0.5), loss="binary_crossentropy")
        hist = model.fit(ds, epochs=5, verbose=0).history["loss"]
        return {"replicas": strategy.num_replicas_in_sync, "per_replica": per_replica, "loss": hist}

    print(json.dumps({"default": run("default"), "mirrored": run("mirrored")}))
    """
)


@pytest.mark.slow
def test_mirrored_on_two_logical_cpus():
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["default"]["replicas"] == 1 and res["mirrored"]["replicas"] == 2
    assert res["default"]["per_replica"] == [16]
    assert res["mirrored"]["per_replica"] == [8, 8]  # the global batch of 16 is split in two
    a, b = np.array(res["default"]["loss"]), np.array(res["mirrored"]["loss"])
    assert np.all(np.diff(a) < 0) and np.all(np.diff(b) < 0)  # both decrease every epoch
    np.testing.assert_allclose(a, b, rtol=0.05)  # same curve: gradients are averaged over replicas


def test_unknown_strategy_and_optimizer():
    with pytest.raises(ValueError, match="unknown strategy"):
        training.make_strategy("tpu-pod")
    with pytest.raises(ValueError, match="unknown optimizer"):
        training.make_optimizer(training.TrainConfig(optimizer="lion9"))


def test_multi_worker_needs_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="TF_CONFIG"):
        training.make_strategy("multi_worker")


class _Kill(Exception):
    pass


def _data():
    import tensorflow as tf

    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(16)


def _build():
    import keras

    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])


def _compile():
    return {"loss": "sparse_categorical_crossentropy"}


def test_resume_after_kill_gives_the_same_model(tmp_path, monkeypatch):
    import keras

    cfg = training.TrainConfig(epochs=6, optimizer="sgd", learning_rate=0.1, tensorboard=False,
                               early_stopping_patience=100)
    ds = _data()
    ref, _ = training.fit(_build, _compile, ds, None, cfg, tmp_path / "ref", monitor="val_loss", verbose=0)

    class KillAt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 3:
                raise _Kill()

    original = training.callbacks
    monkeypatch.setattr(training, "callbacks", lambda *a, **k: original(*a, **k) + [KillAt()])
    with pytest.raises(_Kill):
        training.fit(_build, _compile, ds, None, cfg, tmp_path / "run", verbose=0)
    monkeypatch.setattr(training, "callbacks", original)
    resumed, history = training.fit(_build, _compile, ds, None, cfg, tmp_path / "run", verbose=0)
    assert history["epoch"].tolist() == [0, 1, 2, 3, 4, 5]  # the log holds every epoch exactly once
    for w_ref, w_res in zip(ref.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(w_ref, w_res, rtol=1e-5, atol=1e-6)


def _scripted(values, weights=None):
    """A metrics callback logging ``score`` = values[epoch] (and keeping each epoch's weights in ``weights``)."""
    import keras

    class Scripted(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["score"] = values[epoch]
            if weights is not None:
                weights[epoch] = self.model.get_weights()

    return Scripted()


def test_an_epoch_without_a_value_is_never_the_best(tmp_path):
    # Keras alone counts a first NaN (an epoch between validation-mAP snapshots) as the best, and
    # then nothing beats it: the first epoch's weights would be kept.
    cfg = training.TrainConfig(epochs=4, optimizer="sgd", learning_rate=0.1, tensorboard=False, early_stopping=False)
    seen = {}
    model, _ = training.fit(_build, _compile, _data(), None, cfg, tmp_path, monitor="score", mode="max",
                            verbose=0, metrics=[_scripted([float("nan"), 0.5, 0.7, 0.6], seen)], keep_best=True)
    for w_best, w_model, w_first in zip(seen[2], model.get_weights(), seen[0]):
        np.testing.assert_array_equal(w_best, w_model)
    assert not np.allclose(seen[0][0], seen[2][0])   # the epochs' weights do differ
    # A fresh run in the same folder, never measured: the last epoch, not the earlier run's best checkpoint.
    again = {}
    model, _ = training.fit(_build, _compile, _data(), None, cfg, tmp_path, monitor="score", mode="max",
                            verbose=0, metrics=[_scripted([float("nan")] * 4, again)], keep_best=True)
    for w_last, w_model in zip(again[3], model.get_weights()):
        np.testing.assert_array_equal(w_last, w_model)


@pytest.mark.parametrize("before_backup", [False, True])
def test_a_resumed_run_stops_and_keeps_the_same_epoch_as_an_uninterrupted_one(tmp_path, monkeypatch, before_backup):
    import keras

    # Best at epoch 3, patience 3: an uninterrupted run stops after epoch 6 and keeps epoch 3.
    values = [5.0, 3.0, 4.0, 2.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]
    cfg = training.TrainConfig(epochs=10, optimizer="sgd", learning_rate=0.1, tensorboard=False,
                               early_stopping=True, early_stopping_patience=3)
    ds = _data()
    seen = {}
    ref, ref_log = training.fit(_build, _compile, ds, None, cfg, tmp_path / "ref", monitor="score", verbose=0,
                                metrics=[_scripted(values, seen)])
    assert ref_log["epoch"].tolist() == list(range(7))
    for w_ref, w_best in zip(ref.get_weights(), seen[3]):
        np.testing.assert_array_equal(w_ref, w_best)

    class KillAt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 4:
                raise _Kill()

    # Killed after epoch 4 was backed up, or before (its log row written, its backup not: it runs again).
    original = training.callbacks
    monkeypatch.setattr(training, "callbacks", lambda *a, **k: (
        original(*a, **k)[:-1] + [KillAt()] + original(*a, **k)[-1:] if before_backup else original(*a, **k) + [KillAt()]))
    with pytest.raises(_Kill):
        training.fit(_build, _compile, ds, None, cfg, tmp_path / "run", monitor="score", verbose=0,
                     metrics=[_scripted(values)])
    assert training.epochs_done(tmp_path / "run") == (4 if before_backup else 5)
    monkeypatch.setattr(training, "callbacks", original)
    resumed, log = training.fit(_build, _compile, ds, None, cfg, tmp_path / "run", monitor="score", verbose=0,
                                metrics=[_scripted(values)])
    assert log["epoch"].tolist() == list(range(7))   # the same stop, each epoch logged once
    for w_ref, w_res in zip(ref.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(w_ref, w_res, rtol=1e-5, atol=1e-6)


def test_logged_best_reads_what_keras_would_have_kept():
    log = pd.DataFrame({"epoch": [0, 1, 2, 3], "val_mAP": [float("nan"), 0.2, 0.4, 0.4]})
    assert training.logged_best(log, "val_mAP", "max") == {"best": 0.4, "best_epoch": 2, "wait": 1}
    assert training.logged_best(log, "val_mAP", "min") == {"best": 0.2, "best_epoch": 1, "wait": 2}
    assert training.logged_best(log.iloc[:1], "val_mAP", "max") == {}
    assert training.logged_best(log, "val_loss", "min") == {}


def test_a_re_evaluation_keeps_the_training_provenance_and_never_takes_an_evaluation_for_it(tmp_path):
    from mammo_tf.config import keep_training_provenance
    from mammo_tf.io import save_json

    trained = {"command": "mammo-tf train-detector --config c.yaml", "date": "2026-01-01 10:00 UTC", "hardware": {"cpu": "x"}}
    path = tmp_path / "metrics.json"
    save_json(path, {"provenance": trained})
    assert keep_training_provenance({"command": "eval"}, path)["trained_by"] == trained
    save_json(path, {"provenance": {"command": "eval", "trained_by": trained}})  # carried through a second re-evaluation
    assert keep_training_provenance({}, path)["trained_by"] == trained
    save_json(path, {"provenance": {"command": "mammo-tf evaluate-detector --model m", "date": "d"}})
    assert "trained_by" not in keep_training_provenance({}, path)
    assert keep_training_provenance({"command": "x"}, tmp_path / "missing.json") == {"command": "x"}


def test_schedule_label_says_which_epoch_was_kept():
    assert training.schedule_label(training.TrainConfig(epochs=60, early_stopping=False)) == "60 epochs"
    assert (training.schedule_label(training.TrainConfig(epochs=60, early_stopping_patience=10))
            == "best val loss of max 60 epochs, patience 10")
    assert training.schedule_label(training.TrainConfig(epochs=60, early_stopping=False, weight_decay=0.05)) == (
        "60 epochs, weight decay 0.05")


def test_weight_decay_reaches_the_optimizer_and_must_not_be_negative():
    assert training.make_optimizer(training.TrainConfig(weight_decay=0.05)).weight_decay == pytest.approx(0.05)
    assert training.make_optimizer(training.TrainConfig()).weight_decay is None
    with pytest.raises(ValueError, match="weight_decay"):
        training.make_optimizer(training.TrainConfig(weight_decay=-1.0))
