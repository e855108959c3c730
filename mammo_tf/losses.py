"""SSD's MultiBox loss (Liu et al. 2016, eq. 1-3) as a serialisable Keras loss.

``L = (L_conf + alpha * L_loc) / N_pos``: softmax cross-entropy over the positive default boxes
and the hard negatives, plus smooth L1 (Huber, delta 1, summed over the 4 offsets) over the
positives, divided by the number of positive default boxes in the whole batch (as the released
Caffe code does; 1 when the batch has none). Hard negative mining keeps, per image, the
negatives with the highest background cross-entropy, at most ``neg_pos_ratio`` (3) per positive.

Mammography note: with the paper's rule a normal film (no positives) contributes nothing.
``min_negatives`` (0 = the paper) keeps that many hard negatives per image even without
positives, as the TF Object Detection API's ``min_negatives_per_image`` does, so that normal
films teach the background.

Targets are the structure made by :func:`mammo_tf.models.ssd.ssd_targets_fn`:
``y_true = {"cls": (B, N) int, "loc": (B, N, 4)}``; predictions are the SSD model's outputs
``y_pred = {"cls_logits": (B, N, C), "box_offsets": (B, N, 4)}``.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

# Written in keras.ops (no TensorFlow call), so that the loss trains on any Keras backend (JAX on
# a GPU machine without TensorFlow, see mammo_tf.detector_arrays).
Tensor = Any


def _unpack(y_true: Any, y_pred: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(cls targets int32, loc targets, class logits, box offsets) from the two dicts."""
    if not isinstance(y_true, dict) or not {"cls", "loc"} <= set(y_true):
        raise ValueError(f"y_true must be a dict with keys 'cls' and 'loc', got {type(y_true).__name__}")
    if not isinstance(y_pred, dict) or not {"cls_logits", "box_offsets"} <= set(y_pred):
        raise ValueError(
            f"y_pred must be a dict with keys 'cls_logits' and 'box_offsets', got {type(y_pred).__name__}"
        )
    cls_t = ops.cast(y_true["cls"], "int32")
    loc_t = ops.cast(y_true["loc"], "float32")
    logits = ops.cast(y_pred["cls_logits"], "float32")
    offsets = ops.cast(y_pred["box_offsets"], "float32")
    return cls_t, loc_t, logits, offsets


@keras.saving.register_keras_serializable(package="mammo_tf")
class MultiBoxLoss(keras.losses.Loss):
    """SSD MultiBox loss with 3:1 hard negative mining, normalised by the batch's positives.

    With the default ``reduction="sum"`` the loss value is the paper's ``L``; :meth:`call` returns
    each image's share of it (its summed losses over the batch's ``N_pos``), so that
    ``reduction=None`` gives per-image terms that add up to ``L``. :meth:`components` gives the
    parts for logging.
    """

    def __init__(
        self,
        neg_pos_ratio: float = 3.0,
        alpha: float = 1.0,
        min_negatives: int = 0,
        delta: float = 1.0,
        name: str = "multibox_loss",
        reduction: str | None = "sum",
        dtype: Any = None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if neg_pos_ratio < 0 or alpha < 0 or min_negatives < 0 or delta <= 0:
            raise ValueError(
                "MultiBoxLoss needs neg_pos_ratio >= 0, alpha >= 0, min_negatives >= 0 and delta > 0, got "
                f"{neg_pos_ratio}, {alpha}, {min_negatives}, {delta}"
            )
        self.neg_pos_ratio = float(neg_pos_ratio)
        self.alpha = float(alpha)
        self.min_negatives = int(min_negatives)
        self.delta = float(delta)

    def per_image(self, y_true: Any, y_pred: Any) -> dict[str, Tensor]:
        """Un-normalised per-image sums: ``cls``, ``loc`` (B,), and ``num_pos``, ``num_neg`` (B,)."""
        cls_t, loc_t, logits, offsets = _unpack(y_true, y_pred)
        positive = ops.greater(cls_t, 0)
        negative = ops.equal(cls_t, 0)
        pos_f = ops.cast(positive, "float32")
        ce = ops.sparse_categorical_crossentropy(ops.maximum(cls_t, 0), logits, from_logits=True)

        num_pos = ops.sum(ops.cast(positive, "int32"), axis=-1)  # (B,)
        num_neg_avail = ops.sum(ops.cast(negative, "int32"), axis=-1)
        wanted = ops.cast(ops.floor(self.neg_pos_ratio * ops.cast(num_pos, "float32")), "int32")
        num_neg = ops.minimum(ops.maximum(wanted, self.min_negatives), num_neg_avail)
        # Rank the negatives by their background loss (positives and ignored boxes go last); the
        # rank of each box is the position of its score in the descending order.
        mining_score = ops.where(negative, ops.stop_gradient(ce), -1.0)
        order = ops.argsort(-mining_score, axis=-1)
        rank = ops.argsort(order, axis=-1)
        hard_neg = ops.logical_and(negative, ops.less(rank, ops.expand_dims(num_neg, -1)))

        conf = ops.sum(ce * (pos_f + ops.cast(hard_neg, "float32")), axis=-1)
        huber = keras.losses.huber(loc_t, offsets, delta=self.delta) * 4.0  # mean -> sum over 4
        loc = ops.sum(huber * pos_f, axis=-1)
        return {"cls": conf, "loc": loc, "num_pos": num_pos, "num_neg": num_neg}

    def _n_pos(self, parts: dict[str, Tensor]) -> Tensor:
        """The batch's positives as a float, at least 1 (the paper's ``N``)."""
        return ops.maximum(ops.cast(ops.sum(parts["num_pos"]), "float32"), 1.0)

    def components(self, y_true: Any, y_pred: Any) -> dict[str, Tensor]:
        """Scalar ``cls``, ``loc`` (already over ``N_pos``), ``total`` and ``num_pos`` for logging."""
        parts = self.per_image(y_true, y_pred)
        n = self._n_pos(parts)
        cls = ops.sum(parts["cls"]) / n
        loc = ops.sum(parts["loc"]) / n
        return {"cls": cls, "loc": loc, "total": cls + self.alpha * loc, "num_pos": ops.sum(parts["num_pos"])}

    def call(self, y_true: Any, y_pred: Any) -> Tensor:
        """Per-image terms ``(L_conf_i + alpha L_loc_i) / N_pos`` (B,); they sum to the loss."""
        parts = self.per_image(y_true, y_pred)
        return (parts["cls"] + self.alpha * parts["loc"]) / self._n_pos(parts)

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments, for Keras serialisation."""
        config = super().get_config()
        config.update(
            neg_pos_ratio=self.neg_pos_ratio,
            alpha=self.alpha,
            min_negatives=self.min_negatives,
            delta=self.delta,
        )
        return config
