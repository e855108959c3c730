"""Evaluation metrics: detection (VOC AP, FROC) and classification (scikit-learn wrappers)."""
