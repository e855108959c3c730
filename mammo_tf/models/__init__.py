"""Networks: the small classifier, SSD backbones, the SSD detector and the VGG16 linear probe (``probe``).

Importing this package registers the custom layer (:class:`L2Normalization`) so that saved
models load with ``keras.saving.load_model(path, safe_mode=True)``.
"""

from mammo_tf.models.backbones import L2Normalization, build_vgg16_base
from mammo_tf.models.classifier import (
    ClassifierConfig,
    build_classifier,
    build_feature_extractor,
    count_params_pair,
)
from mammo_tf.models.ssd import SSDConfig, build_ssd, load_ssd, ssd_targets_fn

__all__ = [
    "ClassifierConfig",
    "L2Normalization",
    "SSDConfig",
    "build_classifier",
    "build_feature_extractor",
    "build_ssd",
    "build_vgg16_base",
    "count_params_pair",
    "load_ssd",
    "ssd_targets_fn",
]
