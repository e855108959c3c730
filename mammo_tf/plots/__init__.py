"""Figures: each function returns a matplotlib Figure; saving is mammo_tf.io.save_figure."""
