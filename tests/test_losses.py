"""MultiBoxLoss: perfect predictions, hard negative mining, normalisation, serialisation."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from mammo_tf.losses import MultiBoxLoss

N_ANCHORS, N_CLASSES = 40, 3


def _targets(positives: list[dict[int, int]], seed: int = 0) -> dict[str, np.ndarray]:
    """y_true for len(positives) images; positives[b] maps anchor index -> class."""
    rng = np.random.default_rng(seed)
    cls = np.zeros((len(positives), N_ANCHORS), np.int32)
    loc = np.zeros((len(positives), N_ANCHORS, 4), np.float32)
    for b, pos in enumerate(positives):
        for i, c in pos.items():
            cls[b, i] = c
            loc[b, i] = rng.normal(size=4)
    return {"cls": cls, "loc": loc}


def _ce(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, labels[..., None], -1)[..., 0]


def _smooth_l1(d: np.ndarray) -> np.ndarray:
    a = np.abs(d)
    return np.where(a < 1, 0.5 * d**2, a - 0.5).sum(-1)


def test_loss_is_zero_for_perfect_predictions():
    y = _targets([{3: 1, 7: 2}, {0: 2}])
    logits = np.where(np.eye(N_CLASSES, dtype=bool)[y["cls"]], 30.0, -30.0).astype(np.float32)
    loss = MultiBoxLoss()(y, {"cls_logits": logits, "box_offsets": y["loc"]})
    assert float(loss) == pytest.approx(0.0, abs=1e-6)


def test_hard_negative_ratio_and_min_negatives():
    y = _targets([{1: 1, 2: 2}, {}, {5: 1}])
    pred = {"cls_logits": np.zeros((3, N_ANCHORS, N_CLASSES), np.float32), "box_offsets": np.zeros((3, N_ANCHORS, 4), np.float32)}
    parts = MultiBoxLoss().per_image(y, pred)
    assert parts["num_pos"].numpy().tolist() == [2, 0, 1]
    assert parts["num_neg"].numpy().tolist() == [6, 0, 3]
    parts = MultiBoxLoss(min_negatives=5).per_image(y, pred)
    assert parts["num_neg"].numpy().tolist() == [6, 5, 5]
    # Never more negatives than exist.
    many = _targets([{i: 1 for i in range(30)}])
    parts = MultiBoxLoss().per_image(many, {k: v[:1] for k, v in pred.items()})
    assert parts["num_neg"].numpy().tolist() == [10]


def test_loss_matches_hand_computation_with_hardest_negatives():
    rng = np.random.default_rng(3)
    y = _targets([{4: 1, 9: 2}, {}], seed=1)
    logits = rng.normal(size=(2, N_ANCHORS, N_CLASSES)).astype(np.float32)
    offsets = rng.normal(size=(2, N_ANCHORS, 4)).astype(np.float32)
    ce = _ce(logits, y["cls"])
    neg0 = np.flatnonzero(y["cls"][0] == 0)
    hardest = neg0[np.argsort(-ce[0, neg0])[:6]]  # 3 negatives per positive
    conf = ce[0, [4, 9]].sum() + ce[0, hardest].sum()
    loc = _smooth_l1(offsets[0, [4, 9]] - y["loc"][0, [4, 9]]).sum()
    expected = (conf + loc) / 2  # normalised by the batch's 2 positives
    pred = {"cls_logits": logits, "box_offsets": offsets}
    loss = MultiBoxLoss()
    assert float(loss(y, pred)) == pytest.approx(expected, rel=1e-5)
    parts = loss.components(y, pred)
    assert float(parts["cls"]) == pytest.approx(conf / 2, rel=1e-5)
    assert float(parts["loc"]) == pytest.approx(loc / 2, rel=1e-5)
    assert int(parts["num_pos"]) == 2
    # alpha weights the localisation term.
    assert float(MultiBoxLoss(alpha=0.5)(y, pred)) == pytest.approx((conf + 0.5 * loc) / 2, rel=1e-5)


def test_normalisation_by_positives_and_zero_positive_guard():
    rng = np.random.default_rng(4)
    y = _targets([{2: 1, 3: 1, 11: 2}])
    pred = {
        "cls_logits": rng.normal(size=(1, N_ANCHORS, N_CLASSES)).astype(np.float32),
        "box_offsets": rng.normal(size=(1, N_ANCHORS, 4)).astype(np.float32),
    }
    single = float(MultiBoxLoss()(y, pred))
    doubled = float(MultiBoxLoss()({k: np.concatenate([v, v]) for k, v in y.items()},
                                   {k: np.concatenate([v, v]) for k, v in pred.items()}))
    assert doubled == pytest.approx(single, rel=1e-5)
    per_image = MultiBoxLoss(reduction=None)(y, pred)
    assert per_image.shape == (1,) and float(per_image[0]) == pytest.approx(single, rel=1e-5)
    empty = _targets([{}])
    assert float(MultiBoxLoss()(empty, pred)) == 0.0
    guarded = float(MultiBoxLoss(min_negatives=4)(empty, pred))  # divided by max(0, 1) = 1
    ce = np.sort(_ce(pred["cls_logits"][0], empty["cls"][0]))[::-1]
    assert guarded == pytest.approx(ce[:4].sum(), rel=1e-5)


def test_gradients_are_finite_and_reach_both_heads():
    y = _targets([{1: 1}, {}])
    logits = tf.Variable(tf.zeros((2, N_ANCHORS, N_CLASSES)))
    offsets = tf.Variable(tf.zeros((2, N_ANCHORS, 4)))
    with tf.GradientTape() as tape:
        loss = MultiBoxLoss(min_negatives=2)(y, {"cls_logits": logits, "box_offsets": offsets})
    g_cls, g_loc = tape.gradient(loss, [logits, offsets])
    assert np.isfinite(g_cls.numpy()).all() and np.abs(g_cls.numpy()).sum() > 0
    assert np.abs(g_loc.numpy()[0, 1]).sum() > 0 and not g_loc.numpy()[1].any()


def test_serialisation_round_trip():
    loss = MultiBoxLoss(neg_pos_ratio=2.0, alpha=0.5, min_negatives=3)
    config = json.loads(json.dumps(keras.losses.serialize(loss)))
    back = keras.losses.deserialize(config)
    assert isinstance(back, MultiBoxLoss)
    assert (back.neg_pos_ratio, back.alpha, back.min_negatives, back.delta) == (2.0, 0.5, 3, 1.0)


def test_bad_structures_and_arguments_raise():
    with pytest.raises(ValueError, match="'cls' and 'loc'"):
        MultiBoxLoss()((np.zeros((1, 4)), np.zeros((1, 4, 4))), {"cls_logits": np.zeros((1, 4, 3)), "box_offsets": np.zeros((1, 4, 4))})
    with pytest.raises(ValueError, match="neg_pos_ratio"):
        MultiBoxLoss(neg_pos_ratio=-1)
