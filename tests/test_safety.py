"""Untrusted inputs: model files with code in them, bad configs, clashing runs."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from mammo_tf import classify
from mammo_tf.config import ConfigError, from_dict, load_config, save_config
from mammo_tf.models import classifier as clf
from mammo_tf.models.ssd import load_ssd


def _model_with_lambda(path):
    inputs = keras.Input((4,))
    outputs = keras.layers.Lambda(lambda x: x * 2)(inputs)  # arbitrary Python code in a model file
    keras.Model(inputs, outputs).save(path)


def test_model_file_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.keras"
    _model_with_lambda(path)
    with pytest.raises(ValueError, match="(?i)lambda|safe_mode"):
        load_ssd(path)
    with pytest.raises(ValueError, match="(?i)lambda|safe_mode"):
        keras.saving.load_model(path, safe_mode=True)


def test_our_models_have_no_lambda_layers():
    from mammo_tf.models.ssd import SSDConfig, build_ssd

    models = [clf.build_classifier(), build_ssd(SSDConfig(backbone="cnn", image_size=96))[0]]
    for model in models:
        assert not [layer for layer in model.layers if isinstance(layer, keras.layers.Lambda)]


@pytest.mark.parametrize(
    "text, message",
    [("name: [unclosed", "not valid YAML"), ("- a\n- b\n", "mapping at the top level")],
)
def test_bad_config_file(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_config_and_unknown_key(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="unknown keys"):
        from_dict(classify.ClassifierExperiment, {"stratgy": "grid_keep"})


def test_runs_with_different_configs_never_share_a_folder(tmp_path):
    exp = classify.ClassifierExperiment(name="x", max_films=6)
    out = tmp_path / "x"
    out.mkdir()
    save_config(classify.ClassifierExperiment(name="x", size=256), out / "config.yaml")
    with pytest.raises(ConfigError, match="different configuration"):
        classify.run_experiment(exp, out)
    assert from_dict(classify.ClassifierExperiment, load_config(out / "config.yaml")).size == 256


def test_atomic_writes_leave_nothing_behind_on_failure_and_get_a_normal_file_mode(tmp_path):
    import os

    from mammo_tf.io import atomic_path, atomic_write_text

    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    reference = tmp_path / "plain.txt"
    reference.write_text("x")  # created the ordinary way: mode 0666 minus the umask
    assert os.stat(target).st_mode & 0o777 == os.stat(reference).st_mode & 0o777
